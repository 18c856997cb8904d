// Package catest runs requests through a real issuance pipeline for the tests
// of the signing backends: a backend's test sees what a client and the audit
// log would, while the backend packages themselves never link package ca.
package catest

import (
	"context"
	"crypto"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"net/url"
	"sync"
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/castellan-ca/castellan/authn"
	"github.com/castellan-ca/castellan/ca"
	"github.com/castellan-ca/castellan/signer"
	"github.com/castellan-ca/castellan/signer/signertest"
	"github.com/castellan-ca/castellan/storage"
)

// Issued is the outcome of one request through a real ca.Issuer.
type Issued struct {
	Result *ca.Issued
	Err    error
	// Record is the audit record the issuer committed for the request.
	Record storage.Record
}

// CSROptions shapes the CSR of IssueThrough.
type CSROptions struct {
	// Subject is the CSR's subject (the issuer ignores it; a backend must too).
	Subject pkix.Name
	// NoSAN leaves the granted URI SAN out of the CSR, which the issuer allows.
	NoSAN bool
	// NonCriticalSAN marks the SAN extension non-critical (Go's default; some
	// ztunnel versions), where Istio's agents mark it critical.
	NonCriticalSAN bool
}

// IssueThrough runs one workload request for id, with a CSR made from key, through a
// real ca.Issuer whose only signer is s, so a test sees what a client and the
// audit log would: the issuer re-checks the backend's result (ca.CheckIssued)
// and maps errors to codes. The caller is authenticated as id itself.
func IssueThrough(t testing.TB, backend string, s signer.Signer, id spiffeid.ID, key crypto.Signer, opts CSROptions) Issued {
	t.Helper()
	var der []byte
	switch {
	case opts.NoSAN:
		der = signertest.CSR(t, key, opts.Subject, nil)
	case opts.NonCriticalSAN:
		var err error
		der, err = x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{Subject: opts.Subject, URIs: []*url.URL{id.URL()}}, key)
		if err != nil {
			t.Fatalf("create CSR: %v", err)
		}
	default:
		der = signertest.CSR(t, key, opts.Subject, id.URL())
	}
	authority := ca.NewAuthority()
	if _, err := authority.Use(backend, s); err != nil {
		t.Fatalf("authority: %v", err)
	}
	audit := &auditLog{}
	issuer, err := ca.NewIssuer(ca.Config{
		TrustDomain:   id.TrustDomain(),
		Authenticator: fixedCaller{id},
		Audit:         audit,
		Authority:     authority,
	})
	if err != nil {
		t.Fatalf("issuer: %v", err)
	}
	res, err := issuer.Issue(t.Context(), ca.Request{CSR: string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der}))})
	audit.mu.Lock()
	defer audit.mu.Unlock()
	if len(audit.recs) != 1 {
		t.Fatalf("issuer wrote %d audit records, want 1", len(audit.recs))
	}
	return Issued{Result: res, Err: err, Record: audit.recs[0]}
}

// fixedCaller authenticates every request as one workload.
type fixedCaller struct{ id spiffeid.ID }

func (f fixedCaller) Authenticate(context.Context) (*authn.Caller, error) {
	return &authn.Caller{Method: "test", Identity: f.id, Name: f.id.String()}, nil
}

// auditLog keeps records in memory.
type auditLog struct {
	mu   sync.Mutex
	recs []storage.Record
}

func (a *auditLog) Append(_ context.Context, rec *storage.Record) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.recs = append(a.recs, *rec)
	return nil
}
