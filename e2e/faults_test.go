package e2e

import (
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc/codes"

	"github.com/castellan-ca/castellan/e2e/internal/testproc"
)

// TestSIGTERMUnderLoad stops the server with SIGTERM while clients keep
// asking for certificates: every call either gets its certificate or
// Unavailable (Istio's clients retry it), the process exits with status 0
// within its grace period, and after a restart every certificate a client
// received has exactly one issuance record and the log verifies.
func TestSIGTERMUnderLoad(t *testing.T) {
	const workers, grace = 8, 8 * time.Second
	cfg := serverConfig{signer: "selfsigned", extraArgs: []string{"--shutdown-grace-period", grace.String(), "--caller-rate-limit", "0"}}
	srv := startServer(t, cfg)

	var (
		mu        sync.Mutex
		received  []string
		codesSeen = map[codes.Code]int{}
		before    atomic.Int64 // certificates received before SIGTERM
		stopped   atomic.Bool  // SIGTERM sent
		wg        sync.WaitGroup
	)
	done := make(chan struct{})
	for w := range workers {
		id := fmt.Sprintf("spiffe://%s/ns/e2e/sa/sigterm-%d", trustDomain, w)
		_, client := dialCA(t, srv, caDial{cred: issueCredential(t, srv, id)})
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-done:
					return
				default:
				}
				r := sign(t, client, id)
				mu.Lock()
				codesSeen[r.code]++
				if r.code == codes.OK {
					received = append(received, r.leafSum(t))
				}
				mu.Unlock()
				if r.code == codes.OK && !stopped.Load() {
					before.Add(1)
				}
				if r.code != codes.OK {
					time.Sleep(10 * time.Millisecond) // the server is going: do not spin
				}
			}
		}()
	}
	deadline := time.Now().Add(rpcTimeout)
	for before.Load() < 100 { // under load: a hundred certificates before the signal
		if time.Now().After(deadline) {
			t.Fatalf("only %d certificates within %v", before.Load(), rpcTimeout)
		}
		time.Sleep(pollInterval)
	}
	stopped.Store(true)
	state, took := srv.stop(t)
	close(done)
	wg.Wait()
	t.Logf("exit %v after %v; calls by code: %v; %d certificates received", state, took.Round(time.Millisecond), codesSeen, len(received))
	if !state.Success() {
		t.Errorf("castellan serve after SIGTERM: %v, want exit status 0", state)
	}
	if took > grace {
		t.Errorf("exit %v after SIGTERM, want within the grace period %v", took, grace)
	}
	for code, n := range codesSeen {
		if code != codes.OK && code != codes.Unavailable {
			t.Errorf("%d calls ended with %s, want only OK or Unavailable", n, code)
		}
	}

	// castellanctl reads the log through a running server: the same data
	// directory, started again.
	restarted := testproc.Retry(t, "castellan serve", startAttempts, func() (*server, error) { return launch(t, cfg, srv.dataDir) })
	matchAudit(t, restarted, received)
	if r := restarted.runCtl(t, "audit", "verify"); r.err != nil {
		t.Errorf("audit verify after the restart: %v\n%s%s", r.err, r.stdout, r.stderr)
	}
}

// TestResumedSessionAfterRootRetirement: a client certificate is verified
// on every call against the current trust bundle, so a TLS session resumed
// after the certificate's root was retired authenticates nothing, with TLS
// 1.3 (ztunnel) and TLS 1.2 (pilot-agent in FIPS mode) alike.
func TestResumedSessionAfterRootRetirement(t *testing.T) {
	for _, version := range []uint16{tls.VersionTLS13, tls.VersionTLS12} {
		t.Run(tls.VersionName(version), func(t *testing.T) {
			t.Parallel()
			testResumedSession(t, version)
		})
	}
}

func testResumedSession(t *testing.T, version uint16) {
	srv := startServer(t, serverConfig{signer: "selfsigned", extraArgs: []string{"--rotation-schedule=false"}})
	oldRoots := readCerts(t, filepath.Join(srv.dataDir, "root-cert.pem"))
	cred := issueCredential(t, srv, workloadID)
	sessions := tls.NewLRUClientSessionCache(4)
	var received []string
	call := func(roots []*x509.Certificate) signResult {
		t.Helper()
		conn, client := dialCA(t, srv, caDial{cred: cred, version: version, sessions: sessions, roots: roots})
		defer conn.Close() // each call a new connection: a new handshake, resumed if it can be
		r := sign(t, client, workloadID)
		if r.code == codes.OK {
			received = append(received, r.leafSum(t))
		}
		return r
	}

	if r := call(oldRoots); r.code != codes.OK || r.didResume(t) {
		t.Fatalf("first call: %s, resumed %v; want a certificate over a full handshake", r.code, r.didResume(t))
	}
	if r := call(oldRoots); r.code != codes.OK || !r.didResume(t) {
		t.Fatalf("second call: %s, resumed %v; want a certificate over a resumed session", r.code, r.didResume(t))
	}

	// Rotate the root away: the client's certificate chains to a root that is
	// no longer trusted. The client trusts both roots, so that only the
	// server's decision can fail the call.
	srv.ctl(t, "ca", "rotate", "prepare")
	srv.ctl(t, "ca", "rotate", "activate", "--force")
	srv.ctl(t, "ca", "rotate", "retire", "--force")
	newRoots, err := parseCerts(srv.ctl(t, "bundle"))
	if err != nil || len(newRoots) != 1 || newRoots[0].Equal(oldRoots[0]) {
		t.Fatalf("after retire the bundle holds %s, want only a new root", describeCerts(newRoots))
	}

	r := call(append(oldRoots, newRoots...))
	if !r.didResume(t) {
		t.Fatal("third call: the session was not resumed, so this test proves nothing")
	}
	if r.code != codes.Unauthenticated {
		t.Errorf("call over a session resumed after the root's retirement: %s, want Unauthenticated", r.code)
	}
	recs := matchAudit(t, srv, received)
	last := csrRecords(recs)[len(csrRecords(recs))-1]
	checkFields(t, "refusal record", []field{
		{"outcome", last.Outcome, "refused"}, {"code", last.Code, "Unauthenticated"},
		{"reason", last.Reason, "authn.failed"}, {"auth_method", last.AuthMethod, "mtls"},
	})
	if len(received) != 2 {
		t.Errorf("%d certificates received, want 2", len(received))
	}
}
