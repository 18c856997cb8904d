package rotation

import (
	"context"
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
	"github.com/castellan-ca/castellan/storage"
)

const operator = "spiffe://example.org/castellan/operator"

// kekFile writes kek to a file of its own and returns the path.
func kekFile(t *testing.T, kek []byte) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "kek")
	if err := os.WriteFile(p, kek, 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// withKEKFiles names the files this replica may read a new KEK from.
func withKEKFiles(paths ...string) option { return func(c *Config) { c.KEKFiles = paths } }

// withHeld adds further KEKs the replica holds (caKEKFiles).
func withHeld(t *testing.T, keks ...[]byte) option {
	return func(c *Config) {
		for _, k := range keks {
			var err error
			if c.Sealer, _, err = c.Sealer.Hold(k); err != nil {
				t.Fatal(err)
			}
		}
	}
}

func (h *harness) rekey(file string, finish bool) (*adminapi.RotationStatus, error) {
	return h.m.Rekey(context.Background(), adminapi.RekeyRequest{NewKEKFile: file, Finish: finish, Caller: operator})
}

// storedKEKs returns, per CA whose key the store holds sealed (not a key
// provider's URI), the KEK ids its key is sealed under, in stored order.
func storedKEKs(t *testing.T, store Store) map[string][]string {
	t.Helper()
	st, err := store.Load(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	out := map[string][]string{}
	for _, r := range st.CAs {
		if len(r.SealedKey) == 0 || isKeyRef(r.SealedKey) {
			continue
		}
		ids, err := sealedUnder(r.SealedKey)
		if err != nil {
			t.Fatalf("CA %s: %v", r.KeyID, err)
		}
		out[r.KeyID] = ids
	}
	if len(out) == 0 {
		t.Fatal("the store holds no key")
	}
	return out
}

// wantSealedUnder checks that every stored key is sealed under exactly ids.
func wantSealedUnder(t *testing.T, store Store, ids ...string) {
	t.Helper()
	for id, got := range storedKEKs(t, store) {
		if !slices.Equal(got, ids) {
			t.Errorf("CA %s sealed under %v, want %v", id, got, ids)
		}
	}
}

// startManager builds a replica without the harness's must-succeed
// bootstrap and returns Bootstrap's error.
func startManager(t *testing.T, store Store, clk *clock, opts ...option) (*Manager, error) {
	t.Helper()
	cfg := Config{Authority: ca.NewAuthority(), Store: store, Audit: &auditLog{}, Backend: generator(t, ""),
		IntermediateLifetime: 48 * time.Hour, RootLifetime: 100 * 24 * time.Hour, PropagationWindow: window, Now: clk.Now}
	for _, o := range opts {
		o(&cfg)
	}
	m, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return m, m.Bootstrap(context.Background())
}

// TestRekey rotates the KEK of two replicas sharing one store, one of which
// is given the new KEK only at the end: it keeps issuing (and restarting)
// throughout, CA keys made meanwhile open with either KEK, and each step is
// audited; after the finish the old KEK opens nothing.
func TestRekey(t *testing.T) {
	oldKEK, newKEK := testKEK(1), testKEK(2)
	oldFile, newFile := kekFile(t, oldKEK), kekFile(t, newKEK)
	oldID, newID := mustSealer(t, oldKEK).ID(), mustSealer(t, newKEK).ID()

	// a holds both KEK files; b only the old one.
	a := newHarness(t, nil, nil, withIntermediates, withKEK(t, oldKEK), withKEKFiles(oldFile, newFile))
	b := newHarness(t, a.store, a.clock, withIntermediates, withKEK(t, oldKEK), withKEKFiles(oldFile))
	wantSealedUnder(t, a.store, oldID)
	b.issue(t)

	// Refusals first: each is audited and changes nothing.
	for _, tc := range []struct {
		name, file string
		finish     bool
		h          *harness
		want       string
	}{
		{"a file the configuration does not name", filepath.Join(t.TempDir(), "kek"), false, a, "is not one of this replica's key-encryption key files"},
		{"the new KEK is not on this replica", newFile, false, b, "is not one of this replica's key-encryption key files"},
		{"the KEK the keys are sealed under already", oldFile, false, a, "already sealed under KEK " + oldID},
		{"finish without a rekey", "", true, a, "no rekey is under way"},
		{"finish naming a file", newFile, true, a, "--finish takes no KEK file"},
		{"no file", "", false, a, "name the new KEK file"},
	} {
		t.Run("refused: "+tc.name, func(t *testing.T) {
			n := tc.h.audit.len()
			_, err := tc.h.rekey(tc.file, tc.finish)
			wantRefused(t, err, tc.want)
			recs := tc.h.audit.since(n)
			if len(recs) != 1 || recs[0].Outcome != storage.OutcomeRefused || recs[0].Reason != adminapi.ReasonRekeyRefused || recs[0].Caller != operator {
				t.Errorf("audit %+v, want one refusal by the operator", recs)
			}
			wantSealedUnder(t, a.store, oldID)
		})
	}

	// Start: every key sealed under the new KEK first, the old one kept.
	n := a.audit.len()
	st, err := a.rekey(newFile, false)
	if err != nil {
		t.Fatalf("rekey: %v", err)
	}
	if !slices.Equal(st.SealedUnder, []string{newID, oldID}) || !strings.Contains(st.Summary, "ca rekey --finish") {
		t.Errorf("status after rekey: sealed under %v, summary %q", st.SealedUnder, st.Summary)
	}
	if recs := a.audit.since(n); len(recs) != 1 || recs[0].Reason != ReasonRekey || recs[0].Outcome != storage.OutcomeOK ||
		recs[0].Caller != operator || !strings.Contains(recs[0].Detail, newID) {
		t.Errorf("rekey audit %+v", recs)
	}
	wantSealedUnder(t, a.store, newID, oldID)

	// b, with the old KEK only, keeps issuing, and so does a restart of it.
	b.issue(t)
	if err := b.m.refresh(context.Background()); err != nil {
		t.Fatalf("b follows the state: %v", err)
	}
	b = newHarness(t, a.store, a.clock, withIntermediates, withKEK(t, oldKEK), withKEKFiles(oldFile))
	b.issue(t)
	// A replica already moved to the new KEK alone works too.
	c := newHarness(t, a.store, a.clock, withIntermediates, withKEK(t, newKEK), withKEKFiles(newFile))
	c.issue(t)

	// Meanwhile b cannot make CA keys (it could not seal them under the new
	// KEK); a can, under both, and b follows onto them.
	_, err = b.rotate(adminapi.StepPrepare, adminapi.TargetIntermediate, false)
	wantRefused(t, err, "does not hold all of them")
	a.mustRotate(t, adminapi.StepPrepare, adminapi.TargetIntermediate, false)
	wantSealedUnder(t, a.store, newID, oldID)
	a.mustRotate(t, adminapi.StepActivate, adminapi.TargetIntermediate, true)
	for name, h := range map[string]*harness{"b (old KEK)": b, "c (new KEK)": c} {
		if err := h.m.refresh(context.Background()); err != nil {
			t.Fatalf("%s follows onto the intermediate made during the rekey: %v", name, err)
		}
		if got, want := h.issuerID(t), a.issuerID(t); got != want {
			t.Errorf("%s issues under %s, a under %s", name, got, want)
		}
	}

	// Finish: refused where the new KEK is missing, done where it is held.
	_, err = b.rekey("", true)
	wantRefused(t, err, "does not hold KEK "+newID)
	n = c.audit.len()
	st, err = c.rekey("", true)
	if err != nil {
		t.Fatalf("finish: %v", err)
	}
	if !slices.Equal(st.SealedUnder, []string{newID}) || !strings.Contains(st.Summary, oldID+" no longer opens them") {
		t.Errorf("status after finish: sealed under %v, summary %q", st.SealedUnder, st.Summary)
	}
	if recs := c.audit.since(n); len(recs) != 1 || recs[0].Reason != ReasonRekeyFinish || recs[0].Outcome != storage.OutcomeOK {
		t.Errorf("finish audit %+v", recs)
	}
	wantSealedUnder(t, a.store, newID)

	// The old KEK opens nothing any more; b still runs on the keys it opened.
	if _, err := startManager(t, a.store, a.clock, withKEK(t, oldKEK)); !errors.Is(err, ErrWrongKEK) {
		t.Errorf("a replica with the old KEK only started: %v", err)
	}
	b.issue(t)
	if _, err := startManager(t, a.store, a.clock, withKEK(t, newKEK)); err != nil {
		t.Errorf("a replica with the new KEK: %v", err)
	}
}

// TestRekeyFromNoKEK: a data directory whose keys were stored unencrypted
// (no KEK configured) is moved under a KEK with the same two steps; until
// the finish, a replica configured with the KEK refuses the unencrypted copy.
func TestRekeyFromNoKEK(t *testing.T) {
	kek := testKEK(5)
	file := kekFile(t, kek)
	id := mustSealer(t, kek).ID()
	h := newHarness(t, nil, nil, withIntermediates, withKEKFiles(file))
	wantSealedUnder(t, h.store, "")

	// With a KEK configured, unencrypted keys are refused, and nothing is used.
	m, err := startManager(t, h.store, h.clock, withKEK(t, kek))
	if !errors.Is(err, ErrUnsealed) || m.cfg.Authority.Current() != nil {
		t.Fatalf("Bootstrap with a KEK over unencrypted keys: %v (a CA in use: %v)", err, m.cfg.Authority.Current() != nil)
	}

	if _, err := h.rekey(file, false); err != nil {
		t.Fatalf("rekey: %v", err)
	}
	wantSealedUnder(t, h.store, id, "")
	if _, err := startManager(t, h.store, h.clock, withKEK(t, kek)); !errors.Is(err, ErrUnsealed) {
		t.Errorf("Bootstrap with a KEK beside an unencrypted copy: %v, want ErrUnsealed", err)
	}
	st, err := h.rekey("", true)
	if err != nil {
		t.Fatalf("finish: %v", err)
	}
	if !strings.Contains(st.Summary, "none (unencrypted) no longer opens them") {
		t.Errorf("finish summary %q", st.Summary)
	}
	wantSealedUnder(t, h.store, id)
	h.issue(t)
	if _, err := startManager(t, h.store, h.clock, withKEK(t, kek)); err != nil {
		t.Errorf("Bootstrap with the KEK after the finish: %v", err)
	}
	if _, err := startManager(t, h.store, h.clock); !errors.Is(err, ErrNoKEK) {
		t.Errorf("Bootstrap without a KEK after the finish: %v, want ErrNoKEK", err)
	}
}

// TestRekeyHeldKEKFiles: a replica that holds the new KEK through its KEK
// files from the start can finish a rekey another replica began, without
// having run it.
func TestRekeyHeldKEKFiles(t *testing.T) {
	oldKEK, newKEK := testKEK(6), testKEK(7)
	newFile := kekFile(t, newKEK)
	a := newHarness(t, nil, nil, withKEK(t, oldKEK), withKEKFiles(newFile))
	b := newHarness(t, a.store, a.clock, withKEK(t, oldKEK), withHeld(t, newKEK))
	if _, err := a.rekey(newFile, false); err != nil {
		t.Fatal(err)
	}
	if _, err := b.rekey("", true); err != nil {
		t.Fatalf("finish on the other replica: %v", err)
	}
	wantSealedUnder(t, a.store, mustSealer(t, newKEK).ID())
	for _, h := range []*harness{a, b} {
		if err := h.m.refresh(context.Background()); err != nil {
			t.Fatal(err)
		}
		h.issue(t)
	}
	if fmt.Sprint(a.status(t).SealedUnder) != fmt.Sprint(b.status(t).SealedUnder) {
		t.Errorf("the replicas report different KEKs")
	}
}

// TestScheduleWaitsForKEK: while a rekey is under way, a leader that holds
// only the old KEK leaves a due prepare alone (it could not seal the new key
// for replicas with the new KEK only), without an audit record every tick;
// a leader holding both takes it.
func TestScheduleWaitsForKEK(t *testing.T) {
	oldKEK, newKEK := testKEK(8), testKEK(9)
	newFile := kekFile(t, newKEK)
	a := newHarness(t, nil, nil, withIntermediates, withSchedule, withKEK(t, oldKEK), withKEKFiles(newFile))
	b := newHarness(t, a.store, a.clock, withIntermediates, withSchedule, withKEK(t, oldKEK))
	if _, err := a.rekey(newFile, false); err != nil {
		t.Fatal(err)
	}
	a.clock.Advance(40 * time.Hour) // past 2/3 of the 48 h intermediate: its successor is due
	version := a.status(t).Version
	n := b.audit.len()
	for range 3 {
		if err := b.m.Tick(context.Background()); err != nil {
			t.Fatalf("Tick on the old-KEK leader: %v", err)
		}
	}
	if recs := b.audit.since(n); len(recs) != 0 || a.status(t).Version != version {
		t.Fatalf("the old-KEK leader acted: %d records, state version %d (was %d)", len(recs), a.status(t).Version, version)
	}
	if err := a.m.Tick(context.Background()); err != nil {
		t.Fatalf("Tick on a leader holding both KEKs: %v", err)
	}
	st := a.status(t)
	only(t, st, storage.RoleIntermediate, storage.PhasePrepared)
	wantSealedUnder(t, a.store, mustSealer(t, newKEK).ID(), mustSealer(t, oldKEK).ID())
}
