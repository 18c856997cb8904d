package postgres

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"sync/atomic"
	"time"

	"github.com/castellan-ca/castellan/storage"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

// States of an appendReq. The caller and the writer race to move it out of
// reqPending with a compare-and-swap, so exactly one of them decides what
// the caller is told.
const (
	reqPending   int32 = iota
	reqAnswered        // the writer sent the outcome on done
	reqAbandoned       // the caller gave up (ctx) and was told "failed"
)

// appendReq is one queued Append.
type appendReq struct {
	rec   storage.Record  // the store's copy: the caller may reuse its record once it gives up
	out   *storage.Record // the caller's record, sealed on success
	state atomic.Int32
	done  chan error // receives exactly one outcome when answered
}

// Append durably records rec and fills its Writer, Seq, PrevHash, Hash (and
// Time, if zero). It returns nil only after the transaction holding rec has
// committed.
//
// It honours ctx throughout, so an audit deadline bounds issuance latency
// even when PostgreSQL hangs. A caller that gives up may leave its record
// queued or in flight; if that record ends up committed anyway (as can a
// record whose COMMIT acknowledgement was lost), the store appends an
// undelivered marker (storage.Undelivered) for it as soon as it can write
// again, so "Append failed" always means "absent, or marked undelivered".
//
// rec must not be read or modified by the caller until Append returns.
func (s *Store) Append(ctx context.Context, rec *storage.Record) error {
	if err := rec.Validate(); err != nil {
		return fmt.Errorf("postgres: append: %w", err)
	}
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("postgres: append: %w", err)
	}
	req := &appendReq{rec: *rec, out: rec, done: make(chan error, 1)}
	if err := s.enqueue(ctx, req); err != nil {
		return err
	}
	select {
	case err := <-req.done:
		return err
	case <-ctx.Done():
		if req.state.CompareAndSwap(reqPending, reqAbandoned) {
			return fmt.Errorf("postgres: append: %w", ctx.Err())
		}
		return <-req.done // the writer answered first
	}
}

func (s *Store) enqueue(ctx context.Context, req *appendReq) error {
	s.mu.RLock()
	defer s.mu.RUnlock()
	if s.closed {
		return fmt.Errorf("postgres: append: %w", storage.ErrClosed)
	}
	select {
	case s.queue <- req:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("postgres: append: %w", ctx.Err())
	}
}

// writerState is what the writer goroutine remembers between batches.
type writerState struct {
	// unmarked holds committed records whose callers were told "failed":
	// each needs an undelivered marker, written first in the next batch.
	unmarked []storage.Record
	// unsettled is a failed batch that may nevertheless have committed.
	unsettled *unsettledBatch
}

// unsettledBatch identifies a failed transaction whose outcome must be read
// back from the server before the next batch.
type unsettledBatch struct {
	xid      string           // pg_current_xact_id() of the transaction
	lastSeq  uint64           // seq of its last row
	lastHash string           // hash of its last row
	records  []storage.Record // the callers' records it held (markers excluded)
}

func (w *writerState) pending() bool { return len(w.unmarked) > 0 || w.unsettled != nil }

// run is the writer goroutine: it takes a batch of queued requests, commits
// them in one transaction and answers each caller. With markers pending and
// nothing queued it retries every RetryInterval.
func (s *Store) run() {
	defer close(s.done)
	var (
		st    writerState
		batch = make([]*appendReq, 0, s.opts.MaxBatch)
		retry <-chan time.Time
	)
	for {
		if st.pending() {
			retry = time.After(s.opts.RetryInterval)
		} else {
			retry = nil
		}
		var first *appendReq
		ok := true
		select {
		case first, ok = <-s.queue:
		case <-retry:
		}
		if !ok {
			if st.pending() {
				s.commit(&st, nil) // last chance for the markers
			}
			if st.pending() {
				s.log.Error("audit store closed with undelivered markers unwritten", "writer", s.writer,
					"records", seqsOf(st.unmarked), "unsettled", st.unsettled != nil)
			}
			return
		}
		batch = batch[:0]
		if first != nil {
			batch = s.gather(append(batch, first))
		}
		s.commit(&st, batch)
		clear(batch) // drop references to callers' records
	}
}

// gather adds queued requests to batch until it holds MaxBatch, the queue is
// empty (MaxBatchDelay 0) or MaxBatchDelay has passed since the first one.
func (s *Store) gather(batch []*appendReq) []*appendReq {
	var timeout <-chan time.Time
	if s.opts.MaxBatchDelay > 0 {
		t := time.NewTimer(s.opts.MaxBatchDelay)
		defer t.Stop()
		timeout = t.C
	}
	for len(batch) < s.opts.MaxBatch {
		if timeout == nil {
			select {
			case r, ok := <-s.queue:
				if !ok {
					return batch
				}
				batch = append(batch, r)
				continue
			default:
				return batch
			}
		}
		select {
		case r, ok := <-s.queue:
			if !ok {
				return batch
			}
			batch = append(batch, r)
		case <-timeout:
			return batch
		}
	}
	return batch
}

// commit settles any earlier failed batch, then writes the pending markers
// and batch in one transaction and answers the callers.
func (s *Store) commit(st *writerState, batch []*appendReq) {
	// Background: no caller's ctx may abort a batch shared with others.
	ctx, cancel := context.WithTimeout(context.Background(), s.opts.CommitTimeout)
	defer cancel()

	live := make([]*appendReq, 0, len(batch))
	for _, r := range batch {
		if r.state.Load() != reqAbandoned { // gave up while queued: never written
			live = append(live, r)
		}
	}
	err := s.settle(ctx, st)
	var res batchResult
	if err == nil {
		if len(live) == 0 && len(st.unmarked) == 0 {
			return
		}
		res, err = s.writeBatch(ctx, st.unmarked, live)
	}
	if err != nil {
		s.failures.Add(1)
		if res.xid != "" {
			st.unsettled = &unsettledBatch{xid: res.xid, lastSeq: res.lastSeq, lastHash: res.lastHash, records: res.sealed}
		}
		s.log.Error("audit batch failed", "writer", s.writer, "records", len(live), "markers", len(st.unmarked), "error", err)
		err = fmt.Errorf("postgres: append: %w", err)
		for _, r := range live {
			if r.state.CompareAndSwap(reqPending, reqAnswered) {
				r.done <- err
			}
		}
		return
	}
	s.batches.Add(1)
	s.records.Add(uint64(len(st.unmarked) + len(live)))
	s.undelivered.Add(uint64(len(st.unmarked)))
	if len(st.unmarked) > 0 {
		s.log.Warn("undelivered markers written", "writer", s.writer, "records", seqsOf(st.unmarked))
	}
	st.unmarked = nil
	for i, r := range live {
		if r.state.CompareAndSwap(reqPending, reqAnswered) {
			*r.out = res.sealed[i]
			r.done <- nil
		} else {
			st.unmarked = appendNeedingMarker(st.unmarked, res.sealed[i])
		}
	}
}

// settle finds out whether the last failed batch committed after all: its
// transaction must have ended (pg_xact_status), and then it committed
// exactly if its last row is in the table. Its records then need markers;
// the markers it carried itself are in, so the previous unmarked list is done.
func (s *Store) settle(ctx context.Context, st *writerState) error {
	u := st.unsettled
	if u == nil {
		return nil
	}
	var status *string
	err := s.pool.QueryRow(ctx, `SELECT pg_xact_status($1::text::xid8)`, u.xid).Scan(&status)
	var pgErr *pgconn.PgError
	switch {
	case errors.As(err, &pgErr) && pgErr.Code == "22023":
		// "transaction ID is in the future": the server restarted without
		// the transaction's WAL, so it cannot have committed.
	case err != nil:
		return fmt.Errorf("outcome of failed batch (xid %s): %w", u.xid, err)
	case status != nil && *status == "in progress":
		return fmt.Errorf("outcome of failed batch (xid %s): still in progress on the server", u.xid)
	}
	var hash string
	err = s.pool.QueryRow(ctx, `SELECT hash FROM audit_log WHERE writer = $1 AND seq = $2`, s.writer, int64(u.lastSeq)).Scan(&hash) //nolint:gosec // G115: a seq is the writer's stored head plus one per record, so it passes MaxInt64 only after 2^63 appends
	switch {
	case errors.Is(err, pgx.ErrNoRows):
	case err != nil:
		return fmt.Errorf("outcome of failed batch (xid %s): %w", u.xid, err)
	case hash == u.lastHash:
		s.log.Warn("failed audit batch had committed; marking its records undelivered", "writer", s.writer,
			"records", seqsOf(u.records))
		st.unmarked = nil
		for _, r := range u.records {
			st.unmarked = appendNeedingMarker(st.unmarked, r)
		}
	}
	st.unsettled = nil
	return nil
}

// batchResult is what writeBatch learned, also on failure.
type batchResult struct {
	sealed   []storage.Record // the live requests' records, in order
	xid      string           // "" if the transaction never got one: nothing can have committed
	lastSeq  uint64
	lastHash string
}

// columns lists audit_log's columns in the order rowValues and scanRecord use.
var columns = []string{"writer", "seq", "time_ns", "kind", "request_id", "peer", "auth_method", "caller",
	"cluster_id", "requested_identity", "granted_identity", "outcome", "reason", "code", "serial",
	"not_before_s", "not_before_ns", "not_after_s", "not_after_ns", "cert_sha256", "signer", "issuer_key_id",
	"detail", "prev_hash", "hash"}

// writeBatch writes a marker for each of unmarked, then reqs, in one
// transaction: it reads the chain head inside it, seals the records in
// order and COPYs them in.
func (s *Store) writeBatch(ctx context.Context, unmarked []storage.Record, reqs []*appendReq) (res batchResult, err error) {
	tx, err := s.pool.BeginTx(ctx, pgx.TxOptions{})
	if err != nil {
		return res, fmt.Errorf("begin: %w", err)
	}
	defer func() {
		if err != nil {
			// A rollback on a dead connection fails too; the server ends the transaction.
			_ = tx.Rollback(ctx)
		}
	}()
	var (
		xid  string
		head *int64
		prev *string
	)
	// One round trip: the transaction id (to settle the batch if COMMIT's
	// answer is lost) and the chain head, read inside the transaction so a
	// failed batch never advances it.
	err = tx.QueryRow(ctx, `SELECT pg_current_xact_id()::text, h.seq, h.hash FROM (SELECT 1) AS one
		LEFT JOIN LATERAL (SELECT seq, hash FROM audit_log WHERE writer = $1 ORDER BY seq DESC LIMIT 1) AS h ON true`,
		s.writer).Scan(&xid, &head, &prev)
	if err != nil {
		return res, fmt.Errorf("read chain head: %w", err)
	}
	res.xid = xid
	var seq uint64
	prevHash := ""
	if head != nil {
		seq, prevHash = uint64(*head), *prev //nolint:gosec // G115: seqs are written from [1, MaxInt64]; one tampered negative stays bit-exact, so the hash check reports it
	}
	now := s.opts.Now().UTC()
	rows := make([][]any, 0, len(unmarked)+len(reqs))
	add := func(r *storage.Record) {
		seq++
		r.Seal(s.writer, seq, prevHash)
		prevHash = r.Hash
		rows = append(rows, rowValues(r))
	}
	for i := range unmarked {
		add(storage.Undelivered(&unmarked[i], now, storage.ReasonCommitUnconfirmed,
			"its append was reported as failed (caller gone or commit unacknowledged), so the certificate was withheld"))
	}
	res.sealed = make([]storage.Record, len(reqs))
	for i, req := range reqs {
		r := req.rec
		if r.Time.IsZero() {
			r.Time = now
		}
		r.Time = r.Time.UTC()
		r.NotBefore, r.NotAfter = utcOrZero(r.NotBefore), utcOrZero(r.NotAfter)
		add(&r)
		res.sealed[i] = r
	}
	res.lastSeq, res.lastHash = seq, prevHash
	if _, err := tx.CopyFrom(ctx, pgx.Identifier{"audit_log"}, columns, pgx.CopyFromRows(rows)); err != nil {
		return res, fmt.Errorf("insert seq %d..%d: %w", seq-uint64(len(rows))+1, seq, err)
	}
	if s.opts.beforeCommit != nil {
		if err := s.opts.beforeCommit(ctx, tx, len(rows)); err != nil {
			return res, fmt.Errorf("commit: %w", err)
		}
	}
	if err := tx.Commit(ctx); err != nil {
		return res, fmt.Errorf("commit: %w", err)
	}
	return res, nil
}

// rowValues converts r to audit_log's columns.
func rowValues(r *storage.Record) []any {
	nbS, nbNs := splitTime(r.NotBefore)
	naS, naNs := splitTime(r.NotAfter)
	return []any{r.Writer, int64(r.Seq), r.Time.UnixNano(), r.Kind, r.RequestID, r.Peer, r.AuthMethod, r.Caller, //nolint:gosec // G115: a seq is the writer's stored head plus one per record, so it passes MaxInt64 only after 2^63 appends
		r.ClusterID, r.RequestedIdentity, r.GrantedIdentity, r.Outcome, r.Reason, r.Code, r.Serial,
		nbS, nbNs, naS, naNs, r.CertSHA256, r.Signer, r.IssuerKeyID, r.Detail, r.PrevHash, r.Hash}
}

// splitTime stores certificate validity as seconds and nanoseconds (NULL
// when zero): years 0..9999 do not fit int64 nanoseconds.
func splitTime(t time.Time) (secs, nanos any) {
	if t.IsZero() {
		return nil, nil
	}
	return t.Unix(), int32(t.Nanosecond()) //nolint:gosec // G115: Nanosecond is in [0, 1e9)
}

func utcOrZero(t time.Time) time.Time {
	if t.IsZero() {
		return time.Time{}
	}
	return t.UTC()
}

// appendNeedingMarker adds r to the records awaiting an undelivered marker,
// unless r is itself a marker: being in the log is all a marker needs.
func appendNeedingMarker(list []storage.Record, r storage.Record) []storage.Record {
	if r.Outcome == storage.OutcomeUndelivered {
		return list
	}
	return append(list, r)
}

// seqsOf lists records as writer/seq for logs.
func seqsOf(recs []storage.Record) []string {
	out := make([]string, len(recs))
	for i := range recs {
		out[i] = recs[i].Writer + "/" + strconv.FormatUint(recs[i].Seq, 10)
	}
	return out
}
