// Package googlecas signs workload certificates with Google Cloud Certificate
// Authority Service (CAS), through its official client library.
//
// Certificates are requested in config mode, not pem_csr mode: with pem_csr,
// CAS takes the subject and SANs from the CSR, which Castellan never trusts
// (a CSR may carry no SAN, or pilot-agent's `O=` subject). In config mode the
// request states the granted identity, key usages, CA:false, the public key
// and the exact validity (requested_not_before_time + lifetime), so CAS signs
// the profile Castellan decided; the issuer re-checks the result anyway.
package googlecas

import (
	"context"
	"crypto/rand"
	"crypto/x509"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"time"

	privateca "cloud.google.com/go/security/privateca/apiv1"
	"cloud.google.com/go/security/privateca/apiv1/privatecapb"
	"github.com/castellan-ca/castellan/signer"
	"github.com/google/uuid"
	"google.golang.org/api/option"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"
)

// Backend names this signer in audit records and configuration.
const Backend = "googlecas"

// Defaults of Config.
const (
	DefaultTimeout         = 10 * time.Second
	DefaultRefreshInterval = time.Minute
)

// Config says which CA pool signs and how to reach CAS.
type Config struct {
	// CAPool is the pool's resource name:
	// projects/PROJECT/locations/LOCATION/caPools/POOL.
	CAPool string
	// CertificateAuthority, if set, pins issuance to this CA ID of the pool
	// (issuing_certificate_authority_id); otherwise CAS picks an enabled CA.
	CertificateAuthority string
	// Timeout bounds each call, the client library's retries included.
	Timeout time.Duration
	// RefreshInterval is how often the pool's CA certificates are re-read.
	RefreshInterval time.Duration
	// ClientOptions configure the client: none means Application Default
	// Credentials and the public endpoint (tests point it at a fake).
	ClientOptions []option.ClientOption
	// OnChange is called (from Run's goroutine) after TrustBundle changed.
	OnChange func()
	// Logger gets refresh events.
	Logger *slog.Logger
	// Rand makes request IDs; nil means crypto/rand.
	Rand io.Reader
}

// Signer is a signer.Signer backed by a CAS CA pool; safe for concurrent use.
type Signer struct {
	cfg    Config
	client *privateca.CertificateAuthorityClient
	log    *slog.Logger

	mu       sync.RWMutex
	roots    []*x509.Certificate
	refreshc chan struct{}
}

var _ signer.Signer = (*Signer)(nil)

// New connects to CAS and reads the pool's CA certificates, so that a wrong
// pool or missing permission fails at start-up. Close releases the client.
func New(ctx context.Context, cfg Config) (*Signer, error) {
	if parts := strings.Split(cfg.CAPool, "/"); len(parts) != 6 || parts[0] != "projects" || parts[2] != "locations" || parts[4] != "caPools" {
		return nil, fmt.Errorf("google CAS signer: CA pool %q is not projects/PROJECT/locations/LOCATION/caPools/POOL", cfg.CAPool)
	}
	if cfg.Timeout <= 0 {
		cfg.Timeout = DefaultTimeout
	}
	if cfg.RefreshInterval <= 0 {
		cfg.RefreshInterval = DefaultRefreshInterval
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.Rand == nil {
		cfg.Rand = rand.Reader
	}
	client, err := privateca.NewCertificateAuthorityClient(ctx, cfg.ClientOptions...)
	if err != nil {
		return nil, fmt.Errorf("google CAS signer: client: %w", err)
	}
	s := &Signer{cfg: cfg, client: client, log: cfg.Logger, refreshc: make(chan struct{}, 1)}
	if _, err := s.refresh(ctx); err != nil {
		return nil, errors.Join(fmt.Errorf("google CAS signer: %w", err), client.Close())
	}
	return s, nil
}

// Close releases the client's connections.
func (s *Signer) Close() error { return s.client.Close() }

// Sign creates a certificate in the pool for exactly the template's SANs,
// usages and validity. The request carries a fresh UUID request_id, which the
// client library's retries reuse, so CAS issues at most one certificate per
// call. Outages, timeouts and quota (ResourceExhausted) wrap
// signer.ErrSignerUnavailable; refusals (InvalidArgument, PermissionDenied, …) do not.
func (s *Signer) Sign(ctx context.Context, req signer.SignRequest) (*signer.Chain, error) {
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("google CAS signer: %w", err)
	}
	if req.Template == nil || req.PublicKey == nil {
		return nil, errors.New("google CAS signer: template and public key are required")
	}
	creq, err := s.request(req)
	if err != nil {
		return nil, fmt.Errorf("google CAS signer: %w", err)
	}
	cctx, cancel := context.WithTimeout(ctx, s.cfg.Timeout)
	defer cancel()
	cert, err := s.client.CreateCertificate(cctx, creq)
	if err != nil {
		return nil, fmt.Errorf("google CAS signer: create certificate %s: %w", creq.CertificateId, classify(ctx, err))
	}
	chain, roots, err := parseCertificate(cert)
	if err != nil {
		return nil, fmt.Errorf("google CAS signer: certificate %s: %w", cert.GetName(), err)
	}
	s.mu.RLock()
	known := s.roots
	s.mu.RUnlock()
	if !slices.ContainsFunc(roots, func(r *x509.Certificate) bool { return signer.ContainsCertificate(known, r) }) {
		// Issued under a root we do not know yet: re-read the pool now.
		select {
		case s.refreshc <- struct{}{}:
		default:
		}
	}
	return chain, nil
}

// request translates the template into a config-mode CreateCertificateRequest.
func (s *Signer) request(req signer.SignRequest) (*privatecapb.CreateCertificateRequest, error) {
	tmpl := req.Template
	pubDER, err := x509.MarshalPKIXPublicKey(req.PublicKey)
	if err != nil {
		return nil, fmt.Errorf("public key: %w", err)
	}
	id, err := uuid.NewRandomFromReader(s.cfg.Rand)
	if err != nil {
		return nil, fmt.Errorf("request id: %w", err)
	}
	uris := make([]string, len(tmpl.URIs))
	for i, u := range tmpl.URIs {
		uris[i] = u.String()
	}
	eku := &privatecapb.KeyUsage_ExtendedKeyUsageOptions{
		ServerAuth: slices.Contains(tmpl.ExtKeyUsage, x509.ExtKeyUsageServerAuth),
		ClientAuth: slices.Contains(tmpl.ExtKeyUsage, x509.ExtKeyUsageClientAuth),
	}
	return &privatecapb.CreateCertificateRequest{
		Parent: s.cfg.CAPool,
		// Unique in the pool, and traceable to Castellan's audit record.
		CertificateId:                 "castellan-" + hex.EncodeToString(tmpl.SerialNumber.Bytes()),
		RequestId:                     id.String(),
		IssuingCertificateAuthorityId: s.cfg.CertificateAuthority,
		Certificate: &privatecapb.Certificate{
			Lifetime:               durationpb.New(tmpl.NotAfter.Sub(tmpl.NotBefore)),
			RequestedNotBeforeTime: timestamppb.New(tmpl.NotBefore),
			CertificateConfig: &privatecapb.Certificate_Config{Config: &privatecapb.CertificateConfig{
				SubjectConfig: &privatecapb.CertificateConfig_SubjectConfig{
					Subject:        &privatecapb.Subject{},
					SubjectAltName: &privatecapb.SubjectAltNames{Uris: uris, DnsNames: tmpl.DNSNames},
				},
				X509Config: &privatecapb.X509Parameters{
					KeyUsage: &privatecapb.KeyUsage{
						BaseKeyUsage: &privatecapb.KeyUsage_KeyUsageOptions{
							DigitalSignature: tmpl.KeyUsage&x509.KeyUsageDigitalSignature != 0,
							KeyEncipherment:  tmpl.KeyUsage&x509.KeyUsageKeyEncipherment != 0,
						},
						ExtendedKeyUsage: eku,
					},
					// Present so the certificate states CA:false (DESIGN.md §4).
					CaOptions: &privatecapb.X509Parameters_CaOptions{IsCa: proto.Bool(false)},
				},
				PublicKey: &privatecapb.PublicKey{
					Key:    pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: pubDER}),
					Format: privatecapb.PublicKey_PEM,
				},
			}},
		},
	}, nil
}

// classify maps a client error: the caller's own cancellation stays a context
// error; our timeout and the codes a retry may cure wrap signer.ErrSignerUnavailable.
// Quota (ResourceExhausted) is the backend's, not Castellan's overload, so it
// is an outage to our clients too (Unavailable, which Istio's agents retry).
func classify(parent context.Context, err error) error {
	if perr := parent.Err(); perr != nil {
		return fmt.Errorf("%w (%w)", perr, err)
	}
	if errors.Is(err, context.DeadlineExceeded) {
		return fmt.Errorf("%w: %w", signer.ErrSignerUnavailable, err)
	}
	switch status.Code(err) {
	case codes.Unavailable, codes.ResourceExhausted, codes.DeadlineExceeded, codes.Aborted:
		return fmt.Errorf("%w: %w", signer.ErrSignerUnavailable, err)
	}
	return err
}

// parseCertificate reads the issued leaf and its chain (issuer to root): the
// roots are split off, since they belong to the bundle, not the response chain.
func parseCertificate(c *privatecapb.Certificate) (*signer.Chain, []*x509.Certificate, error) {
	leaf, err := signer.ParseCertificatesPEM([]byte(c.GetPemCertificate()))
	if err != nil {
		return nil, nil, fmt.Errorf("pem_certificate: %w", err)
	}
	if len(leaf) != 1 {
		return nil, nil, fmt.Errorf("pem_certificate holds %d certificates, want 1", len(leaf))
	}
	chain, err := signer.ParseCertificatesPEMList(c.GetPemCertificateChain())
	if err != nil {
		return nil, nil, fmt.Errorf("pem_certificate_chain: %w", err)
	}
	inter, roots := signer.SplitRoots(chain)
	return &signer.Chain{Leaf: leaf[0], Intermediates: inter}, roots, nil
}

// TrustBundle returns the roots of the pool's CAs, as last read from CAS.
func (s *Signer) TrustBundle() []*x509.Certificate {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return slices.Clone(s.roots)
}

// refresh reads the roots of every CA chain in the pool (FetchCaCerts) and
// reports whether they changed. Every chain must end at a root.
func (s *Signer) refresh(ctx context.Context) (changed bool, err error) {
	cctx, cancel := context.WithTimeout(ctx, s.cfg.Timeout)
	defer cancel()
	resp, err := s.client.FetchCaCerts(cctx, &privatecapb.FetchCaCertsRequest{CaPool: s.cfg.CAPool})
	if err != nil {
		return false, fmt.Errorf("fetch CA certificates of %s: %w", s.cfg.CAPool, classify(ctx, err))
	}
	var roots []*x509.Certificate
	for i, cc := range resp.GetCaCerts() {
		chain, err := signer.ParseCertificatesPEMList(cc.GetCertificates())
		if err != nil {
			return false, fmt.Errorf("CA chain %d of %s: %w", i, s.cfg.CAPool, err)
		}
		_, rs := signer.SplitRoots(chain)
		if len(rs) == 0 {
			return false, fmt.Errorf("CA chain %d of %s does not end at a root", i, s.cfg.CAPool)
		}
		for _, r := range rs {
			if !signer.ContainsCertificate(roots, r) {
				roots = append(roots, r)
			}
		}
	}
	if len(roots) == 0 {
		return false, fmt.Errorf("CA pool %s has no CA certificates", s.cfg.CAPool)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	changed = !signer.SameCertificates(s.roots, roots)
	s.roots = roots
	return changed, nil
}

// Run re-reads the pool's CA certificates every RefreshInterval, or at once
// when Sign saw an unknown root, and calls OnChange when the trust bundle
// changed. It returns when ctx ends.
func (s *Signer) Run(ctx context.Context) {
	signer.RefreshLoop(ctx, s.cfg.RefreshInterval, s.refreshc, s.refresh,
		func(err error) { s.log.Warn("google CAS: CA certificate refresh failed", "error", err) },
		func() {
			s.log.Info("google CAS: trust bundle changed", "ca_pool", s.cfg.CAPool, "roots", len(s.TrustBundle()))
			if s.cfg.OnChange != nil {
				s.cfg.OnChange()
			}
		})
}
