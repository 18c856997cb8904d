package postgres

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/castellan-ca/castellan/storage"
	"github.com/castellan-ca/castellan/storage/postgres/pgtest"
)

// opRecord is the audit record of one rotation step.
func opRecord(detail string) *storage.Record {
	return &storage.Record{Kind: storage.KindOperator, Outcome: storage.OutcomeOK, Caller: "castellan (schedule)",
		RequestID: "op-" + detail, Detail: detail}
}

func caRec(id, phase string) storage.CARecord {
	t0 := time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC)
	return storage.CARecord{KeyID: id, Role: storage.RoleRoot, RootID: id, Source: storage.SourceManaged, Phase: phase,
		CertDER: []byte("der-" + id), SealedKey: []byte{1, 2, 3}, PreparedAt: t0}
}

// operatorRecords lists the operator records of the log, oldest first.
func operatorRecords(t *testing.T, s *Store) []storage.Record {
	t.Helper()
	var out []storage.Record
	for _, r := range mustList(t, s, storage.Query{}) {
		if r.Kind == storage.KindOperator {
			out = append(out, r)
		}
	}
	return out
}

// TestSaveCAAudited: a CA state change and its audit record commit together
// or not at all. A failure between writing them and COMMIT (the stand-in for
// a replica killed there) leaves neither; a stale version leaves neither; a
// success leaves both, the record chained into the writer's chain between
// group-committed batches, so the log verifies.
func TestSaveCAAudited(t *testing.T) {
	ctx := context.Background()
	dsn := pgtest.DSN(t)
	errDied := errors.New("replica died before COMMIT")
	var (
		mu       sync.Mutex
		failNext bool
		seen     []bool
	)
	s := openStore(t, dsn, Options{Writer: "leader", CheckpointKey: testKey,
		CAStateSaved: func(_ context.Context, rec *storage.Record, committed bool) error {
			mu.Lock()
			defer mu.Unlock()
			seen = append(seen, committed)
			if rec.Hash == "" || rec.Seq == 0 {
				return fmt.Errorf("hook saw an unsealed record %+v", rec)
			}
			if failNext && !committed {
				failNext = false
				return errDied
			}
			return nil
		}})
	cas := s.CAStore()

	if err := s.Append(ctx, record("spiffe://td/ns/a/sa/before")); err != nil {
		t.Fatal(err)
	}
	first := opRecord("ca rotate prepare root: first")
	if err := cas.SaveAudited(ctx, 0, []storage.CARecord{caRec("a", storage.PhaseActive)}, first); err != nil {
		t.Fatal(err)
	}
	if first.Seq != 2 || first.Writer != "leader" || first.Hash == "" || first.Time.IsZero() {
		t.Errorf("saved record %+v; want seq 2 of writer leader, hashed and timed", first)
	}
	if err := s.Append(ctx, record("spiffe://td/ns/a/sa/after")); err != nil {
		t.Fatal(err)
	}

	// Dies between the writes and COMMIT: neither the state nor the record.
	mu.Lock()
	failNext = true
	mu.Unlock()
	died := opRecord("ca rotate activate root: died")
	if err := cas.SaveAudited(ctx, 1, []storage.CARecord{caRec("a", storage.PhaseActive), caRec("b", storage.PhasePrepared)}, died); !errors.Is(err, errDied) {
		t.Fatalf("SaveAudited with the hook failing = %v; want %v", err, errDied)
	}
	// A stale version: neither.
	if err := cas.SaveAudited(ctx, 0, nil, opRecord("stale")); !errors.Is(err, storage.ErrConflict) {
		t.Fatalf("SaveAudited of a stale version = %v; want ErrConflict", err)
	}
	st, err := cas.Load(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if st.Version != 1 || len(st.CAs) != 1 || st.CAs[0].KeyID != "a" {
		t.Fatalf("state after failed saves: version %d, CAs %+v; want version 1 with CA a only", st.Version, st.CAs)
	}
	ops := operatorRecords(t, s)
	if len(ops) != 1 || ops[0].Detail != first.Detail || ops[0].Hash != first.Hash {
		t.Fatalf("operator records %+v; want only the first save's", ops)
	}
	mu.Lock()
	if want := []bool{false, true, false}; fmt.Sprint(seen) != fmt.Sprint(want) {
		t.Errorf("hook calls (committed) %v; want %v", seen, want)
	}
	mu.Unlock()

	// Saves race appends from many callers on one chain: each save is
	// chained in, no seq is taken twice, the log verifies.
	var wg sync.WaitGroup
	const appenders, saves = 8, 5
	errs := make(chan error, appenders*10+saves)
	for i := range appenders {
		wg.Go(func() {
			for j := range 10 {
				errs <- s.Append(ctx, record(fmt.Sprintf("spiffe://td/ns/load/sa/w%d-%d", i, j)))
			}
		})
	}
	wg.Go(func() {
		for i := range saves {
			errs <- cas.SaveAudited(ctx, uint64(1+i), []storage.CARecord{caRec("a", storage.PhaseActive)}, opRecord(fmt.Sprintf("step %d", i)))
		}
	})
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	if st, err := cas.Load(ctx); err != nil || st.Version != 1+saves {
		t.Fatalf("version %v, %v; want %d", st, err, 1+saves)
	}
	mustVerify(t, s, 3+appenders*10+saves)
	if n := len(operatorRecords(t, s)); n != 1+saves {
		t.Errorf("%d operator records; want %d", n, 1+saves)
	}
}
