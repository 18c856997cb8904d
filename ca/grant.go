package ca

import (
	"context"
	"crypto"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/castellan-ca/castellan/signer"
	"github.com/castellan-ca/castellan/storage"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// Reasons of grant requests (besides the pipeline's own).
const (
	// ReasonKeyType: the key to certify is not one DESIGN.md §4 accepts
	// (the reason ParseCSR gives a CSR with such a key).
	ReasonKeyType = "csr.key"
	// ReasonNoNames: the grant names neither an identity nor a DNS name.
	ReasonNoNames = "grant.no_names"
	// ReasonShortLifetime: the signed leaf is shorter than the request's
	// minimum (its CA ends too soon), so it is withheld.
	ReasonShortLifetime = "signer.short_lifetime"
)

// GrantRequest is a certificate request that reaches Castellan through an API
// whose server has already authenticated the requester and checked proof of
// possession (a Kubernetes PodCertificateRequest or CertificateSigningRequest).
// The controller that read it decides what may be granted (Authorize); the
// pipeline does the rest exactly as for CreateCertificate: the profile, the
// signing, the result check, the audit record and the metrics.
type GrantRequest struct {
	// Method names the interface in the audit record (auth_method), e.g.
	// "kubernetes.pcr".
	Method string
	// Caller is who asked, as the record shows it (the requesting user, the
	// pod and node of a PodCertificateRequest).
	Caller string
	// Peer names the API object the request came in (the record's peer).
	Peer string
	// ClusterID is the cluster whose API holds the object.
	ClusterID string
	// Requested is what the request asked for, for the record (untrusted).
	Requested string
	// Authorize decides the grant, or refuses with an error classified by
	// Refuse (its kind and reason go to the record). It runs inside the
	// pipeline, after admission, so its refusals are audited and counted.
	Authorize func(ctx context.Context) (*Grant, error)
}

// Grant is what an authorized request receives. The certificate profile is
// the workload leaf of DESIGN.md §4 with these names.
type Grant struct {
	// Identity is the only URI SAN; zero for a certificate of DNS names only.
	// It must be in the issuer's trust domain.
	Identity spiffeid.ID
	// DNSNames are DNS SANs (a control plane's serving certificate).
	DNSNames []string
	// PublicKey is the key to certify; it must be one the policy accepts.
	PublicKey crypto.PublicKey
	// CSR is the request in DER for remote backends, which sign a CSR.
	CSR []byte
	// Lifetime is the requested lifetime: ≤ 0 means the policy's default,
	// more than the policy's maximum is shortened to it (Kubernetes treats
	// requested lifetimes as advisory, so they are never refused).
	Lifetime time.Duration
	// MaxLifetime, if set, bounds NotAfter−NotBefore, clock-skew backdating
	// included (a PodCertificateRequest's maxExpirationSeconds).
	MaxLifetime time.Duration
	// MinLifetime, if set, is the shortest NotAfter−NotBefore the requester
	// accepts; a leaf cut shorter by its CA's end is withheld (ErrInternal).
	MinLifetime time.Duration
}

// IssueGrant runs the pipeline for req: admission (ErrOverloaded), req's
// Authorize, the key check, the profile with the granted names, signing, the
// result check, then the audit record (Kind csr, auth_method req.Method) and
// the metrics. As with Issue, every outcome is audited and a certificate is
// returned only once its record is committed.
func (is *Issuer) IssueGrant(ctx context.Context, req GrantRequest) (*Issued, error) {
	rec := is.newRecord(req.Peer, req.ClusterID)
	rec.AuthMethod, rec.Caller, rec.RequestedIdentity = req.Method, storage.Sanitize(req.Caller, storage.MaxNameLen), storage.Sanitize(req.Requested, storage.MaxNameLen)
	return is.run(ctx, rec, func(ctx context.Context) (*Issued, error) { return is.issueGrant(ctx, req, rec) })
}

// issueGrant does the work of IssueGrant between admission and audit.
func (is *Issuer) issueGrant(ctx context.Context, req GrantRequest, rec *storage.Record) (*Issued, error) {
	g, err := req.Authorize(ctx)
	if err != nil {
		return nil, err
	}
	rec.GrantedIdentity = storage.Sanitize(grantedNames(g), storage.MaxNameLen)
	switch {
	case g.Identity.IsZero() && len(g.DNSNames) == 0:
		return nil, Refuse(ErrInvalidRequest, ReasonNoNames, errors.New("the grant names no identity and no DNS name"))
	case !g.Identity.IsZero() && g.Identity.TrustDomain() != is.cfg.TrustDomain:
		return nil, Refuse(ErrPermissionDenied, ReasonBadIdentity, fmt.Errorf("%s is not in trust domain %s", g.Identity, is.cfg.TrustDomain.Name()))
	}
	if err := CheckPublicKey(g.PublicKey); err != nil {
		return nil, Refuse(ErrInvalidRequest, ReasonKeyType, err)
	}
	ttl, err := is.grantTTL(g)
	if err != nil {
		return nil, err
	}
	st, err := is.State()
	if err != nil {
		return nil, err
	}
	rec.Signer = st.Backend
	tmpl := LeafTemplate(g.Identity, g.PublicKey, nil, time.Time{}, time.Time{})
	if g.Identity.IsZero() {
		tmpl.URIs = nil
	}
	tmpl.DNSNames = g.DNSNames
	chain, err := is.sign(ctx, st, signer.SignRequest{PublicKey: g.PublicKey, CSR: g.CSR, Identity: g.Identity, TTL: ttl}, tmpl)
	if err != nil {
		return nil, err
	}
	if life := chain.Leaf.NotAfter.Sub(chain.Leaf.NotBefore); life < g.MinLifetime {
		return nil, Refuse(ErrInternal, ReasonShortLifetime,
			fmt.Errorf("the leaf lives %s (its CA ends %s), the request needs at least %s", life, chain.Leaf.NotAfter.UTC().Format(time.RFC3339), g.MinLifetime))
	}
	fillRecord(rec, chain)
	return &Issued{Chain: chain, Elements: Elements(chain, st)}, nil
}

// grantTTL is the lifetime counted from now: the requested one within the
// policy (shortened, never refused), so that the whole validity, backdating
// included, stays within g.MaxLifetime.
func (is *Issuer) grantTTL(g *Grant) (time.Duration, error) {
	policy := is.cfg.TTL
	policy.Mode = TTLClamp
	ttl, err := policy.Grant(int64(g.Lifetime / time.Second))
	if err != nil {
		return 0, Refuse(ErrInvalidRequest, ReasonTTL, err)
	}
	if g.MaxLifetime > 0 && ttl+is.cfg.ClockSkew > g.MaxLifetime {
		ttl = g.MaxLifetime - is.cfg.ClockSkew
	}
	if ttl <= 0 {
		return 0, Refuse(ErrInvalidRequest, ReasonTTL,
			fmt.Errorf("a maximum lifetime of %s leaves nothing after the clock-skew allowance %s", g.MaxLifetime, is.cfg.ClockSkew))
	}
	return ttl, nil
}

// grantedNames is how the record names what a grant certifies: the SPIFFE
// ID, else "dns:" and the DNS names.
func grantedNames(g *Grant) string {
	if !g.Identity.IsZero() {
		return g.Identity.String()
	}
	if len(g.DNSNames) == 0 {
		return ""
	}
	return "dns:" + strings.Join(g.DNSNames, ",")
}
