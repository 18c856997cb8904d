package kube

import (
	"testing"
	"time"
)

func TestTokenCacheExpiry(t *testing.T) {
	now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	info := &TokenInfo{Namespace: "ns", ServiceAccount: "sa"}
	for _, tc := range []struct {
		name     string
		tokenExp time.Time
		maxTTL   time.Duration
		at       time.Duration // lookup time after now
		hit      bool
	}{
		{"before token expiry", now.Add(time.Hour), 2 * time.Hour, 59 * time.Minute, true},
		{"at token expiry", now.Add(time.Hour), 2 * time.Hour, time.Hour, false},
		{"max TTL shorter than the token", now.Add(time.Hour), 5 * time.Minute, 4 * time.Minute, true},
		{"past max TTL", now.Add(time.Hour), 5 * time.Minute, 5 * time.Minute, false},
		{"already expired token is not cached", now.Add(-time.Second), time.Hour, 0, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := newTokenCache(10, tc.maxTTL)
			k := keyOf("token")
			c.put(k, info, tc.tokenExp, now)
			got, ok := c.get(k, now.Add(tc.at))
			if ok != tc.hit || (ok && got != info) {
				t.Errorf("get = %v, %v; want hit=%v", got, ok, tc.hit)
			}
			if !tc.hit && c.len() != 0 {
				t.Errorf("a missed entry stays cached (%d entries)", c.len())
			}
		})
	}
}

func TestTokenCacheKeying(t *testing.T) {
	now := time.Now()
	c := newTokenCache(10, time.Hour)
	a, b := &TokenInfo{ServiceAccount: "a"}, &TokenInfo{ServiceAccount: "b"}
	c.put(keyOf("token-a"), a, now.Add(time.Hour), now)
	c.put(keyOf("token-b"), b, now.Add(time.Hour), now)
	if got, _ := c.get(keyOf("token-a"), now); got != a {
		t.Errorf("token-a → %v", got)
	}
	if got, _ := c.get(keyOf("token-b"), now); got != b {
		t.Errorf("token-b → %v", got)
	}
	if _, ok := c.get(keyOf("token-c"), now); ok {
		t.Error("an unknown token hits")
	}
	c.remove(keyOf("token-a"))
	if _, ok := c.get(keyOf("token-a"), now); ok {
		t.Error("a removed token hits")
	}
}

func TestTokenCacheBounded(t *testing.T) {
	now := time.Now()
	c := newTokenCache(3, time.Hour)
	for _, tok := range []string{"t1", "t2", "t3"} {
		c.put(keyOf(tok), &TokenInfo{}, now.Add(time.Hour), now)
	}
	c.get(keyOf("t1"), now) // t1 is now the most recently used
	c.put(keyOf("t4"), &TokenInfo{}, now.Add(time.Hour), now)
	if c.len() != 3 {
		t.Fatalf("len = %d, want the bound 3", c.len())
	}
	for tok, want := range map[string]bool{"t1": true, "t2": false, "t3": true, "t4": true} {
		if _, ok := c.get(keyOf(tok), now); ok != want {
			t.Errorf("%s cached = %v, want %v (least recently used evicted)", tok, ok, want)
		}
	}
}
