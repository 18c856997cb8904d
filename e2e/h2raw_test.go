package e2e

import (
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"io"
	"net"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// h2Conn is a hostile HTTP/2 client: it speaks just enough HTTP/2 over TLS
// to open streams with header blocks of its choosing and never send their
// request, which no real gRPC client lets one do.
type h2Conn struct {
	t    *testing.T
	conn *tls.Conn
	wmu  sync.Mutex // guards fr's writes and enc
	fr   *http2.Framer
	enc  *hpack.Encoder
	hbuf bytes.Buffer
	next uint32 // next stream id

	pings  chan struct{} // a PING was acknowledged
	closed chan struct{} // the server closed the connection
	rsts   atomic.Int64  // RST_STREAM frames received
	heads  atomic.Int64  // HEADERS frames received (early answers)
	goaway atomic.Bool
}

// dialH2 opens a TLS (ALPN h2) connection to srv's gRPC port from localIP and
// sends the HTTP/2 preface and SETTINGS.
func dialH2(t *testing.T, srv *server, localIP string) *h2Conn {
	t.Helper()
	pool := x509.NewCertPool()
	for _, c := range readCerts(t, filepath.Join(srv.dataDir, "root-cert.pem")) {
		pool.AddCert(c)
	}
	d := &net.Dialer{Timeout: rpcTimeout, LocalAddr: &net.TCPAddr{IP: net.ParseIP(localIP)}}
	conn, err := tls.DialWithDialer(d, "tcp", srv.grpcAddr, &tls.Config{RootCAs: pool, ServerName: caServerName,
		NextProtos: []string{"h2"}, MinVersion: tls.VersionTLS12})
	if err != nil {
		t.Fatalf("TLS dial: %v", err)
	}
	h := &h2Conn{t: t, conn: conn, fr: http2.NewFramer(conn, conn), next: 1,
		pings: make(chan struct{}, 1), closed: make(chan struct{})}
	h.enc = hpack.NewEncoder(&h.hbuf)
	t.Cleanup(func() { _ = conn.Close() })
	if _, err := io.WriteString(conn, http2.ClientPreface); err != nil {
		t.Fatal(err)
	}
	if err := h.fr.WriteSettings(); err != nil {
		t.Fatal(err)
	}
	go h.read()
	return h
}

// read consumes what the server sends, acknowledging its SETTINGS.
func (h *h2Conn) read() {
	defer close(h.closed)
	for {
		f, err := h.fr.ReadFrame()
		if err != nil {
			return
		}
		switch f := f.(type) {
		case *http2.SettingsFrame:
			if !f.IsAck() {
				h.wmu.Lock()
				_ = h.fr.WriteSettingsAck()
				h.wmu.Unlock()
			}
		case *http2.PingFrame:
			if f.IsAck() {
				select {
				case h.pings <- struct{}{}:
				default:
				}
			}
		case *http2.RSTStreamFrame:
			h.rsts.Add(1)
		case *http2.HeadersFrame:
			h.heads.Add(1)
		case *http2.GoAwayFrame:
			h.goaway.Store(true)
		}
	}
}

// grpcHeaders are the header fields of a CreateCertificate call, never
// indexed, so that the HPACK dynamic table holds only what a flood puts there.
func grpcHeaders() []hpack.HeaderField {
	return []hpack.HeaderField{
		{Name: ":method", Value: "POST"},
		{Name: ":scheme", Value: "https"},
		{Name: ":path", Value: "/istio.v1.auth.IstioCertificateService/CreateCertificate", Sensitive: true},
		{Name: ":authority", Value: caServerName, Sensitive: true},
		{Name: "content-type", Value: "application/grpc", Sensitive: true},
		{Name: "te", Value: "trailers", Sensitive: true},
	}
}

// open starts a stream with fields and then repeat copies of extra, and
// never ends it. The encoder indexes extra on its first use, so each further
// copy costs one byte on the wire; the block is split into CONTINUATION
// frames of at most 16 KiB. It returns false once the connection is gone.
func (h *h2Conn) open(extra *hpack.HeaderField, repeat int) bool {
	h.wmu.Lock()
	defer h.wmu.Unlock()
	h.hbuf.Reset()
	for _, f := range grpcHeaders() {
		_ = h.enc.WriteField(f)
	}
	for range repeat {
		if extra != nil {
			_ = h.enc.WriteField(*extra)
		}
	}
	block := h.hbuf.Bytes()
	const maxFrame = 16 << 10
	first := block[:min(len(block), maxFrame)]
	block = block[len(first):]
	err := h.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: h.next, BlockFragment: first, EndHeaders: len(block) == 0})
	for err == nil && len(block) > 0 {
		chunk := block[:min(len(block), maxFrame)]
		block = block[len(chunk):]
		err = h.fr.WriteContinuation(h.next, len(block) == 0, chunk)
	}
	h.next += 2
	return err == nil
}

// sync sends a PING and waits for its acknowledgement: the server reads
// frames in order, so every stream opened before has been processed. It
// returns false if the server closed the connection instead.
func (h *h2Conn) sync() bool {
	h.wmu.Lock()
	err := h.fr.WritePing(false, [8]byte{1})
	h.wmu.Unlock()
	if err != nil {
		return false
	}
	select {
	case <-h.pings:
		return true
	case <-h.closed:
		return false
	case <-time.After(rpcTimeout):
		h.t.Fatalf("no PING acknowledgement within %v", rpcTimeout)
		return false
	}
}

// waitClosed waits up to bound for the server to close the connection.
func (h *h2Conn) waitClosed(bound time.Duration) error {
	select {
	case <-h.closed:
		return nil
	case <-time.After(bound):
		return errors.New("still open")
	}
}
