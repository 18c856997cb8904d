package rotation

import (
	"errors"
	"os"
	"path/filepath"
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

// checkKeyRefs asserts that the state holds no key of a managed CA, only
// its URI in the token, labelled with the CA's key id, and that the token
// holds that CA's key.
func checkKeyRefs(t *testing.T, h *harness, p *cakey.Provider) {
	t.Helper()
	st, err := h.store.Load(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	v, err := parseState(st)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range v.cas {
		if e.Source != storage.SourceManaged || e.Phase == storage.PhaseRetired {
			continue
		}
		uri, ok := refURI(e.SealedKey)
		if !ok || len(e.SealedKey) == 0 || e.SealedKey[0] != formatKeyURI {
			t.Errorf("%s %s: stored key is not a key URI (format %d)", e.Role, e.KeyID, e.SealedKey[0])
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
// key: Open refuses it by name, and only a valid reference is one.
func TestKeyRefNeverUnsealed(t *testing.T) {
	ref := keyRef("pkcs11:id=01;object=01")
	if _, err := (*Sealer)(nil).Open("01", ref); err == nil || !strings.Contains(err.Error(), "held by a key provider") {
		t.Errorf("Open of a key URI: err = %v, want one saying the key is held by a key provider", err)
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
