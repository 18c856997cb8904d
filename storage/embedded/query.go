package embedded

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"math"
	"strings"
	"time"

	"github.com/castellan-ca/castellan/storage"
)

// columns lists audit_log's columns in the order scanRecord reads them.
const columns = `writer, seq, time_ns, kind, request_id, peer, auth_method, caller, cluster_id,
	requested_identity, granted_identity, outcome, reason, code, serial, not_before, not_after,
	cert_sha256, signer, issuer_key_id, detail, prev_hash, hash`

// List returns the records matching q, ordered by (Writer, Seq), at most
// q.EffectiveLimit() of them.
func (s *Store) List(ctx context.Context, q storage.Query) ([]storage.Record, error) {
	if s.isClosed.Load() {
		return nil, fmt.Errorf("embedded: list: %w", storage.ErrClosed)
	}
	q = q.Sanitized() // stored values are sanitised: search for what was stored
	var (
		where []string
		args  []any
	)
	add := func(cond string, a ...any) {
		where = append(where, cond)
		args = append(args, a...)
	}
	if q.Identity != "" {
		add("(granted_identity = ? OR requested_identity = ?)", q.Identity, q.Identity)
	}
	if q.Serial != "" {
		add("serial = ?", q.Serial)
	}
	if q.CertSHA256 != "" {
		add("cert_sha256 = ?", q.CertSHA256)
	}
	if q.Outcome != "" {
		add("outcome = ?", q.Outcome)
	}
	if !q.Since.IsZero() {
		add("time_ns >= ?", storage.ClampUnixNano(q.Since))
	}
	if !q.Until.IsZero() {
		add("time_ns < ?", storage.ClampUnixNano(q.Until))
	}
	switch {
	case q.AfterWriter != "":
		add("(writer > ? OR (writer = ? AND seq > ?))", q.AfterWriter, q.AfterWriter, storage.ClampSeq(q.AfterSeq))
	case q.AfterSeq > 0:
		add("seq > ?", storage.ClampSeq(q.AfterSeq))
	}
	if q.Writer != "" {
		add("writer = ?", q.Writer)
	}
	if q.IssuerKeyID != "" {
		add("issuer_key_id = ?", q.IssuerKeyID)
	}
	query := "SELECT " + columns + " FROM audit_log"
	if len(where) > 0 {
		query += " WHERE " + strings.Join(where, " AND ") //nolint:gosec // G202: where holds only the fixed conditions above; every value is a bound ? parameter
	}
	query += " ORDER BY writer, seq LIMIT ?"
	args = append(args, q.EffectiveLimit())

	rows, err := s.rdb.QueryContext(ctx, query, args...)
	if err != nil {
		return nil, fmt.Errorf("embedded: list: %w", err)
	}
	defer rows.Close()
	out, err := storage.CollectRecords(rows, scanRecord)
	if err != nil {
		return nil, fmt.Errorf("embedded: list: %w", err)
	}
	return out, nil
}

// Get returns the record at (writer, seq), or an error wrapping
// storage.ErrNotFound.
func (s *Store) Get(ctx context.Context, writer string, seq uint64) (*storage.Record, error) {
	if s.isClosed.Load() {
		return nil, fmt.Errorf("embedded: get: %w", storage.ErrClosed)
	}
	if seq > math.MaxInt64 {
		return nil, fmt.Errorf("embedded: get %s/%d: %w", writer, seq, storage.ErrNotFound)
	}
	var r storage.Record
	row := s.rdb.QueryRowContext(ctx, "SELECT "+columns+" FROM audit_log WHERE writer = ? AND seq = ?", writer, int64(seq))
	if err := scanRecord(row, &r); err != nil {
		if errors.Is(err, sql.ErrNoRows) {
			return nil, fmt.Errorf("embedded: get %s/%d: %w", writer, seq, storage.ErrNotFound)
		}
		return nil, fmt.Errorf("embedded: get %s/%d: %w", writer, seq, err)
	}
	return &r, nil
}

// Verify streams every record, ordered by writer and seq, through the shared
// storage.ChainVerifier. It reads one consistent snapshot (a single read
// transaction under WAL) and stops at the first break. A broken chain is
// reported with OK false and a nil error; the error is for read failures.
func (s *Store) Verify(ctx context.Context) (storage.VerifyResult, error) {
	if s.isClosed.Load() {
		return storage.VerifyResult{}, fmt.Errorf("embedded: verify: %w", storage.ErrClosed)
	}
	// One read transaction: checkpoints and rows from the same snapshot, so
	// a concurrent prune is seen entirely or not at all.
	tx, err := s.rdb.BeginTx(ctx, &sql.TxOptions{ReadOnly: true})
	if err != nil {
		return storage.VerifyResult{}, fmt.Errorf("embedded: verify: %w", err)
	}
	defer tx.Rollback() //nolint:errcheck // read-only
	var (
		v storage.ChainVerifier
		r storage.Record // reused: the verifier keeps no reference
	)
	cps, err := loadCheckpoints(ctx, tx)
	if err != nil {
		return storage.VerifyResult{}, fmt.Errorf("embedded: verify: %w", err)
	}
	for i := range cps {
		if err := v.AddCheckpoint(&cps[i], storage.CheckpointPublicKey(s.opts.CheckpointKey)); err != nil {
			return v.Result(), nil
		}
	}
	rows, err := tx.QueryContext(ctx, "SELECT "+columns+" FROM audit_log ORDER BY writer, seq")
	if err != nil {
		return storage.VerifyResult{}, fmt.Errorf("embedded: verify: %w", err)
	}
	defer rows.Close()
	for rows.Next() {
		if err := scanRecord(rows, &r); err != nil {
			// A value that cannot be decoded was written by something other
			// than this store: report it as a break, not as an I/O failure.
			res := v.Result()
			res.Records++
			res.OK = false
			res.Writer, res.Seq = r.Writer, r.Seq
			res.Problem = fmt.Sprintf("writer %q: unreadable row near seq %d: %v", r.Writer, r.Seq, err)
			return res, nil
		}
		if err := v.Add(&r); err != nil {
			if errors.Is(err, storage.ErrChainBroken) {
				return v.Result(), nil
			}
			return v.Result(), fmt.Errorf("embedded: verify: %w", err)
		}
	}
	if err := rows.Err(); err != nil {
		return v.Result(), fmt.Errorf("embedded: verify: %w", err)
	}
	_ = v.Finish() // a break is reported in the result
	return v.Result(), nil
}

// scanRecord reads one row selected with columns into r.
func scanRecord(sc storage.RowScanner, r *storage.Record) error {
	var (
		seq, timeNS         int64
		notBefore, notAfter sql.NullString
	)
	err := sc.Scan(&r.Writer, &seq, &timeNS, &r.Kind, &r.RequestID, &r.Peer, &r.AuthMethod, &r.Caller,
		&r.ClusterID, &r.RequestedIdentity, &r.GrantedIdentity, &r.Outcome, &r.Reason, &r.Code, &r.Serial,
		&notBefore, &notAfter, &r.CertSHA256, &r.Signer, &r.IssuerKeyID, &r.Detail, &r.PrevHash, &r.Hash)
	if err != nil {
		return err
	}
	r.Seq = uint64(seq) //nolint:gosec // G115: seqs are written from [1, MaxInt64]; one tampered negative stays bit-exact, so the hash check reports it
	r.Time = time.Unix(0, timeNS).UTC()
	if r.NotBefore, err = parseTime(notBefore); err != nil {
		return fmt.Errorf("seq %d not_before: %w", seq, err)
	}
	if r.NotAfter, err = parseTime(notAfter); err != nil {
		return fmt.Errorf("seq %d not_after: %w", seq, err)
	}
	return nil
}

func parseTime(s sql.NullString) (time.Time, error) {
	if !s.Valid {
		return time.Time{}, nil
	}
	t, err := time.Parse(time.RFC3339Nano, s.String)
	if err != nil {
		return time.Time{}, err
	}
	return t.UTC(), nil
}
