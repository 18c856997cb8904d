package rotation

import (
	"bytes"
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/castellan-ca/castellan/ca"
	"github.com/castellan-ca/castellan/internal/adminapi"
	"github.com/castellan-ca/castellan/signer"
	"github.com/castellan-ca/castellan/signer/selfsigned"
	"github.com/castellan-ca/castellan/storage"
)

func TestBootstrap(t *testing.T) {
	for _, tc := range []struct {
		name      string
		opts      []option
		wantRoles []string // roles of the active CAs
		chainLen  int      // intermediates in every response
	}{
		{"root signs leaves", nil, []string{storage.RoleRoot}, 0},
		{"intermediate layer", []option{withIntermediates}, []string{storage.RoleRoot, storage.RoleIntermediate}, 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := newHarness(t, nil, nil, tc.opts...)
			st := h.status(t)
			var roles []string
			for _, c := range st.CAs {
				if c.Phase != storage.PhaseActive || c.Source != storage.SourceManaged {
					t.Errorf("CA %s is %s/%s, want active/managed", c.KeyID, c.Phase, c.Source)
				}
				roles = append(roles, c.Role)
			}
			if !slices.Equal(roles, tc.wantRoles) {
				t.Errorf("roles %v, want %v", roles, tc.wantRoles)
			}
			chain := h.issue(t)
			if len(chain.Intermediates) != tc.chainLen {
				t.Errorf("chain carries %d intermediates, want %d", len(chain.Intermediates), tc.chainLen)
			}
			if err := h.verifies(chain); err != nil {
				t.Errorf("leaf does not verify: %v", err)
			}
			// The active root's certificate is kept where operators look for it.
			root := only(t, st, storage.RoleRoot, storage.PhaseActive)
			b, err := os.ReadFile(filepath.Join(h.dir, "ca", selfsigned.CertFile))
			if err != nil || !strings.Contains(string(b), strings.TrimSpace(signer.EncodePEM(h.authority.Current().Roots[0]))) {
				t.Errorf("ca-cert.pem does not hold the active root %s: %v", root.KeyID, err)
			}
			if got := h.audit.since(0); len(got) != 1 || got[0].Reason != ReasonBootstrap || got[0].Kind != storage.KindOperator {
				t.Errorf("audit records %+v, want one bootstrap record", got)
			}

			// A restart (new manager on the same store) keeps the same CAs.
			again := newHarness(t, h.store, h.clock, tc.opts...)
			if !slices.Equal(again.bundleIDs(), h.bundleIDs()) || again.issuerID(t) != h.issuerID(t) {
				t.Errorf("restart changed the CA: bundle %v issuer %s, was %v %s", again.bundleIDs(), again.issuerID(t), h.bundleIDs(), h.issuerID(t))
			}
			if n := again.audit.len(); n != 0 {
				t.Errorf("restart wrote %d audit records, want none", n)
			}
		})
	}
}

func TestBootstrapImportsLegacyRoot(t *testing.T) {
	dir := t.TempDir()
	legacy, err := selfsigned.Load(selfsigned.Options{Dir: filepath.Join(dir, "ca"), TrustDomain: td, Now: func() time.Time { return epoch }})
	if err != nil {
		t.Fatal(err)
	}
	clk := &clock{t: epoch}
	h := newHarnessIn(t, dir, nil, clk)
	if ids := h.bundleIDs(); len(ids) != 1 || ids[0] != keyID(legacy.Certificate()) {
		t.Errorf("bundle %v, want the imported root %s", ids, keyID(legacy.Certificate()))
	}
	if !strings.Contains(h.audit.since(0)[0].Detail, "imported") {
		t.Errorf("bootstrap record %q does not say imported", h.audit.since(0)[0].Detail)
	}

	// The certificate without the state is refused: never a silent new root.
	other := t.TempDir()
	if err := os.MkdirAll(filepath.Join(other, "ca"), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(other, "ca", selfsigned.CertFile), []byte(signer.EncodePEM(legacy.Certificate())), 0o644); err != nil {
		t.Fatal(err)
	}
	m, _ := New(Config{Authority: ca.NewAuthority(), Store: openStore(t, other), Audit: &auditLog{}, Backend: generator(t, filepath.Join(other, "ca")),
		Now: clk.Now})
	if err := m.Bootstrap(context.Background()); !errors.Is(err, selfsigned.ErrRootWithoutKey) {
		t.Errorf("Bootstrap with a certificate and no state: %v, want a refusal", err)
	}
}

// TestRootRotation walks the self-signed root through every phase, checking
// issuance, the trust bundle and the audit trail at each step.
func TestRootRotation(t *testing.T) {
	for _, tc := range []struct {
		name string
		opts []option
	}{
		{"root signs leaves", nil},
		{"with intermediates", []option{withIntermediates}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := newHarness(t, nil, nil, tc.opts...)
			oldRoot := h.bundleIDs()[0]
			oldIssuer := h.issuerID(t)
			before := h.issue(t)

			n := h.audit.len()
			st := h.mustRotate(t, adminapi.StepPrepare, adminapi.TargetRoot, false)
			newRoot := only(t, st, storage.RoleRoot, storage.PhasePrepared)
			if got := h.bundleIDs(); !slices.Equal(got, []string{oldRoot, newRoot.KeyID}) {
				t.Errorf("bundle after prepare %v, want [old, new]", got)
			}
			if got := h.issuerID(t); got != oldIssuer {
				t.Errorf("prepare changed the issuer to %s", got)
			}
			if want := newRoot.PreparedAt.Add(window); !newRoot.NextStepAt.Equal(want) {
				t.Errorf("prepared root NextStepAt %v, want %v", newRoot.NextStepAt, want)
			}
			if recs := h.audit.since(n); len(recs) != 1 || recs[0].Reason != ReasonRotate || recs[0].Outcome != storage.OutcomeOK ||
				!strings.Contains(recs[0].Detail, "prepare root") || !strings.Contains(recs[0].Detail, newRoot.KeyID) {
				t.Errorf("prepare audit records %+v", recs)
			}

			h.clock.Advance(window)
			st = h.mustRotate(t, adminapi.StepActivate, adminapi.TargetRoot, false)
			issuing := issuingCA(t, st)
			if issuing.RootKeyID != newRoot.KeyID || issuing.KeyID == oldIssuer {
				t.Errorf("issuing CA %s under root %s, want a new CA under %s", issuing.KeyID, issuing.RootKeyID, newRoot.KeyID)
			}
			after := h.issue(t)
			if got := h.issuerIDOf(after); got != issuing.KeyID {
				t.Errorf("leaf issued by %s after activate, want %s", got, issuing.KeyID)
			}
			if err := h.verifies(before); err != nil {
				t.Errorf("a leaf of the old root stopped verifying at activation: %v", err)
			}
			old := findCA(t, st, oldRoot)
			if old.Phase != storage.PhasePrevious || !old.DependentsUntil.After(before.Leaf.NotAfter.Add(-time.Nanosecond)) {
				t.Errorf("old root %s, dependents until %v; want previous, covering %v", old.Phase, old.DependentsUntil, before.Leaf.NotAfter)
			}

			// Retirement waits for the old root's last leaf.
			_, err := h.rotate(adminapi.StepRetire, adminapi.TargetRoot, false)
			wantRefused(t, err, "has certificates chaining to it until")
			h.clock.Advance(leafTTL + time.Hour)
			st = h.mustRotate(t, adminapi.StepRetire, adminapi.TargetRoot, false)
			if got := h.bundleIDs(); !slices.Equal(got, []string{newRoot.KeyID}) {
				t.Errorf("bundle after retire %v, want only the new root %s", got, newRoot.KeyID)
			}
			if err := h.verifies(h.issue(t)); err != nil {
				t.Errorf("a leaf of the new root does not verify after retire: %v", err)
			}
			for _, c := range st.CAs {
				if c.RootKeyID == oldRoot && c.Phase != storage.PhaseRetired {
					t.Errorf("CA %s under the retired root is %s", c.KeyID, c.Phase)
				}
			}
			// Retired keys are erased from the store.
			stored, err := h.store.Load(context.Background())
			if err != nil {
				t.Fatal(err)
			}
			for _, r := range stored.CAs {
				if r.Phase == storage.PhaseRetired && len(r.SealedKey) != 0 {
					t.Errorf("retired CA %s still has its key stored", r.KeyID)
				}
			}
		})
	}
}

func (h *harness) issuerIDOf(c *signer.Chain) string {
	return keyID(issuerCert(c, h.authority.Current()))
}

func issuerCert(c *signer.Chain, st *ca.State) *x509.Certificate {
	if iss := c.Issuer(); iss != nil {
		return iss
	}
	for _, r := range st.Roots {
		if bytes.Equal(r.SubjectKeyId, c.Leaf.AuthorityKeyId) {
			return r
		}
	}
	return nil
}

func issuingCA(t *testing.T, st *adminapi.RotationStatus) adminapi.CAStatus {
	t.Helper()
	for _, c := range st.CAs {
		if c.Issuing {
			return c
		}
	}
	t.Fatalf("no issuing CA in %+v", st.CAs)
	return adminapi.CAStatus{}
}

// TestIntermediateRotation rotates the intermediate under the same root: the
// bundle never changes, every step still waits for safety.
func TestIntermediateRotation(t *testing.T) {
	h := newHarness(t, nil, nil, withIntermediates)
	bundle := h.bundleIDs()
	oldInter := h.issuerID(t)
	before := h.issue(t)

	st := h.mustRotate(t, adminapi.StepPrepare, adminapi.TargetIntermediate, false)
	next := only(t, st, storage.RoleIntermediate, storage.PhasePrepared)
	if next.RootKeyID != bundle[0] {
		t.Errorf("new intermediate under %s, want the active root %s", next.RootKeyID, bundle[0])
	}
	_, err := h.rotate(adminapi.StepActivate, adminapi.TargetIntermediate, false)
	wantRefused(t, err, "propagation window")
	h.clock.Advance(window)
	h.mustRotate(t, adminapi.StepActivate, adminapi.TargetIntermediate, false)
	after := h.issue(t)
	if got := h.issuerIDOf(after); got != next.KeyID {
		t.Errorf("issued by %s, want the new intermediate %s", got, next.KeyID)
	}
	if !slices.Equal(h.bundleIDs(), bundle) {
		t.Errorf("bundle changed to %v in an intermediate rotation", h.bundleIDs())
	}
	if err := h.verifies(before); err != nil {
		t.Errorf("leaf of the old intermediate stopped verifying: %v", err)
	}
	_, err = h.rotate(adminapi.StepRetire, adminapi.TargetIntermediate, false)
	wantRefused(t, err, "intermediate "+oldInter)
	h.clock.Advance(leafTTL + time.Hour)
	st = h.mustRotate(t, adminapi.StepRetire, adminapi.TargetIntermediate, false)
	if c := findCA(t, st, oldInter); c.Phase != storage.PhaseRetired {
		t.Errorf("old intermediate is %s, want retired", c.Phase)
	}
}

// TestNewKeysEveryTime checks that each rotation makes a new key pair.
func TestNewKeysEveryTime(t *testing.T) {
	h := newHarness(t, nil, nil, withIntermediates)
	seen := map[string]bool{}
	for range 3 {
		for _, target := range []string{adminapi.TargetRoot, adminapi.TargetIntermediate} {
			h.mustRotate(t, adminapi.StepPrepare, target, false)
			h.clock.Advance(window)
			h.mustRotate(t, adminapi.StepActivate, target, false)
		}
	}
	st := h.status(t)
	for _, c := range st.CAs {
		if seen[c.KeyID] {
			t.Errorf("key %s used twice", c.KeyID)
		}
		seen[c.KeyID] = true
	}
	if len(seen) != 1+1+3*(2+1) {
		t.Errorf("%d distinct keys, want %d", len(seen), 1+1+3*3)
	}
}

// TestRefusals checks every step that would break trust or cannot apply.
func TestRefusals(t *testing.T) {
	for _, tc := range []struct {
		name         string
		opts         []option
		setup        func(t *testing.T, h *harness)
		step, target string
		want         string
	}{
		{"activate with nothing prepared", nil, nil, adminapi.StepActivate, adminapi.TargetRoot, "no root is prepared"},
		{"activate before the propagation window", nil, func(t *testing.T, h *harness) {
			h.mustRotate(t, adminapi.StepPrepare, adminapi.TargetRoot, false)
			h.clock.Advance(window - time.Second)
		}, adminapi.StepActivate, adminapi.TargetRoot, "propagation window 1h0m0s"},
		{"prepare twice", nil, func(t *testing.T, h *harness) {
			h.mustRotate(t, adminapi.StepPrepare, adminapi.TargetRoot, false)
		}, adminapi.StepPrepare, adminapi.TargetRoot, "is already prepared"},
		{"retire with nothing previous", nil, nil, adminapi.StepRetire, adminapi.TargetRoot, "no previous root"},
		{"retire while leaves live", nil, func(t *testing.T, h *harness) {
			h.issue(t)
			h.mustRotate(t, adminapi.StepPrepare, adminapi.TargetRoot, false)
			h.clock.Advance(window)
			h.mustRotate(t, adminapi.StepActivate, adminapi.TargetRoot, false)
		}, adminapi.StepRetire, adminapi.TargetRoot, "retiring now breaks them"},
		{"retire right after activation, before followers catch up", nil, func(t *testing.T, h *harness) {
			h.mustRotate(t, adminapi.StepPrepare, adminapi.TargetRoot, false)
			h.clock.Advance(window)
			h.mustRotate(t, adminapi.StepActivate, adminapi.TargetRoot, false)
		}, adminapi.StepRetire, adminapi.TargetRoot, "replicas may still be issuing under it"},
		{"intermediate without an intermediate layer", nil, nil, adminapi.StepPrepare, adminapi.TargetIntermediate, "no intermediate layer"},
		{"intermediate under a prepared root", []option{withIntermediates}, func(t *testing.T, h *harness) {
			h.mustRotate(t, adminapi.StepPrepare, adminapi.TargetRoot, false)
			h.clock.Advance(window)
		}, adminapi.StepActivate, adminapi.TargetIntermediate, "activate the root"},
		{"unknown target", nil, nil, adminapi.StepPrepare, "leaf", `unknown target "leaf"`},
		{"unknown step", nil, nil, "rollback", adminapi.TargetRoot, `unknown step "rollback"`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := newHarness(t, nil, nil, tc.opts...)
			if tc.setup != nil {
				tc.setup(t, h)
			}
			stateBefore, _ := h.store.Load(context.Background())
			bundle, n := h.bundleIDs(), h.audit.len()
			_, err := h.rotate(tc.step, tc.target, false)
			wantRefused(t, err, tc.want)
			if after, _ := h.store.Load(context.Background()); after.Version != stateBefore.Version {
				t.Errorf("a refused step changed the state (version %d → %d)", stateBefore.Version, after.Version)
			}
			if !slices.Equal(h.bundleIDs(), bundle) {
				t.Errorf("a refused step changed the bundle")
			}
			recs := h.audit.since(n)
			if len(recs) != 1 || recs[0].Outcome != storage.OutcomeRefused || recs[0].Reason != adminapi.ReasonRotationRefused ||
				recs[0].Code != "FailedPrecondition" || !strings.Contains(recs[0].Detail, tc.want) {
				t.Errorf("audit of the refusal: %+v", recs)
			}
		})
	}
}

// TestRefusedForIntermediateBackend: the operator's files decide the chain.
func TestRefusedForIntermediateBackend(t *testing.T) {
	h := newExternal(t, nil)
	for _, step := range []string{adminapi.StepPrepare, adminapi.StepActivate} {
		_, err := h.rotate(step, adminapi.TargetRoot, true)
		wantRefused(t, err, "comes from its files")
	}
}

// TestForce checks that force overrides each check and says so in the audit log.
func TestForce(t *testing.T) {
	h := newHarness(t, nil, nil)
	before := h.issue(t)
	h.mustRotate(t, adminapi.StepPrepare, adminapi.TargetRoot, false)

	n := h.audit.len()
	st := h.mustRotate(t, adminapi.StepActivate, adminapi.TargetRoot, true)
	if !strings.Contains(st.Summary, "forced past") {
		t.Errorf("summary %q does not say it was forced", st.Summary)
	}
	recs := h.audit.since(n)
	if len(recs) != 1 || recs[0].Reason != ReasonForced || recs[0].Outcome != storage.OutcomeOK ||
		!strings.Contains(recs[0].Detail, "--force") || !strings.Contains(recs[0].Detail, "FORCED past:") ||
		!strings.Contains(recs[0].Detail, "propagation window") || recs[0].Caller != "spiffe://example.org/castellan/operator" {
		t.Errorf("audit of a forced activation: %+v", recs)
	}

	n = h.audit.len()
	h.mustRotate(t, adminapi.StepRetire, adminapi.TargetRoot, true)
	recs = h.audit.since(n)
	if len(recs) != 1 || recs[0].Reason != ReasonForced || !strings.Contains(recs[0].Detail, "retiring now breaks them") {
		t.Errorf("audit of a forced retirement: %+v", recs)
	}
	// What force breaks: the old root's leaves no longer verify.
	if err := h.verifies(before); err == nil {
		t.Errorf("a leaf of the force-retired root still verifies")
	}
}

func TestAuditFailureStopsTheStep(t *testing.T) {
	h := newHarness(t, nil, nil)
	h.audit.fail = errors.New("audit store down")
	before, _ := h.store.Load(context.Background())
	if _, err := h.rotate(adminapi.StepPrepare, adminapi.TargetRoot, false); err == nil || errors.Is(err, ca.ErrPrecondition) {
		t.Fatalf("prepare with the audit log down: %v, want a storage error", err)
	}
	if after, _ := h.store.Load(context.Background()); after.Version != before.Version {
		t.Errorf("an unaudited step changed the state")
	}
}

// TestUnauditedRefusalIsNotARefusal: a refused step whose record the audit
// log cannot take fails as a storage error, so neither an operator nor the
// schedule (which passes over refusals) takes it for a plain refusal.
func TestUnauditedRefusalIsNotARefusal(t *testing.T) {
	h := newHarness(t, nil, nil)
	down := errors.New("audit store down")
	h.audit.fail = down
	before, _ := h.store.Load(context.Background())
	_, err := h.rotate(adminapi.StepActivate, adminapi.TargetRoot, false) // nothing prepared: refused
	if !errors.Is(err, down) || errors.Is(err, ca.ErrPrecondition) {
		t.Fatalf("refused step with the audit log down: %v, want the audit failure and no refusal", err)
	}
	if after, _ := h.store.Load(context.Background()); after.Version != before.Version {
		t.Errorf("a refused step changed the state")
	}
}

// saveFails is a Store whose Save, once armed, fails with err and takes the
// audit log down with it (one PostgreSQL can hold both), counting Loads and
// Saves.
type saveFails struct {
	Store
	audit        *auditLog
	err, auditEr error
	armed        bool
	loads, saves int
}

func (s *saveFails) Load(ctx context.Context) (*storage.CAState, error) {
	s.loads++
	return s.Store.Load(ctx)
}

func (s *saveFails) Save(ctx context.Context, version uint64, cas []storage.CARecord) error {
	if !s.armed {
		return s.Store.Save(ctx, version, cas)
	}
	s.saves++
	s.audit.mu.Lock()
	s.audit.fail = s.auditEr
	s.audit.mu.Unlock()
	return s.err
}

// TestSaveAndCorrectionFail: the step is recorded, its save fails, and the
// record saying it was not applied cannot be written either. The log now
// holds a step that did not happen: the error says so (the audit failure),
// and the step is not retried, even after a conflict.
func TestSaveAndCorrectionFail(t *testing.T) {
	for _, tc := range []struct {
		name    string
		saveErr error
	}{
		{"store down", errors.New("CA state store down")},
		{"conflict", fmt.Errorf("another replica saved first: %w", storage.ErrConflict)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			store := &saveFails{Store: openStore(t, t.TempDir()), err: tc.saveErr, auditEr: errors.New("audit store down")}
			h := newHarness(t, store, nil)
			store.audit, store.armed, store.loads = h.audit, true, 0
			before, _ := store.Store.Load(context.Background())
			n := h.audit.len()
			_, err := h.rotate(adminapi.StepPrepare, adminapi.TargetRoot, false)
			if !errors.Is(err, store.auditEr) || errors.Is(err, storage.ErrConflict) || errors.Is(err, ca.ErrPrecondition) {
				t.Fatalf("prepare: %v, want the audit failure, neither a conflict nor a refusal", err)
			}
			if store.loads != 1 || store.saves != 1 {
				t.Errorf("%d loads and %d saves, want 1 each: the step was retried", store.loads, store.saves)
			}
			if after, _ := store.Store.Load(context.Background()); after.Version != before.Version {
				t.Errorf("a step whose save failed changed the state")
			}
			if recs := h.audit.since(n); len(recs) != 1 || recs[0].Outcome != storage.OutcomeOK || recs[0].Reason != ReasonRotate {
				t.Errorf("audit records %+v, want the one written before the save", recs)
			}
		})
	}
}

// TestLeavesNeverOutliveIssuer: a leaf issued near the intermediate's end is
// clamped, and the dependents bound follows the clamped NotAfter.
func TestLeavesNeverOutliveIssuer(t *testing.T) {
	h := newHarness(t, nil, nil, withIntermediates)
	h.clock.Advance(48*time.Hour - time.Hour)
	c := h.issue(t)
	iss := c.Issuer()
	if c.Leaf.NotAfter.After(iss.NotAfter) {
		t.Errorf("leaf NotAfter %v after its issuer's %v", c.Leaf.NotAfter, iss.NotAfter)
	}
}

// auditedSaveFails is a Store that saves its state and the step's record in
// one transaction (AuditedStore), whose SaveAudited fails with err as a lost
// answer to COMMIT would, once armed: nothing tells whether it was applied.
// Unarmed (the harness's bootstrap), it saves the state alone.
type auditedSaveFails struct {
	Store
	err   error
	armed bool
}

func (s *auditedSaveFails) SaveAudited(ctx context.Context, version uint64, cas []storage.CARecord, _ *storage.Record) error {
	if !s.armed {
		return s.Store.Save(ctx, version, cas)
	}
	return s.err
}

// TestAuditedSaveUnconfirmed: when the atomic save fails, the step's only
// record says it is unconfirmed, never that it was not applied, since a
// lost COMMIT answer may have stored both the state and its own record.
func TestAuditedSaveUnconfirmed(t *testing.T) {
	store := &auditedSaveFails{Store: openStore(t, t.TempDir()), err: errors.New("connection reset during COMMIT")}
	h := newHarness(t, store, nil)
	store.armed = true
	n := h.audit.len()
	_, err := h.rotate(adminapi.StepPrepare, adminapi.TargetRoot, false)
	if !errors.Is(err, store.err) || errors.Is(err, storage.ErrConflict) {
		t.Fatalf("prepare: %v, want the save's failure", err)
	}
	recs := h.audit.since(n)
	if len(recs) != 1 || recs[0].Outcome != storage.OutcomeFailed {
		t.Fatalf("audit records %+v, want one failed record", recs)
	}
	if d := recs[0].Detail; !strings.Contains(d, "not confirmed") || strings.Contains(d, "not applied") {
		t.Errorf("detail %q: want the step called unconfirmed, not unapplied", d)
	}
}
