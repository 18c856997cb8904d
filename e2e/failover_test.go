package e2e

import (
	"bytes"
	"context"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"istio.io/istio/pkg/security"
	"istio.io/istio/security/pkg/nodeagent/caclient/providers/citadel"
	"istio.io/istio/security/pkg/pki/util"

	"github.com/castellan-ca/castellan/storage/postgres/pgtest"
)

const (
	// scheduleLine is what a replica logs when it becomes the rotation leader.
	scheduleLine = "CA rotation schedule running on this replica"
	// chainLockClass is storage/postgres's advisory lock class of a writer's
	// audit chain ("chc"): an audited CA state save takes it after writing
	// the new state and before appending its record.
	chainLockClass = 0x636863
	// failoverBound is "within seconds", generous for a loaded machine.
	failoverBound = 20 * time.Second
	// csrTimeout bounds one CSR: Istio's client sets no deadline, so the
	// load's own stands in for an agent giving up and trying another replica.
	csrTimeout = 15 * time.Second
)

// TestKillLeaderMidRotation runs two replicas on one PostgreSQL database
// under load from Istio's CA client, which fails over between them. The
// rotation leader is stopped inside a rotation phase (prepare), after it
// wrote the new CA state and before it committed it with its audit record,
// and killed there with SIGKILL. The phase did not happen: the CA state and
// the audit log are as before, with no half step. The survivor takes over
// the schedule within seconds and runs the phase itself. Every certificate
// a client received matches exactly one audit row, and every chain verifies.
func TestKillLeaderMidRotation(t *testing.T) {
	dsn := pgtest.DSN(t)
	dir := t.TempDir()
	kek := writeFile(t, dir, "kek", bytes.Repeat([]byte{0x5a}, 32), 0o600)
	common := []string{"--audit-dsn", dsn, "--ca-kek-file", kek, "--intermediate-lifetime", "2h",
		"--ca-state-poll-interval", "200ms", "--clock-skew", "1s", "--audit-timeout", "3s"}
	var replicas [2]*server
	for i, w := range []string{"replica-a", "replica-b"} {
		replicas[i] = startServer(t, serverConfig{signer: "selfsigned", extraArgs: append([]string{"--audit-writer", w}, common...)})
	}
	writers := map[*server]string{replicas[0]: "replica-a", replicas[1]: "replica-b"}
	var leader, survivor *server
	eventuallyE2E(t, failoverBound, "one replica leads the rotation schedule", func() error {
		for i, r := range replicas {
			if strings.Contains(r.logs.String(), scheduleLine) {
				leader, survivor = r, replicas[1-i]
				return nil
			}
		}
		return errors.New("no replica logged that it leads")
	})

	conn, err := pgx.Connect(context.Background(), dsn)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = conn.Close(context.Background()) }) // the test's own session; its locks go with it
	before := caStateVersion(t, conn)
	rootBefore := rotStatus(t, survivor).only(t, "root", "active")

	load := startFailoverLoad(t, survivor, [2]string{leader.grpcAddr, survivor.grpcAddr})
	t.Cleanup(load.halt)
	load.waitIssued(t, 6)

	// Hold the leader's chain lock: its next audited CA state save stops
	// after writing the state, before its record and COMMIT.
	ctx := context.Background()
	if _, err := conn.Exec(ctx, `SELECT pg_advisory_lock($1, hashtext($2))`, int32(chainLockClass), writers[leader]); err != nil {
		t.Fatal(err)
	}
	prepare := exec.Command(castellanctlBin, "--data-dir", leader.dataDir, "ca", "rotate", "prepare")
	var prepareOut bytes.Buffer
	prepare.Stdout, prepare.Stderr = &prepareOut, &prepareOut
	if err := prepare.Start(); err != nil {
		t.Fatal(err)
	}
	prepareDone := make(chan error, 1)
	go func() { prepareDone <- prepare.Wait() }()
	eventuallyE2E(t, failoverBound, "the leader's prepare is mid-transaction", func() error {
		var n int
		if err := conn.QueryRow(ctx, `SELECT count(DISTINCT w.pid) FROM pg_locks w JOIN pg_locks s ON s.pid = w.pid
			JOIN pg_class c ON c.oid = s.relation
			WHERE w.locktype = 'advisory' AND NOT w.granted AND c.relname = 'ca_authority'`).Scan(&n); err != nil {
			return err
		}
		if n != 1 {
			return fmt.Errorf("%d sessions wait for the chain lock with the CA state written", n)
		}
		return nil
	})
	if strings.Contains(survivor.logs.String(), scheduleLine) {
		t.Fatal("both replicas lead the rotation schedule")
	}
	if err := leader.cmd.Process.Kill(); err != nil { // SIGKILL
		t.Fatal(err)
	}
	<-leader.exited
	killedAt := time.Now()
	if _, err := conn.Exec(ctx, `SELECT pg_advisory_unlock_all()`); err != nil {
		t.Fatal(err)
	}
	if err := <-prepareDone; err == nil {
		t.Errorf("castellanctl ca rotate prepare succeeded on a replica killed before COMMIT:\n%s", prepareOut.String())
	}

	// The survivor takes the schedule over within seconds.
	eventuallyE2E(t, failoverBound, "the survivor leads the rotation schedule", func() error {
		if !strings.Contains(survivor.logs.String(), scheduleLine) {
			return errors.New("the survivor has not logged that it leads")
		}
		return nil
	})
	t.Logf("the survivor leads %v after the kill", time.Since(killedAt).Round(time.Millisecond))

	// The phase did not happen, not even half: the state and the log are as before.
	eventuallyE2E(t, failoverBound, "the killed leader's transaction is gone", func() error {
		var n int
		if err := conn.QueryRow(ctx, `SELECT count(*) FROM pg_locks l JOIN pg_class c ON c.oid = l.relation
			WHERE c.relname = 'ca_authority' AND l.pid <> pg_backend_pid()`).Scan(&n); err != nil {
			return err
		}
		if n != 0 {
			return fmt.Errorf("%d sessions still hold locks on the CA state", n)
		}
		return nil
	})
	if v := caStateVersion(t, conn); v != before {
		t.Errorf("CA state version %d after the kill, want %d (unchanged)", v, before)
	}
	st := rotStatus(t, survivor)
	if got := st.only(t, "root", "active"); got.KeyID != rootBefore.KeyID {
		t.Errorf("active root %s after the kill, want %s", got.KeyID, rootBefore.KeyID)
	}
	for _, c := range st.CAs {
		if c.Phase == "prepared" {
			t.Errorf("CA %s (%s) is prepared: half a phase survived the kill", c.KeyID, c.Role)
		}
	}
	if recs := prepareRecords(survivor.auditList(t)); len(recs) != 0 {
		t.Errorf("audit records of a prepare after the kill: %+v; want none", recs)
	}

	// The survivor runs the phase whole: state and record together.
	load.waitIssued(t, 4)
	survivor.ctl(t, "ca", "rotate", "prepare")
	prepared := rotStatus(t, survivor).only(t, "root", "prepared")
	if v := caStateVersion(t, conn); v != before+1 {
		t.Errorf("CA state version %d after the survivor's prepare, want %d", v, before+1)
	}
	if recs := prepareRecords(survivor.auditList(t)); len(recs) != 1 || recs[0].Writer != writers[survivor] ||
		!strings.Contains(recs[0].Detail, prepared.KeyID) {
		t.Errorf("audit records of prepare: %+v; want one by %s naming %s", recs, writers[survivor], prepared.KeyID)
	}
	load.waitIssued(t, 4)
	load.halt()

	// Every certificate a client received has exactly one audit row.
	issued, failovers, failures := load.results()
	t.Logf("%d certificates received, %d failovers between replicas", len(issued), failovers)
	if failovers == 0 {
		t.Errorf("the client never failed over: the kill was not under load")
	}
	if len(failures) > 0 {
		t.Logf("failed CSRs (each followed by a failover): %d, first: %s", len(failures), failures[0])
	}
	all := survivor.auditList(t)
	for _, c := range issued {
		recs := recordsWithSerial(t, all, c.SerialNumber)
		if len(recs) != 1 || recs[0].Outcome != "issued" || recs[0].Kind != "csr" {
			t.Errorf("certificate %x: audit rows %+v; want exactly one issued", c.SerialNumber, recs)
		}
	}
	if r := survivor.runCtl(t, "audit", "verify"); r.err != nil {
		t.Errorf("audit verify after the kill: %v\n%s%s", r.err, r.stdout, r.stderr)
	}
}

// prepareRecords are the operator records of successful prepare steps.
func prepareRecords(recs []auditRecord) []auditRecord {
	var out []auditRecord
	for _, r := range recs {
		if r.Kind == "operator" && r.Outcome == "ok" && strings.HasPrefix(r.Detail, "ca rotate prepare") {
			out = append(out, r)
		}
	}
	return out
}

func caStateVersion(t *testing.T, conn *pgx.Conn) int64 {
	t.Helper()
	var v int64
	if err := conn.QueryRow(context.Background(), `SELECT version FROM ca_state`).Scan(&v); err != nil {
		t.Fatalf("read the CA state version: %v", err)
	}
	return v
}

// eventuallyE2E retries fn until it succeeds or within passes.
func eventuallyE2E(t *testing.T, within time.Duration, what string, fn func() error) {
	t.Helper()
	deadline := time.Now().Add(within)
	for {
		err := fn()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within %v: %v", what, within, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// failoverLoad is Istio's CA client renewing in a loop, authenticated by a
// bootstrap certificate, moving to the other replica after any failure.
type failoverLoad struct {
	addrs [2]string
	cred  string // directory of key.pem, cert-chain.pem, root-cert.pem
	id    string

	stop     chan struct{}
	stopOnce sync.Once
	wg       sync.WaitGroup

	mu        sync.Mutex
	issued    []*x509.Certificate
	failures  []string
	failovers atomic.Int64
}

func startFailoverLoad(t *testing.T, bootstrapFrom *server, addrs [2]string) *failoverLoad {
	l := &failoverLoad{addrs: addrs, cred: filepath.Join(t.TempDir(), "bootstrap"), stop: make(chan struct{}),
		id: fmt.Sprintf("spiffe://%s/ns/e2e/sa/failover", trustDomain)}
	bootstrapFrom.ctl(t, "issue", "--identity", l.id, "--out-dir", l.cred, "--ttl", "1h")
	const clients = 2
	for i := range clients {
		l.wg.Go(func() { l.run(i % 2) })
	}
	return l
}

func (l *failoverLoad) run(at int) {
	for {
		select {
		case <-l.stop:
			return
		default:
		}
		leaf, err := l.csr(l.addrs[at])
		l.mu.Lock()
		if err != nil {
			l.failures = append(l.failures, fmt.Sprintf("%s: %v", l.addrs[at], err))
		} else {
			l.issued = append(l.issued, leaf)
		}
		l.mu.Unlock()
		if err != nil {
			at = 1 - at
			l.failovers.Add(1)
			time.Sleep(100 * time.Millisecond)
		}
	}
}

// csr asks addr for a certificate with Istio's client and returns the leaf.
func (l *failoverLoad) csr(addr string) (*x509.Certificate, error) {
	csrPEM, _, err := util.GenCSR(util.CertOptions{Host: l.id, ECSigAlg: util.EcdsaSigAlg, ECCCurve: util.P256Curve})
	if err != nil {
		return nil, err
	}
	client, err := citadel.NewCitadelClient(&security.Options{CAEndpoint: addr, CAEndpointSAN: caServerName, ClusterID: clusterID},
		&citadel.TLSOptions{RootCert: filepath.Join(l.cred, "root-cert.pem"), Key: filepath.Join(l.cred, "key.pem"),
			Cert: filepath.Join(l.cred, "cert-chain.pem")})
	if err != nil {
		return nil, err
	}
	type result struct {
		resp []string
		err  error
	}
	ch := make(chan result, 1)
	go func() {
		defer client.Close()
		resp, err := client.CSRSign(csrPEM, 3600)
		ch <- result{resp, err}
	}()
	var r result
	select {
	case r = <-ch:
	case <-time.After(csrTimeout):
		return nil, errors.New("no answer: gave up") // a late answer is dropped, as an agent that gave up drops it
	}
	if r.err != nil {
		return nil, r.err
	}
	if len(r.resp) < 2 {
		return nil, fmt.Errorf("%d chain elements", len(r.resp))
	}
	block, _ := pem.Decode([]byte(r.resp[0]))
	if block == nil {
		return nil, errors.New("leaf is not PEM")
	}
	return x509.ParseCertificate(block.Bytes)
}

// waitIssued waits until n more certificates were received.
func (l *failoverLoad) waitIssued(t *testing.T, n int) {
	t.Helper()
	l.mu.Lock()
	want := len(l.issued) + n
	l.mu.Unlock()
	eventuallyE2E(t, 2*failoverBound, fmt.Sprintf("%d more certificates", n), func() error {
		l.mu.Lock()
		defer l.mu.Unlock()
		if len(l.issued) < want {
			return fmt.Errorf("%d of %d received", len(l.issued), want)
		}
		return nil
	})
}

func (l *failoverLoad) halt() {
	l.stopOnce.Do(func() {
		close(l.stop)
		l.wg.Wait()
	})
}

func (l *failoverLoad) results() (issued []*x509.Certificate, failovers int64, failures []string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]*x509.Certificate(nil), l.issued...), l.failovers.Load(), append([]string(nil), l.failures...)
}
