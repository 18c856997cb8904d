package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sync"
	"time"

	"golang.org/x/sync/errgroup"
)

// lifecycle supervises serve's components. Each component starts in order
// (start) and runs its goroutines in one errgroup, which owns every goroutine
// serve starts; a goroutine's error stops the whole server. Shutdown stops the
// components in reverse order of start, each only once the ones started
// after it have stopped: the audit store, started first, closes last, after
// its last writer.
type lifecycle struct {
	g      *errgroup.Group
	failed context.Context // ends when a goroutine of the group returned an error
	base   context.Context // the parent's values without its cancellation
	logger *slog.Logger

	mu         sync.Mutex
	components []*component
}

// component is one started part of the server.
type component struct {
	name   string
	l      *lifecycle
	ctx    context.Context // ends when shutdown reaches the component
	cancel context.CancelFunc
	wg     sync.WaitGroup // the component's goroutines
	stops  []func()
}

func newLifecycle(ctx context.Context, logger *slog.Logger) *lifecycle {
	g, failed := errgroup.WithContext(context.WithoutCancel(ctx))
	return &lifecycle{g: g, failed: failed, base: context.WithoutCancel(ctx), logger: logger}
}

// start registers the next component. Its context ends when shutdown reaches
// it, not when serve's context ends, so that components started later stop
// first.
func (l *lifecycle) start(name string) *component {
	c := &component{name: name, l: l}
	c.ctx, c.cancel = context.WithCancel(l.base)
	l.mu.Lock()
	defer l.mu.Unlock()
	l.components = append(l.components, c)
	return c
}

// Go runs fn as a goroutine of the component, with the component's context.
// An error fails the server: shutdown begins.
func (c *component) Go(fn func(ctx context.Context) error) {
	c.wg.Add(1)
	c.l.g.Go(func() error {
		defer c.wg.Done()
		return fn(c.ctx)
	})
}

// onStop adds what makes the component stop beyond its context's end (a
// server's graceful stop, a store's close); at shutdown they run in reverse
// order of registration, after the context ended and before the component's
// goroutines are waited for.
func (c *component) onStop(fn func()) { c.stops = append(c.stops, fn) }

func (c *component) stop() {
	c.cancel()
	for _, fn := range slices.Backward(c.stops) {
		fn()
	}
	c.wg.Wait()
}

// wait blocks until ctx ends or a goroutine fails, then shuts down and
// returns the first goroutine error (nil after a plain stop). A shutdown
// still under way after grace is abandoned with errGraceExceeded, so that the
// process exits within its grace period whatever hangs: nothing is lost by
// it, since a certificate is only returned once its record is committed.
func (l *lifecycle) wait(ctx context.Context, grace time.Duration) error {
	select {
	case <-ctx.Done():
	case <-l.failed.Done():
	}
	l.logger.Info("shutting down", "grace_period", grace)
	done := make(chan error, 1)
	go func() { done <- l.shutdown() }()
	t := time.NewTimer(grace)
	defer t.Stop()
	select {
	case err := <-done:
		return err
	case <-t.C:
		l.logger.Error("shutdown did not finish within the grace period; exiting", "grace_period", grace)
		return fmt.Errorf("%w (%s)", errGraceExceeded, grace)
	}
}

// errGraceExceeded: shutdown took longer than the grace period.
var errGraceExceeded = errors.New("shutdown exceeded the grace period")

// shutdown stops every started component, the last started first, and
// returns the first goroutine error. It is idempotent: serve defers it to
// stop what a failed start left running.
func (l *lifecycle) shutdown() error {
	l.mu.Lock()
	components := l.components
	l.components = nil
	l.mu.Unlock()
	for _, c := range slices.Backward(components) {
		c.stop()
		l.logger.Debug("component stopped", "component", c.name)
	}
	return l.g.Wait()
}
