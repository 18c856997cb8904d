package storagetest

import (
	"context"
	"errors"
	"fmt"
	"reflect"
	"sync"
	"testing"

	"github.com/castellan-ca/castellan/storage"
	"github.com/castellan-ca/castellan/storage/groupcommit"
)

// These subtests pin the group-commit semantics of package groupcommit
// against each store: what a caller whose ctx ends is told, what the log
// then holds, what Close does with queued records, and that one refused
// record fails only its own caller.

// openTuned opens a store with tune and closes it when the test ends; it
// skips t when the store offers no tuned opener.
func openTuned(t *testing.T, env Env, tune Tuning) Store {
	t.Helper()
	if env.OpenTuned == nil {
		t.Skip("store provides no OpenTuned")
	}
	s := env.OpenTuned(t, tune)
	t.Cleanup(func() { _ = s.Close() })
	return s
}

// held opens a tuned store whose first batch, holding the record appended
// by this function, stays claimed until gate.Release; queued receives once
// per record that enters the queue (the held one already counted).
func held(t *testing.T, env Env, extra func(*Tuning)) (s Store, gate *Gate, queued chan struct{}, first <-chan error) {
	t.Helper()
	gate, queued = NewGate(), make(chan struct{}, 1024)
	tune := Tuning{}
	tune.Hooks.Claimed = gate.Claimed
	tune.Hooks.Queued = func() { queued <- struct{}{} }
	if extra != nil {
		extra(&tune)
	}
	s = openTuned(t, env, tune)
	errc := make(chan error, 1)
	go func() { errc <- s.Append(context.Background(), csr("spiffe://td/ns/gc/sa/held", t0)) }()
	<-gate.Held()
	<-queued
	t.Cleanup(gate.Release)
	return s, gate, queued, errc
}

// identities lists each record's GrantedIdentity and Outcome in (Writer,
// Seq) order.
func identities(t *testing.T, s Store) []string {
	t.Helper()
	return listAll(t, s, func(r *storage.Record) string { return r.GrantedIdentity + " " + r.Outcome })
}

// testCancelledWhileQueued: a caller whose ctx ends before the writer takes
// its record is told ctx's error (not ErrCommitUnconfirmed), and its record
// is never written.
func testCancelledWhileQueued(t *testing.T, env Env) {
	s, gate, queued, first := held(t, env, nil)
	ctx, cancel := context.WithCancel(context.Background())
	errc := make(chan error, 1)
	go func() { errc <- s.Append(ctx, csr("spiffe://td/ns/gc/sa/withdrawn", t0)) }()
	<-queued
	cancel()
	err := <-errc
	if !errors.Is(err, context.Canceled) || errors.Is(err, storage.ErrCommitUnconfirmed) {
		t.Fatalf("Append cancelled while queued = %v, want context.Canceled and not ErrCommitUnconfirmed", err)
	}
	gate.Release()
	if err := <-first; err != nil {
		t.Fatalf("held Append: %v", err)
	}
	r := csr("spiffe://td/ns/gc/sa/next", t0)
	mustAppend(t, s, r)
	if r.Seq != 2 {
		t.Fatalf("seq after a withdrawn record = %d, want 2", r.Seq)
	}
	want := []string{"spiffe://td/ns/gc/sa/held issued", "spiffe://td/ns/gc/sa/next issued"}
	if got := identities(t, s); !reflect.DeepEqual(got, want) {
		t.Fatalf("log %v, want %v", got, want)
	}
	mustVerify(t, s, 2)
}

// testCancelledWhileCommitting: a caller whose ctx ends while its batch is
// being committed is told at once (ctx's error and ErrCommitUnconfirmed);
// its record commits anyway and an undelivered marker naming it follows,
// before the next record.
func testCancelledWhileCommitting(t *testing.T, env Env) {
	gate := NewGate()
	s := openTuned(t, env, Tuning{Hooks: groupcommit.Hooks{Claimed: gate.Claimed}})
	t.Cleanup(gate.Release)
	ctx, cancel := context.WithCancel(context.Background())
	errc := make(chan error, 1)
	gone := csr("spiffe://td/ns/gc/sa/gone", t0)
	go func() { errc <- s.Append(ctx, gone) }()
	<-gate.Held()
	cancel()
	err := <-errc
	if !errors.Is(err, context.Canceled) || !errors.Is(err, storage.ErrCommitUnconfirmed) {
		t.Fatalf("Append cancelled while committing = %v, want context.Canceled and ErrCommitUnconfirmed", err)
	}
	gate.Release()
	mustAppend(t, s, csr("spiffe://td/ns/gc/sa/next", t0))

	recs, err := s.List(context.Background(), storage.Query{})
	if err != nil || len(recs) != 3 {
		t.Fatalf("List = %d records, %v; want the record, its marker, the next", len(recs), err)
	}
	orig, marker := recs[0], recs[1]
	if orig.Outcome != storage.OutcomeIssued || orig.GrantedIdentity != gone.GrantedIdentity ||
		marker.Outcome != storage.OutcomeUndelivered || marker.Reason != storage.ReasonCommitUnconfirmed ||
		marker.RequestID != orig.RequestID || marker.Serial != orig.Serial || recs[2].GrantedIdentity != "spiffe://td/ns/gc/sa/next" {
		t.Fatalf("log %+v: want the abandoned record, its commit-unconfirmed marker, the next record", recs)
	}
	mustVerify(t, s, 3)
}

// CloseCommitsQueued checks that records queued when Close starts are
// committed and their callers told so; Append once Close has begun fails with ErrClosed
// and writes nothing. The store is reopened to read what is on disk.
func CloseCommitsQueued(t *testing.T, env Env) {
	const n = 20
	closing := make(chan struct{})
	s, gate, queued, first := held(t, env, func(tune *Tuning) {
		tune.MaxBatch = 2 * n // room in the queue for all: none waits to enter it
		tune.Hooks.Closed = func() { close(closing) }
	})
	var wg sync.WaitGroup
	errs := make([]error, n)
	for i := range n {
		wg.Go(func() { errs[i] = s.Append(context.Background(), csr(fmt.Sprintf("spiffe://td/ns/gc/sa/q%d", i), t0)) })
	}
	for range n {
		<-queued
	}
	closed := make(chan error, 1)
	go func() { closed <- s.Close() }()
	<-closing
	if err := s.Append(context.Background(), csr("spiffe://td/ns/gc/sa/late", t0)); !errors.Is(err, storage.ErrClosed) {
		t.Fatalf("Append after Close began = %v, want ErrClosed", err)
	}
	gate.Release()
	if err := <-closed; err != nil {
		t.Fatalf("Close: %v", err)
	}
	wg.Wait()
	if err := <-first; err != nil {
		t.Fatalf("held Append: %v", err)
	}
	for i, err := range errs {
		if err != nil {
			t.Fatalf("Append %d, queued before Close: %v", i, err)
		}
	}
	s = open(t, env)
	got := identities(t, s)
	if len(got) != n+1 {
		t.Fatalf("after reopen, log %v: want the held record and the %d queued", got, n)
	}
	for _, id := range got {
		if id == "spiffe://td/ns/gc/sa/late issued" {
			t.Fatal("a record appended after Close began was written")
		}
	}
	mustVerify(t, s, n+1)
}

// testRejectedRecordIsolated: one record the database refuses for a data
// reason, in a batch with good ones, fails only its own caller (an error
// wrapping ErrRecordRejected); the good ones commit, and a substitute
// (OutcomeFailed, ReasonRecordRejected, same RequestID) takes its place.
func testRejectedRecordIsolated(t *testing.T, env Env) {
	if env.Reject == nil {
		t.Skip("store provides no Reject hook")
	}
	const poison = "spiffe://td/ns/gc/sa/poison"
	s, gate, queued, first := held(t, env, nil)
	if err := env.Reject(context.Background(), poison); err != nil {
		t.Fatalf("Reject: %v", err)
	}
	ids := []string{"spiffe://td/ns/gc/sa/a", poison, "spiffe://td/ns/gc/sa/b", "spiffe://td/ns/gc/sa/c"}
	errs := make([]error, len(ids))
	var wg sync.WaitGroup
	for i, id := range ids {
		wg.Go(func() { errs[i] = s.Append(context.Background(), csr(id, t0)) })
		<-queued // in this order
	}
	gate.Release()
	wg.Wait()
	if err := <-first; err != nil {
		t.Fatalf("held Append: %v", err)
	}
	for i, err := range errs {
		switch {
		case ids[i] == poison && !errors.Is(err, storage.ErrRecordRejected):
			t.Fatalf("Append of the refused record = %v, want ErrRecordRejected", err)
		case ids[i] != poison && err != nil:
			t.Fatalf("Append of %s, batched with a refused record: %v", ids[i], err)
		}
	}
	recs, err := s.List(context.Background(), storage.Query{})
	if err != nil || len(recs) != 5 {
		t.Fatalf("List = %d records, %v; want 5", len(recs), err)
	}
	sub := recs[2]
	if sub.Outcome != storage.OutcomeFailed || sub.Reason != storage.ReasonRecordRejected ||
		sub.RequestID != "req-"+poison || sub.GrantedIdentity != "" || sub.Kind != storage.KindCSR {
		t.Fatalf("record in the refused one's place: %+v", sub)
	}
	for i, want := range []string{"spiffe://td/ns/gc/sa/held", ids[0], "", ids[2], ids[3]} {
		if recs[i].GrantedIdentity != want {
			t.Fatalf("seq %d identity %q, want %q", recs[i].Seq, recs[i].GrantedIdentity, want)
		}
	}
	mustVerify(t, s, 5)
}
