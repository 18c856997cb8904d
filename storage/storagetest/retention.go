package storagetest

import (
	"context"
	"errors"
	"fmt"
	"math"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/castellan-ca/castellan/storage"
)

// Pruner is the retention contract: stores that implement it (with a
// checkpoint key configured by Env.Open) get the prune subtests. Their
// checkpoints live in a table audit_checkpoint with columns id, time_ns,
// before_ns, writers, key_id and signature, which the tamper cases edit.
type Pruner interface {
	// Prune removes records older than before and returns the signed
	// checkpoint it stored, or nil when nothing was old enough.
	Prune(ctx context.Context, before time.Time) (*storage.Checkpoint, error)
}

// openPruner opens a store and appends n records a minute apart from t0
// (seq i has time t0 + i min); it skips t if the store cannot prune.
func openPruner(t *testing.T, env Env, n int) (Store, Pruner, []*storage.Record) {
	t.Helper()
	s := open(t, env)
	p, ok := s.(Pruner)
	if !ok {
		t.Skip("store does not implement Pruner")
	}
	var recs []*storage.Record
	for i := 1; i <= n; i++ {
		r := csr(fmt.Sprintf("spiffe://td/ns/p/sa/s%d", i), t0.Add(time.Duration(i)*time.Minute))
		mustAppend(t, s, r)
		recs = append(recs, r)
	}
	return s, p, recs
}

func seqsOfList(t *testing.T, s Store) []uint64 {
	t.Helper()
	return listAll(t, s, func(r *storage.Record) uint64 { return r.Seq })
}

// listAll maps f over every record s lists, in (Writer, Seq) order.
func listAll[T any](t *testing.T, s Store, f func(r *storage.Record) T) []T {
	t.Helper()
	got, err := s.List(context.Background(), storage.Query{Limit: storage.MaxLimit})
	if err != nil {
		t.Fatalf("List: %v", err)
	}
	var out []T
	for i := range got {
		out = append(out, f(&got[i]))
	}
	return out
}

func mustVerifyCheckpoints(t *testing.T, s Store, wantRecords, wantCheckpoints int) {
	t.Helper()
	res, err := s.Verify(context.Background())
	if err != nil || !res.OK || res.Records != wantRecords || res.Checkpoints != wantCheckpoints {
		t.Fatalf("Verify = %+v, %v; want OK with %d records, %d checkpoints", res, err, wantRecords, wantCheckpoints)
	}
}

func testPrune(t *testing.T, env Env) {
	s, p, recs := openPruner(t, env, 10)
	ctx := context.Background()
	w := recs[0].Writer

	cp, err := p.Prune(ctx, t0.Add(6*time.Minute)) // seq 1..5 are older
	if err != nil {
		t.Fatalf("Prune: %v", err)
	}
	want := []storage.CheckpointEntry{{Writer: w, Seq: 5, Hash: recs[4].Hash, Removed: 5}}
	if cp == nil || cp.ID != 1 || !reflect.DeepEqual(cp.Writers, want) || cp.Signature == "" || !cp.Before.Equal(t0.Add(6*time.Minute)) {
		t.Fatalf("checkpoint = %+v, want ID 1 with %+v", cp, want)
	}
	if got := seqsOfList(t, s); !reflect.DeepEqual(got, []uint64{6, 7, 8, 9, 10}) {
		t.Fatalf("after prune, seqs %v", got)
	}
	mustVerifyCheckpoints(t, s, 5, 1)

	if cp, err := p.Prune(ctx, t0.Add(6*time.Minute)); err != nil || cp != nil {
		t.Fatalf("second Prune with the same cutoff = %+v, %v; want nil, nil", cp, err)
	}

	// A cutoff after everything keeps the newest record, the chain's head.
	cp, err = p.Prune(ctx, t0.Add(time.Hour))
	if err != nil || cp == nil || cp.ID != 2 || cp.Writers[0].Seq != 9 || cp.Writers[0].Removed != 4 {
		t.Fatalf("Prune(all) = %+v, %v; want checkpoint 2 ending at seq 9 with 4 removed", cp, err)
	}
	r := csr("after-prune", t0.Add(2*time.Hour))
	mustAppend(t, s, r)
	if r.Seq != 11 || r.PrevHash != recs[9].Hash {
		t.Fatalf("append after prune: seq %d prev %q, want 11 linked to seq 10", r.Seq, r.PrevHash)
	}
	mustVerifyCheckpoints(t, s, 2, 2)

	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	s = open(t, env)
	mustVerifyCheckpoints(t, s, 2, 2)
}

func testPruneRefusesBrokenChain(t *testing.T, env Env) {
	if env.Tamper == nil {
		t.Skip("store provides no Tamper hook")
	}
	s, p, recs := openPruner(t, env, 6)
	ctx := context.Background()
	if err := env.Tamper.Exec(ctx, fmt.Sprintf(
		`UPDATE audit_log SET granted_identity = 'spiffe://td/ns/evil/sa/x' WHERE writer = '%s' AND seq = 2`, recs[0].Writer)); err != nil {
		t.Fatal(err)
	}
	if cp, err := p.Prune(ctx, t0.Add(5*time.Minute)); !errors.Is(err, storage.ErrChainBroken) || cp != nil {
		t.Fatalf("Prune over an edited row = %+v, %v; want ErrChainBroken", cp, err)
	}
	if got := seqsOfList(t, s); len(got) != 6 {
		t.Fatalf("a refused prune removed records: seqs %v", got)
	}
}

// pruneTamperCases run after a prune that left seq 5..8 and checkpoint 1
// (seq 4); Verify must fail naming wantSeq (0: a checkpoint problem) with
// wantWords in the problem.
var pruneTamperCases = []struct {
	name      string
	sql       string // %[1]s is the writer
	wantSeq   uint64
	wantWords string
}{
	{"CheckpointDeleted", `DELETE FROM audit_checkpoint`, 1, "missing"},
	{"CheckpointEdited", `UPDATE audit_checkpoint SET before_ns = before_ns + 1`, 0, "signature"},
	{"CheckpointSignatureReplaced", `UPDATE audit_checkpoint SET signature = '00'`, 0, "signature"},
	{"FirstRowAfterCheckpointDeleted", `DELETE FROM audit_log WHERE writer = '%[1]s' AND seq = 5`, 5, "missing"},
	{"AllRowsAfterCheckpointDeleted", `DELETE FROM audit_log WHERE writer = '%[1]s'`, 5, "no record after checkpoint"},
	{"RowAfterCheckpointEdited", `UPDATE audit_log SET serial = 'ff' WHERE writer = '%[1]s' AND seq = 5`, 5, "hash mismatch"},
}

func testPruneTamper(t *testing.T, newEnv func(t *testing.T) Env) {
	for _, tc := range pruneTamperCases {
		t.Run(tc.name, func(t *testing.T) {
			env := newEnv(t)
			if env.Tamper == nil {
				t.Skip("store provides no Tamper hook")
			}
			s, p, recs := openPruner(t, env, 8)
			ctx := context.Background()
			if _, err := p.Prune(ctx, t0.Add(5*time.Minute)); err != nil {
				t.Fatal(err)
			}
			mustVerifyCheckpoints(t, s, 4, 1)
			if err := env.Tamper.Exec(ctx, strings.ReplaceAll(tc.sql, "%[1]s", recs[0].Writer)); err != nil {
				t.Fatalf("tamper: %v", err)
			}
			res, err := s.Verify(ctx)
			if err != nil {
				t.Fatalf("Verify: %v", err)
			}
			if res.OK || res.Seq != tc.wantSeq || !strings.Contains(res.Problem, tc.wantWords) {
				t.Fatalf("Verify = %+v; want a break at seq %d mentioning %q", res, tc.wantSeq, tc.wantWords)
			}
		})
	}
}

// testListPaging pages across writers with AfterWriter and filters by
// issuer key id, the inventory queries beyond the basic filters.
func testListPaging(t *testing.T, env Env) {
	s := open(t, env)
	ctx := context.Background()
	var w string
	for i := range 5 {
		r := csr(fmt.Sprint(i), t0)
		if i == 3 {
			r.IssuerKeyID = "beef"
		}
		mustAppend(t, s, r)
		w = r.Writer
	}
	tests := []struct {
		name string
		q    storage.Query
		want []uint64
	}{
		{"after writer and seq", storage.Query{AfterWriter: w, AfterSeq: 2}, []uint64{3, 4, 5}},
		{"after writer and seq with limit", storage.Query{AfterWriter: w, AfterSeq: 1, Limit: 2}, []uint64{2, 3}},
		{"after an earlier writer", storage.Query{AfterWriter: w[:len(w)-1], AfterSeq: 99}, []uint64{1, 2, 3, 4, 5}},
		{"after a later writer", storage.Query{AfterWriter: w + "~", AfterSeq: 0}, nil},
		{"after writer and a seq past MaxInt64", storage.Query{AfterWriter: w, AfterSeq: math.MaxInt64 + 1}, nil},
		{"after writer and the largest seq", storage.Query{AfterWriter: w, AfterSeq: math.MaxUint64}, nil},
		{"after an earlier writer and the largest seq", storage.Query{AfterWriter: w[:len(w)-1], AfterSeq: math.MaxUint64}, []uint64{1, 2, 3, 4, 5}},
		{"issuer key id", storage.Query{IssuerKeyID: "beef"}, []uint64{4}},
		{"issuer key id other", storage.Query{IssuerKeyID: "cafe", AfterSeq: 3}, []uint64{5}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := s.List(ctx, tc.q)
			if err != nil {
				t.Fatal(err)
			}
			var seqs []uint64
			for _, r := range got {
				seqs = append(seqs, r.Seq)
			}
			if !reflect.DeepEqual(seqs, tc.want) {
				t.Fatalf("List(%+v) = %v, want %v", tc.q, seqs, tc.want)
			}
		})
	}
}
