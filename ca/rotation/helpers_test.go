package rotation

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/castellan-ca/castellan/ca"
	"github.com/castellan-ca/castellan/internal/adminapi"
	"github.com/castellan-ca/castellan/signer"
	"github.com/castellan-ca/castellan/signer/selfsigned"
	"github.com/castellan-ca/castellan/storage"
	"github.com/castellan-ca/castellan/storage/cafile"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

var (
	td      = spiffeid.RequireTrustDomainFromString("example.org")
	epoch   = time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC)
	window  = time.Hour
	leafTTL = 2 * time.Hour
)

// clock is an injected, manually advanced clock.
type clock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *clock) Now() time.Time { c.mu.Lock(); defer c.mu.Unlock(); return c.t }

func (c *clock) Advance(d time.Duration) { c.mu.Lock(); c.t = c.t.Add(d); c.mu.Unlock() }

// auditLog keeps appended records in memory.
type auditLog struct {
	mu   sync.Mutex
	recs []storage.Record
	fail error
}

func (a *auditLog) Append(_ context.Context, r *storage.Record) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.fail != nil {
		return a.fail
	}
	a.recs = append(a.recs, *r)
	return nil
}

// since returns the records appended after the first n.
func (a *auditLog) since(n int) []storage.Record {
	a.mu.Lock()
	defer a.mu.Unlock()
	return append([]storage.Record(nil), a.recs[n:]...)
}

func (a *auditLog) len() int { a.mu.Lock(); defer a.mu.Unlock(); return len(a.recs) }

// harness is one replica: a Manager with its own Authority on a shared store.
type harness struct {
	m         *Manager
	authority *ca.Authority
	audit     *auditLog
	clock     *clock
	store     Store
	dir       string
}

type option func(*Config)

func withIntermediates(c *Config) { c.IntermediateLifetime = 48 * time.Hour }
func withSchedule(c *Config)      { c.Schedule = true }

// newHarness bootstraps a selfsigned manager on a new file store (or on
// store, to share it with another harness).
func newHarness(t *testing.T, store Store, clk *clock, opts ...option) *harness {
	t.Helper()
	return newHarnessIn(t, t.TempDir(), store, clk, opts...)
}

// openStore opens the CA state file of data directory dir.
func openStore(t *testing.T, dir string) *cafile.Store {
	t.Helper()
	s, err := cafile.Open(filepath.Join(dir, "ca", "state.json"))
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// newHarnessIn is newHarness with dir as the data directory.
func newHarnessIn(t *testing.T, dir string, store Store, clk *clock, opts ...option) *harness {
	t.Helper()
	if store == nil {
		store = openStore(t, dir)
	}
	if clk == nil {
		clk = &clock{t: epoch}
	}
	h := &harness{authority: ca.NewAuthority(), audit: &auditLog{}, clock: clk, store: store, dir: dir}
	cfg := Config{Authority: h.authority, Store: store, Audit: h.audit, Backend: generator(t, filepath.Join(dir, "ca")),
		RootLifetime: 100 * 24 * time.Hour, PropagationWindow: window, PollInterval: time.Second, Now: clk.Now}
	for _, o := range opts {
		o(&cfg)
	}
	m, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	h.m = m
	if _, generated := cfg.Backend.(Generator); generated {
		if err := m.Bootstrap(context.Background()); err != nil {
			t.Fatalf("Bootstrap: %v", err)
		}
	}
	return h
}

// generator is the selfsigned backend with the root of earlier versions in
// dir ("" for none).
func generator(t testing.TB, dir string) *selfsigned.Generator {
	t.Helper()
	g, err := selfsigned.NewGenerator(selfsigned.Options{Dir: dir, TrustDomain: td})
	if err != nil {
		t.Fatal(err)
	}
	return g
}

// rotate runs one operator step.
func (h *harness) rotate(step, target string, force bool) (*adminapi.RotationStatus, error) {
	return h.m.Rotate(context.Background(), adminapi.RotateRequest{Step: step, Target: target, Force: force, Caller: "spiffe://example.org/castellan/operator"})
}

func (h *harness) mustRotate(t *testing.T, step, target string, force bool) *adminapi.RotationStatus {
	t.Helper()
	st, err := h.rotate(step, target, force)
	if err != nil {
		t.Fatalf("%s %s: %v", step, target, err)
	}
	return st
}

// issue signs a workload leaf of leafTTL with the active signer and audits
// it through the dependents tracker, as the issuer does.
func (h *harness) issue(t *testing.T) *signer.Chain {
	t.Helper()
	st := h.authority.Current()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	serial, _ := signer.NewSerial(rand.Reader)
	now := h.clock.Now()
	tmpl := ca.LeafTemplate(spiffeid.RequireFromPath(td, "/ns/default/sa/app"), key.Public(), serial, now.Add(-time.Minute), now.Add(leafTTL))
	chain, err := st.Signer.Sign(context.Background(), signer.SignRequest{Template: tmpl, PublicKey: key.Public()})
	if err != nil {
		t.Fatalf("sign: %v", err)
	}
	if err := ca.CheckIssued(chain, tmpl, key.Public(), st.Pool, now); err != nil {
		t.Fatalf("issued chain: %v", err)
	}
	rec := &storage.Record{Kind: storage.KindCSR, Outcome: storage.OutcomeIssued, IssuerKeyID: hex.EncodeToString(chain.Leaf.AuthorityKeyId),
		NotBefore: chain.Leaf.NotBefore, NotAfter: chain.Leaf.NotAfter}
	// Workload records go to their own log: h.audit holds operator records only.
	if err := h.m.TrackDependents(&auditLog{}).Append(context.Background(), rec); err != nil {
		t.Fatalf("audit: %v", err)
	}
	return chain
}

// verifies reports whether chain verifies against the current trust bundle.
func (h *harness) verifies(chain *signer.Chain) error {
	inter := x509.NewCertPool()
	for _, c := range chain.Intermediates {
		inter.AddCert(c)
	}
	_, err := chain.Leaf.Verify(x509.VerifyOptions{Roots: h.authority.Current().Pool, Intermediates: inter,
		CurrentTime: h.clock.Now(), KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}})
	return err
}

// bundleIDs returns the key ids of the trust bundle, in order.
func (h *harness) bundleIDs() []string {
	var out []string
	for _, r := range h.authority.Current().Roots {
		out = append(out, keyID(r))
	}
	return out
}

// issuerID returns the key id of the CA that signs leaves now.
func (h *harness) issuerID(t *testing.T) string {
	t.Helper()
	return hex.EncodeToString(h.issue(t).Leaf.AuthorityKeyId)
}

// ca returns the status of the CA with key id, failing if absent.
func findCA(t *testing.T, st *adminapi.RotationStatus, id string) adminapi.CAStatus {
	t.Helper()
	for _, c := range st.CAs {
		if c.KeyID == id {
			return c
		}
	}
	t.Fatalf("CA %s not in status", id)
	return adminapi.CAStatus{}
}

// only returns the single CA of role in phase.
func only(t *testing.T, st *adminapi.RotationStatus, role, phase string) adminapi.CAStatus {
	t.Helper()
	var out []adminapi.CAStatus
	for _, c := range st.CAs {
		if c.Role == role && c.Phase == phase {
			out = append(out, c)
		}
	}
	if len(out) != 1 {
		t.Fatalf("%d %s CAs in phase %s, want 1: %+v", len(out), role, phase, st.CAs)
	}
	return out[0]
}

func (h *harness) status(t *testing.T) *adminapi.RotationStatus {
	t.Helper()
	st, err := h.m.Status(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	return st
}

// wantRefused checks that err is a refusal mentioning want.
func wantRefused(t *testing.T, err error, want string) {
	t.Helper()
	if !errors.Is(err, ca.ErrPrecondition) {
		t.Fatalf("error %v, want a refusal (ca.ErrPrecondition)", err)
	}
	if !strings.Contains(err.Error(), want) {
		t.Errorf("refusal %q does not say %q", err, want)
	}
}
