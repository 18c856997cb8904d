package postgres

import (
	"context"
	"fmt"
	"iter"
	"time"

	"github.com/castellan-ca/castellan/storage"
	"github.com/jackc/pgx/v5"
)

// pruneLock is the pg_advisory_xact_lock key that lets one prune run at a
// time across replicas ("castprun" in ASCII).
const pruneLock = 0x63617374707275

// Prune removes every writer's records older than before (storage.Prune
// says exactly which) and stores a checkpoint signed with the store's
// checkpoint key, all in one transaction. It returns nil when nothing was
// old enough. Appends continue meanwhile: they only add records above the
// ones a prune removes.
func (s *Store) Prune(ctx context.Context, before time.Time) (*storage.Checkpoint, error) {
	if s.isClosed.Load() {
		return nil, fmt.Errorf("postgres: prune: %w", storage.ErrClosed)
	}
	var cp *storage.Checkpoint
	err := pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, `SELECT pg_advisory_xact_lock($1)`, int64(pruneLock)); err != nil {
			return err
		}
		var err error
		cp, err = storage.Prune(ctx, pruneTx{tx}, s.opts.CheckpointKey, before, s.opts.Now())
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("postgres: %w", err)
	}
	if cp != nil {
		s.log.Info("audit log pruned", "before", before, "checkpoint", cp.ID, "writers", len(cp.Writers))
	}
	return cp, nil
}

// pruneTx implements storage.PruneTx on one PostgreSQL transaction.
type pruneTx struct{ tx pgx.Tx }

func (p pruneTx) Checkpoints(ctx context.Context) ([]storage.Checkpoint, error) {
	return loadCheckpoints(ctx, p.tx)
}

// Writers walks the primary key's distinct writers with a recursive "loose
// index scan": one index probe per writer instead of reading every row.
func (p pruneTx) Writers(ctx context.Context) ([]string, error) {
	rows, err := p.tx.Query(ctx, `WITH RECURSIVE w(writer) AS (
			(SELECT writer FROM audit_log ORDER BY writer LIMIT 1)
			UNION ALL
			SELECT (SELECT a.writer FROM audit_log a WHERE a.writer > w.writer ORDER BY a.writer LIMIT 1)
			FROM w WHERE w.writer IS NOT NULL)
		SELECT writer FROM w WHERE writer IS NOT NULL`)
	if err != nil {
		return nil, err
	}
	return pgx.CollectRows(rows, pgx.RowTo[string])
}

// Span reads the first kept seq by walking the writer's chain from its start
// in primary-key order: it touches only the rows a prune removes, plus one.
func (p pruneTx) Span(ctx context.Context, writer string, before time.Time) (uint64, uint64, error) {
	var first, newest *int64
	err := p.tx.QueryRow(ctx, `SELECT
			(SELECT seq FROM audit_log WHERE writer = $1 AND time_ns >= $2 ORDER BY seq LIMIT 1),
			(SELECT seq FROM audit_log WHERE writer = $1 ORDER BY seq DESC LIMIT 1)`,
		writer, storage.ClampUnixNano(before)).Scan(&first, &newest)
	if err != nil {
		return 0, 0, err
	}
	var f, n uint64
	if first != nil {
		f = uint64(*first) //nolint:gosec // G115: seqs are written from [1, MaxInt64]; one tampered negative stays bit-exact, so the hash check reports it
	}
	if newest != nil {
		n = uint64(*newest) //nolint:gosec // G115: seqs are written from [1, MaxInt64]; one tampered negative stays bit-exact, so the hash check reports it
	}
	return f, n, nil
}

func (p pruneTx) Records(ctx context.Context, writer string, upTo uint64) iter.Seq2[*storage.Record, error] {
	return func(yield func(*storage.Record, error) bool) {
		rows, err := p.tx.Query(ctx, "SELECT "+selectColumns+" FROM audit_log WHERE writer = $1 AND seq <= $2 ORDER BY seq",
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
	tag, err := p.tx.Exec(ctx, `DELETE FROM audit_log WHERE writer = $1 AND seq <= $2`, writer, storage.ClampSeq(upTo))
	if err != nil {
		return 0, err
	}
	return uint64(tag.RowsAffected()), nil //nolint:gosec // G115: a count of deleted rows is never negative
}

func (p pruneTx) InsertCheckpoint(ctx context.Context, cp *storage.Checkpoint) error {
	values, err := storage.CheckpointValues(cp)
	if err != nil {
		return err
	}
	_, err = p.tx.Exec(ctx, `INSERT INTO audit_checkpoint (`+storage.CheckpointColumns+`)
		VALUES ($1, $2, $3, $4, $5, $6)`, values...)
	return err
}
