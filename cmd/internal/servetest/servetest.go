// Package servetest holds what the tests of castellan and castellanctl share
// around a `castellan serve` they run: a buffer for its log and waiting until
// it logs that it is serving.
package servetest

import (
	"bytes"
	"crypto/x509"
	"os"
	"regexp"
	"sync"
	"testing"
	"time"

	"github.com/castellan-ca/castellan/cmd/internal/datadir"
	"github.com/castellan-ca/castellan/signer"
)

// SyncBuffer is an io.Writer safe for the server's log writes and the test's
// reads to share.
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

var servingLine = regexp.MustCompile(`msg="castellan serving" listen=(\S+) monitoring=(\S+)`)

// WaitServing polls logs every interval until serve logs that it is serving,
// checks that dataDir's server.json names the gRPC address it logged, and
// returns the gRPC and monitoring addresses. wait(d) waits up to d for serve
// to end, reporting whether it did and with what error. The test fails when
// serve ends first or timeout passes.
func WaitServing(t testing.TB, logs *SyncBuffer, dataDir string, timeout, interval time.Duration,
	wait func(d time.Duration) (exited bool, err error)) (addr, monAddr string) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		if m := servingLine.FindStringSubmatch(logs.String()); m != nil {
			info, err := datadir.ReadServer(dataDir)
			if err != nil {
				t.Fatalf("server is serving but server.json is unreadable: %v", err)
			}
			if info.Address != m[1] {
				t.Fatalf("server.json address %q, log says listen=%s", info.Address, m[1])
			}
			return info.Address, m[2]
		}
		if exited, err := wait(interval); exited {
			t.Fatalf("castellan serve ended before serving: %v\n%s", err, logs.String())
		}
		if time.Now().After(deadline) {
			t.Fatalf("castellan serve not serving after %s:\n%s", timeout, logs.String())
		}
	}
}

// ReadFile returns the content of path, failing the test on error.
func ReadFile(t testing.TB, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// ParseCerts parses the PEM certificates in b, failing the test on error.
func ParseCerts(t testing.TB, b []byte) []*x509.Certificate {
	t.Helper()
	certs, err := signer.ParseCertificatesPEM(b)
	if err != nil {
		t.Fatalf("parse certificates: %v", err)
	}
	return certs
}
