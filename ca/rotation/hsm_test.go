package rotation

import (
	"bytes"
	"crypto/x509"
	"errors"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/castellan-ca/castellan/ca"
	"github.com/castellan-ca/castellan/internal/adminapi"
	"github.com/castellan-ca/castellan/signer"
	"github.com/castellan-ca/castellan/signer/cakey"
	"github.com/castellan-ca/castellan/signer/cakey/softhsmtest"
	"github.com/castellan-ca/castellan/signer/selfsigned"
	"github.com/castellan-ca/castellan/signer/signertest"
	"github.com/castellan-ca/castellan/storage"
)

func TestMain(m *testing.M) { os.Exit(softhsmtest.Main(m)) }

// hsm opens a provider on this binary's SoftHSM2 token.
func hsm(t *testing.T) (*softhsmtest.Token, *cakey.Provider) {
	t.Helper()
	tk := softhsmtest.Get(t)
	return tk, tk.Provider(t)
}

// withKeys makes the backend a selfsigned generator whose keys p creates;
// dir is the harness's data directory.
func withKeys(t *testing.T, dir string, p *cakey.Provider) option {
	g, err := selfsigned.NewGenerator(selfsigned.Options{Dir: filepath.Join(dir, "ca"), TrustDomain: td, Keys: p})
	if err != nil {
		t.Fatal(err)
	}
	return func(c *Config) { c.Backend = g }
}

// TestHSMConformance runs the signer conformance suite on the CA the
// manager puts to use with its keys in the token: the root signing leaves
// itself, and a generated intermediate. The outage is the token's removal.
func TestHSMConformance(t *testing.T) {
	tk, p := hsm(t)
	for name, opts := range map[string][]option{"root": nil, "intermediate": {withIntermediates}} {
		t.Run(name, func(t *testing.T) {
			dir := t.TempDir()
			// Real time: the suite verifies chains at time.Now.
			h := newHarnessIn(t, dir, nil, &clock{t: time.Now()}, append(opts, withKeys(t, dir, p))...)
			checkKeyRefs(t, h, p)
			signertest.Run(t, signertest.Factory{
				TrustDomain: td,
				New:         func(*testing.T) signer.Signer { return h.authority.Current().Signer },
				Outage: func(t *testing.T, _ signer.Signer) func() {
					return tk.Remove(t)
				},
			})
		})
	}
}

// checkKeyRefs asserts that the state holds no key of a managed CA (of
// those named by ids, when given), only its URI in the token, labelled with
// the CA's key id, and that the token holds that CA's key.
func checkKeyRefs(t *testing.T, h *harness, p *cakey.Provider, ids ...string) {
	t.Helper()
	for _, e := range loadView(t, h.store).cas {
		if e.Source != storage.SourceManaged || e.Phase == storage.PhaseRetired || (len(ids) > 0 && !slices.Contains(ids, e.KeyID)) {
			continue
		}
		uri, ok := refURI(e.SealedKey)
		if !ok || e.SealedKey[0] != formatKeyURI {
			t.Errorf("%s %s: stored key is not a key URI (%x…)", e.Role, e.KeyID, e.SealedKey[:min(len(e.SealedKey), 1)])
			continue
		}
		if want := "pkcs11:id=" + e.KeyID + ";object=" + e.KeyID; uri != want {
			t.Errorf("%s %s: key URI %q, want %q", e.Role, e.KeyID, uri, want)
		}
		k, err := p.Key(uri, e.cert.PublicKey)
		if err != nil {
			t.Fatal(err)
		}
		if err := k.Check(t.Context()); err != nil {
			t.Errorf("%s %s: the token has no matching key at %s: %v", e.Role, e.KeyID, uri, err)
		}
	}
}

// TestHSMRotation rotates the root (and its intermediate) and then the
// intermediate with every key in the token: each prepare creates new key
// pairs there, the state never holds a key, a restarted manager finds the
// keys again, and a token outage during prepare is Unavailable and audited.
func TestHSMRotation(t *testing.T) {
	tk, p := hsm(t)
	dir := t.TempDir()
	keys := withKeys(t, dir, p)
	objects := tk.Objects(t)
	h := newHarnessIn(t, dir, nil, nil, withIntermediates, keys)
	if got := tk.Objects(t) - objects; got != 4 {
		t.Errorf("bootstrap added %d token objects, want 4 (root and intermediate key pairs)", got)
	}
	checkKeyRefs(t, h, p)
	oldRoot := only(t, h.status(t), storage.RoleRoot, storage.PhaseActive).KeyID
	h.issue(t)

	objects = tk.Objects(t)
	n := h.audit.len()
	st := h.mustRotate(t, adminapi.StepPrepare, adminapi.TargetRoot, false)
	if got := tk.Objects(t) - objects; got != 4 {
		t.Errorf("prepare root added %d token objects, want 4", got)
	}
	newRoot := only(t, st, storage.RoleRoot, storage.PhasePrepared).KeyID
	newInter := only(t, st, storage.RoleIntermediate, storage.PhasePrepared).KeyID
	rec := h.audit.since(n)[0]
	for _, id := range []string{newRoot, newInter} {
		if want := "(key pkcs11:id=" + id + ";object=" + id + ")"; !strings.Contains(rec.Detail, want) {
			t.Errorf("prepare audit detail %q does not say where the key is: %s", rec.Detail, want)
		}
	}
	checkKeyRefs(t, h, p)

	h.clock.Advance(window + time.Second)
	h.mustRotate(t, adminapi.StepActivate, adminapi.TargetRoot, false)
	if got := h.issuerID(t); got != newInter {
		t.Errorf("issuing CA after activate = %s, want the new intermediate %s", got, newInter)
	}
	h.clock.Advance(leafTTL + time.Hour)
	n = h.audit.len()
	h.mustRotate(t, adminapi.StepRetire, adminapi.TargetRoot, false)
	if d := h.audit.since(n)[0].Detail; !strings.Contains(d, oldRoot) || !strings.Contains(d, "still holds their keys") {
		t.Errorf("retire audit detail %q does not name the retired root %s and its keys left in the provider", d, oldRoot)
	}

	objects = tk.Objects(t)
	h.mustRotate(t, adminapi.StepPrepare, adminapi.TargetIntermediate, false)
	if got := tk.Objects(t) - objects; got != 2 {
		t.Errorf("prepare intermediate added %d token objects, want 2", got)
	}
	h.clock.Advance(window + time.Second)
	h.mustRotate(t, adminapi.StepActivate, adminapi.TargetIntermediate, false)
	checkKeyRefs(t, h, p)
	h.issue(t)

	// A restarted replica opens every key by its URI alone; the KEK it now
	// has seals nothing (the bootstrap leaves key URIs as they are).
	sealer, err := NewSealer(make([]byte, KEKSize))
	if err != nil {
		t.Fatal(err)
	}
	restarted := newHarnessIn(t, dir, h.store, h.clock, withIntermediates, keys, func(c *Config) { c.Sealer = sealer })
	checkKeyRefs(t, restarted, p)
	if got, want := restarted.issuerID(t), only(t, h.status(t), storage.RoleIntermediate, storage.PhaseActive).KeyID; got != want {
		t.Errorf("restarted replica issues under %s, want %s", got, want)
	}

	// The token is out: prepare is Unavailable and audited as a backend outage.
	restore := tk.Remove(t)
	n = h.audit.len()
	if _, err := h.rotate(adminapi.StepPrepare, adminapi.TargetIntermediate, false); !errors.Is(err, signer.ErrSignerUnavailable) {
		t.Fatalf("prepare without the token: err = %v, want ErrSignerUnavailable", err)
	}
	recs := h.audit.since(n)
	if len(recs) != 1 || recs[0].Outcome != storage.OutcomeFailed || recs[0].Reason != ca.ReasonSignerDown {
		t.Fatalf("audit records of the failed prepare = %+v, want one %s record with reason %s", recs, storage.OutcomeFailed, ca.ReasonSignerDown)
	}
	restore()
	if _, err := waitFor(t, func() (*adminapi.RotationStatus, error) {
		return h.rotate(adminapi.StepPrepare, adminapi.TargetIntermediate, false)
	}); err != nil {
		t.Fatalf("prepare once the token is back: %v", err)
	}
}

// waitFor retries f while it fails as Unavailable (the provider reconnects
// after its retry interval), for up to 10 s.
func waitFor[T any](t *testing.T, f func() (T, error)) (T, error) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		v, err := f()
		if err == nil || !errors.Is(err, signer.ErrSignerUnavailable) || time.Now().After(deadline) {
			return v, err
		}
		time.Sleep(softhsmtest.RetryInterval)
	}
}

// TestKeyRefNeverUnsealed: a stored key URI is not mistaken for a sealed
// key: Open refuses it, naming the URI, with or without KEKs, and so does
// every reading of sealings; only a valid reference is one.
func TestKeyRefNeverUnsealed(t *testing.T) {
	ref := keyRef("pkcs11:id=01;object=01")
	for name, s := range map[string]*Sealer{"no KEK": nil, "a KEK": mustSealer(t, testKEK(1))} {
		if _, err := s.Open("01", ref); !errors.Is(err, ErrKeyInProvider) || !strings.Contains(err.Error(), "pkcs11:id=01;object=01") {
			t.Errorf("Open of a key URI with %s: err = %v, want ErrKeyInProvider naming the URI", name, err)
		}
	}
	if _, err := sealedUnder(ref); !errors.Is(err, ErrKeyInProvider) {
		t.Errorf("sealedUnder of a key URI: err = %v, want ErrKeyInProvider", err)
	}
	if ref[0] == formatMultiple || ref[0] == formatAESGCM || ref[0] == formatPlain {
		t.Errorf("a key URI is stored behind format byte %d, which a sealed key uses", ref[0])
	}
	if uri, ok := refURI(ref); !ok || uri != "pkcs11:id=01;object=01" {
		t.Errorf("refURI = %q, %v", uri, ok)
	}
	for _, blob := range [][]byte{nil, {formatKeyURI}, {formatPlain, 1, 2}, {formatKeyURI, 0xff, 0xfe}} {
		if _, ok := refURI(blob); ok {
			t.Errorf("refURI(%x) took it for a key URI", blob)
		}
	}
}

// storedBlobs returns the stored key of every CA that has one, by key id.
func storedBlobs(t *testing.T, store Store) map[string][]byte {
	t.Helper()
	st, err := store.Load(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	out := map[string][]byte{}
	for _, r := range st.CAs {
		if len(r.SealedKey) > 0 {
			out[r.KeyID] = r.SealedKey
		}
	}
	return out
}

// TestRekeyWithProviderKeys: a KEK rekey of a state that mixes software keys
// sealed under the KEK with keys in SoftHSM2 (keyProvider set on a running
// deployment, then an intermediate rotation). The rekey reseals the
// software keys and leaves the token's key URIs byte for byte as they were;
// a replica with the old KEK only still makes CA keys meanwhile, in the
// token; after the finish a replica with the new KEK only uses both kinds:
// it issues under the token's intermediate and signs the next one with the
// software root.
func TestRekeyWithProviderKeys(t *testing.T) {
	_, p := hsm(t)
	oldKEK, newKEK := testKEK(21), testKEK(22)
	newFile := kekFile(t, newKEK)
	oldID, newID := mustSealer(t, oldKEK).ID(), mustSealer(t, newKEK).ID()
	dir := t.TempDir()

	sw := newHarnessIn(t, dir, nil, nil, withIntermediates, withKEK(t, oldKEK))
	softRoot := only(t, sw.status(t), storage.RoleRoot, storage.PhaseActive).KeyID
	softInter := only(t, sw.status(t), storage.RoleIntermediate, storage.PhaseActive).KeyID
	before := storedBlobs(t, sw.store)

	// keyProvider is set and the replicas restart: nothing is resealed or
	// moved, a holds the new KEK's file, b the old KEK only.
	keys := withKeys(t, dir, p)
	a := newHarnessIn(t, dir, sw.store, sw.clock, withIntermediates, withKEK(t, oldKEK), withKEKFiles(newFile), keys)
	b := newHarnessIn(t, dir, sw.store, sw.clock, withIntermediates, withKEK(t, oldKEK), keys)
	if !maps.EqualFunc(storedBlobs(t, a.store), before, bytes.Equal) {
		t.Fatal("a restart with a key provider rewrote stored keys")
	}
	// The next intermediate is made in the token, under the software root.
	st := a.mustRotate(t, adminapi.StepPrepare, adminapi.TargetIntermediate, false)
	hsmInter := only(t, st, storage.RoleIntermediate, storage.PhasePrepared).KeyID
	checkKeyRefs(t, a, p, hsmInter)
	blobs := storedBlobs(t, a.store)

	// Start: the software keys are sealed under the new KEK too; the token's
	// key is skipped, and the summary and status say so.
	n := a.audit.len()
	st, err := a.rekey(newFile, false)
	if err != nil {
		t.Fatalf("rekey: %v", err)
	}
	note := "the keys of " + hsmInter + " are held by a key provider, not sealed: left as they are"
	if !slices.Equal(st.SealedUnder, []string{newID, oldID}) || !strings.Contains(st.Summary, note) {
		t.Errorf("status after rekey: sealed under %v, summary %q", st.SealedUnder, st.Summary)
	}
	if recs := a.audit.since(n); len(recs) != 1 || recs[0].Reason != ReasonRekey || !strings.Contains(recs[0].Detail, note) ||
		!strings.Contains(recs[0].Detail, softRoot) || !strings.Contains(recs[0].Detail, softInter) {
		t.Errorf("rekey audit %+v, want one naming the resealed keys and the skipped one", recs)
	}
	if got, want := findCA(t, st, hsmInter).KeyURI, "pkcs11:id="+hsmInter+";object="+hsmInter; got != want {
		t.Errorf("status: key URI of %s = %q, want %q", hsmInter, got, want)
	}
	if got := findCA(t, st, softRoot).KeyURI; got != "" {
		t.Errorf("status: the software root has a key URI %q", got)
	}
	wantMixed := func(kekIDs ...string) {
		t.Helper()
		after := storedBlobs(t, a.store)
		if !bytes.Equal(after[hsmInter], blobs[hsmInter]) {
			t.Errorf("the token's key URI changed: %q, was %q", after[hsmInter], blobs[hsmInter])
		}
		for _, id := range []string{softRoot, softInter} {
			if got, err := sealedUnder(after[id]); err != nil || !slices.Equal(got, kekIDs) {
				t.Errorf("software CA %s sealed under %v (%v), want %v", id, got, err, kekIDs)
			}
		}
	}
	wantMixed(newID, oldID)

	// During the rekey b, which lacks the new KEK and so could seal no new
	// software key, activates the token's intermediate, issues under it and
	// prepares its successor: in the token, stored as its URI.
	b.clock.Advance(window + time.Second)
	b.mustRotate(t, adminapi.StepActivate, adminapi.TargetIntermediate, false)
	if got := b.issuerID(t); got != hsmInter {
		t.Errorf("b issues under %s, want the token's intermediate %s", got, hsmInter)
	}
	b.issue(t)
	st = b.mustRotate(t, adminapi.StepPrepare, adminapi.TargetIntermediate, false)
	next := only(t, st, storage.RoleIntermediate, storage.PhasePrepared).KeyID
	checkKeyRefs(t, b, p, hsmInter, next)

	// Finish: the software keys under the new KEK only, the token's as they were.
	st, err = a.rekey("", true)
	if err != nil {
		t.Fatalf("finish: %v", err)
	}
	if !slices.Equal(st.SealedUnder, []string{newID}) || !strings.Contains(st.Summary, oldID+" no longer opens them") ||
		!strings.Contains(st.Summary, hsmInter+", "+next+" are held by a key provider") {
		t.Errorf("status after finish: sealed under %v, summary %q", st.SealedUnder, st.Summary)
	}
	wantMixed(newID)
	old := mustSealer(t, oldKEK)
	if _, err := old.Open(softRoot, storedBlobs(t, a.store)[softRoot]); !errors.Is(err, ErrWrongKEK) {
		t.Errorf("the old KEK still opens the software root after the finish: %v", err)
	}

	// A replica with the new KEK only and the token opens both kinds.
	c := newHarnessIn(t, dir, a.store, a.clock, withIntermediates, withKEK(t, newKEK), keys)
	if got := c.issuerID(t); got != hsmInter {
		t.Errorf("c issues under %s, want %s", got, hsmInter)
	}
	c.issue(t)
	c.clock.Advance(window + time.Second)
	c.mustRotate(t, adminapi.StepActivate, adminapi.TargetIntermediate, false)
	c.issue(t)
	st = c.mustRotate(t, adminapi.StepPrepare, adminapi.TargetIntermediate, false) // signed by the software root
	third := only(t, st, storage.RoleIntermediate, storage.PhasePrepared)
	checkKeyRefs(t, c, p, third.KeyID)
	if third.RootKeyID != softRoot {
		t.Errorf("the third intermediate is under %s, want the software root %s", third.RootKeyID, softRoot)
	}
	c.clock.Advance(window + time.Second)
	c.mustRotate(t, adminapi.StepActivate, adminapi.TargetIntermediate, false)
	if chain := c.issue(t); chain.Intermediates[0].CheckSignatureFrom(findCert(t, c, softRoot)) != nil {
		t.Error("the third intermediate does not verify under the software root")
	}
}

// loadView returns the state in store.
func loadView(t *testing.T, store Store) *view {
	t.Helper()
	st, err := store.Load(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	v, err := parseState(st)
	if err != nil {
		t.Fatal(err)
	}
	return v
}

// findCert returns the certificate of the CA id in h's state.
func findCert(t *testing.T, h *harness, id string) *x509.Certificate {
	t.Helper()
	if e := loadView(t, h.store).byID(id); e != nil {
		return e.cert
	}
	t.Fatalf("no CA %s in the state", id)
	return nil
}

// TestRekeyAllKeysInProvider: with every CA key in the token the state
// seals nothing, so both rekey steps are refused, audited, and the state
// is left as it was.
func TestRekeyAllKeysInProvider(t *testing.T) {
	_, p := hsm(t)
	dir := t.TempDir()
	newFile := kekFile(t, testKEK(24))
	h := newHarnessIn(t, dir, nil, nil, withIntermediates, withKEK(t, testKEK(23)), withKEKFiles(newFile), withKeys(t, dir, p))
	before := storedBlobs(t, h.store)
	for _, finish := range []bool{false, true} {
		file := newFile
		if finish {
			file = ""
		}
		n := h.audit.len()
		_, err := h.rekey(file, finish)
		wantRefused(t, err, "no CA key is sealed in the state")
		if recs := h.audit.since(n); len(recs) != 1 || recs[0].Reason != adminapi.ReasonRekeyRefused {
			t.Errorf("finish=%v: audit %+v, want one refusal", finish, recs)
		}
	}
	if !maps.EqualFunc(storedBlobs(t, h.store), before, bytes.Equal) {
		t.Error("a refused rekey changed stored keys")
	}
	if st := h.status(t); len(st.SealedUnder) != 0 {
		t.Errorf("status: sealed under %v with every key in the token", st.SealedUnder)
	}
}

// TestScheduleDuringRekeyWithProvider: while a rekey is under way, a leader
// holding only the old KEK still takes a due prepare when new CA keys are
// made in the token (they need no KEK), where with software keys it waits
// (TestScheduleWaitsForKEK).
func TestScheduleDuringRekeyWithProvider(t *testing.T) {
	_, p := hsm(t)
	oldKEK, newKEK := testKEK(25), testKEK(26)
	newFile := kekFile(t, newKEK)
	dir := t.TempDir()
	a := newHarnessIn(t, dir, nil, nil, withIntermediates, withKEK(t, oldKEK), withKEKFiles(newFile))
	if _, err := a.rekey(newFile, false); err != nil {
		t.Fatal(err)
	}
	b := newHarnessIn(t, dir, a.store, a.clock, withIntermediates, withSchedule, withKEK(t, oldKEK), withKeys(t, dir, p))
	b.clock.Advance(40 * time.Hour) // past 2/3 of the 48 h intermediate: its successor is due
	if err := b.m.Tick(t.Context()); err != nil {
		t.Fatalf("Tick on the old-KEK leader: %v", err)
	}
	prepared := only(t, b.status(t), storage.RoleIntermediate, storage.PhasePrepared)
	checkKeyRefs(t, b, p, prepared.KeyID)
	wantSealedUnder(t, a.store, mustSealer(t, newKEK).ID(), mustSealer(t, oldKEK).ID())
}
