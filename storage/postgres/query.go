package postgres

import (
	"context"
	"crypto/ed25519"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/castellan-ca/castellan/storage"
	"github.com/jackc/pgx/v5"
)

// selectColumns is columns as a SELECT list.
var selectColumns = strings.Join(columns, ", ")

// querier is what pgxpool.Pool and pgx.Tx share.
type querier interface {
	Query(ctx context.Context, sql string, args ...any) (pgx.Rows, error)
	QueryRow(ctx context.Context, sql string, args ...any) pgx.Row
}

// listSQL builds the query for q. Every filter is an indexed column (see
// migrations/0001_audit_log.sql); the order is the primary key's.
func listSQL(q storage.Query) (string, []any) {
	var (
		where []string
		args  []any
	)
	arg := func(v any) string {
		args = append(args, v)
		return "$" + strconv.Itoa(len(args))
	}
	// The indexes of names, serial, fingerprint and issuer are partial
	// (col <> ''): a filter on them repeats that condition, so that a
	// generic plan, which cannot see that the parameter is not '', may use
	// them too. It holds for every value searched: empty filters are left out.
	if q.Identity != "" {
		p := arg(q.Identity)
		where = append(where, "((granted_identity = "+p+" AND granted_identity <> '') OR (requested_identity = "+p+" AND requested_identity <> ''))")
	}
	for _, f := range []struct {
		col, v  string
		partial bool
	}{{"serial", q.Serial, true}, {"cert_sha256", q.CertSHA256, true},
		{"outcome", q.Outcome, false}, {"writer", q.Writer, false}, {"issuer_key_id", q.IssuerKeyID, true}} {
		switch {
		case f.v == "":
		case f.partial:
			where = append(where, "("+f.col+" = "+arg(f.v)+" AND "+f.col+" <> '')")
		default:
			where = append(where, f.col+" = "+arg(f.v))
		}
	}
	if !q.Since.IsZero() {
		where = append(where, "time_ns >= "+arg(storage.ClampUnixNano(q.Since)))
	}
	if !q.Until.IsZero() {
		where = append(where, "time_ns < "+arg(storage.ClampUnixNano(q.Until)))
	}
	switch {
	case q.AfterWriter != "":
		where = append(where, "(writer, seq) > ("+arg(q.AfterWriter)+", "+arg(storage.ClampSeq(q.AfterSeq))+")")
	case q.AfterSeq > 0:
		where = append(where, "seq > "+arg(storage.ClampSeq(q.AfterSeq)))
	}
	sql := "SELECT " + selectColumns + " FROM audit_log"
	if len(where) > 0 {
		sql += " WHERE " + strings.Join(where, " AND ")
	}
	return sql + " ORDER BY writer, seq LIMIT " + arg(q.EffectiveLimit()), args
}

// List returns the records matching q, ordered by (Writer, Seq), at most
// q.EffectiveLimit() of them.
func (s *Store) List(ctx context.Context, q storage.Query) ([]storage.Record, error) {
	if s.isClosed.Load() {
		return nil, fmt.Errorf("postgres: list: %w", storage.ErrClosed)
	}
	q = q.Sanitized() // stored values are sanitised: search for what was stored
	sql, args := listSQL(q)
	rows, err := s.pool.Query(ctx, sql, args...)
	if err != nil {
		return nil, fmt.Errorf("postgres: list: %w", err)
	}
	defer rows.Close()
	out, err := storage.CollectRecords(rows, scanRecord)
	if err != nil {
		return nil, fmt.Errorf("postgres: list: %w", err)
	}
	return out, nil
}

// Get returns the record at (writer, seq), or an error wrapping
// storage.ErrNotFound.
func (s *Store) Get(ctx context.Context, writer string, seq uint64) (*storage.Record, error) {
	if s.isClosed.Load() {
		return nil, fmt.Errorf("postgres: get: %w", storage.ErrClosed)
	}
	if seq > 1<<63-1 {
		return nil, fmt.Errorf("postgres: get %s/%d: %w", writer, seq, storage.ErrNotFound)
	}
	var r storage.Record
	row := s.pool.QueryRow(ctx, "SELECT "+selectColumns+" FROM audit_log WHERE writer = $1 AND seq = $2", writer, int64(seq))
	if err := scanRecord(row, &r); err != nil {
		if errors.Is(err, pgx.ErrNoRows) {
			return nil, fmt.Errorf("postgres: get %s/%d: %w", writer, seq, storage.ErrNotFound)
		}
		return nil, fmt.Errorf("postgres: get %s/%d: %w", writer, seq, err)
	}
	return &r, nil
}

// Verify checks every chain from one snapshot (storage.VerifySnapshot), the
// prune checkpoints against the store's checkpoint key. A broken chain is
// reported with OK false and a nil error; the error is for read failures.
func (s *Store) Verify(ctx context.Context) (storage.VerifyResult, error) {
	var res storage.VerifyResult
	err := s.snapshot(ctx, func(snap storage.Snapshot) (err error) {
		res, err = storage.VerifySnapshot(snap, storage.CheckpointPublicKey(s.opts.CheckpointKey))
		return err
	})
	if err != nil {
		return res, fmt.Errorf("postgres: verify: %w", err)
	}
	return res, nil
}

// Export sends the whole log from one snapshot to sink, ending in a head
// signed with the store's checkpoint key (storage.ExportSnapshot).
func (s *Store) Export(ctx context.Context, sink storage.ExportSink) error {
	err := s.snapshot(ctx, func(snap storage.Snapshot) error {
		return storage.ExportSnapshot(snap, s.opts.CheckpointKey, s.opts.Now(), sink)
	})
	if err != nil {
		return fmt.Errorf("postgres: export: %w", err)
	}
	return nil
}

// CheckpointPublicKey returns the key that checks checkpoints and export
// heads, or nil without a checkpoint key.
func (s *Store) CheckpointPublicKey() ed25519.PublicKey {
	return storage.CheckpointPublicKey(s.opts.CheckpointKey)
}

// snapshot runs fn on the checkpoints and every record ordered by writer
// and seq, read in one REPEATABLE READ transaction, so a concurrent prune
// is seen entirely or not at all.
func (s *Store) snapshot(ctx context.Context, fn func(storage.Snapshot) error) error {
	if s.isClosed.Load() {
		return storage.ErrClosed
	}
	return pgx.BeginTxFunc(ctx, s.pool, pgx.TxOptions{IsoLevel: pgx.RepeatableRead, AccessMode: pgx.ReadOnly}, func(tx pgx.Tx) error {
		cps, err := loadCheckpoints(ctx, tx)
		if err != nil {
			return err
		}
		rows, err := tx.Query(ctx, "SELECT "+selectColumns+" FROM audit_log ORDER BY writer, seq")
		if err != nil {
			return err
		}
		defer rows.Close()
		return fn(storage.Snapshot{Checkpoints: cps, Records: func(yield func(*storage.Record, error) bool) {
			storage.YieldRecords(rows, scanRecord, yield)
		}})
	})
}

// loadCheckpoints reads every checkpoint by ascending ID.
func loadCheckpoints(ctx context.Context, q querier) ([]storage.Checkpoint, error) {
	rows, err := q.Query(ctx, `SELECT `+storage.CheckpointColumns+` FROM audit_checkpoint ORDER BY id`)
	if err != nil {
		return nil, fmt.Errorf("read checkpoints: %w", err)
	}
	defer rows.Close()
	return storage.CollectCheckpoints(rows)
}

// scanRecord reads one row selected with selectColumns into r.
func scanRecord(row storage.RowScanner, r *storage.Record) error {
	var (
		seq, timeNS  int64
		nbS, naS     *int64
		nbNs, naNs   *int32
		prevH, hashH string
	)
	err := row.Scan(&r.Writer, &seq, &timeNS, &r.Kind, &r.RequestID, &r.Peer, &r.AuthMethod, &r.Caller,
		&r.ClusterID, &r.RequestedIdentity, &r.GrantedIdentity, &r.Outcome, &r.Reason, &r.Code, &r.Serial,
		&nbS, &nbNs, &naS, &naNs, &r.CertSHA256, &r.Signer, &r.IssuerKeyID, &r.Detail, &prevH, &hashH)
	if err != nil {
		return err
	}
	r.Seq, r.PrevHash, r.Hash = uint64(seq), prevH, hashH //nolint:gosec // G115: seqs are written from [1, MaxInt64]; one tampered negative stays bit-exact, so the hash check reports it
	r.Time = time.Unix(0, timeNS).UTC()
	r.NotBefore, r.NotAfter = joinTime(nbS, nbNs), joinTime(naS, naNs)
	return nil
}

func joinTime(secs *int64, nanos *int32) time.Time {
	if secs == nil {
		return time.Time{}
	}
	var ns int64
	if nanos != nil {
		ns = int64(*nanos)
	}
	return time.Unix(*secs, ns).UTC()
}
