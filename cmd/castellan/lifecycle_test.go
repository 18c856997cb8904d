package main

import (
	"context"
	"errors"
	"log/slog"
	"slices"
	"sync"
	"testing"
	"time"
)

// events records what the components did, in order.
type events struct {
	mu  sync.Mutex
	log []string
}

func (e *events) add(s string) { e.mu.Lock(); e.log = append(e.log, s); e.mu.Unlock() }

func (e *events) list() []string { e.mu.Lock(); defer e.mu.Unlock(); return slices.Clone(e.log) }

// TestLifecycleShutdownOrder: shutdown stops the components in reverse order
// of start, waits for every goroutine of one before stopping the next, and so
// closes the store, started first, only after its last writer has stopped.
func TestLifecycleShutdownOrder(t *testing.T) {
	var ev events
	l := newLifecycle(context.Background(), slog.New(slog.DiscardHandler))
	storeClosed := make(chan struct{})
	l.start("store").onStop(func() { ev.add("store closed"); close(storeClosed) })

	writer := l.start("writer")
	stopping, release := make(chan struct{}), make(chan struct{})
	writer.Go(func(ctx context.Context) error {
		<-ctx.Done()
		close(stopping)
		<-release // still writing its last record
		ev.add("writer done")
		return nil
	})
	server := l.start("server")
	serving := make(chan struct{})
	server.Go(func(ctx context.Context) error {
		<-serving // a server whose Serve returns once stopped
		ev.add("server returned")
		return nil
	})
	server.onStop(func() { ev.add("server stopped"); close(serving) })

	ctx, stop := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- l.wait(ctx, time.Minute) }()
	stop()
	<-stopping
	select {
	case <-storeClosed:
		t.Fatal("the store closed while a writer was still running")
	default:
	}
	close(release)
	if err := <-done; err != nil {
		t.Fatalf("wait = %v, want nil after a plain stop", err)
	}
	want := []string{"server stopped", "server returned", "writer done", "store closed"}
	if got := ev.list(); !slices.Equal(got, want) {
		t.Errorf("shutdown order %q, want %q", got, want)
	}
	if err := l.shutdown(); err != nil || len(ev.list()) != len(want) {
		t.Errorf("a second shutdown: %v, events %q; want nothing more", err, ev.list())
	}
}

// TestLifecycleFailure: a goroutine's error shuts the server down, every
// component included, and is what serve returns.
func TestLifecycleFailure(t *testing.T) {
	var ev events
	l := newLifecycle(context.Background(), slog.New(slog.DiscardHandler))
	l.start("store").onStop(func() { ev.add("store closed") })
	l.start("loop").Go(func(ctx context.Context) error {
		<-ctx.Done()
		ev.add("loop done")
		return nil
	})
	boom := errors.New("listener failed")
	l.start("server").Go(func(context.Context) error { return boom })

	if err := l.wait(context.Background(), time.Minute); !errors.Is(err, boom) {
		t.Fatalf("wait = %v, want %v", err, boom)
	}
	if got, want := ev.list(), []string{"loop done", "store closed"}; !slices.Equal(got, want) {
		t.Errorf("shutdown after a failure %q, want %q", got, want)
	}
}

// TestLifecycleGrace: a shutdown that hangs is abandoned after the grace
// period, so that the process exits within it.
func TestLifecycleGrace(t *testing.T) {
	l := newLifecycle(context.Background(), slog.New(slog.DiscardHandler))
	hang := make(chan struct{})
	defer close(hang)
	l.start("stuck").onStop(func() { <-hang })
	ctx, stop := context.WithCancel(context.Background())
	stop()
	done := make(chan error, 1)
	go func() { done <- l.wait(ctx, 100*time.Millisecond) }()
	select {
	case err := <-done:
		if !errors.Is(err, errGraceExceeded) {
			t.Errorf("wait = %v, want errGraceExceeded", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("wait did not give up on a hanging shutdown")
	}
}

// TestServeComponentOrder: serve starts the audit store first, so that it
// closes last, the listeners and then the health feed last, so that the
// drain begins with NOT_SERVING and the listeners stop next; after
// shutdown the store is closed.
func TestServeComponentOrder(t *testing.T) {
	cfg, err := loadConfig([]string{"--data-dir", t.TempDir(), "--listen", "127.0.0.1:0", "--monitoring-listen", "127.0.0.1:0"})
	if err != nil {
		t.Fatal(err)
	}
	s := newServer(t.Context(), cfg, slog.New(slog.DiscardHandler))
	if err := s.start(t.Context()); err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, c := range s.lc.components {
		names = append(names, c.name)
	}
	want := []string{"audit store", "signer", "authentication", "issuer", "trust bundle file", "admission", "grpc", "monitoring", "health"}
	if !slices.Equal(names, want) {
		t.Errorf("components started %q, want %q", names, want)
	}
	if err := s.lc.shutdown(); err != nil {
		t.Fatalf("shutdown: %v", err)
	}
	if err := s.store.Ping(context.Background()); err == nil {
		t.Error("the audit store still answers after shutdown")
	}
}
