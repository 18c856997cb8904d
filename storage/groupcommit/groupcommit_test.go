package groupcommit_test

import (
	"context"
	"errors"
	"fmt"
	"reflect"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/castellan-ca/castellan/storage"
	"github.com/castellan-ca/castellan/storage/groupcommit"
	"github.com/castellan-ca/castellan/storage/storagetest"
)

var errInjected = errors.New("injected failure")

// memChain is an in-memory store behind a queue: one chain, a commit that
// can be made to fail (before or after the rows are kept), and a Settle
// that looks the failed batch's last row up.
type memChain struct {
	mu      sync.Mutex
	rows    []storage.Record
	batches [][]storage.Record // committed batches, in order
	fail    func(b *groupcommit.Batch) (keep bool, err error)
	last    *storage.Record // last row of the last failed batch
	settles int
}

func (m *memChain) commit(_ context.Context, b *groupcommit.Batch) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.last = nil
	seq, hash := uint64(len(m.rows)), ""
	if seq > 0 {
		hash = m.rows[seq-1].Hash
	}
	b.Seal("w", seq, hash)
	if m.fail != nil {
		keep, err := m.fail(b)
		if err != nil {
			if keep {
				m.keep(b)
			}
			last := b.Records[len(b.Records)-1]
			m.last = &last
			return err
		}
	}
	m.keep(b)
	return nil
}

func (m *memChain) keep(b *groupcommit.Batch) {
	m.rows = append(m.rows, b.Records...)
	m.batches = append(m.batches, append([]storage.Record(nil), b.Records...))
}

func (m *memChain) settle(context.Context) (bool, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.settles++
	if m.last == nil {
		return false, nil
	}
	committed := int(m.last.Seq) <= len(m.rows) && m.rows[m.last.Seq-1].Hash == m.last.Hash
	m.last = nil
	return committed, nil
}

// outcomes lists the committed rows as "GrantedIdentity:Outcome".
func (m *memChain) outcomes() []string {
	m.mu.Lock()
	defer m.mu.Unlock()
	var out []string
	for _, r := range m.rows {
		out = append(out, r.GrantedIdentity+":"+r.Outcome)
	}
	return out
}

func (m *memChain) batchSizes() []int {
	m.mu.Lock()
	defer m.mu.Unlock()
	var out []int
	for _, b := range m.batches {
		out = append(out, len(b))
	}
	return out
}

func newQueue(t *testing.T, m *memChain, cfg groupcommit.Config) *groupcommit.Queue {
	t.Helper()
	cfg.Name, cfg.Writer, cfg.Commit, cfg.Settle = "mem", "w", m.commit, m.settle
	if cfg.Hooks.NewTimer == nil {
		cfg.Hooks.NewTimer = (&storagetest.ManualTimers{}).NewTimer
	}
	q := groupcommit.New(cfg)
	t.Cleanup(q.Close)
	return q
}

func rec(id string) *storage.Record {
	return &storage.Record{Kind: storage.KindCSR, Outcome: storage.OutcomeIssued, GrantedIdentity: id, RequestID: "req-" + id}
}

func TestBatchesAreCappedAndWaitForTheDelay(t *testing.T) {
	m := &memChain{}
	timers := &storagetest.ManualTimers{}
	type event struct{ size, committed int }
	gathered := make(chan event, 100)
	q := newQueue(t, m, groupcommit.Config{MaxBatch: 4, MaxBatchDelay: 1, Hooks: groupcommit.Hooks{
		NewTimer: timers.NewTimer, Gathered: func(n int) { gathered <- event{n, len(m.batchSizes())} }}})
	var wg sync.WaitGroup
	errs := make([]error, 10)
	for i := range errs {
		wg.Go(func() { errs[i] = q.Append(context.Background(), rec(fmt.Sprint(i))) })
	}
	// Two full batches commit by themselves; the last two records wait for
	// the delay, which only Fire ends.
	for e := (event{}); e != (event{size: 2, committed: 2}); e = <-gathered {
	}
	if fired := timers.Fire(); fired != 1 {
		t.Fatalf("%d timers fired, want the one batch delay", fired)
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Fatalf("append %d: %v", i, err)
		}
	}
	if got := m.batchSizes(); !reflect.DeepEqual(got, []int{4, 4, 2}) {
		t.Fatalf("batch sizes %v, want [4 4 2]", got)
	}
	if st := q.Stats(); st.Batches != 3 || st.Records != 10 {
		t.Fatalf("stats %+v", st)
	}
}

func TestAppendSanitisesAndReturnsTheStoredRecord(t *testing.T) {
	m := &memChain{}
	q := newQueue(t, m, groupcommit.Config{})
	r := rec("spiffe://td/ns/a/sa/\x00\xff")
	r.Detail = "line\nforged"
	if err := q.Append(context.Background(), r); err != nil {
		t.Fatal(err)
	}
	if r.GrantedIdentity != "spiffe://td/ns/a/sa/␀\ufffd" || r.Detail != "line␊forged" || r.Seq != 1 || r.Hash != r.ComputeHash() {
		t.Fatalf("record after Append: %+v", r)
	}
	if !reflect.DeepEqual(m.rows[0], *r) {
		t.Fatalf("stored %+v\nreturned %+v", m.rows[0], *r)
	}
	bad := rec("x")
	bad.Outcome = ""
	if err := q.Append(context.Background(), bad); !errors.Is(err, storage.ErrInvalidRecord) {
		t.Fatalf("Append(invalid) = %v, want ErrInvalidRecord", err)
	}
}

// TestAbandonedRecordMarkedByRetry: a record whose caller gave up while it
// was being committed gets its undelivered marker from the retry timer when
// no later append comes to carry it. (What callers are told when their ctx
// ends is pinned for every store by the conformance suite, storagetest.)
func TestAbandonedRecordMarkedByRetry(t *testing.T) {
	m := &memChain{}
	g := storagetest.NewGate()
	timers := &storagetest.ManualTimers{}
	q := newQueue(t, m, groupcommit.Config{Hooks: groupcommit.Hooks{Claimed: g.Claimed, NewTimer: timers.NewTimer}})
	ctx, cancel := context.WithCancel(context.Background())
	errc := make(chan error, 1)
	go func() { errc <- q.Append(ctx, rec("gone")) }()
	<-g.Held()
	cancel()
	if err := <-errc; !errors.Is(err, storage.ErrCommitUnconfirmed) {
		t.Fatalf("Append cancelled while committing = %v, want ErrCommitUnconfirmed", err)
	}
	g.Release()
	timers.Await(1) // the writer waits on its retry interval
	if fired := timers.Fire(); fired != 1 {
		t.Fatalf("%d timers fired, want the retry timer", fired)
	}
	q.Close()
	if got := m.outcomes(); !reflect.DeepEqual(got, []string{"gone:issued", "gone:undelivered"}) {
		t.Fatalf("log %v", got)
	}
	if st := q.Stats(); st.Undelivered != 1 {
		t.Fatalf("stats %+v, want 1 undelivered marker", st)
	}
}

func TestCommitFailure(t *testing.T) {
	tests := []struct {
		name string
		keep bool // the failed commit kept its rows (acknowledgement lost)
		want []string
	}{
		{"rolled back: absent", false, []string{"next:issued"}},
		{"acknowledgement lost: marked", true, []string{"doomed:issued", "doomed:undelivered", "next:issued"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var armed atomic.Bool
			armed.Store(true)
			m := &memChain{fail: func(*groupcommit.Batch) (bool, error) {
				if armed.CompareAndSwap(true, false) {
					return tc.keep, errInjected
				}
				return false, nil
			}}
			q := newQueue(t, m, groupcommit.Config{})
			if err := q.Append(context.Background(), rec("doomed")); !errors.Is(err, errInjected) {
				t.Fatalf("Append = %v, want the injected failure", err)
			}
			if err := q.Append(context.Background(), rec("next")); err != nil {
				t.Fatal(err)
			}
			if got := m.outcomes(); !reflect.DeepEqual(got, tc.want) {
				t.Fatalf("log %v, want %v", got, tc.want)
			}
			if m.settles != 1 {
				t.Fatalf("Settle called %d times, want once", m.settles)
			}
		})
	}
}

// TestCloseCommitsQueuedRecords: records queued when Close starts are
// committed and their callers told so; a later Append is refused.
func TestCloseCommitsQueuedRecords(t *testing.T) {
	m := &memChain{}
	g := storagetest.NewGate()
	queued := make(chan struct{}, 32)
	closed := make(chan struct{})
	q := newQueue(t, m, groupcommit.Config{Hooks: groupcommit.Hooks{Claimed: g.Claimed,
		Queued: func() { queued <- struct{}{} }, Closed: func() { close(closed) }}})
	const n = 20
	var wg sync.WaitGroup
	errs := make([]error, n)
	for i := range n {
		wg.Go(func() { errs[i] = q.Append(context.Background(), rec(fmt.Sprint(i))) })
	}
	<-g.Held()
	for range n {
		<-queued
	}
	closeDone := make(chan struct{})
	go func() { q.Close(); close(closeDone) }()
	<-closed
	if err := q.Append(context.Background(), rec("late")); !errors.Is(err, storage.ErrClosed) {
		t.Fatalf("Append after Close = %v, want ErrClosed", err)
	}
	g.Release()
	<-closeDone
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Fatalf("queued append %d: %v", i, err)
		}
	}
	if got := len(m.outcomes()); got != n {
		t.Fatalf("%d records committed, want %d", got, n)
	}
}

// BenchmarkQueue measures the queue's own cost per record (validate,
// sanitise, queue, batch, seal, answer) with 16 callers per CPU and a store
// whose commit only seals: what group commit adds on top of the database.
func BenchmarkQueue(b *testing.B) {
	var seq uint64
	hash := ""
	q := groupcommit.New(groupcommit.Config{Name: "bench", Commit: func(_ context.Context, batch *groupcommit.Batch) error {
		seq, hash = batch.Seal("w", seq, hash)
		return nil
	}})
	defer q.Close()
	b.SetParallelism(16)
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		r := storage.Record{Kind: storage.KindCSR, Outcome: storage.OutcomeIssued, RequestID: "0123456789abcdef01234567",
			Peer: "10.1.2.3:45678", AuthMethod: "kubernetes", Caller: "spiffe://cluster.local/ns/bench/sa/default",
			GrantedIdentity: "spiffe://cluster.local/ns/bench/sa/default", Code: "OK", Serial: "0123456789abcdef",
			Signer: "selfsigned"}
		for pb.Next() {
			rec := r
			if err := q.Append(context.Background(), &rec); err != nil {
				b.Error(err)
				return
			}
		}
	})
	if st := q.Stats(); st.Batches > 0 {
		b.ReportMetric(float64(st.Records)/float64(st.Batches), "records/batch")
	}
}
