package rotation

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/castellan-ca/castellan/signer/local"
	"github.com/castellan-ca/castellan/storage"
)

// UseExternal makes s, the operator's CA (an External backend), the issuing
// CA, and records its chain in the shared state: CAs
// of the previous files become previous, so their roots stay in the trust
// bundle until every certificate issued under them has expired and the
// schedule retires them. detail describes the change for the audit record,
// written when the state changed.
func (m *Manager) UseExternal(ctx context.Context, s *local.Signer, detail string) error {
	if m.generator != nil {
		return fmt.Errorf("rotation: the %s backend generates its CAs: it takes no external CA", m.cfg.Backend.Name())
	}
	current, err := externalEntries(s, m.cfg.Now())
	if err != nil {
		return err
	}
	m.mu.Lock()
	m.external = s
	m.externalGen++
	m.mu.Unlock()
	for range maxAttempts {
		v, err := m.load(ctx)
		if err != nil {
			return err
		}
		n, did := m.externalPlan(v, current)
		if len(did) == 0 {
			return m.apply(v)
		}
		err = m.commit(ctx, v, n, auditEntry{outcome: storage.OutcomeOK, reason: ReasonReload, detail: detail + ": " + strings.Join(did, "; ")})
		if errors.Is(err, storage.ErrConflict) {
			continue
		}
		if err != nil {
			return err
		}
		return m.apply(n)
	}
	return fmt.Errorf("rotation: %w", storage.ErrConflict)
}

// externalPlan returns v with current as the active external CAs; did is
// empty when nothing changed.
func (m *Manager) externalPlan(v *view, current []*entry) (*view, []string) {
	n := v.clone()
	now := m.now()
	in := map[string]bool{}
	for _, c := range current {
		in[c.KeyID] = true
	}
	var did []string
	for _, e := range n.cas {
		switch {
		case e.Source == storage.SourceManaged:
			continue
		case in[e.KeyID] && e.Phase != storage.PhaseActive:
			// Back in the files (e.g. an operator rolled back): trusted again.
			e.Phase, e.ActivatedAt, e.DeactivatedAt, e.RetiredAt = storage.PhaseActive, now, time.Time{}, time.Time{}
			did = append(did, e.Role+" "+e.KeyID+" active again")
		case !in[e.KeyID] && e.Phase == storage.PhaseActive:
			e.Phase, e.DeactivatedAt = storage.PhasePrevious, now
			did = append(did, e.Role+" "+e.KeyID+" previous (trusted until its certificates expire)")
		}
	}
	for _, c := range current {
		if n.byID(c.KeyID) == nil {
			c.PreparedAt, c.ActivatedAt = now, now
			n.cas = append(n.cas, c)
			did = append(did, c.Role+" "+c.KeyID+" active")
		}
	}
	did = append(did, deactivate(n, storage.SourceManaged, now)...)
	return n, did
}

// externalEntries lists s's roots and its issuing CA as active external CAs.
func externalEntries(s *local.Signer, now time.Time) ([]*entry, error) {
	roots := s.TrustBundle()
	var out []*entry
	for _, r := range roots {
		out = append(out, &entry{cert: r, CARecord: storage.CARecord{KeyID: keyID(r), Role: storage.RoleRoot, RootID: keyID(r),
			Source: storage.SourceExternal, Phase: storage.PhaseActive, CertDER: r.Raw}})
	}
	iss := s.Certificate()
	for _, r := range roots {
		if r.Equal(iss) {
			return out, nil // the root signs leaves itself
		}
	}
	rootPool, inter := x509.NewCertPool(), x509.NewCertPool()
	for _, r := range roots {
		rootPool.AddCert(r)
	}
	for _, c := range s.Chain() {
		inter.AddCert(c)
	}
	chains, err := iss.Verify(x509.VerifyOptions{Roots: rootPool, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny},
		CurrentTime: now})
	if err != nil {
		return nil, fmt.Errorf("rotation: intermediate CA: %w", err)
	}
	chain := chains[0]
	return append(out, &entry{cert: iss, CARecord: storage.CARecord{KeyID: keyID(iss), Role: storage.RoleIntermediate,
		RootID: keyID(chain[len(chain)-1]), Source: storage.SourceExternal, Phase: storage.PhaseActive, CertDER: iss.Raw}}), nil
}
