package ca

import (
	"testing"
	"time"
)

// TestCompletionsWindow: the count covers the last second, slot by slot,
// and a slot reused after the window forgets its old count.
func TestCompletionsWindow(t *testing.T) {
	var c completions
	t0 := time.Unix(1000, 0)
	for range 5 {
		c.add(t0)
	}
	for range 3 {
		c.add(t0.Add(450 * time.Millisecond))
	}
	for _, tc := range []struct {
		at   time.Duration
		want int64
	}{
		{0, 5},
		{450 * time.Millisecond, 8},
		{999 * time.Millisecond, 8},  // t0's slot is the oldest of the window
		{1000 * time.Millisecond, 3}, // t0's slot has left it
		{1450 * time.Millisecond, 0}, // and so has the second one
		{10 * time.Second, 0},        // long idle
		{-5 * time.Second, 0},        // a clock that went back sees no future slots
	} {
		if got := c.lastSecond(t0.Add(tc.at)); got != tc.want {
			t.Errorf("lastSecond(t0%+v) = %d, want %d", tc.at, got, tc.want)
		}
	}
	c.add(t0.Add(time.Second)) // reuses t0's slot
	if got := c.lastSecond(t0.Add(time.Second)); got != 4 {
		t.Errorf("after reusing the slot: %d, want 4 (3 + 1, not t0's 5)", got)
	}
}
