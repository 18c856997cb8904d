// Package signer is the contract between the issuance pipeline (package ca)
// and its signing backends (one package per backend below this folder): the
// Signer interface, what it is asked and what it returns, its errors, and the
// certificate helpers every backend shares. It imports no other Castellan
// package, so a backend never links the pipeline, authentication or storage.
package signer

import (
	"bytes"
	"context"
	"crypto"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"math/big"
	"slices"
	"strings"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// Signer is one signing backend (self-signed root, intermediate, Vault, Google CAS, AWS Private CA).
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

// Subjecter is implemented by a backend whose workload certificates must
// carry a subject (AWS Private CA otherwise copies the CSR's subject, and
// refuses an empty one without a critical SAN). The issuer puts
// LeafSubject(id) into the template, so the result check expects it; the
// other backends issue Castellan's empty subject.
type Subjecter interface {
	LeafSubject(id spiffeid.ID) pkix.Name
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
	// SignatureChecked is set by a backend whose Leaf's signature is known
	// to verify with its issuing CA's public key: verified after signing
	// (crypto/x509 does for a key in an HSM or KMS), or made in process by a
	// standard-library key matched to that CA (signer/local). The result
	// check then skips repeating that one signature verification once the
	// issuer's path is known; every other check still runs. Remote backends
	// leave it false.
	SignatureChecked bool
	// BackendRef is the backend's own name for the issued certificate (an
	// AWS Private CA certificate ARN), recorded in the audit record so an
	// operator can find the certificate in the backend's records; empty when
	// the serial is the only reference.
	BackendRef string
}

// ErrSignerUnavailable marks a signing failure that a retry may cure.
var ErrSignerUnavailable = errors.New("signer unavailable")

// ErrUnsupportedKey marks a request whose public key the backend cannot
// certify (AWS Private CA has no Ed25519): the caller's key is at fault, not
// the backend, and no retry with the same key will succeed.
var ErrUnsupportedKey = errors.New("key type not supported by the signer")

// DefaultClockSkew is how far certificates are backdated (NotBefore = now −
// skew) so that relying parties whose clocks run behind accept them at once.
const DefaultClockSkew = 2 * time.Minute

// NewSerial returns a random positive 128-bit serial with its top bit set, so
// every serial has the same length and never collides in practice.
func NewSerial(r io.Reader) (*big.Int, error) {
	var b [16]byte
	if _, err := io.ReadFull(r, b[:]); err != nil {
		return nil, fmt.Errorf("read serial randomness: %w", err)
	}
	b[0] |= 0x80
	return new(big.Int).SetBytes(b[:]), nil
}

// Issuer returns the certificate that signed the leaf: the first intermediate, or
// nil when the leaf was signed by a root directly (self-signed backend).
func (c *Chain) Issuer() *x509.Certificate {
	if len(c.Intermediates) > 0 {
		return c.Intermediates[0]
	}
	return nil
}

// EncodePEM returns one PEM CERTIFICATE block per certificate, concatenated:
// what pem.EncodeToMemory writes, in one allocation (every response carries
// the leaf in PEM, so this is on the hot path).
func EncodePEM(certs ...*x509.Certificate) string {
	n := 0
	for _, c := range certs {
		body := base64.StdEncoding.EncodedLen(len(c.Raw))
		n += len(pemBegin) + body + (body+pemLineLen-1)/pemLineLen + len(pemEnd)
	}
	var b strings.Builder
	b.Grow(n)
	var line [pemLineLen]byte
	for _, c := range certs {
		b.WriteString(pemBegin)
		for der := c.Raw; len(der) > 0; {
			chunk := der[:min(len(der), pemLineLen/4*3)]
			der = der[len(chunk):]
			enc := line[:base64.StdEncoding.EncodedLen(len(chunk))]
			base64.StdEncoding.Encode(enc, chunk)
			b.Write(enc)
			b.WriteByte('\n')
		}
		b.WriteString(pemEnd)
	}
	return b.String()
}

// The PEM framing of a certificate, as encoding/pem writes it.
const (
	pemBegin   = "-----BEGIN CERTIFICATE-----\n"
	pemEnd     = "-----END CERTIFICATE-----\n"
	pemLineLen = 64
)

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

// ParseCertificatesPEMList parses each element of pems with ParseCertificatesPEM
// and returns their certificates in order; an error names the element's index.
func ParseCertificatesPEMList(pems []string) ([]*x509.Certificate, error) {
	var out []*x509.Certificate
	for i, p := range pems {
		certs, err := ParseCertificatesPEM([]byte(p))
		if err != nil {
			return nil, fmt.Errorf("element %d: %w", i, err)
		}
		out = append(out, certs...)
	}
	return out, nil
}

// SplitRoots separates self-signed certificates (roots, for the trust bundle)
// from the rest (intermediates), keeping the order of each.
func SplitRoots(certs []*x509.Certificate) (inter, roots []*x509.Certificate) {
	for _, c := range certs {
		if bytes.Equal(c.RawIssuer, c.RawSubject) && c.CheckSignatureFrom(c) == nil {
			roots = append(roots, c)
		} else {
			inter = append(inter, c)
		}
	}
	return inter, roots
}

// CheckChainOrder requires each certificate of chain to be signed by the next
// one, so that a remote CA's chain runs from its issuing CA up to the root
// its top names, as the trust bundle and the response layout assume.
func CheckChainOrder(chain []*x509.Certificate) error {
	for i := 0; i+1 < len(chain); i++ {
		if err := chain[i].CheckSignatureFrom(chain[i+1]); err != nil {
			return fmt.Errorf("%q is not signed by the next certificate %q: %w", chain[i].Subject.String(), chain[i+1].Subject.String(), err)
		}
	}
	return nil
}

// ContainsCertificate reports whether set holds c, compared byte for byte.
func ContainsCertificate(set []*x509.Certificate, c *x509.Certificate) bool {
	return slices.ContainsFunc(set, func(s *x509.Certificate) bool { return bytes.Equal(s.Raw, c.Raw) })
}

// SameCertificates reports whether a and b hold the same certificates, byte
// for byte, in the same order.
func SameCertificates(a, b []*x509.Certificate) bool {
	return slices.EqualFunc(a, b, func(x, y *x509.Certificate) bool { return bytes.Equal(x.Raw, y.Raw) })
}

// RefreshLoop calls refresh every interval, or at once when wake receives,
// until ctx ends. After each call it reports an error to failed, or calls
// changed when refresh says what it read changed (the trust bundle, for a
// remote signer); once ctx has ended it returns without either.
func RefreshLoop(ctx context.Context, interval time.Duration, wake <-chan struct{},
	refresh func(context.Context) (bool, error), failed func(error), changed func()) {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		case <-wake:
		}
		ok, err := refresh(ctx)
		switch {
		case ctx.Err() != nil:
			return
		case err != nil:
			failed(err)
		case ok:
			changed()
		}
	}
}
