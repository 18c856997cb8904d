package rotation

import (
	"context"
	"fmt"
	"time"

	"github.com/castellan-ca/castellan/ca"
	"github.com/castellan-ca/castellan/storage"
)

// Bounds of the margin added to a stored dependents bound, so that a
// replica writes it about once per margin rather than once per certificate.
const (
	minDependentsMargin = time.Second
	maxDependentsMargin = 10 * time.Minute
)

// TrackDependents wraps the issuer's audit log so that, before the record of
// a workload certificate is committed (and so before the certificate is
// released), the store's bound of what its issuing CA has live covers the
// certificate's NotAfter. Retirement relies on that bound, so it holds across
// crashes and replicas. The bound is raised ahead, by a tenth of the
// certificate's lifetime (between 1 s and 10 min), which makes the store
// write rare and retirement at most that much later than necessary.
//
// Castellan's own certificates (serving, operator) are operator records and
// are not tracked: they are reissued when the CA changes.
func (m *Manager) TrackDependents(inner ca.AuditLog) ca.AuditLog {
	return &tracker{m: m, inner: inner}
}

type tracker struct {
	m     *Manager
	inner ca.AuditLog
}

// Append raises the dependents bound if needed, then appends rec.
func (t *tracker) Append(ctx context.Context, rec *storage.Record) error {
	if rec.Kind == storage.KindCSR && rec.Outcome == storage.OutcomeIssued && rec.IssuerKeyID != "" && !rec.NotAfter.IsZero() {
		if err := t.m.reserve(ctx, rec.IssuerKeyID, rec.NotBefore, rec.NotAfter); err != nil {
			return fmt.Errorf("record dependents of CA %s: %w", rec.IssuerKeyID, err)
		}
	}
	return t.inner.Append(ctx, rec)
}

// reserve makes the stored dependents bound of keyID at least notAfter.
func (m *Manager) reserve(ctx context.Context, keyID string, notBefore, notAfter time.Time) error {
	m.depMu.Lock()
	defer m.depMu.Unlock()
	if !notAfter.After(m.reserved[keyID]) {
		return nil
	}
	margin := min(max(notAfter.Sub(notBefore)/10, minDependentsMargin), maxDependentsMargin)
	bound := notAfter.Add(margin).UTC().Truncate(time.Microsecond)
	if err := m.cfg.Store.RaiseDependents(ctx, keyID, bound); err != nil {
		return err
	}
	m.reserved[keyID] = bound
	return nil
}
