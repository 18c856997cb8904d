package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/castellan-ca/castellan/ca"
	"github.com/castellan-ca/castellan/ca/bundleserver"
	"github.com/castellan-ca/castellan/ca/rotation"
	"github.com/castellan-ca/castellan/cmd/internal/datadir"
	"github.com/castellan-ca/castellan/signer/cakey"
	"github.com/castellan-ca/castellan/signer/intermediate"
	"github.com/castellan-ca/castellan/signer/selfsigned"
	"github.com/castellan-ca/castellan/storage/cafile"
	"github.com/castellan-ca/castellan/storage/postgres"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// RotationConfig holds the CA rotation and bundle endpoint keys, at the top
// level of the file.
type RotationConfig struct {
	IntermediateLifetime   time.Duration `yaml:"intermediateLifetime"`
	PropagationWindow      time.Duration `yaml:"rotationPropagationWindow"`
	RotationSchedule       bool          `yaml:"rotationSchedule"`
	ScheduleFraction       float64       `yaml:"rotationScheduleFraction"`
	CAStatePoll            time.Duration `yaml:"caStatePollInterval"`
	CAKEKFile              string        `yaml:"caKEKFile"`
	CAKEKFiles             []string      `yaml:"caKEKFiles"`
	BundleEndpointListen   string        `yaml:"bundleEndpointListen"`
	BundleEndpointAuth     string        `yaml:"bundleEndpointAuth"`
	BundleEndpointCertFile string        `yaml:"bundleEndpointCertFile"`
	BundleEndpointKeyFile  string        `yaml:"bundleEndpointKeyFile"`
	BundleRefreshHint      time.Duration `yaml:"bundleEndpointRefreshHint"`
}

func rotationDefaults() RotationConfig {
	return RotationConfig{
		PropagationWindow:  rotation.DefaultPropagationWindow,
		RotationSchedule:   true,
		ScheduleFraction:   rotation.DefaultScheduleFraction,
		CAStatePoll:        rotation.DefaultPollInterval,
		BundleEndpointAuth: bundleserver.AuthSPIFFE,
		BundleRefreshHint:  bundleserver.DefaultRefreshHint,
	}
}

func bindRotationFlags(fs *flag.FlagSet, c *RotationConfig) {
	fs.DurationVar(&c.IntermediateLifetime, "intermediate-lifetime", c.IntermediateLifetime, "selfsigned: issue through a generated intermediate of this lifetime (0: the root signs workload certificates)")
	fs.DurationVar(&c.PropagationWindow, "rotation-propagation-window", c.PropagationWindow, "least time between preparing a CA and activating it without --force (at least one client renewal period)")
	fs.BoolVar(&c.RotationSchedule, "rotation-schedule", c.RotationSchedule, "selfsigned: prepare, activate and retire CAs automatically")
	fs.Float64Var(&c.ScheduleFraction, "rotation-schedule-fraction", c.ScheduleFraction, "fraction of a CA's lifetime at which the schedule prepares its successor")
	fs.DurationVar(&c.CAStatePoll, "ca-state-poll-interval", c.CAStatePoll, "how often replicas reload the shared CA state")
	fs.StringVar(&c.CAKEKFile, "ca-kek-file", c.CAKEKFile, "key-encryption key (32 bytes, raw or base64) sealing CA keys at rest; required with auditDSN; never inside dataDir")
	fs.Var(listFlag{&c.CAKEKFiles}, "ca-kek-files", "comma-separated further key-encryption key files this replica holds (those present are read at start) and that `castellanctl ca rekey --new-kek-file` may name; never inside dataDir")
	fs.StringVar(&c.BundleEndpointListen, "bundle-endpoint-listen", c.BundleEndpointListen, "SPIFFE bundle endpoint listen address (empty: off)")
	fs.StringVar(&c.BundleEndpointAuth, "bundle-endpoint-auth", c.BundleEndpointAuth, "bundle endpoint authentication: https_spiffe | https_web")
	fs.StringVar(&c.BundleEndpointCertFile, "bundle-endpoint-cert-file", c.BundleEndpointCertFile, "https_web: certificate chain PEM")
	fs.StringVar(&c.BundleEndpointKeyFile, "bundle-endpoint-key-file", c.BundleEndpointKeyFile, "https_web: private key PEM")
	fs.DurationVar(&c.BundleRefreshHint, "bundle-endpoint-refresh-hint", c.BundleRefreshHint, "refresh hint published in the bundle")
}

// validate checks the rotation keys; dataDir is where the KEK must not be.
func (c RotationConfig) validate(bad func(key, format string, a ...any), cfg Config) {
	if c.IntermediateLifetime < 0 || (c.IntermediateLifetime > 0 && c.IntermediateLifetime >= cfg.RootLifetime) {
		bad("intermediateLifetime", "must be 0 (no intermediate) or positive and shorter than rootLifetime")
	}
	if c.PropagationWindow <= 0 {
		bad("rotationPropagationWindow", "must be positive")
	}
	if c.ScheduleFraction <= 0 || c.ScheduleFraction >= 1 {
		bad("rotationScheduleFraction", "must be between 0 and 1, got %v", c.ScheduleFraction)
	}
	if c.CAStatePoll < 100*time.Millisecond {
		bad("caStatePollInterval", "must be at least 100ms")
	}
	if c.CAKEKFile != "" && cfg.DataDir != "" && inside(c.CAKEKFile, cfg.DataDir) {
		bad("caKEKFile", "must not be inside dataDir: the key-encryption key never lives beside the keys it protects")
	}
	for i, f := range c.CAKEKFiles {
		switch {
		case f == "":
			bad(fmt.Sprintf("caKEKFiles[%d]", i), "must not be empty")
		case cfg.DataDir != "" && inside(f, cfg.DataDir):
			bad(fmt.Sprintf("caKEKFiles[%d]", i), "must not be inside dataDir: the key-encryption key never lives beside the keys it protects")
		}
	}
	if cfg.AuditDSN != "" && cfg.Signer == selfsigned.Backend && c.CAKEKFile == "" {
		bad("caKEKFile", "required with auditDSN: CA keys in a shared database are always encrypted")
	}
	if c.BundleEndpointListen != "" {
		switch c.BundleEndpointAuth {
		case bundleserver.AuthSPIFFE:
		case bundleserver.AuthWeb:
			if c.BundleEndpointCertFile == "" || c.BundleEndpointKeyFile == "" {
				bad("bundleEndpointCertFile", "bundleEndpointCertFile and bundleEndpointKeyFile are required with https_web")
			}
		default:
			bad("bundleEndpointAuth", "%q is not https_spiffe or https_web", c.BundleEndpointAuth)
		}
		if c.BundleRefreshHint <= 0 {
			bad("bundleEndpointRefreshHint", "must be positive")
		}
	}
}

// inside reports whether path is dir or under it, symbolic links resolved.
func inside(path, dir string) bool {
	abs := func(p string) string {
		p, _ = filepath.Abs(p)
		if r, err := filepath.EvalSymlinks(p); err == nil {
			return r
		}
		// The file may not exist yet: resolve its directory.
		if r, err := filepath.EvalSymlinks(filepath.Dir(p)); err == nil {
			return filepath.Join(r, filepath.Base(p))
		}
		return p
	}
	p, d := abs(path), abs(dir)
	return p == d || strings.HasPrefix(p, d+string(filepath.Separator))
}

// startRotation builds the CA rotation manager on the store the
// configuration selects (the PostgreSQL audit database when several replicas
// share one, else a file in the data directory) and puts the configured CA
// to use. The caller runs the manager (Manager.Run): it follows the shared
// state and, on the leader, the schedule.
func startRotation(ctx context.Context, cfg Config, td spiffeid.TrustDomain, authority *ca.Authority, audit auditStore,
	keys *cakey.Provider, leaders leaderGauges, logger *slog.Logger) (*rotation.Manager, error) {
	logger = logger.With("component", "ca-rotation")
	var (
		store  rotation.Store
		leader rotation.Leader = rotation.Always{}
	)
	if pg, ok := audit.(*postgres.Store); ok {
		store = pg.CAStore()
		leader = &postgres.Leader{Store: pg, Interval: cfg.CAStatePoll, Logger: logger}
	} else {
		fs, err := cafile.Open(filepath.Join(cfg.DataDir, datadir.SelfSignedDir, datadir.CAState))
		if err != nil {
			return nil, err
		}
		store = fs
	}
	sealer, err := openSealer(cfg, logger)
	if err != nil {
		return nil, err
	}
	backend, err := rotationBackend(cfg, td, keys, logger)
	if err != nil {
		return nil, err
	}
	m, err := rotation.New(rotation.Config{
		Authority: authority, Store: store, Backend: backend, Leader: leaders.track(leader, electionRotation, ""), Audit: audit, AuditTimeout: cfg.AuditTimeout,
		Sealer: sealer, KEKFiles: kekFiles(cfg), RootLifetime: cfg.RootLifetime, IntermediateLifetime: cfg.IntermediateLifetime,
		PropagationWindow: cfg.PropagationWindow, Schedule: cfg.RotationSchedule, ScheduleFraction: cfg.ScheduleFraction,
		PollInterval: cfg.CAStatePoll, Logger: logger,
	})
	if err != nil {
		return nil, err
	}
	if err := m.Start(ctx); err != nil {
		return nil, err
	}
	return m, nil
}

// rotationBackend is the configured local backend: selfsigned (generated
// CAs, the root of earlier versions in the data directory) or intermediate
// (the operator's cacerts directory), with its keys in keys when set.
func rotationBackend(cfg Config, td spiffeid.TrustDomain, keys *cakey.Provider, logger *slog.Logger) (rotation.Backend, error) {
	switch cfg.Signer {
	case selfsigned.Backend:
		return selfsigned.NewGenerator(selfsigned.Options{Dir: filepath.Join(cfg.DataDir, datadir.SelfSignedDir), TrustDomain: td,
			KeyType: cfg.RootKeyType, Keys: keys})
	case intermediate.Backend:
		return &intermediate.Source{Dir: cfg.CACertsDir, Interval: cfg.CACertsPoll, Logger: logger, Keys: keys, KeyURI: cfg.CACertsKeyURI}, nil
	}
	return nil, fmt.Errorf("signer: unknown backend %q", cfg.Signer)
}

// kekFiles are the key-encryption key files of this replica: caKEKFile,
// then caKEKFiles. They are the only files a KEK rekey reads a new KEK from.
func kekFiles(cfg Config) []string {
	var out []string
	if cfg.CAKEKFile != "" {
		out = append(out, cfg.CAKEKFile)
	}
	return append(out, cfg.CAKEKFiles...)
}

// openSealer reads the key-encryption key, when one is configured, and the
// further KEK files present (a rekey under way, or prepared for).
func openSealer(cfg Config, logger *slog.Logger) (*rotation.Sealer, error) {
	var sealer *rotation.Sealer
	if cfg.CAKEKFile != "" {
		kek, err := rotation.ReadKEKFile(cfg.CAKEKFile)
		if err != nil {
			return nil, err
		}
		defer clear(kek)
		if sealer, err = rotation.NewSealer(kek); err != nil {
			return nil, err
		}
		logger.Info("CA keys sealed under a key-encryption key", "kek_id", sealer.ID())
	}
	for _, f := range cfg.CAKEKFiles {
		if _, err := os.Stat(f); errors.Is(err, fs.ErrNotExist) {
			// It may appear later (a key added to a mounted Secret): a rekey reads it then.
			logger.Info("further key-encryption key file not present (yet)", "file", f)
			continue
		}
		kek, err := rotation.ReadKEKFile(f)
		if err != nil {
			return nil, fmt.Errorf("caKEKFiles: %w", err)
		}
		var id string
		sealer, id, err = sealer.Hold(kek)
		clear(kek)
		if err != nil {
			return nil, fmt.Errorf("caKEKFiles: %s: %w", f, err)
		}
		logger.Info("further key-encryption key held", "file", f, "kek_id", id)
	}
	return sealer, nil
}
