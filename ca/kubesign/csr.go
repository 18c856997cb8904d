package kubesign

import (
	"context"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"slices"
	"strings"
	"time"

	"github.com/castellan-ca/castellan/authn"
	"github.com/castellan-ca/castellan/ca"
	"github.com/castellan-ca/castellan/signer"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	certv1 "k8s.io/api/certificates/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	listerscertv1 "k8s.io/client-go/listers/certificates/v1"
	"k8s.io/client-go/tools/cache"
)

// MethodCSR is the audit auth_method of CertificateSigningRequests.
const MethodCSR = "kubernetes.csr"

// Which SPIFFE IDs a CSR signer name may certify (CSRPolicy.Identities).
const (
	// IdentitiesWorkload: a workload ID of the trust domain,
	// spiffe://<td>/ns/<namespace>/sa/<service account> (istiod's RA mode).
	IdentitiesWorkload = "workload"
	// IdentitiesTrustDomain: any SPIFFE ID of the trust domain (another
	// Castellan signing through this one: its operator and endpoint IDs too).
	IdentitiesTrustDomain = "trustDomain"
	// IdentitiesNone: no URI SAN (DNS certificates only).
	IdentitiesNone = "none"
)

// allowedUsages are the key usages a CSR may ask for: those of the workload
// profile (DESIGN.md §4). The certificate carries the profile's usages,
// whatever subset was asked for.
var allowedUsages = []certv1.KeyUsage{certv1.UsageDigitalSignature, certv1.UsageKeyEncipherment,
	certv1.UsageServerAuth, certv1.UsageClientAuth}

// CSRPolicy is what one signer name signs, and for whom.
type CSRPolicy struct {
	// SignerName is the CSRs' spec.signerName; never a kubernetes.io one.
	SignerName string
	// Requesters are the users (spec.username) whose CSRs are signed, e.g.
	// system:serviceaccount:istio-system:istiod. Approval alone is not
	// enough: an approver may approve any CSR.
	Requesters []string
	// Identities is IdentitiesWorkload (default), IdentitiesTrustDomain or
	// IdentitiesNone.
	Identities string
	// DNSNames are the DNS SANs that may be asked for (exact names), e.g.
	// istiod's for PILOT_CERT_PROVIDER=k8s.io/<signer>; none by default.
	DNSNames []string
}

// CSRSigners signs the certificates.k8s.io/v1 CertificateSigningRequests of
// its signer names once they are Approved, writing status.certificate (the
// leaf and its intermediates) through /status, or a Failed condition with a
// reason when the requester, the SANs or the usages are not what the
// signer's policy allows. Requests not yet approved, denied or already
// answered are left alone. expirationSeconds is honoured within the policy's
// maximum (shortened, never refused, as the API says it is advisory).
type CSRSigners struct {
	Client  kubernetes.Interface
	Issuer  Issuer
	Signers []CSRPolicy
	// ClusterID names the cluster in audit records.
	ClusterID string
	// Workers is how many requests are signed at once (default DefaultWorkers).
	Workers int
	// RetryWindow bounds retries after transient failures, from approval
	// (default DefaultRetryWindow).
	RetryWindow time.Duration
	Metrics     *Metrics
	Logger      *slog.Logger
	Now         func() time.Time
}

// csrSigner is one run of CSRSigners.
type csrSigner struct {
	*CSRSigners
	*answerer
	policies map[string]CSRPolicy
	listers  []listerscertv1.CertificateSigningRequestLister
}

// Run signs until ctx ends. It returns an error for a policy naming a
// reserved signer, or when its caches cannot sync.
func (c *CSRSigners) Run(ctx context.Context) error {
	s := &csrSigner{CSRSigners: c, policies: map[string]CSRPolicy{}}
	if err := s.fill(); err != nil {
		return err
	}
	ctl := newController("certificatesigningrequests", s.Workers, s.Logger)
	var synced []cache.InformerSynced
	for name := range s.policies {
		f := informers.NewSharedInformerFactoryWithOptions(s.Client, 0, informers.WithTweakListOptions(func(o *metav1.ListOptions) {
			o.FieldSelector = fields.OneTermEqualSelector("spec.signerName", name).String()
		}))
		inf := f.Certificates().V1().CertificateSigningRequests()
		if _, err := inf.Informer().AddEventHandler(ctl.handlers()); err != nil {
			return err
		}
		s.listers = append(s.listers, inf.Lister())
		synced = append(synced, inf.Informer().HasSynced)
		f.Start(ctx.Done())
		defer f.Shutdown()
	}
	if err := waitSynced(ctx, "certificatesigningrequests", synced...); err != nil || ctx.Err() != nil {
		return err
	}
	s.Logger.Info("certificatesigningrequest signer running", "signers", strings.Join(slices.Sorted(maps.Keys(s.policies)), ","))
	ctl.handle, ctl.stopped = s.handle, s.abandon
	ctl.run(ctx)
	return nil
}

func (s *csrSigner) fill() error {
	for _, p := range s.Signers {
		if ReservedSignerName(p.SignerName) {
			return fmt.Errorf("certificatesigningrequest signer %q: signer names of kubernetes.io and k8s.io are Kubernetes' own", p.SignerName)
		}
		if p.Identities == "" {
			p.Identities = IdentitiesWorkload
		}
		s.policies[p.SignerName] = p
	}
	s.answerer = newAnswerer(apiCSR, s.Issuer, s.Metrics, &s.Workers, &s.RetryWindow, &s.Logger, &s.Now)
	return nil
}

// handle signs the approved request with key, unless it is answered.
func (s *csrSigner) handle(ctx context.Context, key string) bool {
	var csr *certv1.CertificateSigningRequest
	for _, l := range s.listers {
		if c, err := l.Get(key); err == nil {
			csr = c
			break
		}
	}
	if csr == nil || !pendingSignature(csr) || s.answers.answered(csr.UID) {
		return false
	}
	if _, ours := s.policies[csr.Spec.SignerName]; !ours || ReservedSignerName(csr.Spec.SignerName) {
		return false
	}
	req, perr := parseRequest(csr.Spec.Request)
	return s.respond(ctx, csrTarget{s: s, csr: csr, req: req, parseErr: perr})
}

// pendingSignature reports whether csr is approved and not yet answered
// (no certificate, not denied, not failed).
func pendingSignature(csr *certv1.CertificateSigningRequest) bool {
	if len(csr.Status.Certificate) > 0 {
		return false
	}
	approved := false
	for _, c := range csr.Status.Conditions {
		switch c.Type {
		case certv1.CertificateDenied, certv1.CertificateFailed:
			return false
		case certv1.CertificateApproved:
			approved = c.Status == corev1.ConditionTrue
		}
	}
	return approved
}

// approvedAt is when csr was approved (its creation if the condition has no time).
func approvedAt(csr *certv1.CertificateSigningRequest) time.Time {
	for _, c := range csr.Status.Conditions {
		if c.Type == certv1.CertificateApproved && !c.LastUpdateTime.IsZero() {
			return c.LastUpdateTime.Time
		}
	}
	return csr.CreationTimestamp.Time
}

// csrTarget is one CertificateSigningRequest being answered.
type csrTarget struct {
	s   *csrSigner
	csr *certv1.CertificateSigningRequest
	// req is spec.request parsed, or why it does not parse.
	req      *x509.CertificateRequest
	parseErr error
}

func (t csrTarget) id() string         { return "certificatesigningrequest " + t.csr.Name }
func (t csrTarget) uid() types.UID     { return t.csr.UID }
func (t csrTarget) signerName() string { return t.csr.Spec.SignerName }
func (t csrTarget) since() time.Time   { return approvedAt(t.csr) }

func (t csrTarget) grant() ca.GrantRequest {
	return ca.GrantRequest{
		Method: MethodCSR, ClusterID: t.s.ClusterID, Caller: t.csr.Spec.Username,
		Peer:      fmt.Sprintf("csr/%s/%s", t.csr.Name, t.csr.UID),
		Requested: requestedNames(t.req),
		Authorize: func(context.Context) (*ca.Grant, error) { return t.s.authorize(t.csr, t.req, t.parseErr) },
	}
}

// issue writes the leaf and its intermediates (not the root: requesters
// verify against the roots they were configured with).
func (t csrTarget) issue(ctx context.Context, out *ca.Issued) error {
	pemChain := signer.EncodePEM(append([]*x509.Certificate{out.Chain.Leaf}, out.Chain.Intermediates...)...)
	return t.s.write(ctx, t.csr, func(csr *certv1.CertificateSigningRequest) { csr.Status.Certificate = []byte(pemChain) })
}

// refuse adds a Failed condition: the signer does not deny (that is the
// approver's word), it fails to sign.
func (t csrTarget) refuse(ctx context.Context, err error, fail bool) (string, error) {
	v := denied
	if fail {
		v = failed
	}
	reason := conditionReason(err, v)
	now := metav1.NewTime(t.s.Now())
	return reason, t.s.write(ctx, t.csr, func(csr *certv1.CertificateSigningRequest) {
		csr.Status.Conditions = append(csr.Status.Conditions, certv1.CertificateSigningRequestCondition{
			Type: certv1.CertificateFailed, Status: corev1.ConditionTrue, Reason: reason, Message: message(err),
			LastUpdateTime: now, LastTransitionTime: now,
		})
	})
}

// write applies set to csr's status and updates it through /status; on a
// conflict it reads the request again and retries, unless it was answered
// or deleted meanwhile (errAnswered).
func (s *csrSigner) write(ctx context.Context, csr *certv1.CertificateSigningRequest, set func(*certv1.CertificateSigningRequest)) error {
	api := s.Client.CertificatesV1().CertificateSigningRequests()
	for range 3 {
		next := csr.DeepCopy()
		set(next)
		cctx, cancel := context.WithTimeout(ctx, callTimeout)
		_, err := api.UpdateStatus(cctx, next, metav1.UpdateOptions{FieldManager: fieldManager})
		if err == nil || !apierrors.IsConflict(err) {
			cancel()
			if apierrors.IsNotFound(err) {
				return fmt.Errorf("%w: deleted", errAnswered)
			}
			return err
		}
		fresh, err := api.Get(cctx, csr.Name, metav1.GetOptions{})
		cancel()
		switch {
		case apierrors.IsNotFound(err):
			return fmt.Errorf("%w: deleted", errAnswered)
		case err != nil:
			return err
		case fresh.UID != csr.UID || !pendingSignature(fresh):
			return fmt.Errorf("%w: by another writer", errAnswered)
		}
		csr = fresh
	}
	return errors.New("status update kept conflicting")
}

// authorize decides what csr may be granted under its signer's policy:
// the requester must be listed; the CSR must parse with a valid signature;
// its usages must be the profile's; each SAN must be allowed, and nothing
// else may be asked for.
func (s *csrSigner) authorize(csr *certv1.CertificateSigningRequest, req *x509.CertificateRequest, parseErr error) (*ca.Grant, error) {
	p, ok := s.policies[csr.Spec.SignerName]
	if !ok {
		return nil, ca.Refuse(ca.ErrPermissionDenied, reasonUnknownSigner, fmt.Errorf("signer %q is not configured", csr.Spec.SignerName))
	}
	if !slices.Contains(p.Requesters, csr.Spec.Username) {
		return nil, ca.Refuse(ca.ErrPermissionDenied, reasonRequester,
			fmt.Errorf("requester %q may not use signer %s", csr.Spec.Username, p.SignerName))
	}
	if parseErr != nil {
		return nil, ca.Refuse(ca.ErrInvalidRequest, reasonCSRParse, parseErr)
	}
	for _, u := range csr.Spec.Usages {
		if !slices.Contains(allowedUsages, u) {
			return nil, ca.Refuse(ca.ErrInvalidRequest, reasonCSRUsages, fmt.Errorf("usage %q is not one of %v", u, allowedUsages))
		}
	}
	id, dns, err := s.names(p, req)
	if err != nil {
		return nil, ca.Refuse(ca.ErrInvalidRequest, reasonCSRSAN, err)
	}
	var life time.Duration
	if e := csr.Spec.ExpirationSeconds; e != nil {
		life = time.Duration(*e) * time.Second
	}
	return &ca.Grant{Identity: id, DNSNames: dns, PublicKey: req.PublicKey, CSR: req.Raw, Lifetime: life}, nil
}

// names checks the CSR's SANs against p: at most one URI, a SPIFFE ID of
// the trust domain of the kind p allows; DNS names from p's list; no IP or
// email SAN; at least one name.
func (s *csrSigner) names(p CSRPolicy, req *x509.CertificateRequest) (spiffeid.ID, []string, error) {
	var id spiffeid.ID
	if len(req.IPAddresses)+len(req.EmailAddresses) > 0 {
		return id, nil, fmt.Errorf("IP and email SANs are not signed (asked: %v %v)", req.IPAddresses, req.EmailAddresses)
	}
	td := s.Issuer.TrustDomain()
	switch len(req.URIs) {
	case 0:
	case 1:
		var err error
		u := req.URIs[0].String()
		switch p.Identities {
		case IdentitiesWorkload:
			id, err = authn.ParseWorkloadID(td, u)
		case IdentitiesTrustDomain:
			if id, err = spiffeid.FromString(u); err == nil && id.TrustDomain() != td {
				err = fmt.Errorf("trust domain %q is not %q", id.TrustDomain().Name(), td.Name())
			}
		default:
			err = errors.New("this signer signs no URI SAN")
		}
		if err != nil {
			return spiffeid.ID{}, nil, fmt.Errorf("URI SAN %q: %w", u, err)
		}
	default:
		return id, nil, fmt.Errorf("%d URI SANs asked for; at most one is signed", len(req.URIs))
	}
	for _, d := range req.DNSNames {
		if !slices.Contains(p.DNSNames, strings.ToLower(d)) {
			return spiffeid.ID{}, nil, fmt.Errorf("DNS SAN %q is not one of this signer's names %v", d, p.DNSNames)
		}
	}
	if id.IsZero() && len(req.DNSNames) == 0 {
		return id, nil, errors.New("the CSR asks for no SAN; the certificate's names come from its SANs, never its subject")
	}
	return id, slices.Compact(slices.Sorted(slices.Values(lower(req.DNSNames)))), nil
}

// parseRequest decodes spec.request: one PEM CERTIFICATE REQUEST with a
// valid signature.
func parseRequest(raw []byte) (*x509.CertificateRequest, error) {
	if len(raw) > ca.MaxCSRBytes {
		return nil, fmt.Errorf("request is %d bytes, limit %d", len(raw), ca.MaxCSRBytes)
	}
	block, _ := pem.Decode(raw)
	if block == nil || block.Type != "CERTIFICATE REQUEST" {
		return nil, errors.New("request is not a PEM CERTIFICATE REQUEST")
	}
	req, err := x509.ParseCertificateRequest(block.Bytes)
	if err != nil {
		return nil, fmt.Errorf("parse request: %w", err)
	}
	if err := req.CheckSignature(); err != nil {
		return nil, fmt.Errorf("request signature: %w", err)
	}
	return req, nil
}

// requestedNames summarizes what an (untrusted) request asks for, for the
// audit record.
func requestedNames(req *x509.CertificateRequest) string {
	if req == nil {
		return ""
	}
	var names []string
	for _, u := range req.URIs {
		names = append(names, u.String())
	}
	for _, d := range req.DNSNames {
		names = append(names, "dns:"+d)
	}
	return strings.Join(names, ",")
}

func lower(ss []string) []string {
	out := make([]string, len(ss))
	for i, s := range ss {
		out[i] = strings.ToLower(s)
	}
	return out
}
