package ca

import (
	"bytes"
	"crypto"
	"crypto/x509"
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/castellan-ca/castellan/signer"
)

// CheckIssued re-checks what a backend returned against what was asked for, so a
// misbehaving backend (remote PKI, misconfigured CA) can never hand a client a
// certificate Castellan did not decide on: key, SANs, subject, lifetime, CA flag, usages,
// and a chain that verifies to the trust bundle with the leaf inside its issuer's life.
// The SANs are read from the raw extension: exactly the template's names, and
// no name of any other type (san.go).
//
// Each call builds and verifies the whole path; the issuer uses an
// issuerPathCache, which checks the same things with one signature check per leaf.
func CheckIssued(chain *signer.Chain, tmpl *x509.Certificate, pub crypto.PublicKey, roots *x509.CertPool, now time.Time) error {
	var paths issuerPathCache // empty: every call takes the full path
	return paths.checkIssued(chain, tmpl, pub, roots, now)
}

// checkIssued is CheckIssued with paths remembering verified issuer paths.
func (paths *issuerPathCache) checkIssued(chain *signer.Chain, tmpl *x509.Certificate, pub crypto.PublicKey, roots *x509.CertPool, now time.Time) error {
	if chain == nil || chain.Leaf == nil {
		return errors.New("backend returned no certificate")
	}
	leaf := chain.Leaf
	if k, ok := leaf.PublicKey.(interface{ Equal(crypto.PublicKey) bool }); !ok || !k.Equal(pub) {
		return errors.New("leaf key is not the requested key")
	}
	// From the raw extension, so that every name type counts (san.go).
	names, _, err := subjectAltNames(leaf.Extensions)
	if err != nil {
		return fmt.Errorf("leaf: %w", err)
	}
	if err := sameNames(names, tmpl); err != nil {
		return err
	}
	// Remote backends may copy the CSR's subject (a Vault role with
	// use_csr_common_name); the subject is part of the profile too.
	if leaf.Subject.String() != tmpl.Subject.String() {
		return fmt.Errorf("leaf subject %q, want %q", leaf.Subject, tmpl.Subject)
	}
	if leaf.IsCA || !leaf.BasicConstraintsValid {
		return errors.New("leaf is not an end-entity certificate")
	}
	for _, u := range tmpl.ExtKeyUsage {
		if !slices.Contains(leaf.ExtKeyUsage, u) {
			return fmt.Errorf("leaf lacks extended key usage %v", u)
		}
	}
	if leaf.NotAfter.After(tmpl.NotAfter) || !leaf.NotAfter.After(now) || leaf.NotBefore.After(now) {
		return fmt.Errorf("leaf validity %s..%s outside the granted %s..%s", leaf.NotBefore, leaf.NotAfter, tmpl.NotBefore, tmpl.NotAfter)
	}
	// Verify would refuse these; the cached path below must as well.
	if len(leaf.UnhandledCriticalExtensions) != 0 {
		return fmt.Errorf("leaf has unhandled critical extensions %v", leaf.UnhandledCriticalExtensions)
	}
	path, err := paths.verify(chain, roots, now)
	if err != nil {
		return fmt.Errorf("leaf does not chain to the trust bundle: %w", err)
	}
	// A path exists; the response must also be laid out in order, since
	// clients read the element after the leaf as its issuer.
	if iss := chain.Issuer(); iss != nil && (!bytes.Equal(leaf.RawIssuer, iss.RawSubject) || !bytes.Equal(leaf.AuthorityKeyId, iss.SubjectKeyId)) {
		return errors.New("first intermediate is not the leaf's issuer")
	}
	if leaf.NotAfter.After(path[0].NotAfter) {
		return errors.New("leaf outlives its issuer")
	}
	return nil
}
