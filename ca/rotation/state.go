package rotation

import (
	"crypto/x509"
	"fmt"
	"slices"
	"time"

	"github.com/castellan-ca/castellan/internal/adminapi"
	"github.com/castellan-ca/castellan/storage"
)

// entry is a stored CA with its parsed certificate.
type entry struct {
	storage.CARecord
	cert *x509.Certificate
}

// view is one parsed snapshot of the stored state: the input of every decision.
type view struct {
	version uint64
	cas     []*entry
	deps    map[string]time.Time
}

func parseState(st *storage.CAState) (*view, error) {
	v := &view{version: st.Version, deps: st.Dependents}
	if v.deps == nil {
		v.deps = map[string]time.Time{}
	}
	for _, r := range st.CAs {
		c, err := x509.ParseCertificate(r.CertDER)
		if err != nil {
			return nil, fmt.Errorf("stored CA %s: %w", r.KeyID, err)
		}
		v.cas = append(v.cas, &entry{CARecord: r, cert: c})
	}
	return v, nil
}

// records returns the state to save: a copy, so a failed save leaves v intact.
func (v *view) records() []storage.CARecord {
	out := make([]storage.CARecord, len(v.cas))
	for i, e := range v.cas {
		out[i] = e.CARecord
	}
	return out
}

// clone returns a deep enough copy of v to change phases in.
func (v *view) clone() *view {
	c := &view{version: v.version, deps: v.deps}
	for _, e := range v.cas {
		cp := *e
		c.cas = append(c.cas, &cp)
	}
	return c
}

func (v *view) byID(id string) *entry {
	for _, e := range v.cas {
		if e.KeyID == id {
			return e
		}
	}
	return nil
}

// all returns the CAs of role and phase ("" matches any) from source ("" any).
func (v *view) all(source, role, phase string) []*entry {
	var out []*entry
	for _, e := range v.cas {
		if (source == "" || e.Source == source) && (role == "" || e.Role == role) && (phase == "" || e.Phase == phase) {
			out = append(out, e)
		}
	}
	return out
}

// managed returns the one managed CA of role in phase, or nil.
func (v *view) managed(role, phase string) *entry {
	if es := v.all(storage.SourceManaged, role, phase); len(es) > 0 {
		return es[0]
	}
	return nil
}

// issuing returns the managed CA that signs leaves: the active
// intermediate, or the active root when there is no intermediate layer.
func (v *view) issuing() *entry {
	if e := v.managed(storage.RoleIntermediate, storage.PhaseActive); e != nil {
		return e
	}
	return v.managed(storage.RoleRoot, storage.PhaseActive)
}

// inBundle reports whether e's phase keeps a root in the trust bundle.
func inBundle(e *entry) bool {
	return e.Role == storage.RoleRoot && e.Phase != storage.PhaseRetired
}

// bundle returns the roots of the trust bundle: active first, then
// prepared, then previous, each oldest first, so the order is stable.
func (v *view) bundle() []*entry {
	var out []*entry
	for _, e := range v.cas {
		if inBundle(e) {
			out = append(out, e)
		}
	}
	rank := map[string]int{storage.PhaseActive: 0, storage.PhasePrepared: 1, storage.PhasePrevious: 2}
	slices.SortStableFunc(out, func(a, b *entry) int {
		if d := rank[a.Phase] - rank[b.Phase]; d != 0 {
			return d
		}
		return a.cert.NotBefore.Compare(b.cert.NotBefore)
	})
	return out
}

// dependentsUntil bounds the NotAfter of every workload certificate that
// chains to e: its own, and for a root those of every CA under it.
func (v *view) dependentsUntil(e *entry) time.Time {
	t := v.deps[e.KeyID]
	if e.Role == storage.RoleRoot {
		for _, c := range v.cas {
			if c.RootID == e.KeyID && v.deps[c.KeyID].After(t) {
				t = v.deps[c.KeyID]
			}
		}
	}
	return t
}

// activateAt is when a prepared CA may be activated without force: once its
// root had a propagation window to reach every client's trust bundle.
func (m *Manager) activateAt(e *entry) time.Time {
	return e.PreparedAt.Add(m.cfg.PropagationWindow)
}

// retireAt is when a previous CA may be retired without force: once every
// certificate chaining to it has expired, and replicas that had not yet
// seen its deactivation (they poll) can no longer be issuing under it. why
// names the later of the two.
func (m *Manager) retireAt(v *view, e *entry) (at time.Time, why string) {
	at = v.dependentsUntil(e)
	why = fmt.Sprintf("%s %s has certificates chaining to it until %s", e.Role, e.KeyID, stamp(at))
	if lag := e.DeactivatedAt.Add(followerLag * m.cfg.PollInterval); lag.After(at) {
		at = lag
		why = fmt.Sprintf("%s %s was deactivated at %s; replicas may still be issuing under it until %s", e.Role, e.KeyID, stamp(e.DeactivatedAt), stamp(at))
	}
	return at, why
}

// followerLag is how many poll intervals a replica may take to notice a change.
const followerLag = 3

// prepareAt is when the schedule prepares the successor of an active CA:
// at the configured fraction of its lifetime.
func (m *Manager) prepareAt(e *entry) time.Time {
	life := e.cert.NotAfter.Sub(e.cert.NotBefore)
	return e.cert.NotBefore.Add(time.Duration(float64(life) * m.cfg.ScheduleFraction))
}

// status renders v for operators.
func (m *Manager) status(v *view) *adminapi.RotationStatus {
	st := &adminapi.RotationStatus{Backend: m.cfg.Backend.Name(), Version: v.version, PropagationWindow: m.cfg.PropagationWindow, Schedule: m.cfg.Schedule}
	st.SealedUnder, _ = v.sealedUnder()
	issuer := m.issuerKeyID(v)
	order := slices.Clone(v.cas)
	slices.SortStableFunc(order, func(a, b *entry) int {
		if a.Role != b.Role {
			if a.Role == storage.RoleRoot {
				return -1
			}
			return 1
		}
		return a.cert.NotBefore.Compare(b.cert.NotBefore)
	})
	for _, e := range order {
		cs := adminapi.CAStatus{KeyID: e.KeyID, RootKeyID: e.RootID, Role: e.Role, Source: e.Source, Phase: e.Phase,
			Subject: e.cert.Subject.String(), NotBefore: e.cert.NotBefore, NotAfter: e.cert.NotAfter,
			PreparedAt: e.PreparedAt, ActivatedAt: e.ActivatedAt, DeactivatedAt: e.DeactivatedAt, RetiredAt: e.RetiredAt,
			DependentsUntil: v.dependentsUntil(e), Issuing: e.KeyID == issuer && e.Phase == storage.PhaseActive}
		cs.KeyURI, _ = refURI(e.SealedKey)
		switch e.Phase {
		case storage.PhasePrepared:
			cs.NextStepAt = m.activateAt(e)
		case storage.PhasePrevious:
			cs.NextStepAt, _ = m.retireAt(v, e)
		case storage.PhaseActive:
			if m.cfg.Schedule && e.Source == storage.SourceManaged && v.managed(e.Role, storage.PhasePrepared) == nil &&
				(e.Role == storage.RoleRoot || m.cfg.IntermediateLifetime > 0) {
				cs.NextStepAt = m.prepareAt(e)
			}
		}
		st.CAs = append(st.CAs, cs)
	}
	return st
}
