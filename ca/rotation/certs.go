package rotation

import (
	"crypto"
	"crypto/x509"
	"crypto/x509/pkix"
	"fmt"
	"net/url"
	"time"

	"github.com/castellan-ca/castellan/internal/keyfile"
	"github.com/castellan-ca/castellan/signer"
	"github.com/castellan-ca/castellan/signer/selfsigned"
	"github.com/castellan-ca/castellan/storage"
)

// IntermediateCommonName is the subject CN of generated intermediates.
const IntermediateCommonName = "Castellan Intermediate CA"

// newRoot returns a prepared root for key, valid RootLifetime from now.
func (m *Manager) newRoot(key crypto.Signer, now time.Time) (*entry, error) {
	cert, err := selfsigned.NewRoot(m.cfg.TrustDomain, key, now.Add(-signer.DefaultClockSkew), now.Add(m.cfg.RootLifetime), m.cfg.Rand)
	if err != nil {
		return nil, fmt.Errorf("rotation: %w", err)
	}
	return m.managedEntry(cert, key, storage.RoleRoot, "", now)
}

// newIntermediate returns a prepared intermediate with a new key, signed by
// root, valid IntermediateLifetime from now but never past the root.
func (m *Manager) newIntermediate(root *entry, rootKey crypto.Signer, now time.Time) (*entry, error) {
	key, err := keyfile.GenerateKey(m.cfg.KeyType)
	if err != nil {
		return nil, fmt.Errorf("rotation: %w", err)
	}
	serial, err := signer.NewSerial(m.cfg.Rand)
	if err != nil {
		return nil, err
	}
	notAfter := now.Add(m.cfg.IntermediateLifetime)
	if notAfter.After(root.cert.NotAfter) {
		notAfter = root.cert.NotAfter
	}
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		Subject:      pkix.Name{Organization: []string{m.cfg.TrustDomain.Name()}, CommonName: IntermediateCommonName},
		// The SPIFFE X.509 CA convention: the trust domain's ID.
		URIs:                  []*url.URL{m.cfg.TrustDomain.ID().URL()},
		NotBefore:             now.Add(-signer.DefaultClockSkew).UTC(),
		NotAfter:              notAfter.UTC(),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
		MaxPathLenZero:        true, // it signs leaves only
	}
	der, err := x509.CreateCertificate(m.cfg.Rand, tmpl, root.cert, key.Public(), rootKey)
	if err != nil {
		return nil, fmt.Errorf("rotation: create intermediate: %w", err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("rotation: parse intermediate: %w", err)
	}
	return m.managedEntry(cert, key, storage.RoleIntermediate, root.KeyID, now)
}

// managedEntry seals key and returns a prepared managed CA record for cert.
// rootID is "" for a root (it is its own root).
func (m *Manager) managedEntry(cert *x509.Certificate, key crypto.Signer, role, rootID string, now time.Time) (*entry, error) {
	id := keyID(cert)
	if id == "" {
		return nil, fmt.Errorf("rotation: %q has no SubjectKeyId", cert.Subject)
	}
	if rootID == "" {
		rootID = id
	}
	sealed, err := m.cfg.Sealer.Seal(id, key)
	if err != nil {
		return nil, err
	}
	m.cacheKey(id, key)
	return &entry{cert: cert, CARecord: storage.CARecord{KeyID: id, Role: role, RootID: rootID, Source: storage.SourceManaged,
		Phase: storage.PhasePrepared, CertDER: cert.Raw, SealedKey: sealed, PreparedAt: now}}, nil
}
