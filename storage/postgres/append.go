package postgres

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/castellan-ca/castellan/storage"
	"github.com/castellan-ca/castellan/storage/groupcommit"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

// Append durably records rec and fills its Writer, Seq, PrevHash, Hash (and
// Time, if zero), and its other fields with their stored, sanitised values
// (storage.Record.Sanitize). It returns nil only after the transaction
// holding rec has committed.
//
// It honours ctx throughout, so an audit deadline bounds issuance latency
// even when PostgreSQL hangs; package groupcommit describes what an error
// means: the record is absent from the log or, when it committed anyway (a
// caller that gave up mid-commit, a lost COMMIT acknowledgement), followed
// by an undelivered marker (storage.Undelivered) as soon as the store can
// write again.
//
// rec must not be read or modified by the caller until Append returns.
func (s *Store) Append(ctx context.Context, rec *storage.Record) error {
	return s.q.Append(ctx, rec)
}

// unsettledTx identifies a failed transaction that may have committed (its
// COMMIT was sent, or its fate is otherwise unknown): settle reads its
// outcome back from the server before the next batch.
type unsettledTx struct {
	xid      string // pg_current_xact_id() of the transaction
	lastSeq  uint64 // seq of its last row
	lastHash string // hash of its last row
}

// settle is the queue's Settle: it finds out whether the last failed
// transaction committed after all. Its transaction must have ended
// (pg_xact_status), and then it committed exactly if its last row is in
// the table.
func (s *Store) settle(ctx context.Context) (committed bool, err error) {
	u := s.unsettled
	if u == nil {
		return false, nil // it never got a transaction id: nothing can have committed
	}
	var status *string
	err = s.pool.QueryRow(ctx, `SELECT pg_xact_status($1::text::xid8)`, u.xid).Scan(&status)
	var pgErr *pgconn.PgError
	switch {
	case errors.As(err, &pgErr) && pgErr.Code == "22023":
		// "transaction ID is in the future": the server restarted without
		// the transaction's WAL, so it cannot have committed.
	case err != nil:
		return false, fmt.Errorf("outcome of failed batch (xid %s): %w", u.xid, err)
	case status != nil && *status == "in progress":
		return false, fmt.Errorf("outcome of failed batch (xid %s): still in progress on the server", u.xid)
	}
	var hash string
	err = s.pool.QueryRow(ctx, `SELECT hash FROM audit_log WHERE writer = $1 AND seq = $2`, s.writer, int64(u.lastSeq)).Scan(&hash) //nolint:gosec // G115: a seq is the writer's stored head plus one per record, so it passes MaxInt64 only after 2^63 appends
	switch {
	case errors.Is(err, pgx.ErrNoRows):
	case err != nil:
		return false, fmt.Errorf("outcome of failed batch (xid %s): %w", u.xid, err)
	default:
		committed = hash == u.lastHash
	}
	s.unsettled = nil
	return committed, nil
}

// columns lists audit_log's columns in the order rowValues and scanRecord use.
var columns = []string{"writer", "seq", "time_ns", "kind", "request_id", "peer", "auth_method", "caller",
	"cluster_id", "requested_identity", "granted_identity", "outcome", "reason", "code", "serial",
	"not_before_s", "not_before_ns", "not_after_s", "not_after_ns", "cert_sha256", "signer", "issuer_key_id",
	"detail", "prev_hash", "hash"}

// writeBatch is the queue's Commit: it writes b in one transaction, reading
// the chain head inside it, sealing the records in order and COPYing them
// in. When it fails after the transaction got an id, it leaves the
// transaction for settle.
func (s *Store) writeBatch(ctx context.Context, b *groupcommit.Batch) (err error) {
	s.unsettled = nil
	tx, err := s.pool.BeginTx(ctx, pgx.TxOptions{})
	if err != nil {
		return fmt.Errorf("begin: %w", err)
	}
	var u unsettledTx
	defer func() {
		if err != nil {
			// A rollback on a dead connection fails too; the server ends the transaction.
			_ = tx.Rollback(ctx)
			if u.xid != "" {
				s.unsettled = &u
			}
		}
	}()
	var (
		head *int64
		prev *string
	)
	// One round trip: the transaction id (to settle the batch if COMMIT's
	// answer is lost) and the chain head, read inside the transaction so a
	// failed batch never advances it.
	err = tx.QueryRow(ctx, `SELECT pg_current_xact_id()::text, h.seq, h.hash FROM (SELECT 1) AS one
		LEFT JOIN LATERAL (SELECT seq, hash FROM audit_log WHERE writer = $1 ORDER BY seq DESC LIMIT 1) AS h ON true`,
		s.writer).Scan(&u.xid, &head, &prev)
	if err != nil {
		u.xid = ""
		return fmt.Errorf("read chain head: %w", err)
	}
	var seq uint64
	prevHash := ""
	if head != nil {
		seq, prevHash = uint64(*head), *prev //nolint:gosec // G115: seqs are written from [1, MaxInt64]; one tampered negative stays bit-exact, so the hash check reports it
	}
	u.lastSeq, u.lastHash = b.Seal(s.writer, seq, prevHash)
	if _, err := tx.CopyFrom(ctx, pgx.Identifier{"audit_log"}, columns, &copySource{recs: b.Records, row: s.row}); err != nil {
		return fmt.Errorf("insert seq %d..%d: %w", seq+1, u.lastSeq, classify(err))
	}
	if s.opts.beforeCommit != nil {
		if err := s.opts.beforeCommit(ctx, tx, len(b.Records)); err != nil {
			return fmt.Errorf("commit: %w", err)
		}
	}
	if err := tx.Commit(ctx); err != nil {
		return fmt.Errorf("commit: %w", err)
	}
	return nil
}

// classify marks the server's refusals of a row's values with
// storage.ErrRecordRejected, so that the queue retries the batch one record
// at a time: SQLSTATE class 22 (data exception: bad encoding, value out of
// range), class 23 (integrity constraint violation: CHECK, NOT NULL) except
// 23505 (a duplicate seq: another process writes this chain, which no
// retry cures), and 54000 (program limit exceeded: an index entry too
// large). Connection failures and every other error fail the batch.
func classify(err error) error {
	var pgErr *pgconn.PgError
	if !errors.As(err, &pgErr) || len(pgErr.Code) != 5 {
		return err
	}
	switch class := pgErr.Code[:2]; {
	case class == "22", class == "23" && pgErr.Code != "23505", pgErr.Code == "54000":
		return fmt.Errorf("%w: %w", storage.ErrRecordRejected, err)
	}
	return err
}

// copySource feeds a batch to COPY through one reused row: pgx encodes each
// row before it asks for the next.
type copySource struct {
	recs []storage.Record
	row  []any
	next int
}

func (c *copySource) Next() bool { c.next++; return c.next <= len(c.recs) }
func (c *copySource) Err() error { return nil }
func (c *copySource) Values() ([]any, error) {
	fillRow(c.row, &c.recs[c.next-1])
	return c.row, nil
}

// rowValues converts r to audit_log's columns.
func rowValues(r *storage.Record) []any { return fillRow(make([]any, len(columns)), r) }

// fillRow writes r's audit_log columns into row (len(columns) long).
func fillRow(row []any, r *storage.Record) []any {
	nbS, nbNs := splitTime(r.NotBefore)
	naS, naNs := splitTime(r.NotAfter)
	return append(row[:0], r.Writer, int64(r.Seq), r.Time.UnixNano(), r.Kind, r.RequestID, r.Peer, r.AuthMethod, //nolint:gosec // G115: a seq is the writer's stored head plus one per record, so it passes MaxInt64 only after 2^63 appends
		r.Caller, r.ClusterID, r.RequestedIdentity, r.GrantedIdentity, r.Outcome, r.Reason, r.Code, r.Serial,
		nbS, nbNs, naS, naNs, r.CertSHA256, r.Signer, r.IssuerKeyID, r.Detail, r.PrevHash, r.Hash)
}

// splitTime stores certificate validity as seconds and nanoseconds (NULL
// when zero): years 0..9999 do not fit int64 nanoseconds.
func splitTime(t time.Time) (secs, nanos any) {
	if t.IsZero() {
		return nil, nil
	}
	return t.Unix(), int32(t.Nanosecond()) //nolint:gosec // G115: Nanosecond is in [0, 1e9)
}
