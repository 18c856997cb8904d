package postgres

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/castellan-ca/castellan/storage"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

// The CA rotation state (ca/rotation.Store), in the tables of migration
// 0002, shared by every replica on the database.

// LoadCA returns the CA rotation state; Version 0 and no CAs when none was saved.
func (s *Store) LoadCA(ctx context.Context) (*storage.CAState, error) {
	if s.isClosed.Load() {
		return nil, storage.ErrClosed
	}
	st := &storage.CAState{Dependents: map[string]time.Time{}}
	err := pgx.BeginTxFunc(ctx, s.pool, pgx.TxOptions{IsoLevel: pgx.RepeatableRead, AccessMode: pgx.ReadOnly}, func(tx pgx.Tx) error {
		var v int64
		switch err := tx.QueryRow(ctx, `SELECT version FROM ca_state`).Scan(&v); {
		case errors.Is(err, pgx.ErrNoRows):
		case err != nil:
			return err
		default:
			st.Version = uint64(v) //nolint:gosec // G115: versions are written from [1, MaxInt64]: 1, then one more per save
		}
		rows, err := tx.Query(ctx, `SELECT key_id, role, root_id, source, phase, cert_der, sealed_key,
			prepared_at, activated_at, deactivated_at, retired_at FROM ca_authority ORDER BY key_id`)
		if err != nil {
			return err
		}
		for rows.Next() {
			var (
				r          storage.CARecord
				p, a, d, x *time.Time
			)
			if err := rows.Scan(&r.KeyID, &r.Role, &r.RootID, &r.Source, &r.Phase, &r.CertDER, &r.SealedKey, &p, &a, &d, &x); err != nil {
				rows.Close()
				return err
			}
			r.PreparedAt, r.ActivatedAt, r.DeactivatedAt, r.RetiredAt = utc(p), utc(a), utc(d), utc(x)
			st.CAs = append(st.CAs, r)
		}
		if err := rows.Err(); err != nil {
			return err
		}
		rows, err = tx.Query(ctx, `SELECT key_id, not_after FROM ca_dependents`)
		if err != nil {
			return err
		}
		for rows.Next() {
			var (
				id string
				t  time.Time
			)
			if err := rows.Scan(&id, &t); err != nil {
				rows.Close()
				return err
			}
			st.Dependents[id] = t.UTC()
		}
		return rows.Err()
	})
	if err != nil {
		return nil, fmt.Errorf("postgres: load CA state: %w", err)
	}
	return st, nil
}

// SaveCA replaces the CAs when the stored version is still version (storing
// version+1), or returns an error wrapping storage.ErrConflict. The row lock
// on ca_state serialises concurrent savers, so exactly one of them wins.
func (s *Store) SaveCA(ctx context.Context, version uint64, cas []storage.CARecord) error {
	if s.isClosed.Load() {
		return storage.ErrClosed
	}
	err := pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
		var (
			tag pgconn.CommandTag
			err error
		)
		if version == 0 {
			tag, err = tx.Exec(ctx, `INSERT INTO ca_state (version) VALUES (1) ON CONFLICT (id) DO NOTHING`)
		} else {
			tag, err = tx.Exec(ctx, `UPDATE ca_state SET version = version + 1 WHERE version = $1`, int64(version)) //nolint:gosec // G115: a version counts saves from 1
		}
		if err != nil {
			return err
		}
		if tag.RowsAffected() != 1 {
			return fmt.Errorf("stored version is not %d: %w", version, storage.ErrConflict)
		}
		if _, err := tx.Exec(ctx, `DELETE FROM ca_authority`); err != nil {
			return err
		}
		rows := make([][]any, len(cas))
		for i, r := range cas {
			rows[i] = []any{r.KeyID, r.Role, r.RootID, r.Source, r.Phase, r.CertDER, nilIfEmpty(r.SealedKey),
				nullTime(r.PreparedAt), nullTime(r.ActivatedAt), nullTime(r.DeactivatedAt), nullTime(r.RetiredAt)}
		}
		_, err = tx.CopyFrom(ctx, pgx.Identifier{"ca_authority"}, []string{"key_id", "role", "root_id", "source", "phase",
			"cert_der", "sealed_key", "prepared_at", "activated_at", "deactivated_at", "retired_at"}, pgx.CopyFromRows(rows))
		return err
	})
	if err != nil {
		return fmt.Errorf("postgres: save CA state: %w", err)
	}
	return nil
}

// RaiseDependents records that certificates issued by keyID live until at
// least t; a concurrent or earlier value never lowers the stored one.
func (s *Store) RaiseDependents(ctx context.Context, keyID string, t time.Time) error {
	if s.isClosed.Load() {
		return storage.ErrClosed
	}
	_, err := s.pool.Exec(ctx, `INSERT INTO ca_dependents (key_id, not_after) VALUES ($1, $2)
		ON CONFLICT (key_id) DO UPDATE SET not_after = greatest(ca_dependents.not_after, excluded.not_after)`, keyID, t.UTC())
	if err != nil {
		return fmt.Errorf("postgres: raise dependents of %s: %w", keyID, err)
	}
	return nil
}

// CAStore adapts s to the CA state store contract (Load, Save,
// RaiseDependents), whose method names the audit store already uses otherwise.
func (s *Store) CAStore() CAStore { return CAStore{s} }

// CAStore is the CA rotation state of a Store.
type CAStore struct{ s *Store }

// Load returns the CA rotation state.
func (c CAStore) Load(ctx context.Context) (*storage.CAState, error) { return c.s.LoadCA(ctx) }

// Save replaces the CAs if the stored version is still version.
func (c CAStore) Save(ctx context.Context, version uint64, cas []storage.CARecord) error {
	return c.s.SaveCA(ctx, version, cas)
}

// RaiseDependents never lowers the stored bound of keyID.
func (c CAStore) RaiseDependents(ctx context.Context, keyID string, t time.Time) error {
	return c.s.RaiseDependents(ctx, keyID, t)
}

func utc(t *time.Time) time.Time {
	if t == nil {
		return time.Time{}
	}
	return t.UTC()
}

func nullTime(t time.Time) *time.Time {
	if t.IsZero() {
		return nil
	}
	u := t.UTC()
	return &u
}

func nilIfEmpty(b []byte) []byte {
	if len(b) == 0 {
		return nil
	}
	return b
}
