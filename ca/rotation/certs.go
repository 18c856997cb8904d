package rotation

import (
	"context"
	"crypto"
	"crypto/x509"
	"fmt"
	"time"

	"github.com/castellan-ca/castellan/signer"
	"github.com/castellan-ca/castellan/storage"
)

// newRoot returns a prepared root for key, valid RootLifetime from now.
func (m *Manager) newRoot(key crypto.Signer, now time.Time) (*entry, error) {
	cert, err := m.generator.NewRoot(key, now.Add(-signer.DefaultClockSkew), now.Add(m.cfg.RootLifetime))
	if err != nil {
		return nil, fmt.Errorf("rotation: %w", err)
	}
	return m.managedEntry(cert, key, storage.RoleRoot, "", now)
}

// newIntermediate returns a prepared intermediate with a new key, signed by
// root, valid IntermediateLifetime from now but never past the root.
func (m *Manager) newIntermediate(ctx context.Context, root *entry, rootKey crypto.Signer, now time.Time) (*entry, error) {
	key, err := m.newKey(ctx)
	if err != nil {
		return nil, err
	}
	notAfter := now.Add(m.cfg.IntermediateLifetime)
	if notAfter.After(root.cert.NotAfter) {
		notAfter = root.cert.NotAfter
	}
	cert, err := m.generator.NewIntermediate(key, root.cert, rootKey, now.Add(-signer.DefaultClockSkew), notAfter)
	if err != nil {
		return nil, fmt.Errorf("rotation: %w", err)
	}
	return m.managedEntry(cert, key, storage.RoleIntermediate, root.KeyID, now)
}

// newKey has the Generator create the key of a new CA: every CA key comes
// from here.
func (m *Manager) newKey(ctx context.Context) (crypto.Signer, error) {
	k, err := m.generator.NewKey(ctx)
	if err != nil {
		return nil, fmt.Errorf("rotation: %w", err)
	}
	return k, nil
}

// managedEntry seals key (or, for a key held by a key provider, records
// its URI) and returns a prepared managed CA record for cert. rootID is ""
// for a root (it is its own root).
func (m *Manager) managedEntry(cert *x509.Certificate, key crypto.Signer, role, rootID string, now time.Time) (*entry, error) {
	id := keyID(cert)
	if id == "" {
		return nil, fmt.Errorf("rotation: %q has no SubjectKeyId", cert.Subject)
	}
	if rootID == "" {
		rootID = id
	}
	var sealed []byte
	if pk, ok := key.(providerKey); ok {
		sealed = keyRef(pk.URI())
	} else {
		var err error
		if sealed, err = m.cfg.Sealer.Seal(id, key); err != nil {
			return nil, err
		}
	}
	m.cacheKey(id, key)
	return &entry{cert: cert, CARecord: storage.CARecord{KeyID: id, Role: role, RootID: rootID, Source: storage.SourceManaged,
		Phase: storage.PhasePrepared, CertDER: cert.Raw, SealedKey: sealed, PreparedAt: now}}, nil
}
