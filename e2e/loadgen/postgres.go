package main

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/castellan-ca/castellan/storage/postgres/pgtest"
)

// postgresTarget starts a throwaway PostgreSQL 15 cluster with fsync and
// synchronous_commit on (pgtest's durable mode, as the audit store
// benchmarks use), then castellan with its audit store on it. The target's
// storeCPU is the CPU of the postmaster and all its processes.
func postgresTarget(ctx context.Context, o options) (*target, error) {
	pg, err := pgtest.Launch(pgtest.Options{Durable: true}) //nolint:contextcheck // pgtest bounds its start-up (60 s)
	if err != nil {
		return nil, fmt.Errorf("PostgreSQL (Debian's postgresql-15 in %s, or %s): %w", pgtest.DefaultBinDir, pgtest.EnvBinDir, err)
	}
	// CA keys in a shared database are sealed with a key-encryption key,
	// which never lives in the data directory.
	kekDir, err := os.MkdirTemp("", "castellan-loadgen-kek-")
	if err != nil {
		return nil, errors.Join(err, pg.Close())
	}
	cleanup := func() error { return errors.Join(pg.Close(), os.RemoveAll(kekDir)) }
	kek := make([]byte, 32)
	_, _ = rand.Read(kek) // crypto/rand.Read never fails
	kekFile := filepath.Join(kekDir, "kek")
	if err := os.WriteFile(kekFile, kek, 0o600); err != nil {
		return nil, errors.Join(err, cleanup())
	}
	o.castellanExtra = append(o.castellanExtra, "--audit-dsn", pg.DSN("postgres"), "--ca-kek-file", kekFile)
	t, err := castellanTarget(ctx, o)
	if err != nil {
		return nil, errors.Join(err, cleanup())
	}
	stopCastellan, pid := t.stop, pg.PID()
	t.stop = func() error { return errors.Join(stopCastellan(), cleanup()) }
	t.storeCPU = func() (time.Duration, error) { return treeCPU("/proc", pid) }
	t.describe += fmt.Sprintf(", PostgreSQL audit store (fsync on, postmaster pid %d)", pid)
	return t, nil
}
