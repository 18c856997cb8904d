package main

import (
	"errors"
	"fmt"
	"io"
	"os"
	"runtime"
	"sync"
)

// harness runs the end-to-end tests' helpers (package kubeenv, written for
// tests) in this command: Fatal records the failure and ends the calling
// goroutine, as testing's does, and Cleanup functions run at close, last
// registered first. Run setup through do, so that a Fatal ends only it.
type harness struct {
	log      io.Writer
	mu       sync.Mutex
	err      error
	cleanups []func()
}

func newHarness(log io.Writer) *harness { return &harness{log: log} }

// Helper does nothing: there is no test log to attribute lines in.
func (h *harness) Helper() {}

// Logf writes a line to the log.
func (h *harness) Logf(format string, args ...any) { fmt.Fprintf(h.log, format+"\n", args...) }

// Fatal records the failure and ends the calling goroutine.
func (h *harness) Fatal(args ...any) { h.fail(fmt.Sprint(args...)) }

// Fatalf records the failure and ends the calling goroutine.
func (h *harness) Fatalf(format string, args ...any) { h.fail(fmt.Sprintf(format, args...)) }

// Skipf is a failure here: a run cannot skip what it was asked to measure.
func (h *harness) Skipf(format string, args ...any) { h.fail(fmt.Sprintf(format, args...)) }

func (h *harness) fail(msg string) {
	h.mu.Lock()
	if h.err == nil {
		h.err = errors.New(msg)
	}
	h.mu.Unlock()
	runtime.Goexit()
}

// Cleanup registers f to run at close.
func (h *harness) Cleanup(f func()) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.cleanups = append(h.cleanups, f)
}

// TempDir returns a new directory, removed at close.
func (h *harness) TempDir() string {
	d, err := os.MkdirTemp("", "loadgen-")
	if err != nil {
		h.Fatal(err)
	}
	h.Cleanup(func() { _ = os.RemoveAll(d) }) // best effort: a temp dir left behind loses nothing
	return d
}

// Failed reports whether a Fatal happened.
func (h *harness) Failed() bool { return h.failure() != nil }

func (h *harness) failure() error {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.err
}

// do runs f on its own goroutine and returns the failure recorded so far.
func (h *harness) do(f func()) error {
	done := make(chan struct{})
	go func() {
		defer close(done)
		f()
	}()
	<-done
	return h.failure()
}

// close runs the cleanups, last registered first.
func (h *harness) close() {
	h.mu.Lock()
	fs := h.cleanups
	h.cleanups = nil
	h.mu.Unlock()
	for i := len(fs) - 1; i >= 0; i-- {
		fs[i]()
	}
}
