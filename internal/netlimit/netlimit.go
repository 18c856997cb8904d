// Package netlimit bounds what a peer can make a listener hold before it has
// proved anything: a cap on open connections (Listener) and the limits of
// every HTTP listener Castellan runs (HTTP). The gRPC listener's HTTP/2
// limits are grpc.Server options, set where the server is built.
package netlimit

import (
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"time"
)

// Listener caps the connections open at once on a net.Listener. A
// connection accepted while the cap is reached is closed at once and counted,
// so that a flood fails fast at the client (which retries) instead of
// waiting in the kernel's accept queue, and the server never holds more than
// the cap, whatever the peers do. A connection counts from its Accept until
// its first Close.
type Listener struct {
	net.Listener
	max     int64
	open    atomic.Int64
	refused atomic.Uint64
}

// NewListener wraps l so that at most maxConns connections are open at once
// (at least 1).
func NewListener(l net.Listener, maxConns int) *Listener {
	return &Listener{Listener: l, max: int64(max(maxConns, 1))}
}

// Accept returns the next connection within the cap, closing those beyond it.
func (l *Listener) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		if l.open.Add(1) > l.max {
			l.open.Add(-1)
			l.refused.Add(1)
			_ = c.Close()
			continue
		}
		return &conn{Conn: c, l: l}, nil
	}
}

// Open returns how many accepted connections are not closed yet.
func (l *Listener) Open() int64 { return l.open.Load() }

// Refused returns how many connections were closed at accept because the cap
// was reached.
func (l *Listener) Refused() uint64 { return l.refused.Load() }

// Max returns the cap.
func (l *Listener) Max() int64 { return l.max }

// conn gives its slot back on its first Close.
type conn struct {
	net.Conn
	l    *Listener
	once sync.Once
}

// Close closes the connection and frees its slot.
func (c *conn) Close() error {
	err := c.Conn.Close()
	c.once.Do(func() { c.l.open.Add(-1) })
	return err
}

// HTTP holds the limits of one HTTP listener (monitoring, SPIFFE bundle
// endpoint): requests there are small GETs, so the bounds are tight. A zero
// field takes its value from DefaultHTTP.
type HTTP struct {
	// MaxConnections caps open connections (Listen).
	MaxConnections int
	// MaxHeaderBytes bounds a request's header block (HTTP/1.1 request line
	// and headers; HTTP/2 decoded header list).
	MaxHeaderBytes int
	// ReadHeaderTimeout bounds the TLS handshake and reading the headers of
	// each request, so a connection that never speaks is closed.
	ReadHeaderTimeout time.Duration
	// IdleTimeout closes a keep-alive connection with no request for this long.
	IdleTimeout time.Duration
}

// DefaultHTTP are the limits of an HTTP listener with nothing configured.
var DefaultHTTP = HTTP{MaxConnections: 64, MaxHeaderBytes: 16 << 10, ReadHeaderTimeout: 10 * time.Second, IdleTimeout: 2 * time.Minute}

func (h HTTP) filled() HTTP {
	if h.MaxConnections <= 0 {
		h.MaxConnections = DefaultHTTP.MaxConnections
	}
	if h.MaxHeaderBytes <= 0 {
		h.MaxHeaderBytes = DefaultHTTP.MaxHeaderBytes
	}
	if h.ReadHeaderTimeout <= 0 {
		h.ReadHeaderTimeout = DefaultHTTP.ReadHeaderTimeout
	}
	if h.IdleTimeout <= 0 {
		h.IdleTimeout = DefaultHTTP.IdleTimeout
	}
	return h
}

// Fixed bounds of the HTTP listeners, beyond the configurable ones: nothing
// they serve takes a request body or half a minute to write.
const (
	httpReadTimeout  = 30 * time.Second
	httpWriteTimeout = 30 * time.Second
	// httpMaxStreams bounds concurrent HTTP/2 streams per connection.
	httpMaxStreams = 16
)

// Server returns an http.Server for handler with these limits.
func (h HTTP) Server(handler http.Handler) *http.Server {
	h = h.filled()
	return &http.Server{
		Handler:           handler,
		ReadHeaderTimeout: h.ReadHeaderTimeout,
		ReadTimeout:       max(httpReadTimeout, h.ReadHeaderTimeout),
		WriteTimeout:      httpWriteTimeout,
		IdleTimeout:       h.IdleTimeout,
		MaxHeaderBytes:    h.MaxHeaderBytes,
		HTTP2:             &http.HTTP2Config{MaxConcurrentStreams: httpMaxStreams},
	}
}

// Listen wraps l in a Listener with MaxConnections.
func (h HTTP) Listen(l net.Listener) *Listener { return NewListener(l, h.filled().MaxConnections) }
