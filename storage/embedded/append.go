package embedded

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"time"

	"github.com/castellan-ca/castellan/storage"
)

// appendReq is one queued Append; done receives exactly one outcome.
type appendReq struct {
	rec  *storage.Record
	done chan error
}

// Append durably records rec and fills its Writer, Seq, PrevHash, Hash (and
// Time, if zero). It returns only after the transaction holding rec has
// committed with synchronous=FULL, or with the error that prevented it.
//
// Cancellation: ctx is honoured only until rec is queued. Once queued, the
// record may be written at any moment, so Append waits for the commit's
// outcome regardless of ctx; returning ctx.Err() then could tell the caller
// "not recorded" for a record that is in the log. The wait is bounded by one
// batch commit (and SQLite's busy timeout).
//
// rec must not be read or modified by the caller until Append returns.
func (s *Store) Append(ctx context.Context, rec *storage.Record) error {
	if err := rec.Validate(); err != nil {
		return fmt.Errorf("embedded: append: %w", err)
	}
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("embedded: append: %w", err)
	}
	req := &appendReq{rec: rec, done: make(chan error, 1)}
	if err := s.enqueue(ctx, req); err != nil {
		return err
	}
	return <-req.done
}

func (s *Store) enqueue(ctx context.Context, req *appendReq) error {
	s.mu.RLock()
	defer s.mu.RUnlock()
	if s.closed {
		return fmt.Errorf("embedded: append: %w", storage.ErrClosed)
	}
	select {
	case s.queue <- req:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("embedded: append: %w", ctx.Err())
	}
}

// run is the single writer goroutine: it takes a batch of queued requests,
// commits them in one transaction and answers each caller.
func (s *Store) run() {
	defer close(s.done)
	batch := make([]*appendReq, 0, s.opts.MaxBatch)
	for {
		first, ok := <-s.queue
		if !ok {
			return
		}
		batch = s.gather(append(batch[:0], first))
		s.commit(batch)
		clear(batch) // drop references to callers' records
	}
}

// gather adds queued requests to batch until it holds MaxBatch, the queue is
// empty (MaxBatchDelay 0) or MaxBatchDelay has passed since the first one.
func (s *Store) gather(batch []*appendReq) []*appendReq {
	if s.opts.MaxBatchDelay <= 0 {
		for len(batch) < s.opts.MaxBatch {
			select {
			case r, ok := <-s.queue:
				if !ok {
					return batch
				}
				batch = append(batch, r)
			default:
				return batch
			}
		}
		return batch
	}
	timer := time.NewTimer(s.opts.MaxBatchDelay)
	defer timer.Stop()
	for len(batch) < s.opts.MaxBatch {
		select {
		case r, ok := <-s.queue:
			if !ok {
				return batch
			}
			batch = append(batch, r)
		case <-timer.C:
			return batch
		}
	}
	return batch
}

// commit writes batch in one transaction. The chain head is read inside the
// transaction (which holds SQLite's write lock from BEGIN IMMEDIATE), so a
// failed batch never advances it and a later batch continues from what is
// really on disk. Callers' records are updated only after COMMIT succeeds.
func (s *Store) commit(batch []*appendReq) {
	sealed, err := s.writeBatch(batch)
	if err != nil {
		s.failures.Add(1)
		s.log.Error("audit batch failed", "writer", s.writer, "records", len(batch), "error", err)
		err = fmt.Errorf("embedded: append: %w", err)
		for _, req := range batch {
			req.done <- err
		}
		return
	}
	s.batches.Add(1)
	s.records.Add(uint64(len(batch)))
	for i, req := range batch {
		*req.rec = sealed[i]
		req.done <- nil
	}
}

// writeBatch inserts and commits batch, returning the sealed copies.
func (s *Store) writeBatch(batch []*appendReq) (sealed []storage.Record, err error) {
	// Background: no caller's ctx may abort a batch shared with others.
	ctx := context.Background()
	tx, err := s.wdb.BeginTx(ctx, nil)
	if err != nil {
		return nil, fmt.Errorf("begin: %w", err)
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
		return nil, fmt.Errorf("read chain head: %w", err)
	}

	insert := tx.StmtContext(ctx, s.insert)
	sealed = make([]storage.Record, len(batch))
	now := s.opts.Now().UTC()
	for i, req := range batch {
		r := *req.rec
		if r.Time.IsZero() {
			r.Time = now
		}
		r.Time = r.Time.UTC()
		r.NotBefore = utcOrZero(r.NotBefore)
		r.NotAfter = utcOrZero(r.NotAfter)
		seq++
		r.Seal(s.writer, seq, prev)
		prev = r.Hash
		if _, err := insert.ExecContext(ctx,
			r.Writer, int64(r.Seq), r.Time.UnixNano(), r.Kind, r.RequestID, r.Peer, r.AuthMethod, r.Caller, //nolint:gosec // G115: a seq is the writer's stored head plus one per record, so it passes MaxInt64 only after 2^63 appends
			r.ClusterID, r.RequestedIdentity, r.GrantedIdentity, r.Outcome, r.Reason, r.Code, r.Serial,
			formatTime(r.NotBefore), formatTime(r.NotAfter), r.CertSHA256, r.Signer, r.IssuerKeyID, r.Detail,
			r.PrevHash, r.Hash,
		); err != nil {
			return nil, fmt.Errorf("insert seq %d: %w", r.Seq, err)
		}
		sealed[i] = r
	}
	if s.opts.beforeCommit != nil {
		if err := s.opts.beforeCommit(len(batch)); err != nil {
			return nil, fmt.Errorf("commit: %w", err)
		}
	}
	if err := tx.Commit(); err != nil {
		return nil, fmt.Errorf("commit: %w", err)
	}
	return sealed, nil
}

// utcOrZero converts t to UTC, keeping the zero value zero (time.Time{}.UTC()
// already is, but this states the intent for NotBefore/NotAfter).
func utcOrZero(t time.Time) time.Time {
	if t.IsZero() {
		return time.Time{}
	}
	return t.UTC()
}

// formatTime stores certificate validity as RFC 3339 text (NULL when zero):
// it round-trips every nanosecond of years 0..9999, unlike int64 nanoseconds.
func formatTime(t time.Time) any {
	if t.IsZero() {
		return nil
	}
	return t.Format(time.RFC3339Nano)
}
