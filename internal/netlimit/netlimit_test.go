package netlimit

import (
	"bufio"
	"errors"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"
)

// waitBound turns a hang into a failure; it is not a speed assertion.
const waitBound = 10 * time.Second

// serveEcho accepts from l and echoes each connection until it closes.
func serveEcho(t *testing.T, l net.Listener) {
	t.Helper()
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				_, _ = io.Copy(c, c)
			}()
		}
	}()
	t.Cleanup(func() { _ = l.Close() })
}

func dial(t *testing.T, addr string) net.Conn {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, waitBound)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	return c
}

// echoes reports whether c answers a byte within waitBound, and false when
// the server closed it.
func echoes(t *testing.T, c net.Conn) bool {
	t.Helper()
	if err := c.SetDeadline(time.Now().Add(waitBound)); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Write([]byte{'x'}); err != nil {
		return false
	}
	var b [1]byte
	_, err := c.Read(b[:])
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		t.Fatalf("no answer and no close within %v", waitBound)
	}
	return err == nil
}

// TestListenerCap: connections beyond the cap are closed at once and
// counted; closing one frees its slot for the next.
func TestListenerCap(t *testing.T) {
	inner, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	l := NewListener(inner, 3)
	serveEcho(t, l)
	addr := inner.Addr().String()

	var held []net.Conn
	for range 3 {
		c := dial(t, addr)
		if !echoes(t, c) {
			t.Fatal("a connection within the cap was closed")
		}
		held = append(held, c)
	}
	for i := range 2 {
		if echoes(t, dial(t, addr)) {
			t.Fatalf("connection %d beyond the cap was served", i+1)
		}
	}
	if l.Open() != 3 || l.Refused() != 2 {
		t.Errorf("open %d, refused %d; want 3 and 2", l.Open(), l.Refused())
	}

	_ = held[0].Close()
	waitOpen(t, l, 2)
	if !echoes(t, dial(t, addr)) {
		t.Error("a connection after a slot was freed was refused")
	}
	if l.Refused() != 2 {
		t.Errorf("refused = %d, want still 2", l.Refused())
	}
}

// TestHTTPLimits: an oversized header block is refused with 431, a
// connection that never sends a request is closed after the read-header
// timeout, and the cap applies.
func TestHTTPLimits(t *testing.T) {
	limits := HTTP{MaxConnections: 2, MaxHeaderBytes: 1 << 10, ReadHeaderTimeout: 200 * time.Millisecond, IdleTimeout: time.Second}
	inner, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	lis := limits.Listen(inner)
	srv := limits.Server(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { _, _ = io.WriteString(w, "ok") }))
	go func() { _ = srv.Serve(lis) }()
	t.Cleanup(func() { _ = srv.Close() })
	addr := inner.Addr().String()

	t.Run("header too large", func(t *testing.T) {
		c := dial(t, addr)
		// net/http allows MaxHeaderBytes plus a 4 KiB read buffer of slack.
		req := "GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + strings.Repeat("a", 8<<10) + "\r\n\r\n"
		if _, err := io.WriteString(c, req); err != nil {
			t.Fatal(err)
		}
		_ = c.SetReadDeadline(time.Now().Add(waitBound))
		resp, err := http.ReadResponse(bufio.NewReader(c), nil)
		if err != nil {
			t.Fatal(err)
		}
		_ = resp.Body.Close()
		if resp.StatusCode != http.StatusRequestHeaderFieldsTooLarge {
			t.Errorf("status %d, want 431", resp.StatusCode)
		}
		_ = c.Close()
	})

	t.Run("silent connection closed", func(t *testing.T) {
		c := dial(t, addr)
		_ = c.SetReadDeadline(time.Now().Add(waitBound))
		var b [1]byte
		_, err := c.Read(b[:])
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			t.Fatalf("a connection that sent nothing was still open after %v", waitBound)
		}
		if !errors.Is(err, io.EOF) {
			t.Logf("read: %v", err) // a reset is a close too
		}
	})

	t.Run("connection cap", func(t *testing.T) {
		waitOpen(t, lis, 0) // the connections of the cases above
		before := lis.Refused()
		a, b := dial(t, addr), dial(t, addr)
		for _, c := range []net.Conn{a, b} {
			if _, err := io.WriteString(c, "GET / HTTP/1.1\r\nHost: x\r\n\r\n"); err != nil {
				t.Fatal(err)
			}
			_ = c.SetReadDeadline(time.Now().Add(waitBound))
			resp, err := http.ReadResponse(bufio.NewReader(c), nil)
			if err != nil {
				t.Fatalf("a connection within the cap: %v", err)
			}
			_ = resp.Body.Close()
		}
		third := dial(t, addr)
		_ = third.SetReadDeadline(time.Now().Add(waitBound))
		_, _ = io.WriteString(third, "GET / HTTP/1.1\r\nHost: x\r\n\r\n")
		if resp, err := http.ReadResponse(bufio.NewReader(third), nil); err == nil {
			_ = resp.Body.Close()
			t.Error("a third connection was served with a cap of 2")
		}
		if got := lis.Refused() - before; got != 1 {
			t.Errorf("refused %d connections, want 1", got)
		}
	})
}

// waitOpen waits until l counts want open connections.
func waitOpen(t *testing.T, l *Listener, want int64) {
	t.Helper()
	deadline := time.Now().Add(waitBound)
	for l.Open() != want {
		if time.Now().After(deadline) {
			t.Fatalf("open = %d, want %d", l.Open(), want)
		}
		time.Sleep(10 * time.Millisecond)
	}
}
