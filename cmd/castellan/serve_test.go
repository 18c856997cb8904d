package main

import (
	"bufio"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"io"
	"io/fs"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/castellan-ca/castellan/cmd/internal/datadir"
	"github.com/castellan-ca/castellan/cmd/internal/servetest"
	adminpb "github.com/castellan-ca/castellan/proto/castellan/admin/v1"
	authpb "github.com/castellan-ca/castellan/proto/istio/v1/auth"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
)

// Bounds that turn a hang into a failure; none is a speed assertion.
const (
	startTimeout = 20 * time.Second // serve: start to "castellan serving"
	stopTimeout  = 10 * time.Second // ctx cancel to serve returning
	callTimeout  = 10 * time.Second // one RPC or HTTP request
)

// testServer is one in-process `castellan serve`.
type testServer struct {
	dataDir string
	addr    string // gRPC listener, from server.json
	monAddr string // monitoring listener, from the startup log line
	logs    *servetest.SyncBuffer
	cancel  context.CancelFunc
	done    chan error // receives serve's result once
	result  error
	stopped bool
}

// startServe runs serve in a goroutine with loopback ports and dataDir, and
// waits until it logs that it is serving. Cleanup stops it and requires a nil
// return; the server log is attached to the test output when the test failed.
func startServe(t *testing.T, dataDir string, extra ...string) *testServer {
	t.Helper()
	return startServeWith(t, dataDir, faultHooks{}, extra...)
}

// startServeWith is startServe with fault hooks.
func startServeWith(t *testing.T, dataDir string, hooks faultHooks, extra ...string) *testServer {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	s := &testServer{dataDir: dataDir, logs: &servetest.SyncBuffer{}, cancel: cancel, done: make(chan error, 1)}
	args := append([]string{"--data-dir", dataDir, "--listen", "127.0.0.1:0", "--monitoring-listen", "127.0.0.1:0"}, extra...)
	go func() { s.done <- serveWith(ctx, args, s.logs, hooks) }()
	t.Cleanup(func() {
		if !s.stopped {
			if err := s.stop(); err != nil {
				t.Errorf("serve returned %v after cancel, want nil", err)
			}
		}
		if t.Failed() {
			t.Logf("server log (%s):\n%s", dataDir, s.logs.String())
		}
	})

	s.addr, s.monAddr = servetest.WaitServing(t, s.logs, dataDir, startTimeout, 20*time.Millisecond, func(d time.Duration) (bool, error) {
		select {
		case err := <-s.done:
			s.stopped, s.result = true, err
			return true, err
		case <-time.After(d):
			return false, nil
		}
	})
	return s
}

// stop cancels serve's ctx and returns its result, failing after stopTimeout.
func (s *testServer) stop() error {
	if s.stopped {
		return s.result
	}
	s.cancel()
	select {
	case err := <-s.done:
		s.stopped, s.result = true, err
		return err
	case <-time.After(stopTimeout):
		return errors.New("serve did not return within " + stopTimeout.String())
	}
}

func (s *testServer) rootPool(t *testing.T) *x509.CertPool {
	t.Helper()
	pool := x509.NewCertPool()
	for _, c := range servetest.ParseCerts(t, servetest.ReadFile(t, filepath.Join(s.dataDir, datadir.RootCert))) {
		pool.AddCert(c)
	}
	return pool
}

// conn dials the gRPC listener over TLS, trusting the published bundle and
// verifying the serving name clients use; operator adds the castellanctl
// credential as client certificate.
func (s *testServer) conn(t *testing.T, operator bool) *grpc.ClientConn {
	t.Helper()
	cfg := &tls.Config{MinVersion: tls.VersionTLS12, RootCAs: s.rootPool(t), ServerName: "istiod.istio-system.svc"}
	if operator {
		dir := filepath.Join(s.dataDir, datadir.OperatorDir)
		pair, err := tls.LoadX509KeyPair(filepath.Join(dir, datadir.OperatorCert), filepath.Join(dir, datadir.OperatorKey))
		if err != nil {
			t.Fatal(err)
		}
		cfg.Certificates = []tls.Certificate{pair}
	}
	cc, err := grpc.NewClient(s.addr, grpc.WithTransportCredentials(credentials.NewTLS(cfg)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := cc.Close(); err != nil {
			t.Errorf("close: %v", err)
		}
	})
	return cc
}

func csrPEM(t *testing.T) string {
	t.Helper()
	p, _, _ := newCSR(t)
	return p
}

// newCSR makes a P-256 key and a CSR without names (the grant supplies
// them), as PEM and DER.
func newCSR(t *testing.T) (csrPEM string, der []byte, key *ecdsa.PrivateKey) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	der, err = x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, key)
	if err != nil {
		t.Fatal(err)
	}
	return string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der})), der, key
}

func httpGet(t *testing.T, url string) (int, string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), callTimeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	return resp.StatusCode, string(b)
}

// metricValues returns the samples of the Prometheus text exposition whose
// series (name plus labels, as printed) starts with name, keyed by series.
func metricValues(t *testing.T, exposition, name string) map[string]float64 {
	t.Helper()
	out := map[string]float64{}
	sc := bufio.NewScanner(strings.NewReader(exposition))
	for sc.Scan() {
		line := sc.Text()
		if strings.HasPrefix(line, "#") || !strings.HasPrefix(line, name) {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		series := line[:i]
		if series != name && !strings.HasPrefix(series, name+"{") {
			continue // a longer name with this prefix
		}
		v, err := strconv.ParseFloat(line[i+1:], 64)
		if err != nil {
			t.Fatalf("metric line %q: %v", line, err)
		}
		out[series] = v
	}
	return out
}

func TestServeFirstStart(t *testing.T) {
	data := filepath.Join(t.TempDir(), "data")
	s := startServe(t, data)

	// Files and modes: secrets 0600 in 0700 directories.
	for _, f := range []struct {
		path string
		mode fs.FileMode
	}{
		{data, fs.ModeDir | 0o700},
		{filepath.Join(data, datadir.SelfSignedDir), fs.ModeDir | 0o700},
		{filepath.Join(data, datadir.SelfSignedDir, datadir.CAState), 0o600},
		{filepath.Join(data, datadir.OperatorDir), fs.ModeDir | 0o700},
		{filepath.Join(data, datadir.OperatorDir, datadir.OperatorKey), 0o600},
		{filepath.Join(data, datadir.AuditDB), 0o600},
	} {
		fi, err := os.Stat(f.path)
		if err != nil {
			t.Errorf("%v", err)
			continue
		}
		if fi.Mode() != f.mode {
			t.Errorf("%s: mode %s, want %s", f.path, fi.Mode(), f.mode)
		}
	}

	// root-cert.pem is published before the server reports serving, and holds
	// exactly the generated root.
	root := servetest.ParseCerts(t, servetest.ReadFile(t, filepath.Join(data, datadir.SelfSignedDir, "ca-cert.pem")))
	bundle := servetest.ParseCerts(t, servetest.ReadFile(t, filepath.Join(data, datadir.RootCert)))
	if len(root) != 1 || len(bundle) != 1 || !bundle[0].Equal(root[0]) {
		t.Fatalf("root-cert.pem holds %d certificates, want exactly the root of ca/ca-cert.pem", len(bundle))
	}
	if !root[0].IsCA || root[0].CheckSignatureFrom(root[0]) != nil {
		t.Errorf("root is not a self-signed CA")
	}
	// The operator credential is a client certificate for the operator ID under that root.
	opChain := servetest.ParseCerts(t, servetest.ReadFile(t, filepath.Join(data, datadir.OperatorDir, datadir.OperatorCert)))
	if len(opChain[0].URIs) != 1 || opChain[0].URIs[0].String() != "spiffe://cluster.local/castellan/operator" {
		t.Errorf("operator credential URIs = %v", opChain[0].URIs)
	}
	if _, err := opChain[0].Verify(x509.VerifyOptions{Roots: s.rootPool(t), KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err != nil {
		t.Errorf("operator credential does not verify for client auth: %v", err)
	}

	for _, path := range []string{"/healthz", "/readyz"} {
		if code, body := httpGet(t, "http://"+s.monAddr+path); code != http.StatusOK {
			t.Errorf("GET %s = %d %q, want 200", path, code, body)
		}
	}

	// Drive every citadel_* counter: a refusal for lack of credentials, one
	// signing error (TTL too long) and one issuance.
	ctx, cancel := context.WithTimeout(context.Background(), callTimeout)
	defer cancel()
	_, err := authpb.NewIstioCertificateServiceClient(s.conn(t, false)).CreateCertificate(ctx,
		&authpb.IstioCertificateRequest{Csr: csrPEM(t), ValidityDuration: 3600})
	if status.Code(err) != codes.Unauthenticated {
		t.Errorf("CreateCertificate without credentials: %v, want Unauthenticated", err)
	}
	admin := adminpb.NewAdminServiceClient(s.conn(t, true))
	_, err = admin.IssueCertificate(ctx, &adminpb.IssueCertificateRequest{Csr: csrPEM(t), Identity: "spiffe://cluster.local/ns/a/sa/b",
		ValiditySeconds: int64(91 * 24 * time.Hour / time.Second)})
	if status.Code(err) != codes.InvalidArgument {
		t.Errorf("IssueCertificate 91 days: %v, want InvalidArgument", err)
	}
	// castellanctl refuses a missing identity itself; the server must too.
	_, err = admin.IssueCertificate(ctx, &adminpb.IssueCertificateRequest{Csr: csrPEM(t), ValiditySeconds: 3600})
	if status.Code(err) != codes.InvalidArgument {
		t.Errorf("IssueCertificate without identity: %v, want InvalidArgument", err)
	}
	if _, err := admin.IssueCertificate(ctx, &adminpb.IssueCertificateRequest{Csr: csrPEM(t), Identity: "spiffe://cluster.local/ns/a/sa/b",
		ValiditySeconds: 3600}); err != nil {
		t.Fatalf("IssueCertificate: %v", err)
	}

	code, metrics := httpGet(t, "http://"+s.monAddr+"/metrics")
	if code != http.StatusOK {
		t.Fatalf("GET /metrics = %d", code)
	}
	rootExpiry := float64(root[0].NotAfter.Unix())
	for _, m := range []struct {
		series string
		check  func(v float64) bool
		want   string
	}{
		{"citadel_server_csr_count", func(v float64) bool { return v == 4 }, "4"},
		{"citadel_server_authentication_failure_count", func(v float64) bool { return v == 1 }, "1"},
		{`citadel_server_csr_sign_err_count{error="ttl.too_long"}`, func(v float64) bool { return v == 1 }, "1"},
		{`citadel_server_csr_sign_err_count{error="authz.bad_identity"}`, func(v float64) bool { return v == 1 }, "1"},
		{"citadel_server_success_cert_issuance_count", func(v float64) bool { return v == 1 }, "1"},
		{"citadel_server_root_cert_expiry_timestamp", func(v float64) bool { return v == rootExpiry }, "the root's NotAfter"},
		// Self-signed: the leaves' issuer is the root itself.
		{"citadel_server_cert_chain_expiry_timestamp", func(v float64) bool { return v == rootExpiry }, "the root's NotAfter"},
	} {
		name, _, _ := strings.Cut(m.series, "{")
		v, ok := metricValues(t, metrics, name)[m.series]
		if !ok {
			t.Errorf("/metrics lacks %s", m.series)
			continue
		}
		if !m.check(v) {
			t.Errorf("%s = %v, want %s", m.series, v, m.want)
		}
	}
}

// TestServeTLS checks what Istio's clients need from the listener: TLS only,
// the serving name verified against the published bundle, TLS 1.2-only
// (pilot-agent FIPS) and TLS 1.3-only (ztunnel, post-quantum key exchange)
// clients, ALPN h2.
func TestServeTLS(t *testing.T) {
	s := startServe(t, filepath.Join(t.TempDir(), "data"))
	roots := s.rootPool(t)

	t.Run("plaintext gRPC is refused", func(t *testing.T) {
		cc, err := grpc.NewClient(s.addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
		if err != nil {
			t.Fatal(err)
		}
		defer cc.Close()
		ctx, cancel := context.WithTimeout(context.Background(), callTimeout)
		defer cancel()
		_, err = authpb.NewIstioCertificateServiceClient(cc).CreateCertificate(ctx, &authpb.IstioCertificateRequest{Csr: csrPEM(t)})
		if status.Code(err) != codes.Unavailable {
			t.Errorf("plaintext CreateCertificate: %v, want Unavailable (no connection)", err)
		}
	})

	for _, tc := range []struct {
		name    string
		version uint16
		curves  []tls.CurveID
	}{
		{"TLS 1.2 only", tls.VersionTLS12, nil},
		{"TLS 1.3 only", tls.VersionTLS13, nil},
		{"TLS 1.3 X25519MLKEM768", tls.VersionTLS13, []tls.CurveID{tls.X25519MLKEM768}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := &tls.Config{MinVersion: tc.version, MaxVersion: tc.version, RootCAs: roots, ServerName: "istiod.istio-system.svc",
				NextProtos: []string{"h2"}, CurvePreferences: tc.curves}
			d := tls.Dialer{Config: cfg, NetDialer: &net.Dialer{Timeout: callTimeout}}
			ctx, cancel := context.WithTimeout(context.Background(), callTimeout)
			defer cancel()
			c, err := d.DialContext(ctx, "tcp", s.addr)
			if err != nil {
				t.Fatalf("TLS handshake: %v", err)
			}
			cs := c.(*tls.Conn).ConnectionState()
			if err := c.Close(); err != nil {
				t.Errorf("close: %v", err)
			}
			if cs.Version != tc.version || cs.NegotiatedProtocol != "h2" || len(cs.VerifiedChains) == 0 {
				t.Errorf("version %x ALPN %q verified chains %d; want version %x, ALPN h2, a verified chain",
					cs.Version, cs.NegotiatedProtocol, len(cs.VerifiedChains), tc.version)
			}
			if len(tc.curves) == 1 && cs.CurveID != tc.curves[0] {
				t.Errorf("key exchange %s, want %s", cs.CurveID, tc.curves[0])
			}

			// A real gRPC call over that version reaches the CA (and is refused
			// for lack of credentials, which proves the request got through).
			cc, err := grpc.NewClient(s.addr, grpc.WithTransportCredentials(credentials.NewTLS(cfg.Clone())))
			if err != nil {
				t.Fatal(err)
			}
			defer cc.Close()
			_, err = authpb.NewIstioCertificateServiceClient(cc).CreateCertificate(ctx, &authpb.IstioCertificateRequest{Csr: csrPEM(t)})
			if status.Code(err) != codes.Unauthenticated {
				t.Errorf("CreateCertificate: %v, want Unauthenticated", err)
			}
		})
	}

	t.Run("other server name is not in the certificate", func(t *testing.T) {
		d := tls.Dialer{Config: &tls.Config{MinVersion: tls.VersionTLS12, RootCAs: roots, ServerName: "evil.example"}}
		ctx, cancel := context.WithTimeout(context.Background(), callTimeout)
		defer cancel()
		c, err := d.DialContext(ctx, "tcp", s.addr)
		if err == nil {
			_ = c.Close() // the test fails on the next line; this only releases the connection
			t.Fatal("handshake for evil.example succeeded")
		}
		var herr x509.HostnameError
		if !errors.As(err, &herr) {
			t.Errorf("handshake error %v, want a hostname mismatch", err)
		}
	})
}

func TestServeInvalidConfig(t *testing.T) {
	emptyDir := t.TempDir()
	for _, tc := range []struct {
		name string
		args []string
		want string // substring of the error naming the culprit
	}{
		{"unknown signer", []string{"--signer", "nope"}, "signer"},
		{"bad ttl policy", []string{"--ttl-policy", "sometimes"}, "ttlPolicy"},
		{"intermediate without dir", []string{"--signer", "intermediate"}, "cacertsDir"},
		{"intermediate with empty dir", []string{"--signer", "intermediate", "--cacerts-dir", emptyDir}, emptyDir},
		{"unknown flag", []string{"--no-such-flag"}, "no-such-flag"},
		{"bad listen address", []string{"--listen", "nowhere"}, "listen"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			data := filepath.Join(t.TempDir(), "data")
			var logs servetest.SyncBuffer
			ctx, cancel := context.WithTimeout(context.Background(), startTimeout)
			defer cancel()
			args := append([]string{"--data-dir", data, "--listen", "127.0.0.1:0", "--monitoring-listen", "127.0.0.1:0"}, tc.args...)
			err := serve(ctx, args, &logs)
			if err == nil {
				t.Fatalf("serve %v returned nil", tc.args)
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Errorf("error %q does not name %q", err, tc.want)
			}
			if strings.Contains(logs.String(), "castellan serving") {
				t.Errorf("server reported serving with an invalid configuration")
			}
		})
	}
}

// TestServeShutdown checks that cancelling ctx (what SIGTERM does in main)
// makes serve return nil promptly, even with a client connected, and that
// both listeners are closed afterwards.
func TestServeShutdown(t *testing.T) {
	s := startServe(t, filepath.Join(t.TempDir(), "data"))
	cc := s.conn(t, true)
	ctx, cancel := context.WithTimeout(context.Background(), callTimeout)
	defer cancel()
	if _, err := adminpb.NewAdminServiceClient(cc).GetTrustBundle(ctx, &adminpb.GetTrustBundleRequest{}); err != nil {
		t.Fatalf("GetTrustBundle: %v", err)
	}
	if err := s.stop(); err != nil {
		t.Fatalf("serve returned %v after cancel, want nil", err)
	}
	for _, addr := range []string{s.addr, s.monAddr} {
		if c, err := net.DialTimeout("tcp", addr, time.Second); err == nil {
			_ = c.Close() // the test fails on the next line; this only releases the connection
			t.Errorf("%s still accepts connections after serve returned", addr)
		}
	}
	if !strings.Contains(s.logs.String(), "shutting down") {
		t.Errorf("no shutdown log line")
	}
}
