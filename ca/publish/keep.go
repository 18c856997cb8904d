package publish

import (
	"context"
	"log/slog"
	"sync"
	"time"

	"k8s.io/client-go/util/workqueue"
)

// reconcileTimeout bounds the apiserver calls of one reconciliation.
const reconcileTimeout = 10 * time.Second

// keeper is what the publishers share: a queue of object keys, workers that
// reconcile them (retrying failures with back-off), and a loop that queues
// every key whenever the trust bundle changes.
type keeper struct {
	bundle Bundle
	// changed is the bundle's Changed channel, taken before the caches'
	// initial lists queued every key, so no change in between is missed.
	changed   <-chan struct{}
	queue     workqueue.TypedRateLimitingInterface[string]
	workers   int
	all       func() []string
	reconcile func(ctx context.Context, key string) error
	logger    *slog.Logger
	// what names the objects in log messages.
	what string
}

// keep runs k until ctx ends, then shuts the queue down and returns once
// every worker has.
func keep(ctx context.Context, k keeper) {
	var wg sync.WaitGroup
	wg.Go(func() { // every bundle change rewrites every object
		changed := k.changed
		for {
			select {
			case <-ctx.Done():
				return
			case <-changed:
			}
			// Re-armed before listing: a change while we enqueue fires again.
			changed = k.bundle.Changed()
			for _, key := range k.all() {
				k.queue.Add(key)
			}
		}
	})
	for range max(k.workers, 1) {
		wg.Go(func() {
			for k.processNext(ctx) {
			}
		})
	}
	<-ctx.Done()
	k.queue.ShutDown()
	wg.Wait()
}

// processNext handles one queued key; false once the queue shuts down.
func (k *keeper) processNext(ctx context.Context) bool {
	key, shutdown := k.queue.Get()
	if shutdown {
		return false
	}
	defer k.queue.Done(key)
	cctx, cancel := context.WithTimeout(ctx, reconcileTimeout)
	err := k.reconcile(cctx, key)
	cancel()
	if err != nil {
		if ctx.Err() == nil {
			k.logger.Warn(k.what+" not written; retrying", "key", key, "error", err)
		}
		k.queue.AddRateLimited(key)
		return true
	}
	k.queue.Forget(key)
	return true
}
