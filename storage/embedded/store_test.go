package embedded

import (
	"context"
	"crypto/ed25519"
	"database/sql"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/castellan-ca/castellan/storage"
	"github.com/castellan-ca/castellan/storage/groupcommit"
	"github.com/castellan-ca/castellan/storage/storagetest"
	"modernc.org/sqlite"
	sqlite3 "modernc.org/sqlite/lib"
)

// rawDB opens path with database/sql directly, bypassing the store: the
// tamper hook and fault injection use it.
type rawDB struct{ db *sql.DB }

func openRaw(t *testing.T, path string) *rawDB {
	t.Helper()
	db, err := sql.Open("sqlite", dsn(path, "_txlock=immediate"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := db.Close(); err != nil {
			t.Errorf("close: %v", err)
		}
	})
	return &rawDB{db: db}
}

// Exec implements storagetest.Tamper.
func (r *rawDB) Exec(ctx context.Context, query string, args ...any) error {
	_, err := r.db.ExecContext(ctx, query, args...)
	return err
}

func openStore(t testing.TB, path string, opts Options) *Store {
	t.Helper()
	s, err := Open(context.Background(), path, opts)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	t.Cleanup(func() {
		if err := s.Close(); err != nil {
			t.Errorf("close: %v", err)
		}
	})
	return s
}

// testCheckpointKey signs prune checkpoints in tests (fixed: deterministic).
var testCheckpointKey = ed25519.NewKeyFromSeed(make([]byte, ed25519.SeedSize))

// reject makes the file refuse, with a CHECK constraint failure, every
// record whose granted identity is identity: SQLite cannot add a CHECK to
// audit_log, so a trigger copies such a row into a checked table.
func (r *rawDB) reject(ctx context.Context, identity string) error {
	lit := "'" + strings.ReplaceAll(identity, "'", "''") + "'"
	return r.Exec(ctx, `CREATE TABLE refused (v TEXT CHECK (v <> `+lit+`));
		CREATE TRIGGER refuse BEFORE INSERT ON audit_log WHEN NEW.granted_identity = `+lit+`
		BEGIN INSERT INTO refused VALUES (NEW.granted_identity); END`)
}

// env is a conformance Env over a fresh file; base sets the options every
// store of it opens with.
func env(t *testing.T, base Options) storagetest.Env {
	path := filepath.Join(t.TempDir(), "audit.db")
	raw := openRaw(t, path)
	open := func(t *testing.T, tune storagetest.Tuning) storagetest.Store {
		opts := base
		opts.CheckpointKey = testCheckpointKey
		tune.Apply(&opts.MaxBatch, &opts.MaxBatchDelay, &opts.hooks)
		return openStore(t, path, opts)
	}
	return storagetest.Env{
		Open:      func(t *testing.T) storagetest.Store { return open(t, storagetest.Tuning{}) },
		OpenTuned: open,
		Reject:    raw.reject,
		Tamper:    raw,
	}
}

func TestConformance(t *testing.T) {
	storagetest.Run(t, func(t *testing.T) storagetest.Env { return env(t, Options{}) })
}

func TestConformanceWithBatchDelay(t *testing.T) {
	storagetest.Run(t, func(t *testing.T) storagetest.Env {
		e := env(t, Options{MaxBatch: 7, MaxBatchDelay: time.Millisecond})
		e.Tamper = nil
		return e
	})
}

func record(id string) *storage.Record {
	return &storage.Record{Kind: storage.KindCSR, Outcome: storage.OutcomeIssued, GrantedIdentity: id}
}

func TestFileMode(t *testing.T) {
	path := filepath.Join(t.TempDir(), "audit.db")
	s := openStore(t, path, Options{})
	if err := s.Append(context.Background(), record("x")); err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{path, path + "-wal"} {
		fi, err := os.Stat(p)
		if err != nil {
			t.Fatal(err)
		}
		if fi.Mode().Perm() != 0o600 {
			t.Errorf("%s mode %v, want 0600", filepath.Base(p), fi.Mode().Perm())
		}
	}
}

// The writer's connection runs with the durability settings dsn asks for: a
// setting SQLite did not take would pass every other test.
func TestWriterConnectionSettings(t *testing.T) {
	s := openStore(t, filepath.Join(t.TempDir(), "audit.db"), Options{})
	for _, tc := range []struct {
		pragma string
		want   string
	}{
		{"journal_mode", "wal"},
		{"synchronous", "2"}, // FULL
		{"busy_timeout", "10000"},
	} {
		var got string
		if err := s.wdb.QueryRowContext(context.Background(), "PRAGMA "+tc.pragma).Scan(&got); err != nil {
			t.Fatalf("PRAGMA %s: %v", tc.pragma, err)
		}
		if got != tc.want {
			t.Errorf("PRAGMA %s = %q, want %q", tc.pragma, got, tc.want)
		}
	}
}

func TestOpenRejectsBadPath(t *testing.T) {
	for _, p := range []string{"", ":memory:", filepath.Join(t.TempDir(), "a?mode=memory")} {
		if _, err := Open(context.Background(), p, Options{}); err == nil {
			t.Errorf("Open(%q) succeeded, want error", p)
		}
	}
}

func TestWriterOption(t *testing.T) {
	path := filepath.Join(t.TempDir(), "audit.db")
	s := openStore(t, path, Options{})
	def := s.Writer()
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	s = openStore(t, path, Options{})
	if s.Writer() != def {
		t.Fatalf("writer changed across reopen: %q then %q", def, s.Writer())
	}
	other := openStore(t, path, Options{Writer: "pod-b"})
	ctx := context.Background()
	for _, st := range []*Store{s, other, s} {
		if err := st.Append(ctx, record("x")); err != nil {
			t.Fatal(err)
		}
	}
	got, err := s.List(ctx, storage.Query{Writer: "pod-b"})
	if err != nil || len(got) != 1 || got[0].Seq != 1 {
		t.Fatalf("List(pod-b) = %+v, %v; want one record with seq 1", got, err)
	}
	res, err := s.Verify(ctx)
	if err != nil || !res.OK || res.Writers != 2 || res.Records != 3 {
		t.Fatalf("Verify = %+v, %v; want OK, 2 writers, 3 records", res, err)
	}
}

// appendConcurrently runs n Appends at once and returns their errors.
func appendConcurrently(s *Store, n int, prefix string) []error {
	return storagetest.AppendConcurrently(s, n, prefix, record)
}

func TestGroupCommitBatches(t *testing.T) {
	s := storagetest.GroupCommitBatches(t, env(t, Options{}).OpenTuned, record).(*Store)
	if st := s.Stats(); st.Records != 100 || st.Batches != 1 {
		t.Fatalf("stats %+v, want 100 records in 1 transaction", st)
	}
}

func TestMaxBatchCapsTransaction(t *testing.T) {
	storagetest.MaxBatchCapsTransaction(t, env(t, Options{}).OpenTuned, record)
}

// neverFires is a batch delay that runs out only when its test fires it:
// a batch commits exactly when MaxBatch records are queued.
func neverFires() groupcommit.Hooks {
	return groupcommit.Hooks{NewTimer: (&storagetest.ManualTimers{}).NewTimer}
}

// TestCommitFailureFailsWholeBatch injects a failure at COMMIT into a batch
// of exactly 10 callers: all must fail, nothing may be written, and the
// next append must continue the chain from the last committed record.
func TestCommitFailureFailsWholeBatch(t *testing.T) {
	injected := errors.New("injected commit failure")
	var (
		fail      atomic.Bool
		failedLen atomic.Int64
	)
	s := openStore(t, filepath.Join(t.TempDir(), "audit.db"), Options{
		MaxBatch: 10, MaxBatchDelay: time.Hour, hooks: neverFires(), // commit when exactly 10 are queued
		beforeCommit: func(n int) error {
			if fail.CompareAndSwap(true, false) {
				failedLen.Store(int64(n))
				return injected
			}
			return nil
		},
	})
	ctx := context.Background()
	for range 3 { // full batches of 10 commit at once, without waiting MaxBatchDelay
		for _, err := range appendConcurrently(s, 10, "ok") {
			if err != nil {
				t.Fatal(err)
			}
		}
	}
	recs, err := s.List(ctx, storage.Query{Limit: 1000})
	if err != nil || len(recs) != 30 {
		t.Fatalf("List = %d records, %v; want 30", len(recs), err)
	}
	last := &recs[29]

	fail.Store(true)
	for i, err := range appendConcurrently(s, 10, "doomed") {
		if !errors.Is(err, injected) {
			t.Fatalf("caller %d of the failed batch got %v, want the injected error", i, err)
		}
	}
	if n := failedLen.Load(); n != 10 {
		t.Fatalf("failed batch had %d records, want 10", n)
	}
	if st := s.Stats(); st.Failures != 1 || st.Records != 30 {
		t.Fatalf("stats %+v, want 1 failure and 30 records", st)
	}

	errs := appendConcurrently(s, 10, "after")
	for _, err := range errs {
		if err != nil {
			t.Fatalf("append after recovery: %v", err)
		}
	}
	next, err := s.Get(ctx, last.Writer, 31)
	if err != nil {
		t.Fatalf("Get seq 31: %v", err)
	}
	if next.PrevHash != last.Hash || next.GrantedIdentity[:5] != "after" {
		t.Fatalf("seq 31 = %+v, want an 'after' record linked to seq 30 (%s)", next, last.Hash)
	}
	res, err := s.Verify(ctx)
	if err != nil || !res.OK || res.Records != 40 {
		t.Fatalf("Verify = %+v, %v; want OK with 40 records", res, err)
	}
}

// TestInsertFailureRollsBack makes SQLite itself reject one row (a trigger
// raises an error), which must fail every caller of that batch and leave the
// chain continuing from the last committed record.
func TestInsertFailureRollsBack(t *testing.T) {
	path := filepath.Join(t.TempDir(), "audit.db")
	s := openStore(t, path, Options{MaxBatch: 5, MaxBatchDelay: time.Hour, hooks: neverFires()})
	ctx := context.Background()
	for _, err := range appendConcurrently(s, 5, "ok") {
		if err != nil {
			t.Fatal(err)
		}
	}
	raw := openRaw(t, path)
	// A trigger's RAISE is not a refusal of the row's values (a CHECK, a
	// type): it fails the whole batch rather than one record.
	if err := raw.Exec(ctx, `CREATE TRIGGER poison BEFORE INSERT ON audit_log
		WHEN NEW.granted_identity = 'poison-3' BEGIN SELECT RAISE(ABORT, 'poisoned row'); END`); err != nil {
		t.Fatal(err)
	}
	for i, err := range appendConcurrently(s, 5, "poison") {
		if err == nil {
			t.Fatalf("caller %d of the poisoned batch succeeded", i)
		}
		if se := (*sqlite.Error)(nil); !errors.As(err, &se) || se.Code() != sqlite3.SQLITE_CONSTRAINT_TRIGGER || errors.Is(err, storage.ErrRecordRejected) {
			t.Fatalf("caller %d of the poisoned batch got %v; want the trigger's SQLite error, not a record refusal", i, err)
		}
	}
	if err := raw.Exec(ctx, `DROP TRIGGER poison`); err != nil {
		t.Fatal(err)
	}
	for _, err := range appendConcurrently(s, 5, "after") {
		if err != nil {
			t.Fatalf("append after recovery: %v", err)
		}
	}
	recs, err := s.List(ctx, storage.Query{})
	if err != nil || len(recs) != 10 {
		t.Fatalf("List = %d records, %v; want 10", len(recs), err)
	}
	for _, r := range recs[5:] {
		if r.GrantedIdentity[:5] != "after" {
			t.Fatalf("seq %d is %q: a poisoned batch's record was written", r.Seq, r.GrantedIdentity)
		}
	}
	if recs[5].Seq != 6 || recs[5].PrevHash != recs[4].Hash {
		t.Fatalf("first record after recovery has seq %d prev %q, want seq 6 linked to %q", recs[5].Seq, recs[5].PrevHash, recs[4].Hash)
	}
	if res, err := s.Verify(ctx); err != nil || !res.OK {
		t.Fatalf("Verify = %+v, %v", res, err)
	}
}

// TestCloseWaitsForQueuedAppends: records queued when Close starts are
// committed, on disk after a reopen, and their callers told so; an Append
// once Close has begun is refused and written nowhere.
func TestCloseWaitsForQueuedAppends(t *testing.T) {
	storagetest.CloseCommitsQueued(t, env(t, Options{}))
}

func BenchmarkAppend(b *testing.B) {
	s, err := Open(context.Background(), filepath.Join(b.TempDir(), "audit.db"), Options{})
	if err != nil {
		b.Fatal(err)
	}
	defer s.Close()
	b.SetParallelism(16) // many concurrent callers, as under CSR load
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			r := record("spiffe://td/ns/bench/sa/default")
			r.Serial, r.CertSHA256 = "0123456789abcdef", "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff"
			if err := s.Append(context.Background(), r); err != nil {
				b.Error(err)
				return
			}
		}
	})
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "records/s")
	st := s.Stats()
	if st.Batches > 0 {
		b.ReportMetric(float64(st.Records)/float64(st.Batches), "records/batch")
	}
}

// FuzzAuditRoundTrip: any record appended comes back, through Get and
// List, as its sanitised form, the chain verifies, and an export holding
// it verifies offline.
func FuzzAuditRoundTrip(f *testing.F) {
	storagetest.FuzzRoundTrip(f, openStore(f, filepath.Join(f.TempDir(), "audit.db"), Options{CheckpointKey: testCheckpointKey}))
}

// TestVerifyReportsUndecodableRow: a value no store would write is a break
// in the chain (OK false), not an I/O error.
func TestVerifyReportsUndecodableRow(t *testing.T) {
	path := filepath.Join(t.TempDir(), "audit.db")
	s := openStore(t, path, Options{})
	ctx := context.Background()
	for range 3 {
		r := record("x")
		r.NotAfter = time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC)
		if err := s.Append(ctx, r); err != nil {
			t.Fatal(err)
		}
	}
	if err := openRaw(t, path).Exec(ctx, `UPDATE audit_log SET not_after = 'garbage' WHERE seq = 2`); err != nil {
		t.Fatal(err)
	}
	res, err := s.Verify(ctx)
	if err != nil || res.OK || res.Seq != 2 || res.Writer != s.Writer() {
		t.Fatalf("Verify = %+v, %v; want OK false at seq 2", res, err)
	}
}

func TestOpenRefusesInvalidWriterAndNewerSchema(t *testing.T) {
	dir := t.TempDir()
	for _, w := range []string{"a\x00b", "line\nbreak", strings.Repeat("w", storage.MaxWriterLen+1)} {
		if _, err := Open(context.Background(), filepath.Join(dir, "w.db"), Options{Writer: w}); !errors.Is(err, storage.ErrInvalidWriter) {
			t.Errorf("Open with writer %.20q = %v, want ErrInvalidWriter", w, err)
		}
	}
	path := filepath.Join(dir, "audit.db")
	s := openStore(t, path, Options{})
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if err := openRaw(t, path).Exec(context.Background(), `UPDATE schema_version SET version = 999`); err != nil {
		t.Fatal(err)
	}
	if _, err := Open(context.Background(), path, Options{}); !errors.Is(err, storage.ErrSchemaTooNew) {
		t.Fatalf("Open on a newer schema = %v, want ErrSchemaTooNew", err)
	}
}

// TestClassify pins which SQLite errors refuse one record (the batch is
// retried record by record) and which fail the batch.
func TestClassify(t *testing.T) {
	path := filepath.Join(t.TempDir(), "c.db")
	raw := openRaw(t, path)
	ctx := context.Background()
	if err := raw.Exec(ctx, `CREATE TABLE c (v TEXT NOT NULL CHECK (v <> 'bad') UNIQUE)`); err != nil {
		t.Fatal(err)
	}
	if err := raw.Exec(ctx, `INSERT INTO c VALUES ('one')`); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name, sql string
		rejected  bool
	}{
		{"check", `INSERT INTO c VALUES ('bad')`, true},
		{"not null", `INSERT INTO c VALUES (NULL)`, true},
		{"unique", `INSERT INTO c VALUES ('one')`, false},
		{"syntax", `INSERT INTO nowhere VALUES (1)`, false},
	} {
		err := raw.Exec(ctx, tc.sql)
		if err == nil {
			t.Fatalf("%s: statement succeeded", tc.name)
		}
		if got := errors.Is(classify(err), storage.ErrRecordRejected); got != tc.rejected {
			t.Errorf("%s (%v): rejected = %v, want %v", tc.name, err, got, tc.rejected)
		}
	}
}
