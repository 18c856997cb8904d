package postgres

import (
	"context"
	"errors"
	"reflect"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/castellan-ca/castellan/storage"
	"github.com/castellan-ca/castellan/storage/postgres/pgtest"
	"github.com/jackc/pgx/v5"
)

var errInjected = errors.New("injected failure")

// TestFailedAppendIsAbsentOrMarked: whenever Append returns an error, the
// record is either absent from the log or followed by an undelivered marker,
// whatever point of the batch the failure hit.
func TestFailedAppendIsAbsentOrMarked(t *testing.T) {
	tests := []struct {
		name string
		// fail runs in place of a normal COMMIT for the first batch.
		fail         func(ctx context.Context, tx pgx.Tx) error
		wantOutcomes []string // outcomes by seq after the failed append and one more
	}{
		{"rolled back before COMMIT", func(context.Context, pgx.Tx) error { return errInjected },
			[]string{storage.OutcomeIssued}},
		{"COMMIT acknowledgement lost", func(ctx context.Context, tx pgx.Tx) error {
			if err := tx.Commit(ctx); err != nil {
				return err
			}
			return errInjected // the caller hears "failed" for a committed record
		}, []string{storage.OutcomeIssued, storage.OutcomeUndelivered, storage.OutcomeIssued}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var armed atomic.Bool
			armed.Store(true)
			s := openStore(t, pgtest.DSN(t), Options{Writer: "w", beforeCommit: func(ctx context.Context, tx pgx.Tx, _ int) error {
				if armed.CompareAndSwap(true, false) {
					return tc.fail(ctx, tx)
				}
				return nil
			}})
			ctx := context.Background()
			failed := record("failed")
			if err := s.Append(ctx, failed); !errors.Is(err, errInjected) {
				t.Fatalf("first Append = %v, want the injected failure", err)
			}
			next := record("next")
			if err := s.Append(ctx, next); err != nil {
				t.Fatalf("Append after the failure: %v", err)
			}
			assertOutcomes(t, s, tc.wantOutcomes, "req-failed")
		})
	}
}

// TestAbandonedAppendIsMarked: a caller whose ctx ends while its batch is
// committing is told "failed"; the record commits anyway and gets a marker.
func TestAbandonedAppendIsMarked(t *testing.T) {
	held, release := make(chan struct{}), make(chan struct{})
	var armed atomic.Bool
	armed.Store(true)
	s := openStore(t, pgtest.DSN(t), Options{Writer: "w", beforeCommit: func(context.Context, pgx.Tx, int) error {
		if armed.CompareAndSwap(true, false) {
			close(held)
			<-release
		}
		return nil
	}})
	ctx, cancel := context.WithCancel(context.Background())
	errc := make(chan error, 1)
	go func() { errc <- s.Append(ctx, record("failed")) }()
	<-held
	cancel()
	if err := <-errc; !errors.Is(err, context.Canceled) {
		t.Fatalf("abandoned Append = %v, want context.Canceled", err)
	}
	close(release)
	if err := s.Append(context.Background(), record("next")); err != nil {
		t.Fatal(err)
	}
	assertOutcomes(t, s, []string{storage.OutcomeIssued, storage.OutcomeUndelivered, storage.OutcomeIssued}, "req-failed")
	if st := s.Stats(); st.Undelivered != 1 {
		t.Fatalf("stats %+v, want 1 undelivered marker", st)
	}
}

// assertOutcomes checks the outcome of each seq, that a marker names the
// record before it (same request id and serial) and that the chain verifies.
func assertOutcomes(t *testing.T, s *Store, want []string, failedReq string) {
	t.Helper()
	recs := mustList(t, s, storage.Query{})
	var got []string
	for _, r := range recs {
		got = append(got, r.Outcome)
	}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("outcomes by seq = %v, want %v", got, want)
	}
	for i, r := range recs {
		if r.Outcome != storage.OutcomeUndelivered {
			continue
		}
		orig := recs[i-1]
		if r.RequestID != failedReq || orig.RequestID != failedReq || r.Serial != orig.Serial ||
			r.Reason != storage.ReasonCommitUnconfirmed || !strings.Contains(r.Detail, "w/1") {
			t.Fatalf("marker %+v does not name record %+v", r, orig)
		}
	}
	mustVerify(t, s, len(want))
}
