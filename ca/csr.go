package ca

import (
	"bytes"
	"crypto/x509"
	"encoding/pem"
	"fmt"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// Refusal reasons of the CSR's names and attributes.
const (
	// ReasonCSRForbiddenSAN: the CSR asks for a SAN of another type than URI.
	ReasonCSRForbiddenSAN = "csr.forbidden_san"
	// ReasonCSRSANMismatch: the CSR's SAN extension is not exactly the
	// granted URI (another URI, several names, a malformed extension).
	ReasonCSRSANMismatch = "csr.san_mismatch"
	// ReasonCSRAttributes: the CSR carries attributes besides one extension request.
	ReasonCSRAttributes = "csr.attributes"
)

// MaxCSRBytes bounds the PEM CSR a client may send; real CSRs are 1-2 KiB.
const MaxCSRBytes = 16 << 10

// ParseCSR decodes and checks an untrusted PEM CSR for the granted identity:
// exactly one CERTIFICATE REQUEST block, a valid self-signature, an accepted
// key, no attribute but one extension request, and either no subjectAltName
// extension (the grant supplies it) or one that holds exactly the granted URI
// and nothing else, whatever the name type. Subject is ignored. The
// returned error wraps ErrInvalidRequest or ErrKeyType and carries a reason code.
func ParseCSR(csrPEM string, grant spiffeid.ID) (*x509.CertificateRequest, error) {
	if len(csrPEM) > MaxCSRBytes {
		return nil, Refuse(ErrInvalidRequest, "csr.too_large", fmt.Errorf("CSR is %d bytes, limit %d", len(csrPEM), MaxCSRBytes))
	}
	block, rest := pem.Decode([]byte(csrPEM))
	if block == nil {
		return nil, Refuse(ErrInvalidRequest, "csr.not_pem", fmt.Errorf("CSR is not PEM"))
	}
	if block.Type != "CERTIFICATE REQUEST" && block.Type != "NEW CERTIFICATE REQUEST" {
		return nil, Refuse(ErrInvalidRequest, "csr.not_pem", fmt.Errorf("PEM block is %q, want CERTIFICATE REQUEST", block.Type))
	}
	if len(bytes.TrimSpace(rest)) != 0 {
		return nil, Refuse(ErrInvalidRequest, "csr.multiple_blocks", fmt.Errorf("CSR PEM has data after the first block"))
	}
	csr, err := x509.ParseCertificateRequest(block.Bytes)
	if err != nil {
		return nil, Refuse(ErrInvalidRequest, "csr.parse", fmt.Errorf("parse CSR: %w", err))
	}
	if err := csr.CheckSignature(); err != nil {
		return nil, Refuse(ErrInvalidRequest, "csr.signature", fmt.Errorf("CSR signature: %w", err))
	}
	if err := CheckPublicKey(csr.PublicKey); err != nil {
		return nil, Refuse(ErrInvalidRequest, "csr.key", err)
	}
	if err := checkCSRAttributes(csr); err != nil {
		return nil, Refuse(ErrInvalidRequest, ReasonCSRAttributes, err)
	}
	names, present, err := subjectAltNames(csr.Extensions)
	if err != nil {
		return nil, Refuse(ErrInvalidRequest, ReasonCSRSANMismatch, fmt.Errorf("CSR: %w", err))
	}
	if present {
		if reason, err := onlyGrantedURI(names, grant.String()); err != nil {
			return nil, Refuse(ErrInvalidRequest, reason, err)
		}
	}
	return csr, nil
}
