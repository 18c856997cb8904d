package embedded

import (
	"context"
	"crypto/ed25519"
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
	query, args := listQuery(q)
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

// listQuery is List's statement for q and its arguments (plan_test.go
// checks that each inventory filter is answered from its index). The
// indexes on names, serial, fingerprint and issuer are partial (WHERE col !=
// ”), and SQLite uses a partial index only when the query's WHERE repeats
// its condition (a bound "col = ?" may be ”): every such filter says it,
// which is true of any value searched here, since empty filters are left out.
func listQuery(q storage.Query) (string, []any) {
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
		add("((granted_identity = ? AND granted_identity != '') OR (requested_identity = ? AND requested_identity != ''))", q.Identity, q.Identity)
	}
	if q.Serial != "" {
		add("serial = ? AND serial != ''", q.Serial)
	}
	if q.CertSHA256 != "" {
		add("cert_sha256 = ? AND cert_sha256 != ''", q.CertSHA256)
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
		add("issuer_key_id = ? AND issuer_key_id != ''", q.IssuerKeyID)
	}
	query := "SELECT " + columns + " FROM audit_log"
	if len(where) > 0 {
		query += " WHERE " + strings.Join(where, " AND ") // only the fixed conditions above; every value is a bound ? parameter
	}
	query += " ORDER BY writer, seq LIMIT ?"
	args = append(args, q.EffectiveLimit())
	return query, args
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

// Verify checks every chain from one consistent snapshot
// (storage.VerifySnapshot), the prune checkpoints against the store's
// checkpoint key. A broken chain is reported with OK false and a nil error;
// the error is for read failures.
func (s *Store) Verify(ctx context.Context) (storage.VerifyResult, error) {
	var res storage.VerifyResult
	err := s.snapshot(ctx, func(snap storage.Snapshot) (err error) {
		res, err = storage.VerifySnapshot(snap, storage.CheckpointPublicKey(s.opts.CheckpointKey))
		return err
	})
	if err != nil {
		return res, fmt.Errorf("embedded: verify: %w", err)
	}
	return res, nil
}

// Export sends the whole log from one consistent snapshot to sink, ending
// in a head signed with the store's checkpoint key (storage.ExportSnapshot).
func (s *Store) Export(ctx context.Context, sink storage.ExportSink) error {
	err := s.snapshot(ctx, func(snap storage.Snapshot) error {
		return storage.ExportSnapshot(snap, s.opts.CheckpointKey, s.opts.Now(), sink)
	})
	if err != nil {
		return fmt.Errorf("embedded: export: %w", err)
	}
	return nil
}

// CheckpointPublicKey returns the key that checks checkpoints and export
// heads, or nil without a checkpoint key.
func (s *Store) CheckpointPublicKey() ed25519.PublicKey {
	return storage.CheckpointPublicKey(s.opts.CheckpointKey)
}

// snapshot runs fn on the checkpoints and every record ordered by writer
// and seq, read in one transaction (a single snapshot under WAL), so a
// concurrent prune is seen entirely or not at all.
func (s *Store) snapshot(ctx context.Context, fn func(storage.Snapshot) error) error {
	if s.isClosed.Load() {
		return storage.ErrClosed
	}
	tx, err := s.rdb.BeginTx(ctx, &sql.TxOptions{ReadOnly: true})
	if err != nil {
		return err
	}
	defer tx.Rollback() //nolint:errcheck // read-only
	cps, err := loadCheckpoints(ctx, tx)
	if err != nil {
		return err
	}
	rows, err := tx.QueryContext(ctx, "SELECT "+columns+" FROM audit_log ORDER BY writer, seq")
	if err != nil {
		return err
	}
	defer rows.Close()
	return fn(storage.Snapshot{Checkpoints: cps, Records: func(yield func(*storage.Record, error) bool) {
		storage.YieldRecords(rows, scanRecord, yield)
	}})
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
