package main

import (
	"context"
	"crypto/ed25519"
	"errors"
	"flag"
	"fmt"
	"io/fs"
	"log/slog"
	"net/url"
	"os"
	"path/filepath"
	"time"

	"github.com/castellan-ca/castellan/ca"
	"github.com/castellan-ca/castellan/ca/admin"
	"github.com/castellan-ca/castellan/cmd/internal/datadir"
	"github.com/castellan-ca/castellan/internal/atomicfile"
	"github.com/castellan-ca/castellan/internal/keyfile"
	"github.com/castellan-ca/castellan/storage/embedded"
	"github.com/castellan-ca/castellan/storage/postgres"
)

// AuditConfig holds the audit store keys, at the top level of the file.
type AuditConfig struct {
	// AuditDSN selects PostgreSQL (postgres://…); empty keeps the embedded store.
	AuditDSN           string        `yaml:"auditDSN"`
	AuditWriter        string        `yaml:"auditWriter"`
	AuditMaxBatch      int           `yaml:"auditMaxBatch"`
	AuditBatchDelay    time.Duration `yaml:"auditBatchDelay"`
	AuditMaxConns      int           `yaml:"auditMaxConns"`
	AuditCheckpointKey string        `yaml:"auditCheckpointKey"`
}

func auditDefaults() AuditConfig {
	// A short batch delay lets concurrent issuances share one durable commit:
	// it costs each request at most this much latency and saves an fsync per
	// record under load (see BENCHMARKS.md).
	return AuditConfig{AuditMaxBatch: 256, AuditMaxConns: 8, AuditBatchDelay: 300 * time.Microsecond}
}

func bindAuditFlags(fs *flag.FlagSet, c *AuditConfig) {
	fs.StringVar(&c.AuditDSN, "audit-dsn", c.AuditDSN, "PostgreSQL audit store, postgres://user@host/db?sslmode=…; empty: embedded SQLite in the data dir")
	fs.StringVar(&c.AuditWriter, "audit-writer", c.AuditWriter, "this process's audit chain id (default: PostgreSQL: <hostname>-<random> per start; embedded: kept in the file)")
	fs.IntVar(&c.AuditMaxBatch, "audit-max-batch", c.AuditMaxBatch, "most audit records committed in one transaction")
	fs.DurationVar(&c.AuditBatchDelay, "audit-batch-delay", c.AuditBatchDelay, "how long a batch waits for more records before committing (0: commit what is queued)")
	fs.IntVar(&c.AuditMaxConns, "audit-max-conns", c.AuditMaxConns, "PostgreSQL connection pool size")
	fs.StringVar(&c.AuditCheckpointKey, "audit-checkpoint-key", c.AuditCheckpointKey, "Ed25519 key (PKCS#8 PEM) signing audit prune checkpoints; generated if missing (default: DATA_DIR/audit-checkpoint-key.pem)")
}

func (c AuditConfig) validate(bad func(key, format string, a ...any)) {
	if c.AuditDSN != "" {
		u, err := url.Parse(c.AuditDSN)
		if err != nil || (u.Scheme != "postgres" && u.Scheme != "postgresql") {
			bad("auditDSN", "must be a postgres:// or postgresql:// URL") // never echo it: it may hold a password
		}
	}
	if c.AuditMaxBatch <= 0 || c.AuditMaxBatch > 10000 {
		bad("auditMaxBatch", "must be between 1 and 10000")
	}
	if c.AuditBatchDelay < 0 || c.AuditBatchDelay > time.Second {
		bad("auditBatchDelay", "must be between 0 and 1s")
	}
	if c.AuditMaxConns < 2 || c.AuditMaxConns > 1000 {
		bad("auditMaxConns", "must be between 2 and 1000")
	}
}

// auditStore is what serve needs of either store.
type auditStore interface {
	ca.AuditLog
	admin.AuditReader
	Ping(ctx context.Context) error
	Close() error
}

// openAuditStore opens the store the configuration selects.
func openAuditStore(ctx context.Context, cfg Config, logger *slog.Logger) (auditStore, error) {
	keyPath := cfg.AuditCheckpointKey
	if keyPath == "" {
		keyPath = filepath.Join(cfg.DataDir, datadir.AuditCheckpointKey)
	}
	key, err := loadCheckpointKey(keyPath, logger)
	if err != nil {
		return nil, err
	}
	if cfg.AuditDSN == "" {
		return embedded.Open(ctx, filepath.Join(cfg.DataDir, datadir.AuditDB), embedded.Options{Writer: cfg.AuditWriter,
			MaxBatch: cfg.AuditMaxBatch, MaxBatchDelay: cfg.AuditBatchDelay, CheckpointKey: key, Logger: logger})
	}
	return postgres.Open(ctx, cfg.AuditDSN, postgres.Options{Writer: cfg.AuditWriter, MaxBatch: cfg.AuditMaxBatch,
		MaxBatchDelay: cfg.AuditBatchDelay, MaxConns: int32(cfg.AuditMaxConns), CommitTimeout: 2 * cfg.AuditTimeout, //nolint:gosec // G115: validation keeps auditMaxConns in [2, 1000]
		CheckpointKey: key, Logger: logger})
}

// loadCheckpointKey reads the Ed25519 checkpoint key, generating it (0600)
// on first start. Replicas sharing one PostgreSQL log must share this key
// (mount one Secret), or each verifies only the checkpoints it signed.
func loadCheckpointKey(path string, logger *slog.Logger) (ed25519.PrivateKey, error) {
	b, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		_, key, err := ed25519.GenerateKey(nil)
		if err != nil {
			return nil, fmt.Errorf("audit checkpoint key: %w", err)
		}
		pemBytes, err := keyfile.MarshalPrivateKeyPEM(key)
		if err != nil {
			return nil, fmt.Errorf("audit checkpoint key: %w", err)
		}
		if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
			return nil, fmt.Errorf("audit checkpoint key: %w", err)
		}
		if err := atomicfile.Write(path, pemBytes, 0o600); err != nil {
			return nil, fmt.Errorf("audit checkpoint key: %w", err)
		}
		logger.Info("audit checkpoint key generated", "path", path)
		return key, nil
	}
	if err != nil {
		return nil, fmt.Errorf("audit checkpoint key: %w", err)
	}
	k, err := keyfile.ParsePrivateKeyPEM(b)
	if err != nil {
		return nil, fmt.Errorf("audit checkpoint key %s: %w", path, err)
	}
	key, ok := k.(ed25519.PrivateKey)
	if !ok {
		return nil, fmt.Errorf("audit checkpoint key %s: %T is not an Ed25519 key", path, k)
	}
	return key, nil
}
