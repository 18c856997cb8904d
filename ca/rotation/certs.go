package rotation

import (
	"context"
	"crypto"
	"crypto/x509"
	"errors"
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

// managedEntry returns a prepared managed CA record for cert. A key held by
// a key provider is stored as its URI (keyRef) here; any other key is cached
// for sealNew, which seals it before the state is saved. rootID is ""
// for a root (it is its own root).
func (m *Manager) managedEntry(cert *x509.Certificate, key crypto.Signer, role, rootID string, now time.Time) (*entry, error) {
	id := keyID(cert)
	if id == "" {
		return nil, fmt.Errorf("rotation: %q has no SubjectKeyId", cert.Subject)
	}
	if rootID == "" {
		rootID = id
	}
	var stored []byte
	if pk, ok := key.(providerKey); ok {
		stored = keyRef(pk.URI())
	}
	m.cacheKey(id, key)
	return &entry{cert: cert, CARecord: storage.CARecord{KeyID: id, Role: role, RootID: rootID, Source: storage.SourceManaged,
		Phase: storage.PhasePrepared, CertDER: cert.Raw, SealedKey: stored, PreparedAt: now}}, nil
}

// sealNew seals the keys of the CAs next adds to v (managed, not retired,
// no stored key: a key provider's key already has its URI) under the KEKs
// v's sealed keys are sealed under, in the same order, so that every replica
// that opens the state's keys opens the new ones too; under this replica's
// KEK when v holds no sealed key yet. During a rekey a replica that lacks
// one of those KEKs cannot, and the step is refused; keys made in a key
// provider need no KEK and are never refused for it.
func (m *Manager) sealNew(v, next *view) error {
	ids, err := v.sealedUnder()
	if err != nil {
		return err
	}
	sealer := m.currentSealer()
	if len(ids) == 0 {
		ids = []string{sealer.ID()}
	}
	for _, e := range next.cas {
		if e.Source != storage.SourceManaged || e.Phase == storage.PhaseRetired || len(e.SealedKey) > 0 {
			continue
		}
		key := m.cachedKey(e.KeyID)
		if key == nil {
			return fmt.Errorf("rotation: CA %s: no key to seal", e.KeyID)
		}
		sealed, err := sealer.sealUnder(ids, e.KeyID, key)
		if errors.Is(err, ErrKEKNotHeld) {
			return refused("the CA keys are sealed under KEKs %s (a rekey is under way) and this replica does not hold all of them: run this step on a replica that was given the new KEK, or finish the rekey first", kekList(ids))
		}
		if err != nil {
			return fmt.Errorf("rotation: %w", err)
		}
		e.SealedKey = sealed
	}
	return nil
}
