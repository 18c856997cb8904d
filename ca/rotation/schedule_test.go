package rotation

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"math/big"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/castellan-ca/castellan/internal/adminapi"
	"github.com/castellan-ca/castellan/signer/intermediate"
	"github.com/castellan-ca/castellan/signer/local"
	"github.com/castellan-ca/castellan/storage"
)

// TestSchedule runs the leader's schedule on an injected clock through a
// whole root rotation: prepare at the fraction, activate after the window,
// retire after the last leaf.
func TestSchedule(t *testing.T) {
	h := newHarness(t, nil, nil, withSchedule)
	root := only(t, h.status(t), storage.RoleRoot, storage.PhaseActive)
	life := root.NotAfter.Sub(root.NotBefore)
	prepareAt := root.NotBefore.Add(time.Duration(float64(life) * DefaultScheduleFraction))
	if !root.NextStepAt.Equal(prepareAt) {
		t.Errorf("status NextStepAt %v, want the scheduled prepare %v", root.NextStepAt, prepareAt)
	}
	tick := func() *adminapi.RotationStatus {
		t.Helper()
		if err := h.m.Tick(t.Context()); err != nil {
			t.Fatalf("Tick: %v", err)
		}
		return h.status(t)
	}
	if st := tick(); len(st.CAs) != 1 {
		t.Fatalf("schedule acted before the fraction: %+v", st.CAs)
	}
	h.clock.t = prepareAt.Add(-time.Second)
	h.issue(t)
	h.clock.t = prepareAt
	st := tick()
	next := only(t, st, storage.RoleRoot, storage.PhasePrepared)
	if st.Version != 2 {
		t.Errorf("state version %d after one scheduled step, want 2", st.Version)
	}
	h.clock.Advance(window - time.Second)
	if st := tick(); findCA(t, st, next.KeyID).Phase != storage.PhasePrepared {
		t.Errorf("schedule activated before the window")
	}
	h.clock.Advance(time.Second)
	st = tick()
	if c := findCA(t, st, next.KeyID); c.Phase != storage.PhaseActive || !c.Issuing {
		t.Errorf("after the window the new root is %s (issuing %v)", c.Phase, c.Issuing)
	}
	old := findCA(t, st, root.KeyID)
	h.clock.t = old.NextStepAt.Add(-time.Second)
	if st := tick(); findCA(t, st, root.KeyID).Phase != storage.PhasePrevious {
		t.Errorf("schedule retired the old root before its last leaf expired")
	}
	h.clock.t = old.NextStepAt
	if st := tick(); findCA(t, st, root.KeyID).Phase != storage.PhaseRetired {
		t.Errorf("schedule did not retire the old root once nothing chains to it")
	}
	if got := h.bundleIDs(); !slices.Equal(got, []string{next.KeyID}) {
		t.Errorf("bundle %v, want the new root only", got)
	}
	var reasons []string
	for _, r := range h.audit.since(0) {
		if r.Caller == scheduleCaller {
			reasons = append(reasons, strings.Fields(r.Detail)[2])
		}
	}
	if !slices.Equal(reasons, []string{adminapi.StepPrepare, adminapi.StepActivate, adminapi.StepRetire}) {
		t.Errorf("scheduled steps audited: %v", reasons)
	}
}

// TestFollower: a second replica on the same store follows every step the
// first one takes, by polling.
func TestFollower(t *testing.T) {
	leader := newHarness(t, nil, nil, withIntermediates)
	follower := newHarness(t, leader.store, leader.clock, withIntermediates)
	if !slices.Equal(follower.bundleIDs(), leader.bundleIDs()) || follower.issuerID(t) != leader.issuerID(t) {
		t.Fatalf("the second replica did not adopt the first one's CA")
	}
	ctx := context.Background()
	for _, s := range []struct{ step, target string }{
		{adminapi.StepPrepare, adminapi.TargetRoot}, {adminapi.StepActivate, adminapi.TargetRoot},
		{adminapi.StepPrepare, adminapi.TargetIntermediate}, {adminapi.StepActivate, adminapi.TargetIntermediate},
		{adminapi.StepRetire, adminapi.TargetIntermediate}, {adminapi.StepRetire, adminapi.TargetRoot},
	} {
		leader.clock.Advance(leafTTL + window) // past the window and the leaves issuerID makes
		leader.mustRotate(t, s.step, s.target, false)
		gen := follower.authority.Current().Generation
		if err := follower.m.refresh(ctx); err != nil {
			t.Fatalf("refresh: %v", err)
		}
		if !slices.Equal(follower.bundleIDs(), leader.bundleIDs()) {
			t.Errorf("after %s %s: follower bundle %v, leader %v", s.step, s.target, follower.bundleIDs(), leader.bundleIDs())
		}
		if f, l := follower.issuerID(t), leader.issuerID(t); f != l {
			t.Errorf("after %s %s: follower issues with %s, leader with %s", s.step, s.target, f, l)
		}
		if s.target == adminapi.TargetRoot || s.step == adminapi.StepActivate {
			if follower.authority.Current().Generation == gen {
				t.Errorf("after %s %s: follower authority unchanged", s.step, s.target)
			}
		}
	}
}

// TestTrackDependents checks the bound written before each record, the
// margin that keeps writes rare, and that a store failure withholds the record.
func TestTrackDependents(t *testing.T) {
	h := newHarness(t, nil, nil)
	counting := &countingStore{Store: h.store}
	h.m.cfg.Store = counting
	audit := &auditLog{}
	tr := h.m.TrackDependents(audit)
	ctx := context.Background()
	nb := epoch
	for i, tc := range []struct {
		name       string
		rec        storage.Record
		wantWrites int64
		wantBound  time.Time
	}{
		{"first leaf raises the bound by a tenth of its life", storage.Record{Kind: storage.KindCSR, Outcome: storage.OutcomeIssued,
			IssuerKeyID: "aa", NotBefore: nb, NotAfter: nb.Add(50 * time.Minute)}, 1, nb.Add(55 * time.Minute)},
		{"a leaf within the bound writes nothing", storage.Record{Kind: storage.KindCSR, Outcome: storage.OutcomeIssued,
			IssuerKeyID: "aa", NotBefore: nb, NotAfter: nb.Add(54 * time.Minute)}, 1, nb.Add(55 * time.Minute)},
		{"a later leaf raises it again", storage.Record{Kind: storage.KindCSR, Outcome: storage.OutcomeIssued,
			IssuerKeyID: "aa", NotBefore: nb, NotAfter: nb.Add(60 * time.Minute)}, 2, nb.Add(66 * time.Minute)},
		{"the margin is at most 10 minutes", storage.Record{Kind: storage.KindCSR, Outcome: storage.OutcomeIssued,
			IssuerKeyID: "aa", NotBefore: nb, NotAfter: nb.Add(10 * time.Hour)}, 3, nb.Add(10*time.Hour + 10*time.Minute)},
		{"refusals are not tracked", storage.Record{Kind: storage.KindCSR, Outcome: storage.OutcomeRefused, IssuerKeyID: "bb",
			NotAfter: nb.Add(time.Hour)}, 3, time.Time{}},
		{"own certificates are not tracked", storage.Record{Kind: storage.KindOperator, Outcome: storage.OutcomeOK, IssuerKeyID: "bb",
			NotAfter: nb.Add(time.Hour)}, 3, time.Time{}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rec := tc.rec
			if err := tr.Append(ctx, &rec); err != nil {
				t.Fatal(err)
			}
			if got := counting.raises.Load(); got != tc.wantWrites {
				t.Errorf("store writes %d, want %d", got, tc.wantWrites)
			}
			st, _ := h.store.Load(ctx)
			if got := st.Dependents[rec.IssuerKeyID]; !got.Equal(tc.wantBound) {
				t.Errorf("bound %v, want %v", got, tc.wantBound)
			}
			if audit.len() != i+1 {
				t.Errorf("record not passed on")
			}
		})
	}
	counting.fail = errors.New("database down")
	rec := storage.Record{Kind: storage.KindCSR, Outcome: storage.OutcomeIssued, IssuerKeyID: "cc", NotBefore: nb, NotAfter: nb.Add(time.Hour)}
	n := audit.len()
	if err := tr.Append(ctx, &rec); err == nil {
		t.Errorf("Append succeeded although the bound could not be stored")
	}
	if audit.len() != n {
		t.Errorf("the record was committed although the bound was not stored")
	}
}

type countingStore struct {
	Store
	raises atomic.Int64
	fail   error
}

func (c *countingStore) RaiseDependents(ctx context.Context, id string, t time.Time) error {
	if c.fail != nil {
		return c.fail
	}
	c.raises.Add(1)
	return c.Store.RaiseDependents(ctx, id, t)
}

// testPKI is an operator's root and intermediate (cacerts).
type testPKI struct {
	root, inter *x509.Certificate
	interKey    crypto.Signer
}

func newPKI(t *testing.T, name string, now time.Time) *testPKI {
	t.Helper()
	mk := func(cn string, parent *x509.Certificate, parentKey crypto.Signer) (*x509.Certificate, crypto.Signer) {
		key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			t.Fatal(err)
		}
		tmpl := &x509.Certificate{SerialNumber: big.NewInt(now.UnixNano()), Subject: pkix.Name{CommonName: cn},
			NotBefore: now.Add(-time.Hour), NotAfter: now.Add(365 * 24 * time.Hour), IsCA: true, BasicConstraintsValid: true,
			KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature}
		if parent == nil {
			parent, parentKey = tmpl, key
		}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, key.Public(), parentKey)
		if err != nil {
			t.Fatal(err)
		}
		c, err := x509.ParseCertificate(der)
		if err != nil {
			t.Fatal(err)
		}
		return c, key
	}
	root, rootKey := mk(name+" root", nil, nil)
	inter, interKey := mk(name+" intermediate", root, rootKey)
	return &testPKI{root: root, inter: inter, interKey: interKey}
}

func (p *testPKI) signer(t *testing.T, now func() time.Time) *local.Signer {
	t.Helper()
	s, err := local.New(local.Config{Cert: p.inter, Key: p.interKey, Roots: []*x509.Certificate{p.root}, Now: now})
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// newExternal is a harness for the intermediate backend, loaded with a new PKI.
func newExternal(t *testing.T, store Store, opts ...option) *harness {
	t.Helper()
	h := newHarness(t, store, nil, append(opts, func(c *Config) { c.Backend = &intermediate.Source{} })...)
	if err := h.m.UseExternal(context.Background(), newPKI(t, "A", epoch).signer(t, h.clock.Now), "loaded A"); err != nil {
		t.Fatal(err)
	}
	return h
}

// TestExternalChainChange: when the cacerts files move to a chain under a
// new root, the old root stays trusted until its leaves expire, then leaves
// by itself; its return in the files makes it active again.
func TestExternalChainChange(t *testing.T) {
	ctx := context.Background()
	h := newHarness(t, nil, nil, func(c *Config) { c.Backend = &intermediate.Source{} })
	a, b := newPKI(t, "A", epoch), newPKI(t, "B", epoch)
	if err := h.m.UseExternal(ctx, a.signer(t, h.clock.Now), "loaded A"); err != nil {
		t.Fatal(err)
	}
	if got := h.bundleIDs(); !slices.Equal(got, []string{keyID(a.root)}) {
		t.Fatalf("bundle %v, want root A", got)
	}
	leafA := h.issue(t)

	n := h.audit.len()
	if err := h.m.UseExternal(ctx, b.signer(t, h.clock.Now), "intermediate CA reloaded: B"); err != nil {
		t.Fatal(err)
	}
	if got := h.bundleIDs(); !slices.Equal(got, []string{keyID(b.root), keyID(a.root)}) {
		t.Errorf("bundle after the change %v, want [B, A]", got)
	}
	if got := h.issuerIDOf(h.issue(t)); got != keyID(b.inter) {
		t.Errorf("issuing with %s, want B's intermediate", got)
	}
	if recs := h.audit.since(n); len(recs) != 1 || recs[0].Reason != ReasonReload || !strings.Contains(recs[0].Detail, "reloaded: B") ||
		!strings.Contains(recs[0].Detail, "root "+keyID(a.root)+" previous") {
		t.Errorf("audit of the reload: %+v", recs)
	}
	// Reloading the same files changes nothing and writes nothing.
	n = h.audit.len()
	if err := h.m.UseExternal(ctx, b.signer(t, h.clock.Now), "again"); err != nil || h.audit.len() != n {
		t.Errorf("reloading the same chain: %v, %d new records", err, h.audit.len()-n)
	}

	_, err := h.rotate(adminapi.StepRetire, adminapi.TargetRoot, false)
	wantRefused(t, err, "root "+keyID(a.root)+" has certificates chaining to it")
	if err := h.m.Tick(ctx); err != nil {
		t.Fatal(err)
	}
	if err := h.verifies(leafA); err != nil {
		t.Errorf("A's leaf stopped verifying before it expired: %v", err)
	}
	h.clock.t = leafA.Leaf.NotAfter.Add(leafTTL)
	if err := h.m.Tick(ctx); err != nil {
		t.Fatal(err)
	}
	if got := h.bundleIDs(); !slices.Equal(got, []string{keyID(b.root)}) {
		t.Errorf("bundle once A's leaves expired %v, want root B only", got)
	}
}

// TestBackendSwitch: moving from the intermediate backend to selfsigned keeps
// the operator's root trusted while its leaves live.
func TestBackendSwitch(t *testing.T) {
	ext := newExternal(t, nil)
	ext.issue(t)
	extRoot := ext.bundleIDs()[0]
	h := newHarness(t, ext.store, ext.clock)
	st := h.status(t)
	if c := findCA(t, st, extRoot); c.Phase != storage.PhasePrevious {
		t.Errorf("operator root is %s after switching to selfsigned, want previous", c.Phase)
	}
	if ids := h.bundleIDs(); len(ids) != 2 || !slices.Contains(ids, extRoot) {
		t.Errorf("bundle %v, want the new root and the operator's", ids)
	}
}
