// Package rotation rotates Castellan's CA keys without downtime (DESIGN.md
// §6): a new CA is prepared (its root joins the trust bundle, issuance is
// unchanged), activated once the bundle had time to propagate (issuance
// switches), and the old one is retired once every certificate chaining to
// it has expired (its root leaves the bundle). Every key is new.
//
// The state (certificates, phases, keys sealed under a key-encryption key,
// and an upper bound of what each CA issued) lives in a Store shared by every
// replica. The key-encryption key itself is replaced without downtime by
// Rekey (rekey.go). Any replica may run a step (compare-and-swap on the state's
// version); one leader runs the schedule; every replica polls the store and
// swaps its ca.Authority when the state changes.
package rotation

import (
	"context"
	"crypto"
	"crypto/rand"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"strings"
	"sync"
	"time"

	"github.com/castellan-ca/castellan/ca"
	"github.com/castellan-ca/castellan/internal/adminapi"
	"github.com/castellan-ca/castellan/signer"
	"github.com/castellan-ca/castellan/signer/local"
	"github.com/castellan-ca/castellan/storage"
	"golang.org/x/sync/errgroup"
)

// Store persists the rotation state shared by every replica
// (storage/cafile for one process, storage/postgres for several).
type Store interface {
	// Load returns the state; Version 0 and no CAs when nothing was saved.
	Load(ctx context.Context) (*storage.CAState, error)
	// Save replaces the CAs if the stored version is still version
	// (storing version+1), or returns an error wrapping storage.ErrConflict.
	// It keeps the dependents.
	Save(ctx context.Context, version uint64, cas []storage.CARecord) error
	// RaiseDependents records that certificates issued by keyID live until
	// at least t; it never lowers the stored value.
	RaiseDependents(ctx context.Context, keyID string, t time.Time) error
}

// AuditedStore is a Store that keeps the audit log in the same database
// (storage/postgres) and saves a state change together with its audit
// record, in one transaction: the change and its record commit together or
// not at all, whatever fails or dies in between, so no replica killed
// mid-step leaves half a step behind. The manager uses it when the Store
// has it; otherwise it appends the record, then saves.
type AuditedStore interface {
	// SaveAudited is Save plus the append of rec to the audit log; on
	// success rec holds its stored form.
	SaveAudited(ctx context.Context, version uint64, cas []storage.CARecord, rec *storage.Record) error
}

// Defaults of Config.
const (
	// DefaultPropagationWindow covers a full 24 h certificate lifetime: every
	// workload renews (at half its life) at least once within it.
	DefaultPropagationWindow = 24 * time.Hour
	// DefaultScheduleFraction prepares a successor at two thirds of a CA's life.
	DefaultScheduleFraction = 2.0 / 3
	// DefaultPollInterval is how often replicas reload the shared state.
	DefaultPollInterval = 2 * time.Second
	// DefaultRootLifetime is the validity of a generated root.
	DefaultRootLifetime = 10 * 365 * 24 * time.Hour
)

// Config wires a Manager.
type Config struct {
	// Authority is swapped to the state's issuing CA and bundle.
	Authority *ca.Authority
	// Store holds the state shared by every replica.
	Store Store
	// Backend is the signing backend whose CAs the manager runs: a Generator
	// (Castellan holds the keys and rotates them) or an External (the
	// operator's CA).
	Backend Backend
	// Leader elects the replica that runs the schedule; nil means Always (a
	// store shared with nobody).
	Leader Leader
	// Audit records every phase change, refusal and forced step.
	Audit ca.AuditLog
	// AuditTimeout bounds each audit write; zero means ca.DefaultAuditTimeout.
	AuditTimeout time.Duration
	// Sealer encrypts keys at rest; nil stores them unencrypted (allowed
	// only for a store that is a local file).
	Sealer *Sealer
	// KEKFiles are the files on this replica that Rekey may read a new
	// key-encryption key from (its configured KEK files); none refuses
	// rekeys.
	KEKFiles []string
	// RootLifetime of generated roots; zero means DefaultRootLifetime.
	RootLifetime time.Duration
	// IntermediateLifetime of generated intermediates; zero means roots sign
	// leaves directly (no intermediate layer).
	IntermediateLifetime time.Duration
	// PropagationWindow is the least time between prepare and activate
	// without force: at least one client renewal period.
	PropagationWindow time.Duration
	// Schedule enables automatic steps for managed CAs (the leader runs them).
	Schedule bool
	// ScheduleFraction of an active CA's lifetime at which its successor is prepared.
	ScheduleFraction float64
	// PollInterval is how often replicas reload the shared state.
	PollInterval time.Duration
	// Logger gets phase changes and failures; nil discards.
	Logger *slog.Logger
	// Now is the clock; nil means time.Now.
	Now func() time.Time
	// Rand supplies serials and signing randomness; nil means crypto/rand.
	Rand io.Reader
}

// Manager runs the rotation workflow of one replica. It implements admin.Rotation.
type Manager struct {
	cfg   Config
	audit *ca.Auditor
	// generator is Backend when Castellan makes the CAs, nil when an
	// External supplies them.
	generator Generator

	mu          sync.Mutex    // serialises apply and the fields below
	applied     string        // fingerprint of what the Authority uses
	seen        *view         // the last state apply was given, for Collect
	external    *local.Signer // the External backend's CA
	externalGen int

	keyMu  sync.Mutex
	keys   map[string]crypto.Signer // opened keys, by key id
	sealer *Sealer                  // the KEKs held: Config.Sealer, and a rekey's target once run here
	// warnedAt is the state version of the last warnOnce.
	warnedAt uint64

	depMu    sync.Mutex
	reserved map[string]time.Time // dependents bounds this replica has stored
}

// New checks cfg and fills defaults.
func New(cfg Config) (*Manager, error) {
	switch {
	case cfg.Authority == nil || cfg.Store == nil || cfg.Audit == nil || cfg.Backend == nil:
		return nil, errors.New("rotation: authority, store, audit log and backend are required")
	case cfg.ScheduleFraction < 0 || cfg.ScheduleFraction >= 1:
		return nil, fmt.Errorf("rotation: schedule fraction %v is not in (0, 1)", cfg.ScheduleFraction)
	}
	gen, isGenerator := cfg.Backend.(Generator)
	if _, isExternal := cfg.Backend.(External); !isGenerator && !isExternal {
		return nil, fmt.Errorf("rotation: backend %q cannot be rotated", cfg.Backend.Name())
	}
	if cfg.Leader == nil {
		cfg.Leader = Always{}
	}
	if cfg.RootLifetime <= 0 {
		cfg.RootLifetime = DefaultRootLifetime
	}
	if cfg.PropagationWindow <= 0 {
		cfg.PropagationWindow = DefaultPropagationWindow
	}
	if cfg.ScheduleFraction == 0 {
		cfg.ScheduleFraction = DefaultScheduleFraction
	}
	if cfg.PollInterval <= 0 {
		cfg.PollInterval = DefaultPollInterval
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.Rand == nil {
		cfg.Rand = rand.Reader
	}
	audit := &ca.Auditor{Log: cfg.Audit, Timeout: cfg.AuditTimeout, Now: cfg.Now, Rand: cfg.Rand, Logger: cfg.Logger}
	return &Manager{cfg: cfg, audit: audit, generator: gen, keys: map[string]crypto.Signer{}, sealer: cfg.Sealer,
		reserved: map[string]time.Time{}}, nil
}

// now is the clock, in UTC at the store's precision (PostgreSQL keeps
// microseconds), so that stored and in-memory times compare equal.
func (m *Manager) now() time.Time { return m.cfg.Now().UTC().Truncate(time.Microsecond) }

func (m *Manager) load(ctx context.Context) (*view, error) {
	st, err := m.cfg.Store.Load(ctx)
	if err != nil {
		return nil, fmt.Errorf("load CA state: %w", err)
	}
	return parseState(st)
}

// maxAttempts bounds compare-and-swap retries against concurrent replicas.
const maxAttempts = 8

// Bootstrap brings the managed state to a usable shape and applies it: on
// first start it imports the root of earlier versions (Generator.ImportRoot) or
// generates a root (and an intermediate when configured); it adds or drops
// the intermediate layer when the configuration changed. Keys stay sealed
// as they are: moving them to another KEK is Rekey's, an explicit and
// audited step. Only for a Generator backend.
func (m *Manager) Bootstrap(ctx context.Context) error {
	if m.generator == nil {
		return fmt.Errorf("rotation: the %s backend's CA is not generated: nothing to bootstrap", m.cfg.Backend.Name())
	}
	for range maxAttempts {
		v, err := m.load(ctx)
		if err != nil {
			return err
		}
		m.checkKEK(v)
		next, detail, err := m.bootstrapPlan(ctx, v)
		if err == nil && next != nil {
			err = m.sealNew(v, next)
		}
		if err != nil {
			return err
		}
		if next != nil {
			err := m.commit(ctx, v, next, auditEntry{outcome: storage.OutcomeOK, reason: ReasonBootstrap, detail: detail})
			if errors.Is(err, storage.ErrConflict) {
				continue // another replica bootstrapped first: use its state
			}
			if err != nil {
				return err
			}
			v = next
		}
		return m.apply(v)
	}
	return fmt.Errorf("rotation: bootstrap: %w", storage.ErrConflict)
}

// bootstrapPlan returns the state to save (nil when v is fine as it is).
func (m *Manager) bootstrapPlan(ctx context.Context, v *view) (*view, string, error) {
	n := v.clone()
	now := m.now()
	var did []string
	did = append(did, deactivate(n, storage.SourceExternal, now)...)
	root := n.managed(storage.RoleRoot, storage.PhaseActive)
	if root == nil {
		e, key, how, err := m.firstRoot(ctx, now)
		if err != nil {
			return nil, "", err
		}
		e.Phase, e.ActivatedAt = storage.PhaseActive, now
		n.cas = append(n.cas, e)
		m.cacheKey(e.KeyID, key)
		root = e
		did = append(did, how+" root "+e.KeyID)
	}
	inter := n.managed(storage.RoleIntermediate, storage.PhaseActive)
	switch {
	case m.cfg.IntermediateLifetime > 0 && inter == nil:
		rootKey, err := m.key(root)
		if err != nil {
			return nil, "", err
		}
		e, err := m.newIntermediate(ctx, root, rootKey, now)
		if err != nil {
			return nil, "", err
		}
		e.Phase, e.ActivatedAt = storage.PhaseActive, now
		n.cas = append(n.cas, e)
		did = append(did, "generated intermediate "+e.KeyID+" under root "+root.KeyID)
	case m.cfg.IntermediateLifetime == 0 && inter != nil:
		// Issuance moves to the root itself, which every client trusts already.
		inter.Phase, inter.DeactivatedAt = storage.PhasePrevious, now
		for _, p := range n.all(storage.SourceManaged, storage.RoleIntermediate, storage.PhasePrepared) {
			retire(p, now)
		}
		did = append(did, "intermediate layer off: "+inter.KeyID+" no longer issues")
	}
	if len(did) == 0 {
		return nil, "", nil
	}
	return n, "ca bootstrap: " + strings.Join(did, "; "), nil
}

// deactivate moves the active and prepared CAs of source out of use (the
// backend changed): active ones stay trusted as previous, prepared ones never
// issued and are retired.
func deactivate(n *view, source string, now time.Time) []string {
	var did []string
	for _, e := range n.all(source, "", "") {
		switch e.Phase {
		case storage.PhaseActive:
			e.Phase, e.DeactivatedAt = storage.PhasePrevious, now
			did = append(did, source+" "+e.Role+" "+e.KeyID+" no longer issues")
		case storage.PhasePrepared:
			retire(e, now)
			did = append(did, source+" "+e.Role+" "+e.KeyID+" retired unused")
		}
	}
	return did
}

func retire(e *entry, now time.Time) {
	e.Phase, e.RetiredAt, e.SealedKey = storage.PhaseRetired, now, nil
}

// firstRoot imports the root an earlier version kept outside the state, or
// generates one.
func (m *Manager) firstRoot(ctx context.Context, now time.Time) (*entry, crypto.Signer, string, error) {
	cert, key, from, err := m.generator.ImportRoot()
	if err != nil {
		return nil, nil, "", fmt.Errorf("rotation: %w", err)
	}
	if cert != nil {
		e, err := m.managedEntry(cert, key, storage.RoleRoot, "", now)
		if err != nil {
			return nil, nil, "", fmt.Errorf("rotation: import %s: %w", from, err)
		}
		if m.cfg.Sealer.configured() {
			m.cfg.Logger.Warn("the imported root key is sealed in the CA state; its plaintext file is no longer read: remove it once backed up", "from", from)
		}
		return e, key, "imported " + from + " as", nil
	}
	key, err = m.newKey(ctx)
	if err != nil {
		return nil, nil, "", err
	}
	e, err := m.newRoot(key, now)
	return e, key, "generated", err
}

// key returns e's private key, opening (and caching) it: unsealed from
// the state, or the key provider's key at the URI stored there.
func (m *Manager) key(e *entry) (crypto.Signer, error) {
	m.keyMu.Lock()
	defer m.keyMu.Unlock()
	if k, ok := m.keys[e.KeyID]; ok {
		return k, nil
	}
	var (
		k   crypto.Signer
		err error
	)
	if uri, ok := refURI(e.SealedKey); ok {
		if m.generator == nil {
			return nil, fmt.Errorf("rotation: CA %s: its key is in a key provider (%s), which only the selfsigned backend opens", e.KeyID, uri)
		}
		k, err = m.generator.OpenKey(uri, e.cert.PublicKey)
	} else {
		k, err = m.sealer.Open(e.KeyID, e.SealedKey)
	}
	if err != nil {
		return nil, fmt.Errorf("rotation: %w", err)
	}
	if err := local.KeyMatches(e.cert, k); err != nil {
		return nil, fmt.Errorf("rotation: CA %s: %w", e.KeyID, err)
	}
	m.keys[e.KeyID] = k
	return k, nil
}

func (m *Manager) cacheKey(id string, k crypto.Signer) {
	m.keyMu.Lock()
	defer m.keyMu.Unlock()
	m.keys[id] = k
}

// cachedKey returns the key of a CA this replica made or opened, or nil.
func (m *Manager) cachedKey(id string) crypto.Signer {
	m.keyMu.Lock()
	defer m.keyMu.Unlock()
	return m.keys[id]
}

// currentSealer returns the KEKs this replica holds now.
func (m *Manager) currentSealer() *Sealer {
	m.keyMu.Lock()
	defer m.keyMu.Unlock()
	return m.sealer
}

// refresh reloads the shared state and applies it if it changed.
func (m *Manager) refresh(ctx context.Context) error {
	v, err := m.load(ctx)
	if err != nil {
		return err
	}
	return m.apply(v)
}

// apply makes the Authority use v: the issuing CA and a trust bundle of every
// root not retired. It does nothing when both are what it already uses.
func (m *Manager) apply(v *view) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.seen = v
	var iss *entry
	ids := []string{}
	switch {
	case m.generator != nil:
		if iss = v.issuing(); iss == nil {
			return errors.New("rotation: the CA state has no active CA")
		}
		ids = append(ids, iss.KeyID)
	case m.external == nil:
		return fmt.Errorf("rotation: no %s CA loaded", m.cfg.Backend.Name())
	default:
		ids = append(ids, fmt.Sprintf("%s#%d", keyID(m.external.Certificate()), m.externalGen))
	}
	var roots []*x509.Certificate
	for _, e := range v.bundle() {
		roots = append(roots, e.cert)
		ids = append(ids, e.KeyID)
	}
	fp := strings.Join(ids, "|")
	if fp == m.applied {
		return nil
	}
	issuing := m.external
	if iss != nil {
		root := v.byID(iss.RootID)
		if root == nil {
			return fmt.Errorf("rotation: CA %s: root %s is not in the state", iss.KeyID, iss.RootID)
		}
		key, err := m.key(iss)
		if err != nil {
			return err
		}
		if issuing, err = local.New(local.Config{Cert: iss.cert, Key: key, Roots: []*x509.Certificate{root.cert}, Now: m.cfg.Now, Rand: m.cfg.Rand}); err != nil {
			return fmt.Errorf("rotation: CA %s: %w", iss.KeyID, err)
		}
	}
	st, err := m.cfg.Authority.Use(m.cfg.Backend.Name(), issuing, roots...)
	if err != nil {
		return fmt.Errorf("rotation: %w", err)
	}
	m.applied = fp
	// Keys of retired CAs are not needed in memory.
	m.keyMu.Lock()
	for id := range m.keys {
		if e := v.byID(id); e != nil && e.Phase == storage.PhaseRetired {
			delete(m.keys, id)
		}
	}
	m.keyMu.Unlock()
	m.cfg.Logger.Info("CA state applied", "generation", st.Generation, "state_version", v.version,
		"issuer", keyID(issuing.Certificate()), "roots", len(st.Roots))
	m.mirrorRoot(v)
	return nil
}

// mirrorRoot has the Generator publish the active managed root, for
// operators and backups (the key stays in the store).
func (m *Manager) mirrorRoot(v *view) {
	root := v.managed(storage.RoleRoot, storage.PhaseActive)
	if m.generator == nil || root == nil {
		return
	}
	if err := m.generator.PublishRoot(root.cert); err != nil {
		m.cfg.Logger.Warn("could not write the active root certificate", "error", err)
	}
}

// Start puts the backend's CA to use: a Generator's state is brought to a
// usable shape (Bootstrap), an External's CA is loaded (UseExternal).
func (m *Manager) Start(ctx context.Context) error {
	name := m.cfg.Backend.Name()
	if m.generator != nil {
		if err := m.Bootstrap(ctx); err != nil {
			return fmt.Errorf("%s CA: %w", name, err)
		}
		return nil
	}
	s, detail, err := m.cfg.Backend.(External).Load()
	if err == nil {
		err = m.UseExternal(ctx, s, detail)
	}
	if err != nil {
		return fmt.Errorf("%s CA: %w", name, err)
	}
	return nil
}

// Run keeps this replica's CA current until ctx ends: it follows the shared
// state (Follow), runs the schedule while this replica leads (Leader), and
// for an External backend takes each new CA of the operator's. It returns
// once all of them have stopped.
func (m *Manager) Run(ctx context.Context) error {
	var g errgroup.Group
	g.Go(func() error { m.Follow(ctx); return nil })
	g.Go(func() error {
		if err := m.cfg.Leader.Run(ctx, m.RunSchedule); err != nil && ctx.Err() == nil {
			m.cfg.Logger.Error("CA rotation leader election stopped", "error", err)
		}
		return nil
	})
	if ext, ok := m.cfg.Backend.(External); ok && m.generator == nil {
		g.Go(func() error {
			ext.Watch(ctx, func(s *local.Signer, detail string) {
				// The previous chain's roots stay in the bundle until the
				// certificates issued under them expire; the schedule retires them.
				if err := m.UseExternal(ctx, s, detail); err != nil {
					m.cfg.Logger.Error("CA reload failed; keeping the current CA", "signer", ext.Name(), "error", err)
				}
			})
			return nil
		})
	}
	return g.Wait()
}

// Follow reloads the shared state every PollInterval until ctx ends, so
// this replica picks up steps run by others within seconds.
func (m *Manager) Follow(ctx context.Context) {
	signer.RefreshLoop(ctx, m.cfg.PollInterval, nil,
		func(ctx context.Context) (bool, error) { return false, m.refresh(ctx) },
		func(err error) { m.cfg.Logger.Error("CA state refresh failed; keeping the current CA", "error", err) },
		func() {})
}

// Status reports the shared rotation state.
func (m *Manager) Status(ctx context.Context) (*adminapi.RotationStatus, error) {
	v, err := m.load(ctx)
	if err != nil {
		return nil, err
	}
	return m.status(v), nil
}

// issuerKeyID is the key id of the CA that signs leaves on this replica.
func (m *Manager) issuerKeyID(v *view) string {
	if m.generator == nil {
		m.mu.Lock()
		defer m.mu.Unlock()
		if m.external != nil {
			return keyID(m.external.Certificate())
		}
		return ""
	}
	if e := v.issuing(); e != nil {
		return e.KeyID
	}
	return ""
}

// keyID is the hex SubjectKeyId, as in audit records' issuer_key_id.
func keyID(c *x509.Certificate) string { return hex.EncodeToString(c.SubjectKeyId) }
