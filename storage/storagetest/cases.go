package storagetest

import (
	"context"
	"errors"
	"fmt"
	"math"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/castellan-ca/castellan/storage"
)

var t0 = time.Date(2025, 6, 1, 12, 0, 0, 123456789, time.UTC)

// open opens a store from env and closes it when the test ends.
func open(t *testing.T, env Env) Store {
	t.Helper()
	s := env.Open(t)
	t.Cleanup(func() {
		if err := s.Close(); err != nil {
			t.Errorf("close: %v", err)
		}
	})
	return s
}

// csr returns a plausible issued-certificate record for identity id.
func csr(id string, at time.Time) *storage.Record {
	return &storage.Record{
		Time: at, Kind: storage.KindCSR, RequestID: "req-" + id, Peer: "10.1.2.3:4567", AuthMethod: "kubernetes",
		Caller: id, ClusterID: "cluster-1", RequestedIdentity: id, GrantedIdentity: id,
		Outcome: storage.OutcomeIssued, Code: "OK", Serial: "01", NotBefore: at.Add(-time.Minute),
		NotAfter: at.Add(24 * time.Hour), CertSHA256: strings.Repeat("ab", 32), Signer: "selfsigned",
		IssuerKeyID: "cafe",
	}
}

func mustAppend(t *testing.T, s Store, r *storage.Record) {
	t.Helper()
	if err := s.Append(t.Context(), r); err != nil {
		t.Fatalf("Append: %v", err)
	}
}

func mustVerify(t *testing.T, s Store, wantRecords int) {
	t.Helper()
	res, err := s.Verify(context.Background())
	if err != nil {
		t.Fatalf("Verify: %v", err)
	}
	if !res.OK || res.Records != wantRecords || res.Problem != "" {
		t.Fatalf("Verify = %+v, want OK with %d records", res, wantRecords)
	}
}

// normalize makes records comparable with reflect.DeepEqual: stores return
// UTC times without monotonic readings.
func normalize(r storage.Record) storage.Record {
	r.Time, r.NotBefore, r.NotAfter = r.Time.UTC(), r.NotBefore.UTC(), r.NotAfter.UTC()
	return r
}

func assertSameRecord(t *testing.T, got, want storage.Record) {
	t.Helper()
	if g, w := normalize(got), normalize(want); !reflect.DeepEqual(g, w) {
		t.Fatalf("record mismatch:\n got %+v\nwant %+v", g, w)
	}
}

func testAppendChain(t *testing.T, env Env) {
	s := open(t, env)
	ctx := context.Background()
	var recs []*storage.Record
	prev := ""
	for i := 1; i <= 5; i++ {
		r := csr(fmt.Sprintf("spiffe://td/ns/a/sa/s%d", i), t0.Add(time.Duration(i)*time.Second))
		mustAppend(t, s, r)
		if r.Seq != uint64(i) || r.Writer == "" || r.PrevHash != prev || r.Hash != r.ComputeHash() {
			t.Fatalf("record %d after Append: seq=%d writer=%q prev=%q hash=%q (want prev %q, hash %q)",
				i, r.Seq, r.Writer, r.PrevHash, r.Hash, prev, r.ComputeHash())
		}
		if i > 1 && r.Writer != recs[0].Writer {
			t.Fatalf("writer changed from %q to %q", recs[0].Writer, r.Writer)
		}
		prev = r.Hash
		recs = append(recs, r)
	}
	for _, want := range recs {
		got, err := s.Get(ctx, want.Writer, want.Seq)
		if err != nil {
			t.Fatalf("Get(%s, %d): %v", want.Writer, want.Seq, err)
		}
		assertSameRecord(t, *got, *want)
	}
	mustVerify(t, s, 5)
}

func testAppendTime(t *testing.T, env Env) {
	s := open(t, env)
	tests := []struct {
		name string
		in   time.Time
	}{
		{"zero is filled", time.Time{}},
		{"nanoseconds kept", time.Date(2025, 1, 1, 0, 0, 0, 1, time.UTC)},
		{"other zone stored as the same instant", time.Date(2025, 1, 1, 9, 0, 0, 999999999, time.FixedZone("X", 9*3600))},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			r := csr("spiffe://td/ns/a/sa/time", tc.in)
			r.NotBefore, r.NotAfter = time.Time{}, time.Date(9999, 12, 31, 23, 59, 59, 5, time.UTC)
			before := time.Now()
			mustAppend(t, s, r)
			switch {
			case tc.in.IsZero() && (r.Time.Before(before.Add(-time.Minute)) || r.Time.After(time.Now().Add(time.Minute))):
				t.Fatalf("zero time filled with %v, want about now", r.Time)
			case !tc.in.IsZero() && !r.Time.Equal(tc.in):
				t.Fatalf("time %v, want %v", r.Time, tc.in)
			}
			got, err := s.Get(t.Context(), r.Writer, r.Seq)
			if err != nil {
				t.Fatal(err)
			}
			if got.Time.Location() != time.UTC || !got.NotBefore.IsZero() {
				t.Fatalf("read back time %v (loc %v), not_before %v; want UTC and zero", got.Time, got.Time.Location(), got.NotBefore)
			}
			assertSameRecord(t, *got, *r)
		})
	}
	mustVerify(t, s, len(tests))
}

func testAppendInvalid(t *testing.T, env Env) {
	s := open(t, env)
	r := csr("x", t0)
	r.Kind = ""
	if err := s.Append(context.Background(), r); !errors.Is(err, storage.ErrInvalidRecord) {
		t.Fatalf("Append with empty kind = %v, want ErrInvalidRecord", err)
	}
	if got, err := s.List(context.Background(), storage.Query{}); err != nil || len(got) != 0 {
		t.Fatalf("List after rejected append = %d records, %v; want none", len(got), err)
	}
}

func testAppendCancelled(t *testing.T, env Env) {
	s := open(t, env)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := s.Append(ctx, csr("x", t0)); !errors.Is(err, context.Canceled) {
		t.Fatalf("Append with cancelled ctx = %v, want context.Canceled", err)
	}
	r := csr("y", t0)
	mustAppend(t, s, r)
	if r.Seq != 1 {
		t.Fatalf("seq after a cancelled append = %d, want 1 (nothing written)", r.Seq)
	}
}

func testConcurrentAppends(t *testing.T, env Env) {
	const workers, each = 64, 20
	s := open(t, env)
	var (
		wg   sync.WaitGroup
		mu   sync.Mutex
		seqs = map[uint64]string{}
		errs []error
	)
	for w := range workers {
		wg.Go(func() {
			for i := range each {
				r := csr(fmt.Sprintf("spiffe://td/ns/w/sa/%d-%d", w, i), t0)
				err := s.Append(context.Background(), r)
				mu.Lock()
				if err != nil {
					errs = append(errs, err)
				} else if prev, dup := seqs[r.Seq]; dup {
					errs = append(errs, fmt.Errorf("seq %d given to %s and %s", r.Seq, prev, r.GrantedIdentity))
				} else {
					seqs[r.Seq] = r.GrantedIdentity
				}
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	if len(errs) > 0 {
		t.Fatalf("%d appends failed, first: %v", len(errs), errs[0])
	}
	for seq := uint64(1); seq <= workers*each; seq++ {
		if _, ok := seqs[seq]; !ok {
			t.Fatalf("seq %d was not assigned", seq)
		}
	}
	got, err := s.List(context.Background(), storage.Query{Limit: storage.MaxLimit})
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != workers*each {
		t.Fatalf("List returned %d records, want %d", len(got), workers*each)
	}
	for i, r := range got {
		if r.Seq != uint64(i+1) || seqs[r.Seq] != r.GrantedIdentity {
			t.Fatalf("row %d: seq %d identity %q, want seq %d identity %q", i, r.Seq, r.GrantedIdentity, i+1, seqs[uint64(i+1)])
		}
	}
	mustVerify(t, s, workers*each)
}

func testListFilters(t *testing.T, env Env) {
	s := open(t, env)
	ctx := context.Background()
	// Fixture, seq in comments.
	fixture := []func(r *storage.Record){
		func(r *storage.Record) {}, // 1 alice issued
		func(r *storage.Record) { r.Serial, r.CertSHA256 = "0b", strings.Repeat("cd", 32) }, // 2 alice
		func(r *storage.Record) { // 3 bob refused, asked for alice's identity
			r.GrantedIdentity, r.RequestedIdentity, r.Caller = "", "spiffe://td/ns/a/sa/alice", "spiffe://td/ns/a/sa/bob"
			r.Outcome, r.Reason, r.Code, r.Serial, r.CertSHA256 = storage.OutcomeRefused, "authz.identity_denied", "PermissionDenied", "", ""
			r.NotBefore, r.NotAfter = time.Time{}, time.Time{}
		},
		func(r *storage.Record) { // 4 bob issued
			r.GrantedIdentity, r.RequestedIdentity, r.Serial = "spiffe://td/ns/a/sa/bob", "spiffe://td/ns/a/sa/bob", "0c"
		},
		func(r *storage.Record) { // 5 failed, requested alice
			r.GrantedIdentity, r.Outcome, r.Serial, r.CertSHA256 = "", storage.OutcomeFailed, "", ""
		},
		func(r *storage.Record) { // 6 operator
			*r = storage.Record{Time: r.Time, Kind: storage.KindOperator, AuthMethod: "operator", Caller: "admin",
				Outcome: storage.OutcomeOK, Detail: "rotated intermediate"}
		},
	}
	var writer string
	for i, f := range fixture {
		r := csr("spiffe://td/ns/a/sa/alice", t0.Add(time.Duration(i)*time.Minute))
		f(r)
		mustAppend(t, s, r)
		writer = r.Writer
	}
	tests := []struct {
		name string
		q    storage.Query
		want []uint64
	}{
		{"all", storage.Query{}, []uint64{1, 2, 3, 4, 5, 6}},
		{"identity matches granted and requested", storage.Query{Identity: "spiffe://td/ns/a/sa/alice"}, []uint64{1, 2, 3, 5}},
		{"identity bob", storage.Query{Identity: "spiffe://td/ns/a/sa/bob"}, []uint64{4}},
		{"identity unknown", storage.Query{Identity: "spiffe://td/ns/a/sa/nobody"}, nil},
		{"serial", storage.Query{Serial: "0b"}, []uint64{2}},
		{"fingerprint", storage.Query{CertSHA256: strings.Repeat("ab", 32)}, []uint64{1, 4}},
		{"outcome refused", storage.Query{Outcome: storage.OutcomeRefused}, []uint64{3}},
		{"outcome issued", storage.Query{Outcome: storage.OutcomeIssued}, []uint64{1, 2, 4}},
		{"since inclusive", storage.Query{Since: t0.Add(4 * time.Minute)}, []uint64{5, 6}},
		{"until exclusive", storage.Query{Until: t0.Add(2 * time.Minute)}, []uint64{1, 2}},
		{"time range", storage.Query{Since: t0.Add(time.Minute), Until: t0.Add(3*time.Minute + time.Nanosecond)}, []uint64{2, 3, 4}},
		{"limit", storage.Query{Limit: 2}, []uint64{1, 2}},
		{"after seq", storage.Query{AfterSeq: 4}, []uint64{5, 6}},
		{"after seq with limit pages", storage.Query{AfterSeq: 2, Limit: 2}, []uint64{3, 4}},
		// Seqs are stored signed: a bound past MaxInt64 is past every record,
		// not a negative number that lists from the start again.
		{"after seq past MaxInt64", storage.Query{AfterSeq: math.MaxInt64 + 1}, nil},
		{"after the largest seq", storage.Query{AfterSeq: math.MaxUint64}, nil},
		{"writer", storage.Query{Writer: writer}, []uint64{1, 2, 3, 4, 5, 6}},
		{"other writer", storage.Query{Writer: writer + "-other"}, nil},
		{"combined", storage.Query{Identity: "spiffe://td/ns/a/sa/alice", Outcome: storage.OutcomeIssued, AfterSeq: 1}, []uint64{2}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := s.List(ctx, tc.q)
			if err != nil {
				t.Fatalf("List: %v", err)
			}
			var seqs []uint64
			for _, r := range got {
				seqs = append(seqs, r.Seq)
			}
			if !reflect.DeepEqual(seqs, tc.want) {
				t.Fatalf("List(%+v) seqs = %v, want %v", tc.q, seqs, tc.want)
			}
		})
	}
	// A listed record is the full record, not a projection.
	got, err := s.List(ctx, storage.Query{Serial: "0b"})
	if err != nil || len(got) != 1 {
		t.Fatalf("List serial: %v, %d records", err, len(got))
	}
	full, err := s.Get(ctx, got[0].Writer, got[0].Seq)
	if err != nil {
		t.Fatal(err)
	}
	assertSameRecord(t, got[0], *full)
}

func testListDefaultLimit(t *testing.T, env Env) {
	s := open(t, env)
	for i := range storage.DefaultLimit + 5 {
		mustAppend(t, s, csr(fmt.Sprint(i), t0))
	}
	for _, tc := range []struct {
		limit, want int
	}{{0, storage.DefaultLimit}, {-1, storage.DefaultLimit}, {storage.MaxLimit + 1, storage.DefaultLimit + 5}} {
		got, err := s.List(context.Background(), storage.Query{Limit: tc.limit})
		if err != nil || len(got) != tc.want {
			t.Fatalf("List(Limit %d) = %d records, %v; want %d", tc.limit, len(got), err, tc.want)
		}
	}
}

func testGetNotFound(t *testing.T, env Env) {
	s := open(t, env)
	r := csr("x", t0)
	mustAppend(t, s, r)
	for _, tc := range []struct {
		writer string
		seq    uint64
	}{{r.Writer, 2}, {r.Writer, 0}, {"nobody", 1}, {r.Writer, math.MaxInt64 + 2}, {r.Writer, math.MaxUint64}} {
		if _, err := s.Get(context.Background(), tc.writer, tc.seq); !errors.Is(err, storage.ErrNotFound) {
			t.Fatalf("Get(%q, %d) = %v, want ErrNotFound", tc.writer, tc.seq, err)
		}
	}
}

func testVerifyClean(t *testing.T, env Env) {
	s := open(t, env)
	res, err := s.Verify(context.Background())
	if err != nil || !res.OK || res.Records != 0 || res.Writers != 0 {
		t.Fatalf("Verify on empty store = %+v, %v; want OK with 0 records", res, err)
	}
	for i := range 10 {
		mustAppend(t, s, csr(fmt.Sprint(i), t0))
	}
	res, err = s.Verify(context.Background())
	if err != nil || !res.OK || res.Records != 10 || res.Writers != 1 {
		t.Fatalf("Verify = %+v, %v; want OK with 10 records, 1 writer", res, err)
	}
	if err := s.Ping(context.Background()); err != nil {
		t.Fatalf("Ping: %v", err)
	}
}

func testReopen(t *testing.T, env Env) {
	s := env.Open(t)
	var last *storage.Record
	for i := range 3 {
		last = csr(fmt.Sprint(i), t0)
		mustAppend(t, s, last)
	}
	if err := s.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	s = open(t, env)
	r := csr("after-reopen", t0)
	mustAppend(t, s, r)
	if r.Seq != 4 || r.Writer != last.Writer || r.PrevHash != last.Hash {
		t.Fatalf("after reopen: seq %d writer %q prev %q; want seq 4 writer %q prev %q",
			r.Seq, r.Writer, r.PrevHash, last.Writer, last.Hash)
	}
	mustAppend(t, s, csr("again", t0))
	mustVerify(t, s, 5)
}

func testClosed(t *testing.T, env Env) {
	s := env.Open(t)
	mustAppend(t, s, csr("x", t0))
	if err := s.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	ctx := context.Background()
	checks := map[string]error{
		"Append": s.Append(ctx, csr("y", t0)),
		"Ping":   s.Ping(ctx),
	}
	_, checks["List"] = s.List(ctx, storage.Query{})
	_, checks["Get"] = s.Get(ctx, "w", 1)
	_, checks["Verify"] = s.Verify(ctx)
	for name, err := range checks {
		if !errors.Is(err, storage.ErrClosed) {
			t.Errorf("%s after Close = %v, want ErrClosed", name, err)
		}
	}
	if err := s.Close(); err != nil {
		t.Errorf("second Close = %v, want nil", err)
	}
}

// tamperCases edit, delete or reorder rows behind the store's back; Verify
// must report OK false naming wantSeq as the first untrustworthy seq.
var tamperCases = []struct {
	name    string
	sql     []string // %[1]s is the writer
	wantSeq uint64
}{
	{"EditedGrantedIdentity", []string{
		`UPDATE audit_log SET granted_identity = 'spiffe://td/ns/evil/sa/x' WHERE writer = '%[1]s' AND seq = 4`}, 4},
	{"DeletedMiddleRow", []string{`DELETE FROM audit_log WHERE writer = '%[1]s' AND seq = 4`}, 4},
	{"DeletedFirstRow", []string{`DELETE FROM audit_log WHERE writer = '%[1]s' AND seq = 1`}, 1},
	{"SwappedSeqs", []string{ // three steps because (writer, seq) is unique
		`UPDATE audit_log SET seq = 1000 WHERE writer = '%[1]s' AND seq = 3`,
		`UPDATE audit_log SET seq = 3 WHERE writer = '%[1]s' AND seq = 4`,
		`UPDATE audit_log SET seq = 4 WHERE writer = '%[1]s' AND seq = 1000`}, 3},
	{"EditedHashColumn", []string{`UPDATE audit_log SET hash = '00' WHERE writer = '%[1]s' AND seq = 5`}, 5},
}

// testTamper runs each tamper case on fresh data from newEnv.
func testTamper(t *testing.T, newEnv func(t *testing.T) Env) {
	for _, tc := range tamperCases {
		t.Run(tc.name, func(t *testing.T) {
			env := newEnv(t)
			if env.Tamper == nil {
				t.Skip("store provides no Tamper hook")
			}
			s := open(t, env)
			ctx := context.Background()
			var writer string
			for i := range 6 {
				r := csr(fmt.Sprint(i), t0)
				mustAppend(t, s, r)
				writer = r.Writer
			}
			mustVerify(t, s, 6)
			for _, stmt := range tc.sql {
				if err := env.Tamper.Exec(ctx, fmt.Sprintf(stmt, writer)); err != nil {
					t.Fatalf("tamper %q: %v", stmt, err)
				}
			}
			res, err := s.Verify(ctx)
			if err != nil {
				t.Fatalf("Verify: %v", err)
			}
			if res.OK || res.Writer != writer || res.Seq != tc.wantSeq || res.Problem == "" {
				t.Fatalf("Verify = %+v, want OK false at writer %q seq %d", res, writer, tc.wantSeq)
			}
			if !strings.Contains(res.Problem, fmt.Sprint(tc.wantSeq)) {
				t.Fatalf("problem %q does not name seq %d", res.Problem, tc.wantSeq)
			}
		})
	}
}
