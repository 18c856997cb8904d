package main

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/pem"
	"fmt"
	"net/http"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/castellan-ca/castellan/cmd/internal/datadir"
	adminpb "github.com/castellan-ca/castellan/proto/castellan/admin/v1"
	"github.com/castellan-ca/castellan/storage"
	"github.com/castellan-ca/castellan/storage/embedded"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// panicID is the identity whose issuance the fault hook turns into a panic.
const panicID = "spiffe://cluster.local/ns/fault/sa/panic"

// TestServePanicFault injects a panic into the issuance pipeline of a real
// server (through ca.Config.BeforeSign) while other calls run beside it:
// each panicking call fails with Internal and leaves exactly one audit
// record, every other call gets its certificate, the server keeps serving,
// and every certificate a client received has exactly one audit record.
func TestServePanicFault(t *testing.T) {
	hooks := faultHooks{beforeSign: func(_ context.Context, grant spiffeid.ID) {
		if grant.String() == panicID {
			panic("injected fault")
		}
	}}
	s := startServeWith(t, filepath.Join(t.TempDir(), "data"), hooks)
	admin := adminpb.NewAdminServiceClient(s.conn(t, true))

	const workers, perWorker = 4, 10
	var (
		mu       sync.Mutex
		received []string // SHA-256 of every leaf a client got
		internal int
		wg       sync.WaitGroup
	)
	issue := func(id string) ([]string, error) {
		ctx, cancel := context.WithTimeout(context.Background(), callTimeout)
		defer cancel()
		resp, err := admin.IssueCertificate(ctx, &adminpb.IssueCertificateRequest{Csr: csrPEM(t), Identity: id, ValiditySeconds: 3600})
		return resp.GetCertChain(), err
	}
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range perWorker {
				id := fmt.Sprintf("spiffe://cluster.local/ns/fault/sa/w%d", w)
				if (i*workers+w)%7 == 3 { // every seventh call, spread over the workers
					id = panicID
				}
				chain, err := issue(id)
				mu.Lock()
				switch {
				case id == panicID && status.Code(err) == codes.Internal:
					internal++
				case id != panicID && err == nil:
					received = append(received, leafSHA256(t, chain[0]))
				default:
					t.Errorf("issue %s: %v", id, err)
				}
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	if internal != 6 || len(received) != workers*perWorker-6 {
		t.Fatalf("%d Internal answers and %d certificates, want 6 and %d", internal, len(received), workers*perWorker-6)
	}
	if chain, err := issue("spiffe://cluster.local/ns/fault/sa/after"); err != nil {
		t.Fatalf("the server does not serve after the panics: %v", err)
	} else {
		received = append(received, leafSHA256(t, chain[0]))
	}
	if code, _ := httpGet(t, "http://"+s.monAddr+"/healthz"); code != http.StatusOK {
		t.Errorf("/healthz = %d after the panics", code)
	}

	recs := auditRecords(t, admin)
	var panicked int
	for _, r := range recs {
		if r.GetReason() == "internal.panic" {
			panicked++
			if r.GetCode() != codes.Internal.String() || r.GetOutcome() != "failed" || r.GetRequestedIdentity() != panicID || r.GetSerial() != "" {
				t.Errorf("panic record %+v, want a failed Internal record for %s without a certificate", r, panicID)
			}
		}
	}
	if panicked != internal {
		t.Errorf("%d panic records, want one per Internal answer (%d)", panicked, internal)
	}
	matchIssued(t, received, recs)
	_, metrics := httpGet(t, "http://"+s.monAddr+"/metrics")
	if v := metricValues(t, metrics, "castellan_panics_total")["castellan_panics_total"]; v != float64(internal) {
		t.Errorf("castellan_panics_total = %v, want %d", v, internal)
	}
	t.Logf("%d certificates received, %d calls failed with Internal, %d audit records", len(received), internal, len(recs))
}

// leafSHA256 returns the hex SHA-256 of the certificate in a PEM element.
func leafSHA256(t *testing.T, elem string) string {
	t.Helper()
	b, _ := pem.Decode([]byte(elem))
	if b == nil {
		t.Fatalf("response element is not PEM: %q", elem)
	}
	sum := sha256.Sum256(b.Bytes)
	return hex.EncodeToString(sum[:])
}

// auditRecords returns the whole audit log through the admin API, page by page.
func auditRecords(t *testing.T, admin adminpb.AdminServiceClient) []*adminpb.AuditRecord {
	t.Helper()
	var out []*adminpb.AuditRecord
	req := &adminpb.ListAuditRecordsRequest{Limit: 1000}
	for {
		ctx, cancel := context.WithTimeout(context.Background(), callTimeout)
		resp, err := admin.ListAuditRecords(ctx, req)
		cancel()
		if err != nil {
			t.Fatalf("ListAuditRecords: %v", err)
		}
		out = append(out, resp.GetRecords()...)
		if len(resp.GetRecords()) < int(req.Limit) {
			return out
		}
		last := resp.GetRecords()[len(resp.GetRecords())-1]
		req.AfterWriter, req.AfterSeq = last.GetWriter(), last.GetSeq()
	}
}

// matchIssued checks that every received certificate has exactly one audit
// record of its issuance, and no other issuance record names it.
func matchIssued(t *testing.T, received []string, recs []*adminpb.AuditRecord) {
	t.Helper()
	issued := map[string]int{}
	for _, r := range recs {
		if r.GetOutcome() == "issued" {
			issued[r.GetCertSha256()]++
		}
	}
	for _, sum := range received {
		if n := issued[sum]; n != 1 {
			t.Errorf("certificate %s…: %d issuance records, want exactly 1", sum[:12], n)
		}
	}
}

// slowID is the identity whose issuance the fault hook holds up, longer than
// the shutdown drain, without looking at its context (a stuck backend).
const slowID = "spiffe://cluster.local/ns/fault/sa/slow"

// TestServeShutdownUnderLoad cancels serve (what SIGTERM does) while fast
// calls keep coming and slow ones are in flight: fast calls finish or get
// Unavailable, the slow ones are cut off after the drain (their clients see
// Unavailable) yet still leave their audit record, serve returns within the
// grace period, and the store read afterwards holds exactly one issuance
// record per certificate a client received, and none delivered to a slow call.
func TestServeShutdownUnderLoad(t *testing.T) {
	entered := make(chan struct{}, 3)
	hooks := faultHooks{beforeSign: func(_ context.Context, grant spiffeid.ID) {
		if grant.String() == slowID {
			entered <- struct{}{}
			time.Sleep(3 * time.Second)
		}
	}}
	// grace 7s with the default 5s audit timeout: 1s of drain.
	data := filepath.Join(t.TempDir(), "data")
	s := startServeWith(t, data, hooks, "--shutdown-grace-period", "7s")
	admin := adminpb.NewAdminServiceClient(s.conn(t, true))
	issue := func(id string) ([]string, error) {
		ctx, cancel := context.WithTimeout(context.Background(), callTimeout)
		defer cancel()
		resp, err := admin.IssueCertificate(ctx, &adminpb.IssueCertificateRequest{Csr: csrPEM(t), Identity: id, ValiditySeconds: 3600})
		return resp.GetCertChain(), err
	}

	var (
		mu       sync.Mutex
		received []string
		byCode   = map[codes.Code]int{}
		fast     atomic.Int64
		wg       sync.WaitGroup
	)
	stop := make(chan struct{})
	for w := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
				chain, err := issue(fmt.Sprintf("spiffe://cluster.local/ns/fault/sa/fast%d", w))
				mu.Lock()
				byCode[status.Code(err)]++
				if err == nil {
					received = append(received, leafSHA256(t, chain[0]))
					fast.Add(1)
				}
				mu.Unlock()
				if err != nil {
					time.Sleep(10 * time.Millisecond)
				}
			}
		}()
	}
	slowCodes := make(chan codes.Code, 3)
	for range 3 {
		go func() {
			_, err := issue(slowID)
			slowCodes <- status.Code(err)
		}()
	}
	for range 3 {
		<-entered // the slow calls are in flight, inside the pipeline
	}
	for fast.Load() < 50 {
		time.Sleep(10 * time.Millisecond)
	}
	start := time.Now()
	if err := s.stop(); err != nil {
		t.Fatalf("serve returned %v, want nil", err)
	}
	took := time.Since(start)
	close(stop)
	wg.Wait()
	for range 3 {
		if c := <-slowCodes; c != codes.Unavailable {
			t.Errorf("slow call cut off at shutdown: %s, want Unavailable", c)
		}
	}
	for c, n := range byCode {
		if c != codes.OK && c != codes.Unavailable {
			t.Errorf("%d fast calls ended with %s, want OK or Unavailable", n, c)
		}
	}
	t.Logf("serve returned %v after cancel; fast calls by code %v", took.Round(time.Millisecond), byCode)
	if took > 7*time.Second {
		t.Errorf("serve returned %v after cancel, want within the 7s grace period", took)
	}

	store, err := embedded.Open(context.Background(), filepath.Join(data, datadir.AuditDB), embedded.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer store.Close()
	recs, err := store.List(context.Background(), storage.Query{Limit: storage.MaxLimit})
	if err != nil {
		t.Fatal(err)
	}
	issued, undelivered := map[string]int{}, map[string]bool{}
	var slow []storage.Record
	for _, r := range recs {
		switch {
		case r.Outcome == storage.OutcomeIssued:
			issued[r.CertSHA256]++
		case r.Outcome == storage.OutcomeUndelivered:
			undelivered[r.CertSHA256] = true
		}
		if r.RequestedIdentity == slowID && r.Outcome != storage.OutcomeUndelivered {
			slow = append(slow, r)
		}
	}
	for _, r := range slow {
		t.Logf("slow call: %s %s %s", r.Outcome, r.Code, r.Reason)
		if r.Outcome == storage.OutcomeIssued && !undelivered[r.CertSHA256] {
			t.Errorf("slow call's certificate %s… issued with no undelivered marker", r.CertSHA256[:12])
		}
	}
	slowRecs := len(slow)
	if slowRecs != 3 {
		t.Errorf("%d audit records of the slow calls, want 3", slowRecs)
	}
	for _, sum := range received {
		if issued[sum] != 1 || undelivered[sum] {
			t.Errorf("received certificate %s…: %d issuance records, undelivered marker %v; want 1 and none", sum[:12], issued[sum], undelivered[sum])
		}
	}
}
