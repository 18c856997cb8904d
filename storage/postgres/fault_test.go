package postgres_test

import (
	"context"
	"crypto/rand"
	"crypto/x509"
	"encoding/pem"
	"net"
	"path/filepath"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/castellan-ca/castellan/authn"
	"github.com/castellan-ca/castellan/ca"
	"github.com/castellan-ca/castellan/internal/keyfile"
	authpb "github.com/castellan-ca/castellan/proto/istio/v1/auth"
	"github.com/castellan-ca/castellan/signer/selfsigned"
	"github.com/castellan-ca/castellan/signer/signertest"
	"github.com/castellan-ca/castellan/storage"
	"github.com/castellan-ca/castellan/storage/postgres"
	"github.com/castellan-ca/castellan/storage/postgres/pgtest"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
)

var (
	td       = spiffeid.RequireTrustDomainFromString("cluster.local")
	clientID = spiffeid.RequireFromPath(td, "/ns/fault/sa/client")
)

// workload authenticates every call as one workload: authentication is not
// what these tests exercise, the audit path is.
type workload struct{}

func (workload) Authenticate(context.Context) (*authn.Caller, error) {
	return &authn.Caller{Method: "test", Identity: clientID, Name: clientID.String()}, nil
}

// newIssuer builds the real pipeline (self-signed P-256 root) over audit.
func newIssuer(t testing.TB, audit ca.AuditLog, auditTimeout time.Duration) *ca.Issuer {
	t.Helper()
	signer, err := selfsigned.Load(selfsigned.Options{Dir: filepath.Join(t.TempDir(), "ca"), TrustDomain: td, KeyType: keyfile.KeyTypeECDSAP256})
	if err != nil {
		t.Fatal(err)
	}
	authority := ca.NewAuthority()
	if _, err := authority.Use(selfsigned.Backend, signer); err != nil {
		t.Fatal(err)
	}
	is, err := ca.NewIssuer(ca.Config{TrustDomain: td, Authenticator: workload{}, Audit: audit, Authority: authority,
		MaxInFlight: 4096, AuditTimeout: auditTimeout})
	if err != nil {
		t.Fatal(err)
	}
	return is
}

// csrPEM is a ztunnel-like CSR (no subject, no SAN: the grant supplies it).
func csrPEM(t testing.TB, i int) string {
	t.Helper()
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, signertest.Key(i))
	if err != nil {
		t.Fatal(err)
	}
	return string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der}))
}

// serveGRPC serves Istio's CA API for is on a loopback port.
func serveGRPC(t testing.TB, is *ca.Issuer) authpb.IstioCertificateServiceClient {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := grpc.NewServer()
	authpb.RegisterIstioCertificateServiceServer(srv, &ca.Server{Issuer: is})
	go srv.Serve(lis)
	t.Cleanup(srv.Stop)
	conn, err := grpc.NewClient(lis.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := conn.Close(); err != nil {
			t.Errorf("close: %v", err)
		}
	})
	return authpb.NewIstioCertificateServiceClient(conn)
}

func leafSerial(t testing.TB, chain []string) string {
	t.Helper()
	block, _ := pem.Decode([]byte(chain[0]))
	if block == nil {
		t.Fatalf("response element 0 is not PEM")
	}
	c, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	return c.SerialNumber.Text(16)
}

// allRecords reads the whole log, every writer, through a fresh store.
func allRecords(t testing.TB, dsn string) []storage.Record {
	t.Helper()
	s, err := postgres.Open(context.Background(), dsn, postgres.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	var out []storage.Record
	q := storage.Query{Limit: storage.MaxLimit}
	for {
		page, err := s.List(context.Background(), q)
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, page...)
		if len(page) < q.Limit {
			return out
		}
		q.AfterWriter, q.AfterSeq = page[len(page)-1].Writer, page[len(page)-1].Seq
	}
}

// load is concurrent clients calling CreateCertificate until stopped, as
// Istio's agents do: a long deadline, a retry after Unavailable.
type load struct {
	mu          sync.Mutex
	received    map[string]int // serial → responses carrying it
	issued      atomic.Int64
	unavailable atomic.Int64
	other       []error
	stop        chan struct{}
	wg          sync.WaitGroup
}

func startLoad(t *testing.T, client authpb.IstioCertificateServiceClient, clients int) *load {
	l := &load{received: map[string]int{}, stop: make(chan struct{})}
	for c := range clients {
		csr := csrPEM(t, c)
		l.wg.Go(func() {
			for {
				select {
				case <-l.stop:
					return
				default:
				}
				ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
				resp, err := client.CreateCertificate(ctx, &authpb.IstioCertificateRequest{Csr: csr})
				cancel()
				switch status.Code(err) {
				case codes.OK:
					serial := leafSerial(t, resp.GetCertChain())
					l.mu.Lock()
					l.received[serial]++
					l.mu.Unlock()
					l.issued.Add(1)
				case codes.Unavailable:
					l.unavailable.Add(1)
					time.Sleep(10 * time.Millisecond) // Istio's client backs off from 100 ms
				default:
					l.mu.Lock()
					l.other = append(l.other, err)
					l.mu.Unlock()
				}
			}
		})
	}
	return l
}

// await waits until cond holds; the bound only keeps a broken build from
// hanging, no assertion depends on timing.
func await(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(2 * time.Minute)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("gave up waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// TestFaultDatabaseStoppedUnderLoad drives the real issuance pipeline over
// gRPC with concurrent clients while the PostgreSQL server process is
// killed (SIGQUIT, as in a crash), shut down (SIGINT) and frozen past the
// audit deadline (SIGSTOP), each time restarted or resumed on the same data
// directory and port. Meanwhile the CA must refuse with Unavailable, and
// recover by itself. Afterwards: every certificate a client received has
// exactly one audit record (matched by serial) and no undelivered marker;
// every issued record whose certificate no client received is followed by
// an undelivered marker; and the chain verifies.
func TestFaultDatabaseStoppedUnderLoad(t *testing.T) {
	if testing.Short() {
		t.Skip("restarts PostgreSQL several times")
	}
	pg := pgtest.Start(t, pgtest.Options{Durable: true})
	dsn := pg.CreateDB(t)
	store, err := postgres.Open(context.Background(), dsn, postgres.Options{Writer: "fault",
		CommitTimeout: 2 * time.Second, RetryInterval: 50 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	defer store.Close()
	client := serveGRPC(t, newIssuer(t, store, 500*time.Millisecond))
	l := startLoad(t, client, 8)
	defer func() { close(l.stop); l.wg.Wait() }()

	ping := func() error {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		return store.Ping(ctx)
	}
	faults := []struct {
		name         string
		break_, mend func()
	}{
		{"killed (SIGQUIT) and restarted", func() { pg.Stop(t, syscall.SIGQUIT) }, func() { pg.Restart(t) }},
		{"shut down (SIGINT) and restarted", func() { pg.Stop(t, syscall.SIGINT) }, func() { pg.Restart(t) }},
		{"frozen (SIGSTOP) past the audit deadline and resumed", func() { pg.Freeze(t) }, func() { pg.Thaw(t) }},
	}
	for _, f := range faults {
		base := l.issued.Load()
		await(t, "issuance before: "+f.name, func() bool { return l.issued.Load() >= base+50 })
		refusedBefore := l.unavailable.Load()
		f.break_()
		await(t, "Unavailable while "+f.name, func() bool { return l.unavailable.Load() >= refusedBefore+20 })
		if err := ping(); err == nil {
			t.Errorf("%s: readiness (Ping) succeeded while the database was out", f.name)
		}
		f.mend()
		base = l.issued.Load()
		await(t, "recovery after: "+f.name, func() bool { return l.issued.Load() >= base+50 })
		if err := ping(); err != nil {
			t.Errorf("%s: readiness after recovery: %v", f.name, err)
		}
		t.Logf("%s: %d issued, %d Unavailable so far", f.name, l.issued.Load(), l.unavailable.Load())
	}
	close(l.stop)
	l.wg.Wait()
	l.stop = make(chan struct{}) // for the deferred close
	if err := store.Close(); err != nil {
		t.Fatal(err)
	}
	if len(l.other) > 0 {
		t.Fatalf("%d calls failed with codes other than Unavailable, first: %v", len(l.other), l.other[0])
	}

	recs := allRecords(t, dsn)
	issuedRows, markers := map[string]int{}, map[string]int{}
	for _, r := range recs {
		switch r.Outcome {
		case storage.OutcomeIssued:
			issuedRows[r.Serial]++
		case storage.OutcomeUndelivered:
			markers[r.Serial]++
		}
	}
	for serial, n := range l.received {
		if n != 1 || issuedRows[serial] != 1 || markers[serial] != 0 {
			t.Errorf("serial %s: received %d times, %d issued records, %d undelivered markers; want 1, 1, 0",
				serial, n, issuedRows[serial], markers[serial])
		}
	}
	undelivered := 0
	for serial, n := range issuedRows {
		if l.received[serial] > 0 {
			continue
		}
		undelivered++
		if n != 1 || markers[serial] != 1 {
			t.Errorf("serial %s: issued record(s) %d and %d markers, but no client received it: want 1 and 1", serial, n, markers[serial])
		}
	}
	verify(t, dsn, len(recs))
	t.Logf("%d certificates received, %d records, %d issued but undelivered (marked), %d Unavailable answers",
		len(l.received), len(recs), undelivered, l.unavailable.Load())
}

func verify(t *testing.T, dsn string, want int) {
	t.Helper()
	s, err := postgres.Open(context.Background(), dsn, postgres.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	res, err := s.Verify(context.Background())
	if err != nil || !res.OK || res.Records != want {
		t.Fatalf("Verify = %+v, %v; want OK over %d records", res, err, want)
	}
}

// TestClientGoneIsMarkedUndelivered: a client whose deadline passes while
// its certificate's audit record is being committed never gets the
// response; the server marks the issuance undelivered.
func TestClientGoneIsMarkedUndelivered(t *testing.T) {
	pg := pgtest.Start(t, pgtest.Options{})
	dsn := pg.CreateDB(t)
	store, err := postgres.Open(context.Background(), dsn, postgres.Options{Writer: "gone"})
	if err != nil {
		t.Fatal(err)
	}
	defer store.Close()
	client := serveGRPC(t, newIssuer(t, store, time.Minute))

	pg.Freeze(t) // the audit commit hangs
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	_, err = client.CreateCertificate(ctx, &authpb.IstioCertificateRequest{Csr: csrPEM(t, 1)})
	cancel()
	if status.Code(err) != codes.DeadlineExceeded {
		t.Fatalf("CreateCertificate with a frozen database = %v, want DeadlineExceeded", err)
	}
	pg.Thaw(t) // the record commits, after the client has gone
	var recs []storage.Record
	await(t, "the undelivered marker", func() bool {
		recs = allRecords(t, dsn)
		return len(recs) == 2
	})
	issued, marker := recs[0], recs[1]
	if issued.Outcome != storage.OutcomeIssued || marker.Outcome != storage.OutcomeUndelivered ||
		marker.Reason != storage.ReasonResponseLost || marker.Serial != issued.Serial || marker.RequestID != issued.RequestID {
		t.Fatalf("records %+v\n%+v: want an issuance followed by its response-lost marker", issued, marker)
	}
	verify(t, dsn, 2)
}
