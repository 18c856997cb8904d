package storagetest

import (
	"context"
	"fmt"
	"reflect"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/castellan-ca/castellan/storage"
	"github.com/castellan-ca/castellan/storage/groupcommit"
)

// This file holds group-commit checks. They wait for the queue's events
// (groupcommit.Hooks) and fire its timers by hand (ManualTimers), so what
// they assert never depends on how fast the machine is.

// AppendConcurrently runs n Appends on s at once, of record(prefix-i) for
// i in [0, n), and returns their errors by i.
func AppendConcurrently(s Store, n int, prefix string, record func(id string) *storage.Record) []error {
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() { errs[i] = s.Append(context.Background(), record(fmt.Sprintf("%s-%d", prefix, i))) })
	}
	wg.Wait()
	return errs
}

// Gate holds the first batch a queue claims (install Claimed as
// groupcommit.Hooks.Claimed) until Release: its records can then no longer
// be withdrawn, and records appended meanwhile stay queued.
type Gate struct {
	held, release chan struct{}
	armed         atomic.Bool
	once          sync.Once
}

// NewGate returns a gate armed for the next claimed batch.
func NewGate() *Gate {
	g := &Gate{held: make(chan struct{}), release: make(chan struct{})}
	g.armed.Store(true)
	return g
}

// Claimed is the hook: it blocks the first batch until Release.
func (g *Gate) Claimed(int) {
	if g.armed.CompareAndSwap(true, false) {
		close(g.held)
		<-g.release
	}
}

// Held is closed once the first batch is held.
func (g *Gate) Held() <-chan struct{} { return g.held }

// Release lets the held batch be committed; later batches pass freely.
func (g *Gate) Release() { g.once.Do(func() { close(g.release) }) }

// batchLog records the sizes of the batches a queue claims and, at each
// growth of the batch being gathered, its size and how many were claimed
// before it.
type batchLog struct {
	mu       sync.Mutex
	sizes    []int
	gathered chan [2]int // {size, batches claimed before}
}

func newBatchLog(capacity int) *batchLog { return &batchLog{gathered: make(chan [2]int, capacity)} }

func (l *batchLog) hooks(timers *ManualTimers) groupcommit.Hooks {
	return groupcommit.Hooks{
		NewTimer: timers.NewTimer,
		Claimed: func(n int) {
			l.mu.Lock()
			l.sizes = append(l.sizes, n)
			l.mu.Unlock()
		},
		Gathered: func(n int) {
			l.mu.Lock()
			claimed := len(l.sizes)
			l.mu.Unlock()
			l.gathered <- [2]int{n, claimed}
		},
	}
}

// awaitGathered waits until the batch being gathered holds size records
// after claimed earlier batches.
func (l *batchLog) awaitGathered(size, claimed int) {
	for e := <-l.gathered; e != [2]int{size, claimed}; e = <-l.gathered {
	}
}

func (l *batchLog) batchSizes() []int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]int(nil), l.sizes...)
}

// appendAll runs n Appends of record(prefix-i) in the background; wait
// returns their errors, failing t on any.
func appendAll(t *testing.T, s Store, n int, prefix string, record func(id string) *storage.Record) (wait func()) {
	done := make(chan []error, 1)
	go func() { done <- AppendConcurrently(s, n, prefix, record) }()
	return func() {
		t.Helper()
		for i, err := range <-done {
			if err != nil {
				t.Fatalf("append %d: %v", i, err)
			}
		}
	}
}

// GroupCommitBatches appends 100 records at once to a store opened with a
// batch delay that runs out only when fired, waits until the writer has
// gathered all 100, fires it, and checks that they were committed in one
// transaction. It returns the store.
func GroupCommitBatches(t *testing.T, open func(t *testing.T, tune Tuning) Store, record func(id string) *storage.Record) Store {
	t.Helper()
	return checkBatches(t, open, record, 256, 100, []int{100})
}

// MaxBatchCapsTransaction appends 50 records at once to a store opened with
// MaxBatch 8 and a batch delay that never runs out by itself: six full
// batches of 8 commit without waiting, the last 2 records wait for the
// delay, which the test then fires.
func MaxBatchCapsTransaction(t *testing.T, open func(t *testing.T, tune Tuning) Store, record func(id string) *storage.Record) {
	t.Helper()
	checkBatches(t, open, record, 8, 50, []int{8, 8, 8, 8, 8, 8, 2})
}

// checkBatches appends n records at once to a store opened with maxBatch
// and a batch delay that runs out only when fired; once the last batch has
// gathered its records it fires the delay, then checks that the batches
// committed were exactly want.
func checkBatches(t *testing.T, open func(t *testing.T, tune Tuning) Store, record func(id string) *storage.Record,
	maxBatch, n int, want []int) Store {
	t.Helper()
	timers, log := &ManualTimers{}, newBatchLog(n+len(want))
	s := open(t, Tuning{MaxBatch: maxBatch, MaxBatchDelay: time.Hour, Hooks: log.hooks(timers)})
	wait := appendAll(t, s, n, "b", record)
	log.awaitGathered(want[len(want)-1], len(want)-1)
	if fired := timers.Fire(); fired != 1 {
		t.Fatalf("%d timers fired, want the one batch delay", fired)
	}
	wait()
	if got := log.batchSizes(); !reflect.DeepEqual(got, want) {
		t.Fatalf("%d concurrent appends with MaxBatch %d were committed in batches %v, want %v", n, maxBatch, got, want)
	}
	return s
}
