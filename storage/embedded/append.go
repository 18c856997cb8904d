package embedded

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"time"

	"github.com/castellan-ca/castellan/storage"
	"github.com/castellan-ca/castellan/storage/groupcommit"
	"modernc.org/sqlite"
	sqlite3 "modernc.org/sqlite/lib"
)

// Append durably records rec and fills its Writer, Seq, PrevHash, Hash (and
// Time, if zero), and its other fields with their stored, sanitised values
// (storage.Record.Sanitize). It returns nil only after the transaction
// holding rec has committed with synchronous=FULL.
//
// It honours ctx throughout, as package groupcommit describes: an error
// means the record is absent from the log or followed by an undelivered
// marker. rec must not be read or modified by the caller until Append
// returns.
func (s *Store) Append(ctx context.Context, rec *storage.Record) error {
	return s.q.Append(ctx, rec)
}

// writeBatch is the queue's Commit: it writes b in one transaction. The
// chain head is read inside the transaction (which holds SQLite's write
// lock from BEGIN IMMEDIATE), so a failed batch never advances it and a
// later batch continues from what is really on disk.
func (s *Store) writeBatch(ctx context.Context, b *groupcommit.Batch) (err error) {
	tx, err := s.wdb.BeginTx(ctx, nil)
	if err != nil {
		return fmt.Errorf("begin: %w", err)
	}
	defer func() {
		if err != nil {
			if rbErr := tx.Rollback(); rbErr != nil && !errors.Is(rbErr, sql.ErrTxDone) {
				s.log.Error("audit batch rollback failed", "writer", s.writer, "error", rbErr)
			}
		}
	}()

	var (
		seq  uint64
		prev string
	)
	err = tx.StmtContext(ctx, s.head).QueryRowContext(ctx, s.writer).Scan(&seq, &prev)
	if err != nil && !errors.Is(err, sql.ErrNoRows) {
		return fmt.Errorf("read chain head: %w", err)
	}
	b.Seal(s.writer, seq, prev)

	insert := tx.StmtContext(ctx, s.insert)
	for i := range b.Records {
		r := &b.Records[i]
		if _, err := insert.ExecContext(ctx,
			r.Writer, int64(r.Seq), r.Time.UnixNano(), r.Kind, r.RequestID, r.Peer, r.AuthMethod, r.Caller, //nolint:gosec // G115: a seq is the writer's stored head plus one per record, so it passes MaxInt64 only after 2^63 appends
			r.ClusterID, r.RequestedIdentity, r.GrantedIdentity, r.Outcome, r.Reason, r.Code, r.Serial,
			formatTime(r.NotBefore), formatTime(r.NotAfter), r.CertSHA256, r.Signer, r.IssuerKeyID, r.Detail,
			r.PrevHash, r.Hash,
		); err != nil {
			return fmt.Errorf("insert seq %d: %w", r.Seq, classify(err))
		}
	}
	if s.opts.beforeCommit != nil {
		if err := s.opts.beforeCommit(len(b.Records)); err != nil {
			return fmt.Errorf("commit: %w", err)
		}
	}
	if err := tx.Commit(); err != nil {
		return fmt.Errorf("commit: %w", err)
	}
	return nil
}

// classify marks SQLite's refusals of a row's values (a CHECK or NOT NULL
// constraint, a value too big or of the wrong type) with
// storage.ErrRecordRejected, so that the queue retries the batch one record
// at a time. Other failures (I/O, locks, a trigger's RAISE, a duplicate
// seq) are not about one record and fail the batch.
func classify(err error) error {
	var se *sqlite.Error
	if errors.As(err, &se) {
		switch se.Code() {
		case sqlite3.SQLITE_CONSTRAINT_CHECK, sqlite3.SQLITE_CONSTRAINT_NOTNULL, sqlite3.SQLITE_TOOBIG, sqlite3.SQLITE_MISMATCH:
			return fmt.Errorf("%w: %w", storage.ErrRecordRejected, err)
		}
	}
	return err
}

// formatTime stores certificate validity as RFC 3339 text (NULL when zero):
// it round-trips every nanosecond of years 0..9999, unlike int64 nanoseconds.
func formatTime(t time.Time) any {
	if t.IsZero() {
		return nil
	}
	return t.Format(time.RFC3339Nano)
}
