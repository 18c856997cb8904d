package postgres

import (
	"context"
	"crypto/ed25519"
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

func TestConformance(t *testing.T) {
	storagetest.Run(t, func(t *testing.T) storagetest.Env {
		dsn := pgtest.DSN(t)
		return storagetest.Env{
			Open: func(t *testing.T) storagetest.Store {
				return openStore(t, dsn, Options{Writer: "conformance", CheckpointKey: testKey})
			},
			Tamper: rawDB{dsn},
		}
	})
}

func TestConformanceWithBatchDelay(t *testing.T) {
	storagetest.Run(t, func(t *testing.T) storagetest.Env {
		dsn := pgtest.DSN(t)
		return storagetest.Env{
			Open: func(t *testing.T) storagetest.Store {
				return openStore(t, dsn, Options{Writer: "delay", MaxBatch: 7, MaxBatchDelay: 1e6, CheckpointKey: testKey})
			},
		}
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
	s := openStore(t, pgtest.DSN(t), Options{MaxBatchDelay: 50 * time.Millisecond})
	storagetest.GroupCommitBatches(t, s, func() (uint64, uint64) {
		st := s.Stats()
		return st.Records, st.Batches
	}, record)
	mustVerify(t, s, 100)
}

func TestMaxBatchCapsTransaction(t *testing.T) {
	storagetest.MaxBatchCapsTransaction(t, func(t *testing.T, onBatch func(int)) storagetest.Store {
		return openStore(t, pgtest.DSN(t), Options{MaxBatch: 8, MaxBatchDelay: 20 * time.Millisecond,
			beforeCommit: func(_ context.Context, _ pgx.Tx, n int) error { onBatch(n); return nil }})
	}, record)
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
	if _, err := Open(context.Background(), dsn, Options{}); err == nil || !strings.Contains(err.Error(), "newer") {
		t.Fatalf("Open on a newer schema = %v; want a refusal", err)
	}
}
