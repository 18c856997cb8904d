// Package local signs workload certificates with a CA key held in memory. It is
// the one signing implementation shared by the selfsigned and intermediate
// backends (and by rotation), so every local backend enforces the same rules.
package local

import (
	"context"
	"crypto"
	"crypto/rand"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"time"

	"github.com/castellan-ca/castellan/signer"
)

// Validation errors of New, so backends can name the file at fault and tests can
// assert the exact kind.
var (
	// ErrKeyMismatch: the private key is not the key of the CA certificate.
	ErrKeyMismatch = errors.New("private key does not match the CA certificate")
	// ErrNotCA: the certificate may not issue certificates (not a CA, no certSign, no SubjectKeyId).
	ErrNotCA = errors.New("certificate cannot act as an issuing CA")
	// ErrExpired: a certificate of the chain is expired or not yet valid.
	ErrExpired = errors.New("certificate is not valid at this time")
	// ErrUntrustedChain: the CA certificate and intermediates do not verify to a root.
	ErrUntrustedChain = errors.New("CA chain does not verify to a trusted root")
)

// Config is the key material and seams of a Signer.
type Config struct {
	// Cert is the issuing CA certificate.
	Cert *x509.Certificate
	// Key is Cert's private key; it must be safe for concurrent use (stdlib keys are).
	Key crypto.Signer
	// Intermediates run from Cert's issuer upwards and exclude roots; empty when
	// Cert is a root or is signed by one directly.
	Intermediates []*x509.Certificate
	// Roots are the trust anchors returned by TrustBundle; Cert's chain must
	// verify to one of them. Several are allowed (rotation keeps old and new).
	Roots []*x509.Certificate
	// Rand is the randomness for signing; nil means crypto/rand. It must be safe
	// for concurrent use.
	Rand io.Reader
	// Now is the clock; nil means time.Now.
	Now func() time.Time
}

// Signer is a signer.Signer backed by an in-memory CA key. It is immutable after New
// and safe for concurrent use; hot reload replaces the whole Signer.
type Signer struct {
	cert  *x509.Certificate
	key   crypto.Signer
	chain []*x509.Certificate // response intermediates: cert (unless a root) + Intermediates
	roots []*x509.Certificate
	rand  io.Reader
	now   func() time.Time
	// sig and fast: the leaf encoder's signature parameters, and whether
	// key is an in-memory standard-library key it may sign with (leaf.go).
	sig  sigParams
	fast bool
}

var _ signer.Signer = (*Signer)(nil)

// New validates cfg and returns a Signer: Key matches Cert, Cert is a CA with
// certSign and a SubjectKeyId, nothing is expired at Now, and Cert followed by
// Intermediates (in order) verifies to one of Roots.
func New(cfg Config) (*Signer, error) {
	if cfg.Cert == nil || cfg.Key == nil {
		return nil, errors.New("local signer: CA certificate and key are required")
	}
	if len(cfg.Roots) == 0 {
		return nil, fmt.Errorf("local signer: %w: no root certificates", ErrUntrustedChain)
	}
	if cfg.Rand == nil {
		cfg.Rand = rand.Reader
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if err := KeyMatches(cfg.Cert, cfg.Key); err != nil {
		return nil, fmt.Errorf("local signer: %w", err)
	}
	if err := checkIssuingCA(cfg.Cert); err != nil {
		return nil, fmt.Errorf("local signer: %w", err)
	}
	now := cfg.Now()
	// Check validity one certificate at a time so the error names the culprit;
	// x509.Verify's message does not say which certificate expired.
	all := append(append([]*x509.Certificate{cfg.Cert}, cfg.Intermediates...), cfg.Roots...)
	for _, c := range all {
		if now.Before(c.NotBefore) || now.After(c.NotAfter) {
			return nil, fmt.Errorf("local signer: %w: %q valid %s to %s, now %s", ErrExpired,
				c.Subject.String(), c.NotBefore.UTC().Format(time.RFC3339), c.NotAfter.UTC().Format(time.RFC3339), now.UTC().Format(time.RFC3339))
		}
	}
	if err := verifyChain(cfg, now); err != nil {
		return nil, fmt.Errorf("local signer: %w", err)
	}

	var chain []*x509.Certificate
	if !signer.ContainsCertificate(cfg.Roots, cfg.Cert) {
		chain = append(chain, cfg.Cert)
	}
	chain = append(chain, cfg.Intermediates...)
	sig, fast := fastSigParams(cfg.Key)
	return &Signer{
		sig:   sig,
		fast:  fast,
		cert:  cfg.Cert,
		key:   cfg.Key,
		chain: chain,
		roots: append([]*x509.Certificate(nil), cfg.Roots...),
		rand:  cfg.Rand,
		now:   cfg.Now,
	}, nil
}

// checkIssuingCA refuses certificates that relying parties would not accept as
// the issuer of a leaf.
func checkIssuingCA(c *x509.Certificate) error {
	switch {
	case !c.BasicConstraintsValid || !c.IsCA:
		return fmt.Errorf("%w: %q is not a CA (basicConstraints CA:true missing)", ErrNotCA, c.Subject.String())
	case c.KeyUsage&x509.KeyUsageCertSign == 0:
		return fmt.Errorf("%w: %q lacks the keyCertSign key usage", ErrNotCA, c.Subject.String())
	case len(c.SubjectKeyId) == 0:
		// Leaves carry AuthorityKeyId = issuer SKID (DESIGN.md §4); without it
		// clients cannot pick the right CA during rotation.
		return fmt.Errorf("%w: %q has no SubjectKeyId", ErrNotCA, c.Subject.String())
	}
	return nil
}

// verifyChain checks that Intermediates are in issuing order and that the whole
// chain verifies to one of Roots, so responses are always well-formed chains.
func verifyChain(cfg Config, now time.Time) error {
	if signer.ContainsCertificate(cfg.Roots, cfg.Cert) && len(cfg.Intermediates) > 0 {
		return fmt.Errorf("%w: the CA certificate is a root but intermediates were given", ErrUntrustedChain)
	}
	child := cfg.Cert
	for i, parent := range cfg.Intermediates {
		if signer.ContainsCertificate(cfg.Roots, parent) {
			return fmt.Errorf("%w: intermediate %d (%q) is a root; roots do not belong in the chain", ErrUntrustedChain, i+1, parent.Subject.String())
		}
		if err := child.CheckSignatureFrom(parent); err != nil {
			return fmt.Errorf("%w: %q is not signed by the next certificate of the chain %q: %w", ErrUntrustedChain, child.Subject.String(), parent.Subject.String(), err)
		}
		child = parent
	}
	roots := x509.NewCertPool()
	for _, r := range cfg.Roots {
		roots.AddCert(r)
	}
	inter := x509.NewCertPool()
	for _, c := range cfg.Intermediates {
		inter.AddCert(c)
	}
	_, err := cfg.Cert.Verify(x509.VerifyOptions{
		Roots:         roots,
		Intermediates: inter,
		CurrentTime:   now,
		KeyUsages:     []x509.ExtKeyUsage{x509.ExtKeyUsageAny},
	})
	if err != nil {
		return fmt.Errorf("%w: %w", ErrUntrustedChain, err)
	}
	return nil
}

// KeyMatches reports ErrKeyMismatch unless key is the private key of cert.
func KeyMatches(cert *x509.Certificate, key crypto.Signer) error {
	pub, ok := key.Public().(interface{ Equal(crypto.PublicKey) bool })
	if !ok || !pub.Equal(cert.PublicKey) {
		return fmt.Errorf("%w: %q", ErrKeyMismatch, cert.Subject.String())
	}
	return nil
}

// Sign signs a copy of req.Template with the CA key, with NotAfter clamped to the
// CA's NotAfter so leaves never outlive their issuer. It refuses when the CA is
// expired at Now or clamping leaves no validity, and checks ctx before signing.
func (s *Signer) Sign(ctx context.Context, req signer.SignRequest) (*signer.Chain, error) {
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("local signer: %w", err)
	}
	if req.Template == nil || req.PublicKey == nil {
		return nil, errors.New("local signer: template and public key are required")
	}
	if now := s.now(); now.After(s.cert.NotAfter) {
		return nil, fmt.Errorf("local signer: issuing CA %q expired at %s", s.cert.Subject.String(), s.cert.NotAfter.UTC().Format(time.RFC3339))
	}
	tmpl := req.Template
	if tmpl.NotAfter.After(s.cert.NotAfter) {
		clamped := *tmpl // shallow copy: only NotAfter changes, the caller's template stays intact
		clamped.NotAfter = s.cert.NotAfter
		tmpl = &clamped
	}
	if !tmpl.NotAfter.After(tmpl.NotBefore) {
		return nil, fmt.Errorf("local signer: no validity left: NotBefore %s, NotAfter %s (issuing CA expires %s)",
			tmpl.NotBefore.UTC().Format(time.RFC3339), tmpl.NotAfter.UTC().Format(time.RFC3339), s.cert.NotAfter.UTC().Format(time.RFC3339))
	}
	key := s.key
	if k, ok := key.(contextKey); ok {
		key = k.WithContext(ctx) // a key in an HSM or KMS gives up when the request does
	}
	der, err := createLeaf(s.rand, tmpl, s.cert, req.PublicKey, key, s.sig, s.fast)
	if err != nil {
		return nil, fmt.Errorf("local signer: create certificate: %w", err)
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("local signer: parse signed certificate: %w", err)
	}
	// New checked that the key is s.cert's. A key outside the process went
	// through CreateCertificate, which verified the signature it made; an
	// in-memory standard-library key signed once, correct by construction
	// (leaf.go). Either way the result check need not verify it again.
	return &signer.Chain{Leaf: leaf, Intermediates: append([]*x509.Certificate(nil), s.chain...), SignatureChecked: true}, nil
}

// contextKey is a CA key held outside the process (signer/cakey), whose
// signatures can end with the request's context.
type contextKey interface {
	WithContext(ctx context.Context) crypto.Signer
}

// checkedKey is a CA key that can tell whether it can sign now.
type checkedKey interface {
	Check(ctx context.Context) error
}

// Check reports whether the CA key can sign now, for readiness: always for
// a key in memory; a key in an HSM or KMS asks its provider, and a failure
// wraps signer.ErrSignerUnavailable.
func (s *Signer) Check(ctx context.Context) error {
	if k, ok := s.key.(checkedKey); ok {
		if err := k.Check(ctx); err != nil {
			return fmt.Errorf("issuing CA %q: %w", s.cert.Subject.String(), err)
		}
	}
	return nil
}

// TrustBundle returns the roots that chains from Sign verify to.
func (s *Signer) TrustBundle() []*x509.Certificate {
	return append([]*x509.Certificate(nil), s.roots...)
}

// Certificate returns the issuing CA certificate.
func (s *Signer) Certificate() *x509.Certificate {
	return s.cert
}

// Chain returns the CAs every response carries between the leaf and a root:
// the issuing CA (unless it is a root) and its issuers.
func (s *Signer) Chain() []*x509.Certificate {
	return append([]*x509.Certificate(nil), s.chain...)
}
