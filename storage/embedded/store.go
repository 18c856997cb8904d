// Package embedded is Castellan's zero-setup audit store: a single SQLite
// file (pure Go, modernc.org/sqlite) holding one hash chain per writer.
//
// Appends are durable (WAL, synchronous=FULL) and group-committed
// (storage/groupcommit): one goroutine writes every queued record in a
// single transaction, so the cost of an fsync is shared by all concurrent
// callers.
package embedded

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"database/sql"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net/url"
	"os"
	"strings"
	"sync/atomic"
	"time"

	"github.com/castellan-ca/castellan/storage"
	"github.com/castellan-ca/castellan/storage/groupcommit"

	_ "modernc.org/sqlite" // registers the "sqlite" database/sql driver
)

// Options configures a Store. The zero value is valid.
type Options struct {
	// Writer names this store's chain. Empty means the id kept in the file's
	// meta table, generated on first open, so one file holds one chain.
	Writer string
	// MaxBatch caps the records committed in one transaction (default 256).
	MaxBatch int
	// MaxBatchDelay is how long the writer waits for more records after the
	// first one of a batch. Zero commits whatever is queued at once, which
	// still batches under load because callers queue while a commit runs.
	MaxBatchDelay time.Duration
	// Logger receives operational events; nil discards them.
	Logger *slog.Logger
	// Now fills Record.Time when the caller left it zero; nil means time.Now.
	Now func() time.Time
	// CheckpointKey signs prune checkpoints and verifies them. Without it
	// Prune fails and Verify reports any stored checkpoint as unverifiable.
	CheckpointKey ed25519.PrivateKey

	// beforeCommit, when set (tests only), runs after a batch's inserts and
	// before COMMIT; a non-nil error is treated as a commit failure.
	beforeCommit func(batchSize int) error
	// hooks are the group-commit queue's test seams (tests only).
	hooks groupcommit.Hooks
}

// Stats counts the writer's work since Open.
type Stats = groupcommit.Stats

// Store is the embedded audit store. It is safe for concurrent use.
type Store struct {
	path   string
	writer string
	opts   Options
	log    *slog.Logger

	wdb    *sql.DB   // one connection, owned by the writer goroutine after Open
	rdb    *sql.DB   // read-only pool for List, Get, Verify, Ping
	insert *sql.Stmt // prepared on wdb
	head   *sql.Stmt // prepared on wdb

	q        *groupcommit.Queue
	isClosed atomic.Bool // fast check for readers
}

// schema holds one migration per schema version; never edit a shipped entry,
// append a new one.
var schema = []string{
	// Version 1.
	`CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
	CREATE TABLE audit_log (
		writer             TEXT    NOT NULL,
		seq                INTEGER NOT NULL,
		time_ns            INTEGER NOT NULL,
		kind               TEXT    NOT NULL,
		request_id         TEXT    NOT NULL DEFAULT '',
		peer               TEXT    NOT NULL DEFAULT '',
		auth_method        TEXT    NOT NULL DEFAULT '',
		caller             TEXT    NOT NULL DEFAULT '',
		cluster_id         TEXT    NOT NULL DEFAULT '',
		requested_identity TEXT    NOT NULL DEFAULT '',
		granted_identity   TEXT    NOT NULL DEFAULT '',
		outcome            TEXT    NOT NULL,
		reason             TEXT    NOT NULL DEFAULT '',
		code               TEXT    NOT NULL DEFAULT '',
		serial             TEXT    NOT NULL DEFAULT '',
		not_before         TEXT,
		not_after          TEXT,
		cert_sha256        TEXT    NOT NULL DEFAULT '',
		signer             TEXT    NOT NULL DEFAULT '',
		issuer_key_id      TEXT    NOT NULL DEFAULT '',
		detail             TEXT    NOT NULL DEFAULT '',
		prev_hash          TEXT    NOT NULL,
		hash               TEXT    NOT NULL,
		PRIMARY KEY (writer, seq)
	);
	CREATE INDEX audit_log_granted   ON audit_log (granted_identity) WHERE granted_identity != '';
	CREATE INDEX audit_log_requested ON audit_log (requested_identity) WHERE requested_identity != '';
	CREATE INDEX audit_log_serial    ON audit_log (serial) WHERE serial != '';
	CREATE INDEX audit_log_cert      ON audit_log (cert_sha256) WHERE cert_sha256 != '';
	CREATE INDEX audit_log_time      ON audit_log (time_ns);
	CREATE INDEX audit_log_outcome   ON audit_log (outcome);`,
	// Version 2: signed prune checkpoints (storage.Checkpoint) and the
	// issuer filter.
	`CREATE TABLE audit_checkpoint (
		id        INTEGER PRIMARY KEY,
		time_ns   INTEGER NOT NULL,
		before_ns INTEGER NOT NULL,
		writers   TEXT    NOT NULL,
		key_id    TEXT    NOT NULL,
		signature TEXT    NOT NULL
	);
	CREATE INDEX audit_log_issuer ON audit_log (issuer_key_id) WHERE issuer_key_id != '';`,
}

// Open opens (creating if needed, with mode 0600) the SQLite file at path,
// migrates its schema and starts the writer goroutine. The caller must Close
// the store.
func Open(ctx context.Context, path string, opts Options) (*Store, error) {
	if path == "" || path == ":memory:" || strings.ContainsAny(path, "?#") {
		// In-memory databases are per-connection and "?" would be parsed as
		// DSN parameters; neither gives a durable audit log.
		return nil, fmt.Errorf("embedded: open: invalid path %q", path)
	}
	if opts.Writer != "" {
		if err := storage.ValidateWriter(opts.Writer); err != nil {
			return nil, fmt.Errorf("embedded: open: %w", err)
		}
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if err := createFile(path, log); err != nil {
		return nil, err
	}

	s := &Store{path: path, opts: opts, log: log}
	var err error
	// _txlock=immediate takes the write lock at BEGIN, so the head read at
	// the start of each batch cannot be invalidated by another connection.
	s.wdb, err = sql.Open("sqlite", dsn(path, "_txlock=immediate"))
	if err != nil {
		return nil, fmt.Errorf("embedded: open %s: %w", path, err)
	}
	s.wdb.SetMaxOpenConns(1)
	s.wdb.SetMaxIdleConns(1)
	s.wdb.SetConnMaxLifetime(0)
	s.wdb.SetConnMaxIdleTime(0)
	if err := s.init(ctx); err != nil {
		return nil, errors.Join(err, s.wdb.Close())
	}
	s.rdb, err = sql.Open("sqlite", dsn(path, "_pragma=query_only(1)"))
	if err != nil {
		return nil, errors.Join(fmt.Errorf("embedded: open %s for reading: %w", path, err), s.closeDBs())
	}
	s.rdb.SetMaxOpenConns(4)
	if err := s.rdb.PingContext(ctx); err != nil {
		return nil, errors.Join(fmt.Errorf("embedded: open %s for reading: %w", path, err), s.closeDBs())
	}

	//nolint:contextcheck // the queue's writer outlives Open's ctx by design: Close ends it
	s.q = groupcommit.New(groupcommit.Config{Name: "embedded", Writer: s.writer, MaxBatch: opts.MaxBatch,
		MaxBatchDelay: opts.MaxBatchDelay, Now: opts.Now, Logger: log, Commit: s.writeBatch, Hooks: opts.hooks})
	log.Info("audit store opened", "path", path, "writer", s.writer)
	return s, nil
}

// dsn builds a modernc.org/sqlite DSN with the pragmas every connection
// needs: WAL for concurrent readers, FULL sync so a committed record
// survives power loss, and a busy timeout instead of immediate SQLITE_BUSY.
func dsn(path string, extra string) string {
	q := url.Values{}
	q.Add("_pragma", "busy_timeout(10000)")
	q.Add("_pragma", "journal_mode(WAL)")
	q.Add("_pragma", "synchronous(FULL)")
	// A plain file name, not a "file:" URI, so that '%' in path is literal.
	return path + "?" + q.Encode() + "&" + extra
}

// createFile creates path with mode 0600 before SQLite sees it, because
// SQLite would create it with 0644 and the WAL inherits the file's mode.
func createFile(path string, log *slog.Logger) error {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return fmt.Errorf("embedded: create %s: %w", path, err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return fmt.Errorf("embedded: stat %s: %w", path, err)
	}
	if fi.Mode().Perm()&0o077 != 0 {
		log.Warn("audit store file is readable by others", "path", path, "mode", fi.Mode().Perm().String())
	}
	return nil
}

// init migrates the schema, resolves the writer id and prepares the
// writer's statements.
func (s *Store) init(ctx context.Context) error {
	if err := migrate(ctx, s.wdb); err != nil {
		return fmt.Errorf("embedded: migrate %s: %w", s.path, err)
	}
	s.writer = s.opts.Writer
	if s.writer == "" {
		w, err := writerID(ctx, s.wdb)
		if err != nil {
			return fmt.Errorf("embedded: writer id in %s: %w", s.path, err)
		}
		s.writer = w
	}
	var err error
	s.insert, err = s.wdb.PrepareContext(ctx, `INSERT INTO audit_log (
		writer, seq, time_ns, kind, request_id, peer, auth_method, caller, cluster_id,
		requested_identity, granted_identity, outcome, reason, code, serial, not_before, not_after,
		cert_sha256, signer, issuer_key_id, detail, prev_hash, hash)
		VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)`)
	if err != nil {
		return fmt.Errorf("embedded: prepare insert: %w", err)
	}
	s.head, err = s.wdb.PrepareContext(ctx, `SELECT seq, hash FROM audit_log WHERE writer = ? ORDER BY seq DESC LIMIT 1`)
	if err != nil {
		return fmt.Errorf("embedded: prepare head: %w", err)
	}
	return nil
}

// migrate applies every schema entry newer than the file's version in one
// transaction, and refuses a file written by a newer Castellan.
func migrate(ctx context.Context, db *sql.DB) error {
	tx, err := db.BeginTx(ctx, nil)
	if err != nil {
		return err
	}
	defer tx.Rollback() //nolint:errcheck // no-op after Commit
	if _, err := tx.ExecContext(ctx, `CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)`); err != nil {
		return err
	}
	var version int
	err = tx.QueryRowContext(ctx, `SELECT version FROM schema_version`).Scan(&version)
	switch {
	case errors.Is(err, sql.ErrNoRows):
		if _, err := tx.ExecContext(ctx, `INSERT INTO schema_version (version) VALUES (0)`); err != nil {
			return err
		}
	case err != nil:
		return err
	}
	if version > len(schema) {
		return fmt.Errorf("%w: version %d, this binary knows up to %d", storage.ErrSchemaTooNew, version, len(schema))
	}
	for v := version; v < len(schema); v++ {
		if _, err := tx.ExecContext(ctx, schema[v]); err != nil {
			return fmt.Errorf("to version %d: %w", v+1, err)
		}
	}
	if _, err := tx.ExecContext(ctx, `UPDATE schema_version SET version = ?`, len(schema)); err != nil {
		return err
	}
	return tx.Commit()
}

// writerID returns the file's persistent writer id, creating it on first use.
func writerID(ctx context.Context, db *sql.DB) (string, error) {
	var b [8]byte
	if _, err := rand.Read(b[:]); err != nil {
		return "", err
	}
	// INSERT OR IGNORE keeps the first id if two processes race on a new file.
	if _, err := db.ExecContext(ctx, `INSERT OR IGNORE INTO meta (key, value) VALUES ('writer', ?)`,
		"embedded-"+hex.EncodeToString(b[:])); err != nil {
		return "", err
	}
	var w string
	err := db.QueryRowContext(ctx, `SELECT value FROM meta WHERE key = 'writer'`).Scan(&w)
	return w, err
}

// Writer returns the id of the chain this store appends to.
func (s *Store) Writer() string { return s.writer }

// Stats returns counters of the writer's work since Open.
func (s *Store) Stats() Stats { return s.q.Stats() }

// Ping reports whether the database answers, for readiness checks.
func (s *Store) Ping(ctx context.Context) error {
	if s.isClosed.Load() {
		return storage.ErrClosed
	}
	var v int
	if err := s.rdb.QueryRowContext(ctx, `SELECT version FROM schema_version`).Scan(&v); err != nil {
		return fmt.Errorf("embedded: ping: %w", err)
	}
	return nil
}

// Close stops accepting appends, waits for queued records to be committed
// (their callers get the real outcome) and for one last attempt to write
// pending undelivered markers, and closes the database. Calling it again
// returns nil.
func (s *Store) Close() error {
	if !s.isClosed.CompareAndSwap(false, true) {
		return nil
	}
	s.q.Close()
	err := s.closeDBs()
	s.log.Info("audit store closed", "path", s.path, "writer", s.writer)
	return err
}

func (s *Store) closeDBs() error {
	var errs []error
	for _, st := range []*sql.Stmt{s.insert, s.head} {
		if st != nil {
			errs = append(errs, st.Close())
		}
	}
	for _, db := range []*sql.DB{s.wdb, s.rdb} {
		if db != nil {
			errs = append(errs, db.Close())
		}
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("embedded: close %s: %w", s.path, err)
	}
	return nil
}
