package kubesign

import (
	"context"
	"fmt"
	"log/slog"
	"slices"
	"sync"
	"testing"
	"time"
)

// TestControllerStopsAtLeadershipEnd: when leadership ends, the request
// being answered is finished (its context lives on, within finishTimeout)
// and none of those still queued is started: the next leader answers them.
func TestControllerStopsAtLeadershipEnd(t *testing.T) {
	c := newController("test", 1, slog.New(slog.DiscardHandler))
	for i := range 100 {
		c.queue.Add(fmt.Sprintf("ns/req-%d", i))
	}
	ctx, endTerm := context.WithCancel(t.Context())
	var (
		mu      sync.Mutex
		handled []string
		ctxErr  error
	)
	c.handle = func(hctx context.Context, key string) bool {
		mu.Lock()
		handled = append(handled, key)
		mu.Unlock()
		if key == "ns/req-0" {
			endTerm() // leadership ends while this one is being answered
			time.Sleep(50 * time.Millisecond)
			ctxErr = hctx.Err()
		}
		return false
	}
	stopped := make(chan struct{})
	c.stopped = func() { close(stopped) }
	c.run(ctx)
	select {
	case <-stopped:
	default:
		t.Error("run returned without calling stopped")
	}
	if !slices.Equal(handled, []string{"ns/req-0"}) {
		t.Errorf("handled %v after leadership ended, want only the request in progress [ns/req-0]", handled)
	}
	if ctxErr != nil {
		t.Errorf("the request in progress lost its context when leadership ended: %v", ctxErr)
	}
}
