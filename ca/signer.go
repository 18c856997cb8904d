package ca

import (
	"bytes"
	"context"
	"crypto"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// Signer is one signing backend (self-signed root, intermediate, Vault, Google CAS).
//
// Contract: Sign returns a leaf whose SAN, key and validity match req (the issuer
// re-checks every field, so a backend that deviates is caught, not trusted), with
// NotAfter never past the issuing CA's NotAfter, and the chain from the issuing CA up
// to but excluding the root. Sign must honour ctx and be safe for concurrent use.
// Errors that a retry may cure (backend down, timeout, quota) wrap ErrSignerUnavailable.
type Signer interface {
	Sign(ctx context.Context, req SignRequest) (*Chain, error)
	// TrustBundle returns the roots that chains from Sign verify to.
	TrustBundle() []*x509.Certificate
}

// SignRequest is what the issuer asks a backend to sign: the profile is decided
// here, so local backends sign Template as is and remote ones translate it.
type SignRequest struct {
	// Template is the complete leaf profile (serial, SAN, usages, validity);
	// local signers sign it unchanged apart from clamping NotAfter to their CA.
	Template *x509.Certificate
	// PublicKey is the key to certify, taken from the verified CSR.
	PublicKey crypto.PublicKey
	// CSR is the caller's verified request in DER, for remote backends that need it.
	CSR []byte
	// Identity is the granted SPIFFE ID (the only URI SAN of Template).
	Identity spiffeid.ID
	// TTL is the granted lifetime, NotAfter-NotBefore of Template.
	TTL time.Duration
}

// Chain is a signed leaf and the CAs between it and a root of the trust bundle.
type Chain struct {
	Leaf *x509.Certificate
	// Intermediates runs from the leaf's issuer upwards and excludes the root.
	Intermediates []*x509.Certificate
}

// ErrSignerUnavailable marks a signing failure that a retry may cure.
var ErrSignerUnavailable = errors.New("signer unavailable")

// Issuer returns the certificate that signed the leaf: the first intermediate, or
// nil when the leaf was signed by a root directly (self-signed backend).
func (c *Chain) Issuer() *x509.Certificate {
	if len(c.Intermediates) > 0 {
		return c.Intermediates[0]
	}
	return nil
}

// EncodePEM returns one PEM CERTIFICATE block per certificate, concatenated.
func EncodePEM(certs ...*x509.Certificate) string {
	var b strings.Builder
	for _, c := range certs {
		b.Write(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw}))
	}
	return b.String()
}

// ParseCertificatesPEM parses every CERTIFICATE block in data and refuses any
// other block type or trailing garbage, so a bundle file means exactly what it shows.
func ParseCertificatesPEM(data []byte) ([]*x509.Certificate, error) {
	var certs []*x509.Certificate
	for {
		var block *pem.Block
		block, data = pem.Decode(data)
		if block == nil {
			if len(bytes.TrimSpace(data)) != 0 {
				return nil, errors.New("trailing data after the last PEM block")
			}
			break
		}
		if block.Type != "CERTIFICATE" {
			return nil, fmt.Errorf("unexpected PEM block %q", block.Type)
		}
		c, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			return nil, fmt.Errorf("parse certificate %d: %w", len(certs)+1, err)
		}
		certs = append(certs, c)
	}
	if len(certs) == 0 {
		return nil, errors.New("no PEM certificate found")
	}
	return certs, nil
}
