package main

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"math/big"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/castellan-ca/castellan/cmd/internal/servetest"
	"github.com/castellan-ca/castellan/storage"
)

// Bounds that turn a hang into a failure; none is a speed assertion.
const (
	startTimeout = 30 * time.Second // castellan serve: exec to "castellan serving"
	stopTimeout  = 10 * time.Second // SIGTERM to exit
	ctlTimeout   = 20 * time.Second // one castellanctl run
	pollInterval = 20 * time.Millisecond
)

// The castellan binary under test: $CASTELLAN_BIN, or ../castellan built once
// per test binary (race-instrumented when the tests are) on first use.
var (
	binOnce sync.Once
	binPath string
	binErr  error
	binDir  string
)

func TestMain(m *testing.M) {
	code := m.Run()
	if binDir != "" {
		if err := os.RemoveAll(binDir); err != nil {
			fmt.Fprintf(os.Stderr, "remove the castellan binary: %v\n", err)
		}
	}
	os.Exit(code)
}

func castellanBinary(t *testing.T) string {
	t.Helper()
	binOnce.Do(func() {
		if p := os.Getenv("CASTELLAN_BIN"); p != "" {
			binPath = p
			return
		}
		binDir, binPath, binErr = buildCastellan()
	})
	if binErr != nil {
		t.Fatal(binErr)
	}
	return binPath
}

// buildCastellan builds the binary into a new directory (returned even on a
// build error, for TestMain to remove). Every test of this binary shares it,
// so it cannot be a t.TempDir, which goes when its test ends.
func buildCastellan() (dir, bin string, err error) {
	dir, err = os.MkdirTemp("", "castellanctl-test-")
	if err != nil {
		return "", "", err
	}
	bin = filepath.Join(dir, "castellan")
	args := []string{"build", "-o", bin}
	if raceEnabled {
		args = append(args, "-race")
	}
	// `go test` puts its own toolchain first in PATH.
	cmd := exec.Command("go", append(args, "github.com/castellan-ca/castellan/cmd/castellan")...)
	if out, err := cmd.CombinedOutput(); err != nil {
		return dir, "", fmt.Errorf("go build castellan: %w\n%s", err, out)
	}
	return dir, bin, nil
}

// server is one `castellan serve` process on loopback ports.
type server struct {
	dataDir string
	monAddr string
	logs    *servetest.SyncBuffer
	cmd     *exec.Cmd
	exited  chan struct{}
	waitErr error
}

// startServer runs castellan serve on dataDir and waits until it is serving.
// It is stopped at the end of the test if still running; its log goes to
// the test output when the test failed.
func startServer(t *testing.T, dataDir string, extra ...string) *server {
	t.Helper()
	args := append([]string{"serve", "--data-dir", dataDir, "--listen", "127.0.0.1:0", "--monitoring-listen", "127.0.0.1:0"}, extra...)
	s := &server{dataDir: dataDir, logs: &servetest.SyncBuffer{}, exited: make(chan struct{})}
	s.cmd = exec.Command(castellanBinary(t), args...)
	s.cmd.Stdout, s.cmd.Stderr = s.logs, s.logs
	if err := s.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { s.waitErr = s.cmd.Wait(); close(s.exited) }()
	t.Cleanup(func() {
		if err := s.stop(); err != nil {
			t.Errorf("castellan serve: %v", err)
		}
		if t.Failed() {
			t.Logf("castellan serve log (%s):\n%s", dataDir, s.logs.String())
		}
	})

	_, s.monAddr = servetest.WaitServing(t, s.logs, dataDir, startTimeout, pollInterval, func(d time.Duration) (bool, error) {
		select {
		case <-s.exited:
			return true, s.waitErr
		case <-time.After(d):
			return false, nil
		}
	})
	return s
}

// stop sends SIGTERM and requires a clean exit (status 0) within stopTimeout.
// Calling it again returns the same result.
func (s *server) stop() error {
	select {
	case <-s.exited:
	default:
		if err := s.cmd.Process.Signal(syscall.SIGTERM); err != nil {
			return fmt.Errorf("SIGTERM: %w", err)
		}
		select {
		case <-s.exited:
		case <-time.After(stopTimeout):
			if err := s.cmd.Process.Kill(); err != nil && !errors.Is(err, os.ErrProcessDone) {
				return fmt.Errorf("no exit within %s of SIGTERM; kill: %w", stopTimeout, err)
			}
			<-s.exited
			return fmt.Errorf("no exit within %s of SIGTERM; killed", stopTimeout)
		}
	}
	if s.waitErr != nil {
		return fmt.Errorf("exit after SIGTERM: %w", s.waitErr)
	}
	return nil
}

// ctl runs castellanctl in-process against dataDir.
func ctl(dataDir string, args ...string) (stdout, stderr string, err error) {
	var out, errb bytes.Buffer
	ctx, cancel := context.WithTimeout(context.Background(), ctlTimeout)
	defer cancel()
	err = run(ctx, append([]string{"--data-dir", dataDir}, args...), &out, &errb)
	return out.String(), errb.String(), err
}

// mustCtl is ctl failing the test on error.
func mustCtl(t *testing.T, dataDir string, args ...string) string {
	t.Helper()
	out, errOut, err := ctl(dataDir, args...)
	if err != nil {
		t.Fatalf("castellanctl %s: %v\n%s", strings.Join(args, " "), err, errOut)
	}
	return out
}

// auditRecords runs `audit list --output json` with extra filters and parses
// the JSON lines.
func auditRecords(t *testing.T, dataDir string, filters ...string) []storage.Record {
	t.Helper()
	out := mustCtl(t, dataDir, append([]string{"audit", "list", "--output", "json"}, filters...)...)
	var recs []storage.Record
	dec := json.NewDecoder(strings.NewReader(out))
	for dec.More() {
		var r storage.Record
		if err := dec.Decode(&r); err != nil {
			t.Fatalf("audit list output is not JSON lines: %v\n%s", err, out)
		}
		recs = append(recs, r)
	}
	if n := strings.Count(out, "\n"); n != len(recs) {
		t.Fatalf("audit list printed %d lines for %d records", n, len(recs))
	}
	return recs
}

func containsCert(set []*x509.Certificate, c *x509.Certificate) bool {
	for _, s := range set {
		if s.Equal(c) {
			return true
		}
	}
	return false
}

// testCA is a CA certificate and its key, for building cacerts directories.
type testCA struct {
	cert *x509.Certificate
	key  crypto.Signer
}

// newCA makes a CA valid from an hour ago for a day, self-signed when parent is nil.
func newCA(t *testing.T, cn string, parent *testCA) *testCA {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{Organization: []string{"castellan test"}, CommonName: cn},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(24 * time.Hour),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	issuer, signer := tmpl, crypto.Signer(key)
	if parent != nil {
		issuer, signer = parent.cert, parent.key
		tmpl.NotAfter = now.Add(12 * time.Hour)
		tmpl.MaxPathLenZero = true
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, issuer, key.Public(), signer)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return &testCA{cert: cert, key: key}
}

func pemCert(certs ...*x509.Certificate) []byte {
	var b []byte
	for _, c := range certs {
		b = append(b, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})...)
	}
	return b
}

// writeCACerts writes Istio's cacerts layout into dir: inter signs, root is
// trusted; key is inter's key unless overridden (to make an invalid set).
func writeCACerts(t *testing.T, dir string, root, inter *testCA, key crypto.Signer) {
	t.Helper()
	if key == nil {
		key = inter.key
	}
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	for name, data := range map[string][]byte{
		"ca-cert.pem":    pemCert(inter.cert),
		"ca-key.pem":     pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}),
		"cert-chain.pem": pemCert(inter.cert, root.cert),
		"root-cert.pem":  pemCert(root.cert),
	} {
		if err := os.WriteFile(filepath.Join(dir, name), data, 0o600); err != nil {
			t.Fatal(err)
		}
	}
}

// swapLink atomically points the symlink link at target (rename over it), the
// way Kubernetes swaps a mounted Secret's ..data.
func swapLink(t *testing.T, link, target string) {
	t.Helper()
	tmp := link + ".tmp"
	if err := os.Remove(tmp); err != nil && !errors.Is(err, fs.ErrNotExist) {
		t.Fatal(err)
	}
	if err := os.Symlink(target, tmp); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, link); err != nil {
		t.Fatal(err)
	}
}

// eventually polls cond until it returns nil or timeout passes.
func eventually(t *testing.T, timeout time.Duration, what string, cond func() error) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		err := cond()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within %s: %v", what, timeout, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}
