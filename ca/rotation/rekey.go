package rotation

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"slices"
	"strings"

	"github.com/castellan-ca/castellan/ca"
	"github.com/castellan-ca/castellan/internal/adminapi"
	"github.com/castellan-ca/castellan/signer/local"
	"github.com/castellan-ca/castellan/storage"
)

// Audit reasons of key-encryption key rotation (Kind operator).
const (
	// ReasonRekey: the CA keys were sealed under a new KEK beside the old.
	ReasonRekey = "ca.rekey"
	// ReasonRekeyFinish: the sealings under old KEKs were dropped.
	ReasonRekeyFinish = "ca.rekey.finish"
)

// A KEK rekey without downtime, in two audited steps on the shared state:
//
//  1. Rekey (start): every CA key is sealed under the new KEK as well and
//     stored with both sealings, the new one first. Replicas holding only
//     the old KEK keep opening the old sealing, at any restart too; the
//     replica that ran the step holds the new KEK from then on. New CA keys
//     made meanwhile are sealed under both (sealNew), so only a replica
//     that holds both can make them.
//  2. Finish, once every replica has the new KEK: the old sealings are
//     dropped, after the replica running the step opened every key under
//     the new KEK. From then on the old KEK opens nothing.
//
// Keys held by a key provider (an HSM or a KMS) are not sealed: the state
// stores only their URI (formatKeyURI), so both steps leave them alone, and
// new CA keys made in the provider during a rekey need no KEK at all.
//
// The new KEK never crosses the wire: the operator names a file on the
// server, which must be one of its configured KEK files (Config.KEKFiles).

// Rekey runs one step of a KEK rekey for an operator (ca.Rotation). Like a
// rotation step it is audited before it is saved, and a refusal is audited.
func (m *Manager) Rekey(ctx context.Context, req adminapi.RekeyRequest) (*adminapi.RotationStatus, error) {
	reason, what := ReasonRekey, "ca rekey --new-kek-file "+req.NewKEKFile
	if req.Finish {
		reason, what = ReasonRekeyFinish, "ca rekey --finish"
	}
	refuse := func(err error) (*adminapi.RotationStatus, error) {
		if errors.Is(err, ca.ErrPrecondition) {
			_ = m.record(ctx, auditEntry{method: "operator", caller: req.Caller, outcome: storage.OutcomeRefused,
				reason: adminapi.ReasonRekeyRefused, detail: what + ": refused: " + err.Error(), err: err})
		}
		return nil, err
	}
	sealer, target, err := m.rekeyTarget(req)
	if err != nil {
		return refuse(err)
	}
	for range maxAttempts {
		v, err := m.load(ctx)
		if err != nil {
			return nil, err
		}
		var next *view
		var summary string
		if req.Finish {
			next, summary, err = m.finishRekey(v, sealer)
		} else {
			next, summary, err = m.startRekey(v, sealer, target)
		}
		if err != nil {
			return refuse(err)
		}
		err = m.commit(ctx, v, next, auditEntry{method: "operator", caller: req.Caller, outcome: storage.OutcomeOK, reason: reason, detail: what + ": " + summary})
		if errors.Is(err, storage.ErrConflict) {
			continue
		} else if err != nil {
			return nil, err
		}
		m.keyMu.Lock()
		m.sealer = sealer // from now on this replica holds the new KEK too
		m.keyMu.Unlock()
		m.cfg.Logger.Info("CA key-encryption key rekey step", "step", what, "caller", req.Caller, "summary", summary)
		st := m.status(next)
		st.Summary = summary
		return st, nil
	}
	return nil, fmt.Errorf("rotation: rekey: %w", storage.ErrConflict)
}

// rekeyTarget returns the KEKs the step works with: for a start, those held
// plus the one read from req.NewKEKFile, and that one's id.
func (m *Manager) rekeyTarget(req adminapi.RekeyRequest) (*Sealer, string, error) {
	sealer := m.currentSealer()
	switch {
	case m.generator == nil:
		return nil, "", refused("the %s backend's CA key is the operator's (cacerts files): there is no CA key in the state to rekey", m.cfg.Backend.Name())
	case req.Finish && req.NewKEKFile != "":
		return nil, "", refused("--finish takes no KEK file: it keeps the sealing under the KEK the rekey started with")
	case req.Finish:
		return sealer, "", nil
	case req.NewKEKFile == "":
		return nil, "", refused("name the new KEK file (a file on the server: one of caKEKFile, caKEKFiles)")
	case !slices.ContainsFunc(m.cfg.KEKFiles, func(f string) bool { return filepath.Clean(f) == filepath.Clean(req.NewKEKFile) }):
		return nil, "", refused("%s is not one of this replica's key-encryption key files (caKEKFile, caKEKFiles: %s): the server reads a new KEK only from a file its configuration names", req.NewKEKFile, strings.Join(m.cfg.KEKFiles, ", "))
	}
	key, err := ReadKEKFile(req.NewKEKFile)
	if err != nil {
		return nil, "", refused("%v", err)
	}
	defer clear(key)
	sealer, id, err := sealer.Hold(key)
	if err != nil {
		return nil, "", refused("%v", err)
	}
	return sealer, id, nil
}

// startRekey seals every sealed key of v under target as well, first.
func (m *Manager) startRekey(v *view, sealer *Sealer, target string) (*view, string, error) {
	n := v.clone()
	if err := n.needSealed(); err != nil {
		return nil, "", err
	}
	var did []string
	var before []string
	for _, e := range n.sealed() {
		ids, err := sealedUnder(e.SealedKey)
		if err != nil {
			return nil, "", fmt.Errorf("rotation: CA %s: %w", e.KeyID, err)
		}
		if len(ids) > 0 && ids[0] == target {
			continue // already first: nothing to do for this key
		}
		before = ids
		key, err := sealer.Open(e.KeyID, e.SealedKey)
		if err != nil {
			return nil, "", refused("CA %s does not open on this replica: %v", e.KeyID, err)
		}
		if err := local.KeyMatches(e.cert, key); err != nil {
			return nil, "", fmt.Errorf("rotation: CA %s: %w", e.KeyID, err)
		}
		fresh, err := sealer.sealUnder([]string{target}, e.KeyID, key)
		if err != nil {
			return nil, "", err
		}
		parts, _ := splitSealings(e.SealedKey)
		parts = slices.DeleteFunc(parts, func(p []byte) bool { return sealingKEK(p) == target })
		if e.SealedKey, err = joinSealings(append([][]byte{fresh}, parts...)); err != nil {
			return nil, "", refused("CA %s: %v", e.KeyID, err)
		}
		did = append(did, e.KeyID)
	}
	if len(did) == 0 {
		return nil, "", refused("every CA key is already sealed under KEK %s first: nothing to do (run ca rekey --finish once every replica holds it)", target)
	}
	return n, fmt.Sprintf("sealed the keys of %s under KEK %s beside %s%s; replicas holding only the old KEK keep working; once every replica holds KEK %s, run ca rekey --finish",
		strings.Join(did, ", "), target, kekList(before), n.providerNote(), target), nil
}

// finishRekey keeps only the first sealing of every key of v, after
// checking that it opens here, under the same KEK for every key.
func (m *Manager) finishRekey(v *view, sealer *Sealer) (*view, string, error) {
	n := v.clone()
	if err := n.needSealed(); err != nil {
		return nil, "", err
	}
	target, dropped := "", map[string]bool{}
	for _, e := range n.sealed() {
		parts, err := splitSealings(e.SealedKey)
		if err != nil {
			return nil, "", fmt.Errorf("rotation: CA %s: %w", e.KeyID, err)
		}
		first := sealingKEK(parts[0])
		switch {
		case target == "":
			target = first
		case first != target:
			return nil, "", refused("the CA keys are sealed first under different KEKs (%s, %s): run ca rekey --new-kek-file again to seal all under one", target, first)
		}
		if len(parts) == 1 {
			continue
		}
		if sealer.find(first) == nil {
			return nil, "", refused("this replica does not hold KEK %s, the rekey's new KEK: run --finish on a replica that was given it", first)
		}
		only, _ := joinSealings(parts[:1])
		key, err := sealer.Open(e.KeyID, only)
		if err != nil {
			return nil, "", refused("CA %s does not open under KEK %s: %v", e.KeyID, first, err)
		}
		if err := local.KeyMatches(e.cert, key); err != nil {
			return nil, "", fmt.Errorf("rotation: CA %s: %w", e.KeyID, err)
		}
		for _, p := range parts[1:] {
			dropped[kekName(sealingKEK(p))] = true
		}
		e.SealedKey = only
	}
	if len(dropped) == 0 {
		return nil, "", refused("no rekey is under way: every CA key is sealed under KEK %s only", kekName(target))
	}
	old := slices.Sorted(func(yield func(string) bool) {
		for k := range dropped {
			if !yield(k) {
				return
			}
		}
	})
	return n, fmt.Sprintf("every CA key sealed in the state is sealed under KEK %s only; %s no longer opens them (replicas still holding only that cannot start)%s",
		target, strings.Join(old, ", "), n.providerNote()), nil
}

// sealed returns the CAs whose keys the state holds sealed: managed, not
// retired, and not held by a key provider.
func (v *view) sealed() []*entry {
	var out []*entry
	for _, e := range v.cas {
		if e.Source == storage.SourceManaged && e.Phase != storage.PhaseRetired && len(e.SealedKey) > 0 && !isKeyRef(e.SealedKey) {
			out = append(out, e)
		}
	}
	return out
}

// inProvider returns the key ids of the CAs whose keys a key provider holds
// (the state stores their URIs): managed, not retired.
func (v *view) inProvider() []string {
	var out []string
	for _, e := range v.cas {
		if e.Source == storage.SourceManaged && e.Phase != storage.PhaseRetired && isKeyRef(e.SealedKey) {
			out = append(out, e.KeyID)
		}
	}
	return out
}

// needSealed refuses a rekey step when the state seals no key: every CA key
// is held by a key provider, and a KEK protects none of them.
func (v *view) needSealed() error {
	if len(v.sealed()) > 0 {
		return nil
	}
	return refused("no CA key is sealed in the state: a key provider holds the keys of %s, and a KEK does not protect them: nothing to rekey (a replica's caKEKFile can simply be replaced)",
		strings.Join(v.inProvider(), ", "))
}

// providerNote tells a rekey's summary which keys it left alone, held by a
// key provider; "" when there are none.
func (v *view) providerNote() string {
	ids := v.inProvider()
	if len(ids) == 0 {
		return ""
	}
	return "; the keys of " + strings.Join(ids, ", ") + " are held by a key provider, not sealed: left as they are"
}

// sealedUnder returns the KEKs the state's sealed keys are sealed under, in
// stored order ("" for unencrypted), as its issuing CA's key shows when that
// is sealed (every sealed key has the same after each step); nil when the
// state seals no key (keys held by a key provider have no KEK).
func (v *view) sealedUnder() ([]string, error) {
	keys := v.sealed()
	if e := v.issuing(); e != nil && slices.Contains(keys, e) {
		keys = []*entry{e}
	}
	if len(keys) == 0 {
		return nil, nil
	}
	ids, err := sealedUnder(keys[0].SealedKey)
	if err != nil {
		return nil, fmt.Errorf("rotation: CA %s: %w", keys[0].KeyID, err)
	}
	return ids, nil
}

// missingKEKs returns the KEKs v's keys are sealed under that this replica
// does not hold (and "" when they are unencrypted but it has a KEK of its
// own): those it cannot seal a new CA key under. None when new CA keys are
// made in a key provider: they are not sealed.
func (m *Manager) missingKEKs(v *view) []string {
	if m.generator != nil && m.generator.ProviderKeys() {
		return nil
	}
	ids, err := v.sealedUnder()
	if err != nil {
		return nil // the step itself reports it
	}
	sealer := m.currentSealer()
	var out []string
	for _, id := range ids {
		if (id == "" && sealer.configured()) || (id != "" && sealer.find(id) == nil) {
			out = append(out, id)
		}
	}
	return out
}

// warnOnce logs msg once per state version.
func (m *Manager) warnOnce(version uint64, msg string, args ...any) {
	m.keyMu.Lock()
	seen := m.warnedAt == version
	m.warnedAt = version
	m.keyMu.Unlock()
	if !seen {
		m.cfg.Logger.Warn(msg, args...)
	}
}

// checkKEK warns when this replica's own KEK is not the one the state's keys
// are sealed under first: it opens them with another KEK it holds, and the
// operator probably meant to rekey.
func (m *Manager) checkKEK(v *view) {
	ids, err := v.sealedUnder()
	own := m.currentSealer().ID()
	if err != nil || len(ids) == 0 || own == "" || ids[0] == own {
		return
	}
	m.cfg.Logger.Warn("the CA keys are not sealed under this replica's key-encryption key (caKEKFile) first: "+
		"seal them under it with castellanctl ca rekey --new-kek-file", "sealed_under", kekList(ids), "kek_id", own)
}

// kekName names a KEK id for operators.
func kekName(id string) string {
	if id == "" {
		return "none (unencrypted)"
	}
	return id
}

// kekList names KEK ids for operators.
func kekList(ids []string) string {
	names := make([]string, len(ids))
	for i, id := range ids {
		names[i] = kekName(id)
	}
	return strings.Join(names, ", ")
}
