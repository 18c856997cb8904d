// Package storagetest is the conformance suite every audit store passes.
//
// A store's test calls Run with a function that prepares a fresh, empty
// backing location (temp file, throwaway database) for each subtest:
//
//	storagetest.Run(t, func(t *testing.T) storagetest.Env {
//		path := filepath.Join(t.TempDir(), "audit.db")
//		return storagetest.Env{
//			Open:   func(t *testing.T) storagetest.Store { ... open path ... },
//			Tamper: rawSQLOn(path),
//		}
//	})
package storagetest

import (
	"context"
	"testing"
	"time"

	"github.com/castellan-ca/castellan/storage"
	"github.com/castellan-ca/castellan/storage/groupcommit"
)

// Store is the audit store contract the suite checks.
type Store interface {
	// Append durably records rec and fills its chain fields (and Time if zero).
	Append(ctx context.Context, rec *storage.Record) error
	// List returns matching records ordered by (Writer, Seq).
	List(ctx context.Context, q storage.Query) ([]storage.Record, error)
	// Get returns one record or an error wrapping storage.ErrNotFound.
	Get(ctx context.Context, writer string, seq uint64) (*storage.Record, error)
	// Verify checks every chain; a break gives OK false and a nil error.
	Verify(ctx context.Context) (storage.VerifyResult, error)
	// Ping reports whether the store can serve requests.
	Ping(ctx context.Context) error
	// Close releases the store; later calls return storage.ErrClosed.
	Close() error
}

// Tamper gives the suite raw write access to a store's backing data, to
// simulate an attacker. SQL stores must name their table audit_log with
// columns writer, seq and granted_identity; the suite only sends plain
// UPDATE and DELETE statements with literal values, valid in SQLite and
// PostgreSQL alike.
type Tamper interface {
	// Exec runs one statement against the backing data, bypassing the store.
	Exec(ctx context.Context, sql string, args ...any) error
}

// Env is one subtest's backing location.
type Env struct {
	// Open opens a store over this Env's data. It is called again after the
	// previous store was closed, and must then see the same data (reopen).
	// It fails the test itself on error; the suite closes every store it
	// opens.
	Open func(t *testing.T) Store
	// OpenTuned opens a store like Open whose group-commit queue
	// (storage/groupcommit) runs with tune. Optional: without it the
	// group-commit subtests are skipped.
	OpenTuned func(t *testing.T, tune Tuning) Store
	// Reject is optional: it makes the backing data refuse, for a data
	// reason the store reports as storage.ErrRecordRejected (a CHECK
	// constraint), every record whose GrantedIdentity is identity. Without
	// it the rejected-record subtest is skipped.
	Reject func(ctx context.Context, identity string) error
	// Tamper is optional; without it the tamper subtests are skipped.
	Tamper Tamper
}

// Tuning is what Env.OpenTuned sets beyond Env.Open: the group-commit
// queue's batch size and delay (zero: the store's defaults) and test hooks.
type Tuning struct {
	MaxBatch      int
	MaxBatchDelay time.Duration
	Hooks         groupcommit.Hooks
}

// Apply sets a store's group-commit options from tune: the batch size and
// delay where tune sets them, and the hooks.
func (tune Tuning) Apply(maxBatch *int, maxBatchDelay *time.Duration, hooks *groupcommit.Hooks) {
	if tune.MaxBatch > 0 {
		*maxBatch = tune.MaxBatch
	}
	if tune.MaxBatchDelay > 0 {
		*maxBatchDelay = tune.MaxBatchDelay
	}
	*hooks = tune.Hooks
}

// Run runs the conformance suite; newEnv is called once per subtest and
// must return an Env over fresh, empty data.
func Run(t *testing.T, newEnv func(t *testing.T) Env) {
	tests := []struct {
		name string
		fn   func(t *testing.T, env Env)
	}{
		{"AppendAssignsSeqAndLinksHashes", testAppendChain},
		{"AppendFillsAndPreservesTime", testAppendTime},
		{"AppendRejectsInvalidRecord", testAppendInvalid},
		{"AppendCancelledBeforeQueued", testAppendCancelled},
		{"ConcurrentAppends", testConcurrentAppends},
		{"ListFilters", testListFilters},
		{"ListDefaultLimit", testListDefaultLimit},
		{"GetNotFound", testGetNotFound},
		{"VerifyEmptyAndClean", testVerifyClean},
		{"ReopenContinuesChain", testReopen},
		{"Closed", testClosed},
		{"ListPagingAndIssuer", testListPaging},
		{"Prune", testPrune},
		{"PruneRefusesBrokenChain", testPruneRefusesBrokenChain},
		{"CancelledWhileQueued", testCancelledWhileQueued},
		{"CancelledWhileCommitting", testCancelledWhileCommitting},
		{"CloseCommitsQueued", CloseCommitsQueued},
		{"RejectedRecordIsolated", testRejectedRecordIsolated},
		{"HostileStrings", testHostileStrings},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			tc.fn(t, newEnv(t))
		})
	}
	t.Run("Tamper", func(t *testing.T) { testTamper(t, newEnv) })
	t.Run("PruneTamper", func(t *testing.T) { testPruneTamper(t, newEnv) })
}
