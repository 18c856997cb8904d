package e2e

import (
	"bufio"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/net/http2/hpack"
	"google.golang.org/grpc/codes"
)

// closeBound turns a connection the server should close but does not into
// a failure; it is far above every timeout these tests configure, and far
// below the two minutes gRPC holds a silent connection by default.
const closeBound = 30 * time.Second

// Bounds on what a flood may add to the server: generous, ten times what
// the defaults let it hold, and far below what an unbounded server takes.
const (
	floodHeapBound       = 64 << 20
	floodGoroutinesBound = 2048 + 512 // maxStreams handlers plus connection goroutines
)

// memory is the server's heap in use, RSS and goroutines from /metrics.
type memory struct{ heap, rss, goroutines float64 }

func serverMemory(t *testing.T, srv *server) memory {
	t.Helper()
	m := srv.metrics(t)
	heap, ok := m["go_memstats_heap_inuse_bytes"]
	if !ok {
		t.Fatal("/metrics has no go_memstats_heap_inuse_bytes")
	}
	return memory{heap: heap, rss: m["process_resident_memory_bytes"], goroutines: m["go_goroutines"]}
}

func (m memory) String() string {
	return fmt.Sprintf("heap in use %.1f MiB, RSS %.1f MiB, %v goroutines", m.heap/(1<<20), m.rss/(1<<20), m.goroutines)
}

// servesAfter checks that a well-behaved client still gets a certificate.
func servesAfter(t *testing.T, srv *server) {
	t.Helper()
	cred := issueCredential(t, srv, workloadID)
	_, client := dialCA(t, srv, caDial{cred: cred})
	if r := sign(t, client, workloadID); r.code != codes.OK {
		t.Errorf("a well-behaved client after the flood: %s, want a certificate", r.code)
	}
}

// TestHeaderFlood is the HPACK bomb: one TLS connection puts a 4 KiB
// binary header into the HPACK dynamic table, then opens streams whose
// header blocks repeat it thousands of times at one byte each and never send
// a request. gRPC decodes every "-bin" value into a fresh buffer, so about
// 100 KiB on the wire would make an unbounded server hold hundreds of MiB;
// with the header-list limit each stream is cut at 16 KiB and refused.
func TestHeaderFlood(t *testing.T) {
	const streams, refs = 30, 3000
	srv := startServer(t, serverConfig{signer: "selfsigned"})
	before := serverMemory(t, srv)

	h := dialH2(t, srv, "127.0.0.2")
	bomb := hpack.HeaderField{Name: "x-flood-bin", Value: base64.StdEncoding.EncodeToString(make([]byte, 3036))} // 4048 characters
	for i := range streams {
		if !h.open(&bomb, refs) {
			t.Logf("the server closed the connection after %d streams", i)
			break
		}
	}
	h.sync()
	during := serverMemory(t, srv)
	t.Logf("%d streams × %d references (about %d KiB on the wire, %d MiB decoded): before %s; during %s; %d streams reset",
		streams, refs, streams*refs/1024, streams*refs*3036>>20, before, during, h.rsts.Load())
	if grown := during.heap - before.heap; grown > floodHeapBound {
		t.Errorf("heap grew by %.0f MiB during the flood, want under %d MiB", grown/(1<<20), floodHeapBound>>20)
	}
	servesAfter(t, srv)
}

// TestStreamFlood opens tens of thousands of calls over a few dozen
// connections and never sends their requests: an unbounded server starts a
// handler for each and keeps it waiting. Per-connection and server-wide
// bounds on open calls keep what the server holds bounded.
func TestStreamFlood(t *testing.T) {
	const conns, perConn = 24, 1000
	srv := startServer(t, serverConfig{signer: "selfsigned"})
	before := serverMemory(t, srv)

	var wg sync.WaitGroup
	flood := make([]*h2Conn, conns)
	for i := range flood {
		flood[i] = dialH2(t, srv, "127.0.0.3")
	}
	for _, h := range flood {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range perConn {
				if !h.open(nil, 0) {
					return
				}
			}
			h.sync()
		}()
	}
	wg.Wait()
	during := serverMemory(t, srv)
	var rsts, early int64
	for _, h := range flood {
		rsts += h.rsts.Load()
		early += h.heads.Load()
	}
	t.Logf("%d calls on %d connections: before %s; during %s; %d refused by stream reset, %d answered at once",
		conns*perConn, conns, before, during, rsts, early)
	if grown := during.heap - before.heap; grown > floodHeapBound {
		t.Errorf("heap grew by %.0f MiB during the flood, want under %d MiB", grown/(1<<20), floodHeapBound>>20)
	}
	if grown := during.goroutines - before.goroutines; grown > floodGoroutinesBound {
		t.Errorf("%v more goroutines during the flood, want at most %d", grown, floodGoroutinesBound)
	}
	for _, h := range flood {
		_ = h.conn.Close()
	}
	servesAfter(t, srv)
}

// TestIdleConnections: a connection that never starts or never finishes its
// TLS handshake is closed after the handshake timeout, one that completed
// its handshake but makes no call after the idle timeout, and a call whose
// request never comes is cancelled after the read timeout.
func TestIdleConnections(t *testing.T) {
	srv := startServer(t, serverConfig{signer: "selfsigned", extraArgs: []string{
		"--handshake-timeout", "1s", "--max-connection-idle", "1s", "--request-read-timeout", "1s"}})

	closedWithin := func(t *testing.T, c net.Conn) {
		t.Helper()
		_ = c.SetReadDeadline(time.Now().Add(closeBound))
		_, err := io.Copy(io.Discard, c)
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			t.Errorf("connection still open after %v", closeBound)
		}
	}
	t.Run("TCP without TLS", func(t *testing.T) {
		for _, addr := range []string{srv.grpcAddr, srv.monAddr} {
			c, err := net.Dial("tcp", addr)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			closedWithin(t, c)
		}
	})
	t.Run("TLS handshake never finished", func(t *testing.T) {
		c, err := net.Dial("tcp", srv.grpcAddr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		if _, err := c.Write([]byte{0x16, 0x03, 0x01, 0x02, 0x00, 0x01}); err != nil { // a ClientHello record, cut short
			t.Fatal(err)
		}
		closedWithin(t, c)
	})
	t.Run("HTTP/2 without calls", func(t *testing.T) {
		h := dialH2(t, srv, "127.0.0.4")
		if err := h.waitClosed(closeBound); err != nil {
			t.Errorf("idle connection: %v after %v", err, closeBound)
		}
		if !h.goaway.Load() {
			t.Error("closed without GOAWAY")
		}
	})
	t.Run("call without request", func(t *testing.T) {
		h := dialH2(t, srv, "127.0.0.5")
		h.open(nil, 0)
		if err := h.waitClosed(closeBound); err != nil {
			t.Fatalf("connection with a stalled call: %v after %v", err, closeBound)
		}
		if h.heads.Load()+h.rsts.Load() == 0 {
			t.Error("the stalled call was never answered")
		}
	})
}

// TestConnectionCap: connections beyond maxConnections (gRPC) and
// httpMaxConnections (monitoring) are closed at accept and counted, a freed
// slot is reused, and the monitoring port refuses an oversized header block.
func TestConnectionCap(t *testing.T) {
	const capacity = 4
	srv := startServer(t, serverConfig{signer: "selfsigned", extraArgs: []string{
		"--max-connections", strconv.Itoa(capacity), "--http-max-connections", strconv.Itoa(capacity)}})
	pool := x509.NewCertPool()
	for _, c := range readCerts(t, filepath.Join(srv.dataDir, "root-cert.pem")) {
		pool.AddCert(c)
	}
	handshake := func() (*tls.Conn, error) {
		d := &net.Dialer{Timeout: rpcTimeout}
		return tls.DialWithDialer(d, "tcp", srv.grpcAddr, &tls.Config{RootCAs: pool, ServerName: caServerName, MinVersion: tls.VersionTLS12, NextProtos: []string{"h2"}})
	}

	t.Run("gRPC", func(t *testing.T) {
		var held []*tls.Conn
		for i := range capacity {
			c, err := handshake()
			if err != nil {
				t.Fatalf("connection %d within the cap: %v", i+1, err)
			}
			defer c.Close()
			held = append(held, c)
		}
		if c, err := handshake(); err == nil {
			_ = c.Close()
			t.Fatalf("connection %d was served with a cap of %d", capacity+1, capacity)
		}
		if v := metricSeries(t, srv, `castellan_connections_refused_total{listener="grpc"}`); v < 1 {
			t.Errorf("refused gRPC connections = %v, want at least 1", v)
		}
		_ = held[0].Close()
		deadline := time.Now().Add(closeBound)
		for metricSeries(t, srv, `castellan_connections_open{listener="grpc"}`) >= capacity {
			if time.Now().After(deadline) {
				t.Fatal("a closed connection still counts")
			}
			time.Sleep(pollInterval)
		}
		c, err := handshake()
		if err != nil {
			t.Fatalf("a connection after one was closed: %v", err)
		}
		_ = c.Close()
	})

	t.Run("monitoring", func(t *testing.T) {
		get := func(header string) (int, error) {
			c, err := net.DialTimeout("tcp", srv.monAddr, rpcTimeout)
			if err != nil {
				return 0, err
			}
			defer c.Close()
			_ = c.SetDeadline(time.Now().Add(rpcTimeout))
			if _, err := fmt.Fprintf(c, "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: %s\r\nConnection: close\r\n\r\n", header); err != nil {
				return 0, err
			}
			resp, err := http.ReadResponse(bufio.NewReader(c), nil)
			if err != nil {
				return 0, err
			}
			_ = resp.Body.Close()
			return resp.StatusCode, nil
		}
		if code, err := get(strings.Repeat("a", 64<<10)); err != nil || code != http.StatusRequestHeaderFieldsTooLarge {
			t.Errorf("64 KiB header: %d %v, want 431", code, err)
		}
		// Every connection is dialled before any request is sent, and kept
		// open: the server accepts them in order, so those beyond the cap
		// (counting one the harness may hold) are closed at accept.
		var held []net.Conn
		for range capacity + 1 {
			c, err := net.DialTimeout("tcp", srv.monAddr, rpcTimeout)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			held = append(held, c)
		}
		refused := 0
		for _, c := range held {
			_ = c.SetDeadline(time.Now().Add(rpcTimeout))
			_, _ = io.WriteString(c, "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
			resp, err := http.ReadResponse(bufio.NewReader(c), nil)
			if err != nil {
				refused++
				continue
			}
			_ = resp.Body.Close()
		}
		if refused == 0 {
			t.Errorf("%d monitoring connections were all held with a cap of %d", capacity+1, capacity)
		}
	})
}

// metricSeries returns the value of one series (name and labels as
// printed) of srv's /metrics, failing if it is absent.
func metricSeries(t *testing.T, srv *server, series string) float64 {
	t.Helper()
	for line := range strings.Lines(string(srv.scrape(t))) {
		if v, ok := strings.CutPrefix(strings.TrimSpace(line), series+" "); ok {
			f, err := strconv.ParseFloat(v, 64)
			if err != nil {
				t.Fatalf("%s: %v", series, err)
			}
			return f
		}
	}
	t.Fatalf("/metrics has no series %s", series)
	return 0
}
