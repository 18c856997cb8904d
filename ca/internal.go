package ca

import (
	"cmp"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"fmt"
	"log/slog"
	"net/url"
	"sync"
	"time"

	"github.com/castellan-ca/castellan/signer"
	"go.opentelemetry.io/otel/trace"
)

// IssueInternal signs a certificate Castellan needs for itself (its serving
// certificate, the operator credential) with the active signer, applying the
// same result checks as workload issuance, and audits it as an operator action.
// tmpl supplies SANs and usages; serial and validity are set here. key is the
// certificate's private key: it signs a CSR, which remote backends (Vault) need.
func (is *Issuer) IssueInternal(ctx context.Context, purpose string, tmpl *x509.Certificate, key crypto.Signer, ttl time.Duration) (*signer.Chain, *State, error) {
	if is.tracer != nil {
		var span trace.Span
		if ctx, span = is.startRun(ctx, AttrPurpose.String(purpose)); span != nil {
			defer span.End()
		}
	}
	st, err := is.State()
	if err != nil {
		return nil, nil, err
	}
	san, err := criticalSAN(tmpl.DNSNames, tmpl.URIs)
	if err != nil {
		return nil, nil, fmt.Errorf("issue %s: %w", purpose, err)
	}
	csr, err := x509.CreateCertificateRequest(is.cfg.Rand, &x509.CertificateRequest{ExtraExtensions: []pkix.Extension{san}}, key)
	if err != nil {
		return nil, nil, fmt.Errorf("issue %s: create CSR: %w", purpose, err)
	}
	act := Action{Signer: st.Backend, Detail: purpose}
	if len(tmpl.URIs) == 1 {
		act.Identity = tmpl.URIs[0].String()
	}
	chain, err := is.sign(ctx, st, signer.SignRequest{PublicKey: key.Public(), CSR: csr, TTL: ttl}, tmpl)
	if err == nil {
		act.Chain = chain
	} else {
		act.Err, act.Detail = err, purpose+": "+err.Error()
	}
	if _, aerr := is.audit.Record(ctx, act); aerr != nil && err == nil {
		err = Refuse(ErrUnavailable, ReasonAuditDown, fmt.Errorf("audit append: %w", aerr))
	}
	if err != nil {
		return nil, nil, fmt.Errorf("issue %s: %w", purpose, err)
	}
	return chain, st, nil
}

// criticalSAN encodes a subjectAltName extension marked critical, as RFC 5280
// requires with an empty subject: a backend that copies the CSR's extensions
// (Vault's sign-verbatim) then still issues a valid certificate.
func criticalSAN(dnsNames []string, uris []*url.URL) (pkix.Extension, error) {
	var names []asn1.RawValue
	for _, n := range dnsNames {
		names = append(names, asn1.RawValue{Class: asn1.ClassContextSpecific, Tag: 2, Bytes: []byte(n)})
	}
	for _, u := range uris {
		names = append(names, asn1.RawValue{Class: asn1.ClassContextSpecific, Tag: 6, Bytes: []byte(u.String())})
	}
	val, err := asn1.Marshal(names)
	if err != nil {
		return pkix.Extension{}, fmt.Errorf("encode SAN: %w", err)
	}
	return pkix.Extension{Id: asn1.ObjectIdentifier{2, 5, 29, 17}, Critical: true, Value: val}, nil
}

// ServingTemplate is the profile of Castellan's own TLS serving certificate.
func ServingTemplate(dnsNames []string) *x509.Certificate {
	return &x509.Certificate{
		DNSNames:              dnsNames,
		KeyUsage:              x509.KeyUsageDigitalSignature,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		BasicConstraintsValid: true,
	}
}

// ClientTemplate is the profile of a client-only certificate for id (operator credential).
func ClientTemplate(id *url.URL) *x509.Certificate {
	return &x509.Certificate{
		URIs:                  []*url.URL{id},
		KeyUsage:              x509.KeyUsageDigitalSignature,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
		BasicConstraintsValid: true,
	}
}

// ServingCert keeps Castellan's TLS serving certificate issued by its own CA,
// reissuing it before expiry and whenever the active CA changes, so clients
// that trust the current bundle can always connect.
type ServingCert struct {
	Issuer   *Issuer
	DNSNames []string
	// URIs are URI SANs, e.g. the SPIFFE ID of an endpoint authenticated by SVID.
	URIs   []*url.URL
	TTL    time.Duration // default 24 h; renewed after two thirds
	Logger *slog.Logger

	mu      sync.Mutex
	cert    *tls.Certificate
	gen     uint64
	renewAt time.Time
}

// GetCertificate is a tls.Config.GetCertificate callback.
func (s *ServingCert) GetCertificate(hello *tls.ClientHelloInfo) (*tls.Certificate, error) {
	ctx := context.Background()
	if hello != nil {
		ctx = hello.Context()
	}
	return s.Current(ctx)
}

// Current returns a valid serving certificate for the active CA, issuing one if needed.
func (s *ServingCert) Current(ctx context.Context) (*tls.Certificate, error) {
	st := s.Issuer.cfg.Authority.Current()
	now := s.Issuer.cfg.Now()
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.cert != nil && st != nil && now.Before(s.renewAt) {
		if s.gen == st.Generation {
			return s.cert, nil
		}
		// The CA changed. Clients learn a new root only as the bundle
		// propagates, so keep the current certificate while it still chains
		// to the bundle (old roots are retained); it moves to the new CA at
		// its normal renewal.
		if chainsTo(s.cert, st.Pool, now) {
			s.gen = st.Generation
			return s.cert, nil
		}
	}
	cert, gen, renewAt, err := s.issue(context.WithoutCancel(ctx))
	if err != nil {
		if s.cert != nil && now.Before(s.cert.Leaf.NotAfter) {
			cmp.Or(s.Logger, s.Issuer.cfg.Logger).Error("serving certificate renewal failed; keeping the current one", "error", err)
			return s.cert, nil
		}
		return nil, err
	}
	s.cert, s.gen, s.renewAt = cert, gen, renewAt
	return cert, nil
}

func (s *ServingCert) issue(ctx context.Context) (*tls.Certificate, uint64, time.Time, error) {
	ttl := s.TTL
	if ttl <= 0 {
		ttl = 24 * time.Hour
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), s.Issuer.cfg.Rand)
	if err != nil {
		return nil, 0, time.Time{}, fmt.Errorf("serving key: %w", err)
	}
	tmpl := ServingTemplate(s.DNSNames)
	tmpl.URIs = s.URIs
	chain, st, err := s.Issuer.IssueInternal(ctx, "serving certificate", tmpl, key, ttl)
	if err != nil {
		return nil, 0, time.Time{}, err
	}
	return TLSCertificate(chain, key), st.Generation, renewalTime(chain.Leaf), nil
}

// TLSCertificate assembles a chain and its key for crypto/tls.
func TLSCertificate(chain *signer.Chain, key crypto.Signer) *tls.Certificate {
	c := &tls.Certificate{PrivateKey: key, Leaf: chain.Leaf, Certificate: [][]byte{chain.Leaf.Raw}}
	for _, i := range chain.Intermediates {
		c.Certificate = append(c.Certificate, i.Raw)
	}
	return c
}

// renewalTime is two thirds into the certificate's life.
func renewalTime(c *x509.Certificate) time.Time {
	return c.NotBefore.Add(c.NotAfter.Sub(c.NotBefore) * 2 / 3)
}

// chainsTo reports whether cert's chain verifies to roots for server auth at now.
func chainsTo(cert *tls.Certificate, roots *x509.CertPool, now time.Time) bool {
	inter := x509.NewCertPool()
	for _, der := range cert.Certificate[1:] {
		c, err := x509.ParseCertificate(der)
		if err != nil {
			return false
		}
		inter.AddCert(c)
	}
	_, err := cert.Leaf.Verify(x509.VerifyOptions{Roots: roots, Intermediates: inter, CurrentTime: now,
		KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}})
	return err == nil
}
