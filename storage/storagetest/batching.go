package storagetest

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/castellan-ca/castellan/storage"
)

// This file holds group-commit checks for stores that batch appends: their
// options and counters are the store's own, so a store's test calls these
// with what to open and read rather than through Run.

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

// GroupCommitBatches appends 100 records to s at once and checks that they
// were committed in far fewer transactions. s must wait a little for more
// records before it commits (a batch delay); stats returns its counts of
// committed records and transactions. It returns the transaction count.
func GroupCommitBatches(t *testing.T, s Store, stats func() (records, batches uint64), record func(id string) *storage.Record) uint64 {
	t.Helper()
	for i, err := range AppendConcurrently(s, 100, "c", record) {
		if err != nil {
			t.Fatalf("append %d: %v", i, err)
		}
	}
	records, batches := stats()
	if records != 100 || batches == 0 || batches > 20 {
		t.Fatalf("stats: %d records in %d transactions; want 100 records in far fewer than 100 transactions", records, batches)
	}
	return batches
}

// MaxBatchCapsTransaction appends 50 records at once and checks that the
// largest transaction held 2 to 8 of them. open must return a store with a
// MaxBatch of 8 and a batch delay (20ms) that calls onBatch with each
// batch's size before committing it.
func MaxBatchCapsTransaction(t *testing.T, open func(t *testing.T, onBatch func(n int)) Store, record func(id string) *storage.Record) {
	t.Helper()
	var largest atomic.Int64
	s := open(t, func(n int) {
		if int64(n) > largest.Load() {
			largest.Store(int64(n))
		}
	})
	for _, err := range AppendConcurrently(s, 50, "m", record) {
		if err != nil {
			t.Fatal(err)
		}
	}
	if l := largest.Load(); l > 8 || l < 2 {
		t.Fatalf("largest batch %d, want 2..8", l)
	}
}
