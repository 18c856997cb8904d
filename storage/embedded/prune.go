package embedded

import (
	"context"
	"database/sql"
	"fmt"
	"iter"
	"time"

	"github.com/castellan-ca/castellan/storage"
)

// Prune removes every writer's records older than before (storage.Prune
// says exactly which) and stores a checkpoint signed with the store's
// checkpoint key, in one write transaction. It returns nil when nothing was
// old enough. It shares the writer's connection, so it runs between batches.
func (s *Store) Prune(ctx context.Context, before time.Time) (*storage.Checkpoint, error) {
	if s.isClosed.Load() {
		return nil, fmt.Errorf("embedded: prune: %w", storage.ErrClosed)
	}
	tx, err := s.wdb.BeginTx(ctx, nil) // BEGIN IMMEDIATE: excludes other prunes and batches
	if err != nil {
		return nil, fmt.Errorf("embedded: prune: %w", err)
	}
	defer tx.Rollback() //nolint:errcheck // no-op after Commit
	cp, err := storage.Prune(ctx, pruneTx{tx}, s.opts.CheckpointKey, before, s.opts.Now())
	if err != nil {
		return nil, fmt.Errorf("embedded: %w", err)
	}
	if err := tx.Commit(); err != nil {
		return nil, fmt.Errorf("embedded: prune: commit: %w", err)
	}
	if cp != nil {
		s.log.Info("audit log pruned", "before", before, "checkpoint", cp.ID, "writers", len(cp.Writers))
	}
	return cp, nil
}

// queryer is what *sql.Tx and *sql.DB share.
type queryer interface {
	QueryContext(ctx context.Context, query string, args ...any) (*sql.Rows, error)
}

// loadCheckpoints reads every checkpoint by ascending ID.
func loadCheckpoints(ctx context.Context, q queryer) ([]storage.Checkpoint, error) {
	rows, err := q.QueryContext(ctx, `SELECT `+storage.CheckpointColumns+` FROM audit_checkpoint ORDER BY id`)
	if err != nil {
		return nil, fmt.Errorf("read checkpoints: %w", err)
	}
	defer rows.Close()
	return storage.CollectCheckpoints(rows)
}

// pruneTx implements storage.PruneTx on one SQLite write transaction.
type pruneTx struct{ tx *sql.Tx }

func (p pruneTx) Checkpoints(ctx context.Context) ([]storage.Checkpoint, error) {
	return loadCheckpoints(ctx, p.tx)
}

func (p pruneTx) Writers(ctx context.Context) ([]string, error) {
	rows, err := p.tx.QueryContext(ctx, `SELECT DISTINCT writer FROM audit_log ORDER BY writer`)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []string
	for rows.Next() {
		var w string
		if err := rows.Scan(&w); err != nil {
			return nil, err
		}
		out = append(out, w)
	}
	return out, rows.Err()
}

func (p pruneTx) Span(ctx context.Context, writer string, before time.Time) (uint64, uint64, error) {
	var first, newest sql.NullInt64
	err := p.tx.QueryRowContext(ctx, `SELECT
			(SELECT seq FROM audit_log WHERE writer = ? AND time_ns >= ? ORDER BY seq LIMIT 1),
			(SELECT seq FROM audit_log WHERE writer = ? ORDER BY seq DESC LIMIT 1)`,
		writer, storage.ClampUnixNano(before), writer).Scan(&first, &newest)
	if err != nil {
		return 0, 0, err
	}
	return uint64(first.Int64), uint64(newest.Int64), nil //nolint:gosec // G115: seqs are written from [1, MaxInt64]; one tampered negative stays bit-exact, so the hash check reports it
}

func (p pruneTx) Records(ctx context.Context, writer string, upTo uint64) iter.Seq2[*storage.Record, error] {
	return func(yield func(*storage.Record, error) bool) {
		rows, err := p.tx.QueryContext(ctx, "SELECT "+columns+" FROM audit_log WHERE writer = ? AND seq <= ? ORDER BY seq",
			writer, storage.ClampSeq(upTo))
		if err != nil {
			yield(nil, err)
			return
		}
		defer rows.Close()
		storage.YieldRecords(rows, scanRecord, yield)
	}
}

func (p pruneTx) Delete(ctx context.Context, writer string, upTo uint64) (uint64, error) {
	res, err := p.tx.ExecContext(ctx, `DELETE FROM audit_log WHERE writer = ? AND seq <= ?`, writer, storage.ClampSeq(upTo))
	if err != nil {
		return 0, err
	}
	n, err := res.RowsAffected()
	return uint64(n), err //nolint:gosec // G115: a count of deleted rows is never negative
}

func (p pruneTx) InsertCheckpoint(ctx context.Context, cp *storage.Checkpoint) error {
	values, err := storage.CheckpointValues(cp)
	if err != nil {
		return err
	}
	_, err = p.tx.ExecContext(ctx, `INSERT INTO audit_checkpoint (`+storage.CheckpointColumns+`) VALUES (?, ?, ?, ?, ?, ?)`, //nolint:gosec // G202: a constant column list; the values are bound ? parameters
		values...)
	return err
}
