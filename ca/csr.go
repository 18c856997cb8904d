package ca

import (
	"bytes"
	"crypto/x509"
	"encoding/pem"
	"fmt"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// MaxCSRBytes bounds the PEM CSR a client may send; real CSRs are 1-2 KiB.
const MaxCSRBytes = 16 << 10

// ParseCSR decodes and checks an untrusted PEM CSR for the granted identity:
// exactly one CERTIFICATE REQUEST block, a valid self-signature, an accepted
// key, and no SAN other than (at most) the granted URI. Subject is ignored. The
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
	if len(csr.DNSNames)+len(csr.IPAddresses)+len(csr.EmailAddresses) != 0 {
		return nil, Refuse(ErrInvalidRequest, "csr.forbidden_san", fmt.Errorf("CSR asks for DNS, IP or email SANs; workload certificates carry only the URI SAN"))
	}
	switch len(csr.URIs) {
	case 0:
	case 1:
		if csr.URIs[0].String() != grant.String() {
			return nil, Refuse(ErrInvalidRequest, "csr.san_mismatch", fmt.Errorf("CSR asks for URI SAN %q, caller is granted %q", csr.URIs[0].String(), grant.String()))
		}
	default:
		return nil, Refuse(ErrInvalidRequest, "csr.san_mismatch", fmt.Errorf("CSR asks for %d URI SANs, only the granted identity is allowed", len(csr.URIs)))
	}
	return csr, nil
}
