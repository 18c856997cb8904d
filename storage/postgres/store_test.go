package postgres

import (
	"context"
	"crypto/ed25519"
	"errors"
	"fmt"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/castellan-ca/castellan/storage"
	"github.com/castellan-ca/castellan/storage/postgres/pgtest"
	"github.com/castellan-ca/castellan/storage/storagetest"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

func TestMain(m *testing.M) { os.Exit(pgtest.Main(m)) }

// testKey is a fixed checkpoint key: deterministic tests.
var testKey = ed25519.NewKeyFromSeed(make([]byte, ed25519.SeedSize))

// rawDB runs SQL behind the store's back: the tamper hook and fault injection.
type rawDB struct{ dsn string }

// Exec implements storagetest.Tamper.
func (r rawDB) Exec(ctx context.Context, sql string, args ...any) error {
	conn, err := pgx.Connect(ctx, r.dsn)
	if err != nil {
		return err
	}
	defer conn.Close(ctx)
	_, err = conn.Exec(ctx, sql, args...)
	return err
}

func openStore(t testing.TB, dsn string, opts Options) *Store {
	t.Helper()
	s, err := Open(context.Background(), dsn, opts)
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

// reject makes the database refuse, with a CHECK constraint violation
// (SQLSTATE 23514), every record whose granted identity is identity.
func (r rawDB) reject(ctx context.Context, identity string) error {
	return r.Exec(ctx, `ALTER TABLE audit_log ADD CONSTRAINT refused CHECK (granted_identity <> `+
		"'"+strings.ReplaceAll(identity, "'", "''")+"'"+`)`)
}

// env is a conformance Env over a fresh database; base sets the options
// every store of it opens with.
func env(t *testing.T, base Options) storagetest.Env {
	dsn := pgtest.DSN(t)
	open := func(t *testing.T, tune storagetest.Tuning) storagetest.Store {
		opts := base
		opts.CheckpointKey = testKey
		tune.Apply(&opts.MaxBatch, &opts.MaxBatchDelay, &opts.hooks)
		return openStore(t, dsn, opts)
	}
	return storagetest.Env{
		Open:      func(t *testing.T) storagetest.Store { return open(t, storagetest.Tuning{}) },
		OpenTuned: open,
		Reject:    rawDB{dsn}.reject,
		Tamper:    rawDB{dsn},
	}
}

func TestConformance(t *testing.T) {
	storagetest.Run(t, func(t *testing.T) storagetest.Env { return env(t, Options{Writer: "conformance"}) })
}

func TestConformanceWithBatchDelay(t *testing.T) {
	storagetest.Run(t, func(t *testing.T) storagetest.Env {
		e := env(t, Options{Writer: "delay", MaxBatch: 7, MaxBatchDelay: 1e6})
		e.Tamper = nil
		return e
	})
}

func record(id string) *storage.Record {
	return &storage.Record{Kind: storage.KindCSR, Outcome: storage.OutcomeIssued, GrantedIdentity: id,
		Serial: "5e71a1", CertSHA256: strings.Repeat("ab", 32), RequestID: "req-" + id}
}

func mustList(t *testing.T, s *Store, q storage.Query) []storage.Record {
	t.Helper()
	if q.Limit == 0 {
		q.Limit = storage.MaxLimit
	}
	recs, err := s.List(context.Background(), q)
	if err != nil {
		t.Fatalf("List: %v", err)
	}
	return recs
}

func mustVerify(t *testing.T, s *Store, wantRecords int) {
	t.Helper()
	res, err := s.Verify(context.Background())
	if err != nil || !res.OK || res.Records != wantRecords {
		t.Fatalf("Verify = %+v, %v; want OK with %d records", res, err, wantRecords)
	}
}

func TestOpenRejectsBadDSN(t *testing.T) {
	_, err := Open(context.Background(), "postgres://u:secret@[::1", Options{})
	if err == nil || strings.Contains(err.Error(), "secret") {
		t.Fatalf("Open(bad DSN) = %v; want an error that does not echo the password", err)
	}
}

func TestGroupCommitBatches(t *testing.T) {
	s := storagetest.GroupCommitBatches(t, env(t, Options{}).OpenTuned, record).(*Store)
	if st := s.Stats(); st.Records != 100 || st.Batches != 1 {
		t.Fatalf("stats %+v, want 100 records in 1 transaction", st)
	}
	mustVerify(t, s, 100)
}

func TestMaxBatchCapsTransaction(t *testing.T) {
	storagetest.MaxBatchCapsTransaction(t, env(t, Options{}).OpenTuned, record)
}

// FuzzAuditRoundTrip: any record appended comes back, through Get and
// List, as its sanitised form, and the chain verifies.
func FuzzAuditRoundTrip(f *testing.F) {
	storagetest.FuzzRoundTrip(f, openStore(f, pgtest.DSN(f), Options{Writer: "fuzz"}))
}

func TestWriterDefaultsToNewChainPerOpen(t *testing.T) {
	dsn := pgtest.DSN(t)
	a := openStore(t, dsn, Options{})
	b := openStore(t, dsn, Options{})
	if a.Writer() == b.Writer() || a.Writer() == "" {
		t.Fatalf("writers %q and %q: want two distinct generated ids", a.Writer(), b.Writer())
	}
}

// TestReplicasShareOneDatabase: several stores (replicas) append to one
// database at once, each on its own chain; verify sees every chain intact
// and one prune covers them all.
func TestReplicasShareOneDatabase(t *testing.T) {
	dsn := pgtest.DSN(t)
	var stores []*Store
	for i := range 3 {
		stores = append(stores, openStore(t, dsn, Options{Writer: fmt.Sprintf("replica-%d", i), CheckpointKey: testKey}))
	}
	var wg sync.WaitGroup
	errs := make(chan error, 3*40)
	for _, s := range stores {
		for range 40 {
			wg.Go(func() {
				r := record("x")
				r.Time = time.Date(2025, 1, 1, 0, 0, 0, 0, time.UTC)
				errs <- s.Append(context.Background(), r)
			})
		}
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	res, err := stores[0].Verify(context.Background())
	if err != nil || !res.OK || res.Writers != 3 || res.Records != 120 {
		t.Fatalf("Verify = %+v, %v; want OK, 3 writers, 120 records", res, err)
	}
	cp, err := stores[1].Prune(context.Background(), time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC))
	if err != nil || cp == nil || len(cp.Writers) != 3 {
		t.Fatalf("Prune = %+v, %v; want a checkpoint over 3 writers", cp, err)
	}
	for _, e := range cp.Writers {
		if e.Seq != 39 || e.Removed != 39 {
			t.Fatalf("checkpoint entry %+v: want seq 39, 39 removed (newest kept)", e)
		}
	}
	res, err = stores[2].Verify(context.Background())
	if err != nil || !res.OK || res.Records != 3 || res.Checkpoints != 1 {
		t.Fatalf("Verify after prune = %+v, %v; want OK, 3 records, 1 checkpoint", res, err)
	}
}

// TestConcurrentMigrations: replicas starting at once against an empty
// database each apply the schema exactly once, under the advisory lock.
func TestConcurrentMigrations(t *testing.T) {
	dsn := pgtest.DSN(t)
	var wg sync.WaitGroup
	errs := make([]error, 6)
	for i := range errs {
		wg.Go(func() {
			s, err := Open(context.Background(), dsn, Options{})
			if err == nil {
				err = s.Close()
			}
			errs[i] = err
		})
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Fatalf("replica %d: %v", i, err)
		}
	}
	steps, err := migrations()
	if err != nil {
		t.Fatal(err)
	}
	conn, err := pgx.Connect(context.Background(), dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(context.Background())
	var n, max int
	if err := conn.QueryRow(context.Background(), `SELECT count(*), max(version) FROM castellan_schema`).Scan(&n, &max); err != nil {
		t.Fatal(err)
	}
	if n != len(steps) || max != len(steps) {
		t.Fatalf("castellan_schema has %d rows up to version %d; want %d", n, max, len(steps))
	}
	if _, err := conn.Exec(context.Background(), `INSERT INTO castellan_schema (version, name) VALUES (999, 'future')`); err != nil {
		t.Fatal(err)
	}
	if _, err := Open(context.Background(), dsn, Options{}); !errors.Is(err, storage.ErrSchemaTooNew) {
		t.Fatalf("Open on a newer schema = %v; want a refusal", err)
	}
}

func TestOpenRefusesInvalidWriter(t *testing.T) {
	dsn := pgtest.DSN(t)
	for _, w := range []string{"a\x00b", "line\nbreak", strings.Repeat("w", storage.MaxWriterLen+1)} {
		if _, err := Open(context.Background(), dsn, Options{Writer: w}); !errors.Is(err, storage.ErrInvalidWriter) {
			t.Errorf("Open with writer %.20q = %v, want ErrInvalidWriter", w, err)
		}
	}
}

// TestClassify pins which server errors refuse one record (the batch is
// retried record by record) and which fail the batch.
func TestClassify(t *testing.T) {
	for _, tc := range []struct {
		code     string
		rejected bool
	}{
		{"22021", true},  // invalid byte sequence for the encoding
		{"22001", true},  // string too long for the column
		{"23514", true},  // CHECK constraint
		{"23502", true},  // NOT NULL
		{"54000", true},  // index row too large
		{"23505", false}, // duplicate (writer, seq): another process writes this chain
		{"08006", false}, // connection failure
		{"57P01", false}, // server shutting down
		{"53100", false}, // disk full
		{"40001", false}, // serialization failure
		{"P0001", false}, // a trigger's RAISE
	} {
		err := classify(fmt.Errorf("insert: %w", &pgconn.PgError{Code: tc.code}))
		if got := errors.Is(err, storage.ErrRecordRejected); got != tc.rejected {
			t.Errorf("SQLSTATE %s: rejected = %v, want %v", tc.code, got, tc.rejected)
		}
		if pgErr := (*pgconn.PgError)(nil); !errors.As(err, &pgErr) || pgErr.Code != tc.code {
			t.Errorf("SQLSTATE %s: the server's error is no longer wrapped: %v", tc.code, err)
		}
	}
	if err := classify(errInjected); errors.Is(err, storage.ErrRecordRejected) || !errors.Is(err, errInjected) {
		t.Errorf("classify(non-server error) = %v", err)
	}
}
