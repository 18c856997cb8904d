// Package postgres is Castellan's shared audit store: PostgreSQL (pgx/v5
// pool), one hash chain per writer, so several replicas append to one
// database without contending on a chain head.
//
// Appends are durable (the server's synchronous_commit) and group-committed
// (storage/groupcommit): one goroutine per store writes every queued record
// of its writer in one transaction (COPY), so concurrent callers share one
// commit. Each caller is
// released only when the transaction holding its record has committed, or
// with an error; an error means the record is absent from the log or, when
// the store cannot rule out that it committed, followed by an "undelivered"
// marker record (storage.Undelivered) once the database is reachable again.
package postgres

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"embed"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"sort"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/castellan-ca/castellan/storage"
	"github.com/castellan-ca/castellan/storage/groupcommit"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
)

// Options configures a Store. The zero value is valid.
type Options struct {
	// Writer names this process's chain. Empty means "<hostname>-<random>",
	// new at every Open: a restarted process starts a new chain, so no two
	// processes ever share one. Set it only to a name unique among live
	// processes.
	Writer string
	// MaxBatch caps the records committed in one transaction (default 256).
	MaxBatch int
	// MaxBatchDelay is how long the writer waits for more records after the
	// first one of a batch. Zero commits whatever is queued at once, which
	// still batches under load because callers queue while a commit runs.
	MaxBatchDelay time.Duration
	// CommitTimeout bounds one batch transaction, so a database that hangs
	// fails appends instead of blocking them forever (default 10 s).
	CommitTimeout time.Duration
	// RetryInterval is how often the writer retries pending undelivered
	// markers when no append arrives to carry them (default 1 s).
	RetryInterval time.Duration
	// MaxConns sizes the connection pool (default 8): one connection writes,
	// the rest serve queries and readiness checks.
	MaxConns int32
	// CheckpointKey signs prune checkpoints and verifies them. Without it
	// Prune fails and Verify reports any stored checkpoint as unverifiable.
	CheckpointKey ed25519.PrivateKey
	// Logger receives operational events; nil discards them.
	Logger *slog.Logger
	// Now fills Record.Time when the caller left it zero; nil means time.Now.
	Now func() time.Time

	// beforeCommit, when set (tests only), runs after a batch's inserts and
	// before COMMIT; a non-nil error fails the batch.
	beforeCommit func(ctx context.Context, tx pgx.Tx, batchSize int) error
	// hooks are the group-commit queue's test seams (tests only).
	hooks groupcommit.Hooks
}

// Stats counts the writer's work since Open.
type Stats = groupcommit.Stats

// Store is the PostgreSQL audit store. It is safe for concurrent use.
type Store struct {
	pool   *pgxpool.Pool
	writer string
	opts   Options
	log    *slog.Logger

	q        *groupcommit.Queue
	isClosed atomic.Bool
	// Only the queue's writer goroutine (writeBatch, settle) touches these.
	unsettled *unsettledTx // the last failed transaction, when it may have committed
	row       []any        // one audit_log row for COPY, len(columns) long
}

//go:embed migrations/*.sql
var migrationFiles embed.FS

// Open connects to dsn (a postgres:// URL or key=value string), applies the
// schema migrations and starts the writer goroutine. The caller must Close
// the store.
func Open(ctx context.Context, dsn string, opts Options) (*Store, error) {
	if opts.CommitTimeout <= 0 {
		opts.CommitTimeout = 10 * time.Second
	}
	if opts.MaxConns <= 0 {
		opts.MaxConns = 8
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if opts.Writer == "" {
		w, err := newWriterID()
		if err != nil {
			return nil, fmt.Errorf("postgres: writer id: %w", err)
		}
		opts.Writer = w
	}
	if err := storage.ValidateWriter(opts.Writer); err != nil {
		return nil, fmt.Errorf("postgres: open: %w", err)
	}
	cfg, err := pgxpool.ParseConfig(dsn)
	if err != nil {
		// pgx's message may quote the DSN, password included: keep only the kind.
		return nil, errors.New("postgres: open: invalid DSN")
	}
	cfg.MaxConns = opts.MaxConns
	if cfg.ConnConfig.ConnectTimeout == 0 {
		// A server that accepts TCP but never answers must fail appends, not hang them.
		cfg.ConnConfig.ConnectTimeout = 10 * time.Second
	}
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("postgres: open: %w", err)
	}
	if err := Migrate(ctx, pool); err != nil {
		pool.Close()
		return nil, err
	}
	s := &Store{pool: pool, writer: opts.Writer, opts: opts, log: log, row: make([]any, len(columns))}
	//nolint:contextcheck // the queue's writer outlives Open's ctx by design: Close ends it
	s.q = groupcommit.New(groupcommit.Config{Name: "postgres", Writer: s.writer, MaxBatch: opts.MaxBatch,
		MaxBatchDelay: opts.MaxBatchDelay, CommitTimeout: opts.CommitTimeout, RetryInterval: opts.RetryInterval,
		Now: opts.Now, Logger: log, Commit: s.writeBatch, Settle: s.settle, Hooks: opts.hooks})
	log.Info("audit store opened", "store", "postgres", "host", cfg.ConnConfig.Host, "database", cfg.ConnConfig.Database, "writer", s.writer)
	return s, nil
}

// newWriterID names a process instance: the host name (the pod name in
// Kubernetes) for people, random bits for uniqueness across restarts.
func newWriterID() (string, error) {
	var b [6]byte
	if _, err := rand.Read(b[:]); err != nil {
		return "", err
	}
	host, _ := os.Hostname()
	if host == "" {
		host = "castellan"
	}
	return host + "-" + hex.EncodeToString(b[:]), nil
}

// migrationLock is the pg_advisory_xact_lock key that serialises migrations
// across replicas starting at once ("castella" in ASCII).
const migrationLock = 0x636173746c6c61

// Migrate applies every embedded migration newer than the database's schema
// version, in one transaction under an advisory lock, so replicas starting
// at once apply each exactly once. Migrations are migrations/NNNN_name.sql,
// applied in NNNN order; a shipped file is never edited, a new one is added.
// It refuses a database migrated by a newer Castellan.
func Migrate(ctx context.Context, pool *pgxpool.Pool) error {
	steps, err := migrations()
	if err != nil {
		return fmt.Errorf("postgres: migrations: %w", err)
	}
	err = pgx.BeginFunc(ctx, pool, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, `SELECT pg_advisory_xact_lock($1)`, int64(migrationLock)); err != nil {
			return err
		}
		if _, err := tx.Exec(ctx, `CREATE TABLE IF NOT EXISTS castellan_schema (
			version integer PRIMARY KEY, name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())`); err != nil {
			return err
		}
		var current int
		if err := tx.QueryRow(ctx, `SELECT coalesce(max(version), 0) FROM castellan_schema`).Scan(&current); err != nil {
			return err
		}
		if n := len(steps); current > steps[n-1].version {
			return fmt.Errorf("%w: version %d, this binary knows up to %d", storage.ErrSchemaTooNew, current, steps[n-1].version)
		}
		for _, m := range steps {
			if m.version <= current {
				continue
			}
			if _, err := tx.Exec(ctx, m.sql); err != nil {
				return fmt.Errorf("%s: %w", m.name, err)
			}
			if _, err := tx.Exec(ctx, `INSERT INTO castellan_schema (version, name) VALUES ($1, $2)`, m.version, m.name); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("postgres: migrate: %w", err)
	}
	return nil
}

type migration struct {
	version int
	name    string
	sql     string
}

// migrations reads the embedded files, checking that versions run 1, 2, ...
func migrations() ([]migration, error) {
	names, err := fs.Glob(migrationFiles, "migrations/*.sql")
	if err != nil {
		return nil, err
	}
	sort.Strings(names)
	var out []migration
	for i, path := range names {
		name := strings.TrimPrefix(path, "migrations/")
		num, _, _ := strings.Cut(name, "_")
		v, err := strconv.Atoi(num)
		if err != nil || v != i+1 {
			return nil, fmt.Errorf("%s: want version %04d", name, i+1)
		}
		b, err := migrationFiles.ReadFile(path)
		if err != nil {
			return nil, err
		}
		out = append(out, migration{version: v, name: name, sql: string(b)})
	}
	if len(out) == 0 {
		return nil, errors.New("none embedded")
	}
	return out, nil
}

// Writer returns the id of the chain this store appends to.
func (s *Store) Writer() string { return s.writer }

// Stats returns counters of the writer's work since Open.
func (s *Store) Stats() Stats { return s.q.Stats() }

// Ping reports whether the database answers within ctx, for readiness
// checks: /readyz goes unready while PostgreSQL is down or too slow.
func (s *Store) Ping(ctx context.Context) error {
	if s.isClosed.Load() {
		return storage.ErrClosed
	}
	var one int
	if err := s.pool.QueryRow(ctx, `SELECT 1`).Scan(&one); err != nil {
		return fmt.Errorf("postgres: ping: %w", err)
	}
	return nil
}

// Close stops accepting appends, waits for queued records to be committed
// (their callers get the real outcome) and for one last attempt to write
// pending undelivered markers, and closes the pool. Calling it again
// returns nil.
func (s *Store) Close() error {
	if !s.isClosed.CompareAndSwap(false, true) {
		return nil
	}
	s.q.Close()
	s.pool.Close()
	s.log.Info("audit store closed", "store", "postgres", "writer", s.writer)
	return nil
}
