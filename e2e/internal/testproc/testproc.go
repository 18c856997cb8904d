// Package testproc holds what the end-to-end tests need around the
// processes they start: free loopback ports, a buffer for a process's
// output, and polling until a process answers over HTTP.
package testproc

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"sync"
	"time"
)

// TB is what these helpers and package kubeenv use of a test: every
// TB is one, and a command that runs them (the load generator)
// supplies its own, whose Fatal ends the goroutine that set things up.
type TB interface {
	Helper()
	Logf(format string, args ...any)
	Fatal(args ...any)
	Fatalf(format string, args ...any)
	Skipf(format string, args ...any)
	Cleanup(f func())
	TempDir() string
	Failed() bool
}

// FreeAddr returns a loopback address with a port that was free a moment
// ago; a caller that loses the race to another process should retry.
func FreeAddr(t TB) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("finding a free port: %v", err)
	}
	defer l.Close()
	return l.Addr().String()
}

// FreePort returns a loopback port that was free a moment ago.
func FreePort(t TB) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("finding a free port: %v", err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// SyncBuffer is an io.Writer safe for the concurrent writes of a process's
// stdout and stderr while a test reads it.
type SyncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

// Write appends p to the buffer.
func (b *SyncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

// String returns everything written so far.
func (b *SyncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// Tail returns at most the last n bytes written.
func (b *SyncBuffer) Tail(n int) string {
	s := b.String()
	if len(s) <= n {
		return s
	}
	return "…" + s[len(s)-n:]
}

// ErrExited is returned by WaitOK when the process exited before it was ready.
var ErrExited = errors.New("exited before ready")

// ErrNotReady is returned by WaitOK when timeout passed before the process
// was ready.
var ErrNotReady = errors.New("not ready")

// WaitOK GETs url with client, each probe bounded by probeTimeout, every
// interval until it answers 200 OK. It returns nil then; an error wrapping
// ErrExited once exited is closed, or ErrNotReady once timeout has passed,
// either with the last probe's error.
func WaitOK(client *http.Client, url string, probeTimeout, interval, timeout time.Duration, exited <-chan struct{}) error {
	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	var last error
	for {
		if last = probe(client, url, probeTimeout); last == nil {
			return nil
		}
		select {
		case <-exited:
			return fmt.Errorf("%w: %w", ErrExited, last)
		case <-deadline.C:
			return fmt.Errorf("%w after %v: %w", ErrNotReady, timeout, last)
		case <-time.After(interval):
		}
	}
}

// probe GETs url once and reports anything but 200 OK as an error.
func probe(client *http.Client, url string, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return err
	}
	resp, err := client.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("GET %s: %s", url, resp.Status)
	}
	return nil
}

// ErrPortTaken reports that a process could not bind a port the test
// picked, because another process bound it in between.
var ErrPortTaken = errors.New("port taken between choosing and binding it")

// Retry calls start, which should pick new ports each time, up to attempts
// times while it fails with an error wrapping ErrPortTaken, and returns its
// result; it fails the test, naming what, on any other error or when the
// attempts are used up.
func Retry[T any](t TB, what string, attempts int, start func() (T, error)) T {
	t.Helper()
	for attempt := 1; ; attempt++ {
		v, err := start()
		if err == nil {
			return v
		}
		if attempt < attempts && errors.Is(err, ErrPortTaken) {
			t.Logf("%s attempt %d: %v; retrying on new ports", what, attempt, err)
			continue
		}
		t.Fatalf("%s: %v", what, err)
	}
}
