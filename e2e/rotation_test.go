package e2e

import (
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"istio.io/istio/pkg/security"
	"istio.io/istio/security/pkg/nodeagent/caclient/providers/citadel"
	"istio.io/istio/security/pkg/pki/util"
)

// Timing of the zero-downtime test: short lifetimes so that a whole root
// and intermediate rotation fits in about a minute. The propagation window
// spans several renewals, as it must in production (at least one renewal).
const (
	rotLeafTTL   = 12 * time.Second
	rotRenewal   = 2 * time.Second
	rotWindow    = 6 * time.Second
	rotDialEvery = 100 * time.Millisecond
	rotWorkloads = 3
	rotStepLimit = 60 * time.Second // bound on waiting for one step to become safe
)

// TestZeroDowntimeRotation rotates the root and then the intermediate through
// every phase while workloads continuously renew with Istio's real CA client
// (each renewal authenticated by the previous certificate) and continuously
// open mTLS connections to each other, each side verifying its peer with the
// trust bundle of its own last CSR response. No handshake and no CSR may fail,
// each unsafe step is refused, and at the end every live certificate chains
// to the new root only.
func TestZeroDowntimeRotation(t *testing.T) {
	srv := startServer(t, serverConfig{signer: "selfsigned", extraArgs: []string{
		"--intermediate-lifetime", "1h", "--rotation-propagation-window", rotWindow.String(), "--rotation-schedule=false",
		"--ca-state-poll-interval", "200ms", "--clock-skew", "1s",
	}})
	mesh := &mesh{t: t, srv: srv, stop: make(chan struct{})}
	for i := range rotWorkloads {
		mesh.add(t, fmt.Sprintf("spiffe://%s/ns/e2e/sa/rotation-%d", trustDomain, i))
	}
	mesh.start()
	t.Cleanup(mesh.halt)
	mesh.waitRenewals(t, 2)
	oldRoot := rotStatus(t, srv).only(t, "root", "active")

	// Root: prepare, activate after the window, retire after the last leaf.
	srv.ctl(t, "ca", "rotate", "prepare")
	newRoot := rotStatus(t, srv).only(t, "root", "prepared")
	refused(t, srv, "propagation window", "ca", "rotate", "activate")
	waitNextStep(t, srv, newRoot.KeyID)
	srv.ctl(t, "ca", "rotate", "activate")
	refused(t, srv, "has certificates chaining to it", "ca", "rotate", "retire")
	waitNextStep(t, srv, oldRoot.KeyID)
	srv.ctl(t, "ca", "rotate", "retire")

	// Intermediate under the new root, the same way.
	mesh.waitRenewals(t, 1)
	oldInter := rotStatus(t, srv).only(t, "intermediate", "active")
	srv.ctl(t, "ca", "rotate", "prepare", "--target", "intermediate")
	newInter := rotStatus(t, srv).only(t, "intermediate", "prepared")
	refused(t, srv, "propagation window", "ca", "rotate", "activate", "--target", "intermediate")
	waitNextStep(t, srv, newInter.KeyID)
	srv.ctl(t, "ca", "rotate", "activate", "--target", "intermediate")
	refused(t, srv, "has certificates chaining to it", "ca", "rotate", "retire", "--target", "intermediate")
	waitNextStep(t, srv, oldInter.KeyID)
	srv.ctl(t, "ca", "rotate", "retire", "--target", "intermediate")
	mesh.waitRenewals(t, 1)
	mesh.halt()

	st := mesh.stats()
	t.Logf("%d renewals, %d mTLS handshakes across the rotation", st.renewals, st.handshakes)
	if len(st.failures) > 0 {
		t.Errorf("%d failures (want none):\n%s", len(st.failures), strings.Join(st.failures[:min(len(st.failures), 20)], "\n"))
	}
	if st.handshakes < 100 || st.renewals < 10*rotWorkloads {
		t.Errorf("only %d handshakes and %d renewals: the load did not run", st.handshakes, st.renewals)
	}
	for _, r := range csrRecords(srv.auditList(t)) {
		if r.Outcome != "issued" {
			t.Errorf("server audit: CSR %s for %s (%s %s), want none refused or failed", r.Outcome, r.GrantedIdentity, r.Code, r.Reason)
		}
	}

	// Every live certificate chains to the new root only, through the new intermediate.
	bundle, err := parseCerts(srv.ctl(t, "bundle"))
	if err != nil || len(bundle) != 1 || keyIDOf(bundle[0]) != newRoot.KeyID {
		t.Fatalf("final bundle: %d roots (%v), want the new root %s", len(bundle), err, newRoot.KeyID)
	}
	oldPool := x509.NewCertPool()
	oldPool.AddCert(mesh.firstRoot)
	for _, w := range mesh.workloads {
		cur := w.current()
		if len(cur.bundle) != 1 || !cur.bundle[0].Equal(bundle[0]) {
			t.Errorf("%s holds a bundle of %d roots, want the new root only", w.id, len(cur.bundle))
		}
		if err := cur.verify(cur.chain, x509.ExtKeyUsageClientAuth, ""); err != nil {
			t.Errorf("%s: certificate does not chain to the new root: %v", w.id, err)
		}
		if got := keyIDOf(cur.chain[1]); got != newInter.KeyID {
			t.Errorf("%s: issued by intermediate %s, want %s", w.id, got, newInter.KeyID)
		}
		inter := x509.NewCertPool()
		inter.AddCert(cur.chain[1])
		if _, err := cur.chain[0].Verify(x509.VerifyOptions{Roots: oldPool, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err == nil {
			t.Errorf("%s: certificate still chains to the old root", w.id)
		}
	}
}

// rotCA is one CA of `castellanctl ca status --output json`.
type rotCA struct {
	KeyID      string    `json:"key_id"`
	Role       string    `json:"role"`
	Phase      string    `json:"phase"`
	NextStepAt time.Time `json:"next_step_at"`
}

type rotState struct {
	CAs []rotCA `json:"cas"`
}

func rotStatus(t *testing.T, srv *server) rotState {
	t.Helper()
	var st rotState
	if err := json.Unmarshal(srv.ctl(t, "ca", "status", "--output", "json"), &st); err != nil {
		t.Fatalf("ca status: %v", err)
	}
	return st
}

func (s rotState) only(t *testing.T, role, phase string) rotCA {
	t.Helper()
	var out []rotCA
	for _, c := range s.CAs {
		if c.Role == role && c.Phase == phase {
			out = append(out, c)
		}
	}
	if len(out) != 1 {
		t.Fatalf("%d %s CAs in phase %s, want 1: %+v", len(out), role, phase, s.CAs)
	}
	return out[0]
}

// waitNextStep sleeps until the CA's next step is safe, as status reports.
func waitNextStep(t *testing.T, srv *server, keyID string) {
	t.Helper()
	for _, c := range rotStatus(t, srv).CAs {
		if c.KeyID != keyID {
			continue
		}
		wait := time.Until(c.NextStepAt)
		if wait > rotStepLimit {
			t.Fatalf("CA %s: next step at %s, beyond the test's bound", keyID, c.NextStepAt)
		}
		time.Sleep(wait + 100*time.Millisecond)
		return
	}
	t.Fatalf("CA %s not in status", keyID)
}

// refused runs castellanctl and requires a refusal saying want.
func refused(t *testing.T, srv *server, want string, args ...string) {
	t.Helper()
	r := srv.runCtl(t, args...)
	if r.err == nil || !strings.Contains(string(r.stderr), "FailedPrecondition") || !strings.Contains(string(r.stderr), want) {
		t.Errorf("castellanctl %s: %v\n%s\nwant FailedPrecondition saying %q", strings.Join(args, " "), r.err, r.stderr, want)
	}
}

func keyIDOf(c *x509.Certificate) string { return hex.EncodeToString(c.SubjectKeyId) }

// mesh is a set of workloads renewing and talking to each other.
type mesh struct {
	t         *testing.T
	srv       *server
	workloads []*workload
	firstRoot *x509.Certificate

	stop     chan struct{}
	stopOnce sync.Once
	wg       sync.WaitGroup

	renewals, handshakes atomic.Int64
	mu                   sync.Mutex
	failures             []string
}

// creds is what a workload holds: its chain, key and bundle, as
// pilot-agent keeps them, plus the files Istio's client reads.
type creds struct {
	cert                           *tls.Certificate
	chain                          []*x509.Certificate // leaf, intermediates
	bundle                         []*x509.Certificate
	pool                           *x509.CertPool
	keyFile, chainFile, bundleFile string
}

type workload struct {
	id  string
	dir string
	cur atomic.Pointer[creds]
	lis net.Listener
	gen int
}

func (w *workload) current() *creds { return w.cur.Load() }

// add bootstraps a workload with castellanctl and starts its mTLS listener.
func (m *mesh) add(t *testing.T, id string) {
	w := &workload{id: id, dir: t.TempDir()}
	out := filepath.Join(w.dir, "bootstrap")
	m.srv.ctl(t, "issue", "--identity", id, "--out-dir", out, "--ttl", rotLeafTTL.String())
	c, err := loadCredentials(filepath.Join(out, "key.pem"), filepath.Join(out, "cert-chain.pem"), filepath.Join(out, "root-cert.pem"))
	if err != nil {
		t.Fatal(err)
	}
	w.cur.Store(c)
	m.firstRoot = c.bundle[0]
	w.lis, err = net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	m.workloads = append(m.workloads, w)
}

func loadCredentials(keyFile, chainFile, bundleFile string) (*creds, error) {
	pair, err := tls.LoadX509KeyPair(chainFile, keyFile)
	if err != nil {
		return nil, err
	}
	chainPEM, err := os.ReadFile(chainFile)
	if err != nil {
		return nil, err
	}
	chain, err := parseCerts(chainPEM)
	if err != nil {
		return nil, err
	}
	bundlePEM, err := os.ReadFile(bundleFile)
	if err != nil {
		return nil, err
	}
	bundle, err := parseCerts(bundlePEM)
	if err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	for _, r := range bundle {
		pool.AddCert(r)
	}
	return &creds{cert: &pair, chain: chain, bundle: bundle, pool: pool, keyFile: keyFile, chainFile: chainFile, bundleFile: bundleFile}, nil
}

// verify checks a peer's chain against this workload's bundle, SPIFFE-style:
// the chain, the usage and (when wantID is set) the one URI SAN.
func (c *creds) verify(chain []*x509.Certificate, usage x509.ExtKeyUsage, wantID string) error {
	if len(chain) == 0 {
		return errors.New("no certificate")
	}
	inter := x509.NewCertPool()
	for _, i := range chain[1:] {
		inter.AddCert(i)
	}
	if _, err := chain[0].Verify(x509.VerifyOptions{Roots: c.pool, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{usage}}); err != nil {
		return err
	}
	if wantID != "" && (len(chain[0].URIs) != 1 || chain[0].URIs[0].String() != wantID) {
		return fmt.Errorf("peer is %v, want %s", chain[0].URIs, wantID)
	}
	return nil
}

func (w *workload) verifyRaw(raw [][]byte, usage x509.ExtKeyUsage, wantID string) error {
	var chain []*x509.Certificate
	for _, der := range raw {
		c, err := x509.ParseCertificate(der)
		if err != nil {
			return err
		}
		chain = append(chain, c)
	}
	return w.current().verify(chain, usage, wantID)
}

func (m *mesh) failf(format string, a ...any) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.failures = append(m.failures, time.Now().Format("15:04:05.000 ")+fmt.Sprintf(format, a...))
}

func (m *mesh) stopped() bool {
	select {
	case <-m.stop:
		return true
	default:
		return false
	}
}

// start runs, per workload, a renewal loop, an mTLS server and a dialer.
func (m *mesh) start() {
	for i, w := range m.workloads {
		m.wg.Add(3)
		// Staggered, as real workloads are: at any moment some hold the
		// newest bundle and some do not, which is what rotation must survive.
		offset := rotRenewal * time.Duration(i) / time.Duration(len(m.workloads))
		go func() { defer m.wg.Done(); m.renewLoop(w, offset) }()
		go func() { defer m.wg.Done(); m.serve(w) }()
		go func() { defer m.wg.Done(); m.dialLoop(w, m.workloads[(i+1)%len(m.workloads)]) }()
	}
}

func (m *mesh) halt() {
	m.stopOnce.Do(func() {
		close(m.stop)
		for _, w := range m.workloads {
			_ = w.lis.Close() // fails only if already closed: the serve loop ends either way
		}
		m.wg.Wait()
	})
}

type meshStats struct {
	renewals, handshakes int64
	failures             []string
}

func (m *mesh) stats() meshStats {
	m.mu.Lock()
	defer m.mu.Unlock()
	return meshStats{m.renewals.Load(), m.handshakes.Load(), append([]string(nil), m.failures...)}
}

// waitRenewals waits until every workload renewed n more times.
func (m *mesh) waitRenewals(t *testing.T, n int) {
	t.Helper()
	want := m.renewals.Load() + int64(n*len(m.workloads))
	deadline := time.Now().Add(time.Duration(n+5) * 4 * rotRenewal)
	for m.renewals.Load() < want {
		if time.Now().After(deadline) {
			t.Fatalf("renewals stalled at %d, want %d", m.renewals.Load(), want)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// renewLoop renews w's certificate every rotRenewal (first after offset) with Istio's client,
// authenticated by the certificate it holds, trusting the CA by its bundle.
func (m *mesh) renewLoop(w *workload, offset time.Duration) {
	next := offset
	for !m.stopped() {
		select {
		case <-m.stop:
			return
		case <-time.After(next):
		}
		next = rotRenewal
		if err := m.renew(w); err != nil {
			m.failf("%s: CSR: %v", w.id, err)
		} else {
			m.renewals.Add(1)
		}
	}
}

func (m *mesh) renew(w *workload) error {
	cur := w.current()
	csrPEM, keyPEM, err := util.GenCSR(util.CertOptions{Host: w.id, ECSigAlg: util.EcdsaSigAlg, ECCCurve: util.P256Curve})
	if err != nil {
		return err
	}
	client, err := citadel.NewCitadelClient(&security.Options{CAEndpoint: m.srv.grpcAddr, CAEndpointSAN: caServerName, ClusterID: clusterID},
		&citadel.TLSOptions{RootCert: cur.bundleFile, Key: cur.keyFile, Cert: cur.chainFile})
	if err != nil {
		return err
	}
	defer client.Close()
	type result struct {
		resp []string
		err  error
	}
	ch := make(chan result, 1)
	go func() {
		resp, err := client.CSRSign(csrPEM, int64(rotLeafTTL/time.Second))
		ch <- result{resp, err}
	}()
	var r result
	select {
	case r = <-ch:
	case <-time.After(rpcTimeout):
		return errors.New("no answer")
	}
	if r.err != nil {
		return r.err
	}
	w.gen++
	dir := filepath.Join(w.dir, fmt.Sprintf("gen-%d", w.gen))
	if err := os.Mkdir(dir, 0o700); err != nil {
		return err
	}
	files := map[string][]byte{"key.pem": keyPEM, "cert-chain.pem": concatCerts(r.resp[:len(r.resp)-1]), "root-cert.pem": []byte(r.resp[len(r.resp)-1])}
	for name, b := range files {
		if err := os.WriteFile(filepath.Join(dir, name), b, 0o600); err != nil {
			return err
		}
	}
	next, err := loadCredentials(filepath.Join(dir, "key.pem"), filepath.Join(dir, "cert-chain.pem"), filepath.Join(dir, "root-cert.pem"))
	if err != nil {
		return fmt.Errorf("response: %w", err)
	}
	w.cur.Store(next)
	return nil
}

// serve accepts mTLS connections: a client certificate is required and
// verified against w's own current bundle; it echoes one byte.
func (m *mesh) serve(w *workload) {
	cfg := &tls.Config{
		MinVersion:     tls.VersionTLS13,
		GetCertificate: func(*tls.ClientHelloInfo) (*tls.Certificate, error) { return w.current().cert, nil },
		ClientAuth:     tls.RequireAnyClientCert,
		VerifyPeerCertificate: func(raw [][]byte, _ [][]*x509.Certificate) error {
			return w.verifyRaw(raw, x509.ExtKeyUsageClientAuth, "")
		},
	}
	for {
		conn, err := w.lis.Accept()
		if err != nil {
			return
		}
		go func() {
			defer conn.Close()
			_ = conn.SetDeadline(time.Now().Add(5 * time.Second))
			tc := tls.Server(conn, cfg)
			var b [1]byte
			if _, err := io.ReadFull(tc, b[:]); err != nil {
				return // the dialer reports the failure
			}
			_, _ = tc.Write(b[:])
		}()
	}
}

// dialLoop connects from w to peer continuously, verifying the peer's
// certificate and identity against w's own current bundle.
func (m *mesh) dialLoop(w, peer *workload) {
	for !m.stopped() {
		cfg := &tls.Config{
			MinVersion:           tls.VersionTLS13,
			GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return w.current().cert, nil },
			// Verified below, SPIFFE-style: leaves carry a URI SAN, no host name.
			InsecureSkipVerify: true,
			VerifyPeerCertificate: func(raw [][]byte, _ [][]*x509.Certificate) error {
				return w.verifyRaw(raw, x509.ExtKeyUsageServerAuth, peer.id)
			},
		}
		if err := exchange(peer.lis.Addr().String(), cfg); err != nil {
			if m.stopped() {
				return
			}
			m.failf("%s → %s: %v", w.id, peer.id, err)
		} else {
			m.handshakes.Add(1)
		}
		select {
		case <-m.stop:
			return
		case <-time.After(rotDialEvery):
		}
	}
}

// exchange dials, completes the handshake and a one-byte round trip, which
// surfaces the server's verdict on our certificate (TLS 1.3 sends it late).
func exchange(addr string, cfg *tls.Config) error {
	conn, err := tls.DialWithDialer(&net.Dialer{Timeout: 5 * time.Second}, "tcp", addr, cfg)
	if err != nil {
		return err
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := conn.Write([]byte{42}); err != nil {
		return err
	}
	var b [1]byte
	if _, err := io.ReadFull(conn, b[:]); err != nil {
		return fmt.Errorf("after handshake: %w", err)
	}
	return nil
}
