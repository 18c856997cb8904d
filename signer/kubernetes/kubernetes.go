// Package kubernetes signs workload certificates through the Kubernetes
// certificates.k8s.io/v1 CertificateSigningRequest API: the cluster's signer
// for a configured signer name (the cluster's CA, another Castellan, any
// signer controller) is Castellan's CA. Castellan still decides every
// certificate: it forwards only a CSR that names exactly the granted SANs,
// asks for the granted lifetime and the profile's usages, and the issuer
// re-checks whatever comes back (ca.CheckIssued) against the trust bundle,
// which comes from configured roots, never from the cluster's answer.
//
// Each Sign creates a CSR, approves it when configured to (the signer's
// Kubernetes identity then needs `approve` on the signer name), waits for
// status.certificate up to a deadline, and deletes the CSR whatever happened.
package kubernetes

import (
	"bytes"
	"context"
	"crypto/rsa"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/castellan-ca/castellan/signer"
	certv1 "k8s.io/api/certificates/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/watch"
	k8s "k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"
	watchtools "k8s.io/client-go/tools/watch"
)

// Backend names this signer in audit records and configuration.
const Backend = "kubernetes"

// Defaults of Config.
const (
	// DefaultTimeout bounds one signing: create, approve, wait, delete.
	DefaultTimeout = 30 * time.Second
	// DefaultRefreshInterval is how often RootsFile is re-read.
	DefaultRefreshInterval = time.Minute
)

// minExpiration is the shortest expirationSeconds the API accepts.
const minExpiration = 10 * time.Minute

// managedBy labels the CSRs this signer creates.
var managedBy = map[string]string{"app.kubernetes.io/managed-by": "castellan"}

// Config says which signer to ask and how.
type Config struct {
	// Client is the cluster's API client; it needs create, get, watch and
	// delete on certificatesigningrequests (and, with Approve, update of
	// certificatesigningrequests/approval and `approve` on the signer name).
	Client k8s.Interface
	// SignerName is the CSRs' spec.signerName; kubernetes.io signers are
	// refused (theirs is not a workload profile).
	SignerName string
	// Approve has Castellan approve its own CSRs, as istiod's RA mode does;
	// otherwise an approver in the cluster must.
	Approve bool
	// RootsFile holds the PEM roots the signer's certificates chain to: the
	// trust bundle. It is re-read every RefreshInterval.
	RootsFile string
	// Timeout bounds one Sign; the certificate's lifetime is asked for
	// Timeout short, since the cluster's signer counts it from when it signs.
	Timeout         time.Duration
	RefreshInterval time.Duration
	// OnChange is called (from Run's goroutine) after TrustBundle changed.
	OnChange func()
	Logger   *slog.Logger
}

// Signer is a signer.Signer backed by a cluster's CSR API; safe for
// concurrent use.
type Signer struct {
	cfg Config
	log *slog.Logger

	mu    sync.RWMutex
	roots []*x509.Certificate
	raw   []byte
}

var _ signer.Signer = (*Signer)(nil)

// New checks cfg and reads the roots, so a misconfiguration fails at
// start-up. Call Run to keep the roots current.
func New(cfg Config) (*Signer, error) {
	switch {
	case cfg.Client == nil:
		return nil, errors.New("kubernetes signer: client is required")
	case cfg.SignerName == "" || !strings.Contains(cfg.SignerName, "/"):
		return nil, fmt.Errorf("kubernetes signer: signer name %q is not <domain>/<path>", cfg.SignerName)
	case reserved(cfg.SignerName):
		return nil, fmt.Errorf("kubernetes signer: %s is a Kubernetes signer, whose certificates carry the requester's name, not the workload profile", cfg.SignerName)
	case cfg.RootsFile == "":
		return nil, errors.New("kubernetes signer: a roots file (the signer's trust bundle) is required")
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
	s := &Signer{cfg: cfg, log: cfg.Logger.With("signer", Backend, "signer_name", cfg.SignerName)}
	if _, err := s.refresh(context.Background()); err != nil {
		return nil, fmt.Errorf("kubernetes signer: %w", err)
	}
	return s, nil
}

func reserved(name string) bool {
	domain, _, _ := strings.Cut(name, "/")
	return domain == "kubernetes.io" || strings.HasSuffix(domain, ".kubernetes.io")
}

// Run re-reads the roots file every RefreshInterval until ctx ends.
func (s *Signer) Run(ctx context.Context) {
	signer.RefreshLoop(ctx, s.cfg.RefreshInterval, nil, s.refresh,
		func(err error) { s.log.Warn("roots file not re-read; keeping the current roots", "error", err) },
		func() {
			s.log.Info("trust bundle changed", "roots", len(s.TrustBundle()))
			if s.cfg.OnChange != nil {
				s.cfg.OnChange()
			}
		})
}

// refresh reads the roots file; true when the roots changed.
func (s *Signer) refresh(context.Context) (bool, error) {
	raw, err := os.ReadFile(s.cfg.RootsFile)
	if err != nil {
		return false, fmt.Errorf("roots file: %w", err)
	}
	s.mu.RLock()
	same := bytes.Equal(raw, s.raw)
	s.mu.RUnlock()
	if same {
		return false, nil
	}
	certs, err := signer.ParseCertificatesPEM(raw)
	if err != nil {
		return false, fmt.Errorf("roots file %s: %w", s.cfg.RootsFile, err)
	}
	for _, c := range certs {
		if !c.IsCA {
			return false, fmt.Errorf("roots file %s: %q is not a CA", s.cfg.RootsFile, c.Subject)
		}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	changed := s.raw != nil && !signer.SameCertificates(s.roots, certs)
	s.roots, s.raw = certs, raw
	return changed, nil
}

// TrustBundle returns the configured roots.
func (s *Signer) TrustBundle() []*x509.Certificate {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return slices.Clone(s.roots)
}

// Sign has the cluster's signer sign req.CSR. The CSR must name exactly the
// template's SANs (the cluster's signer can read names only from it); the
// lifetime asked for ends no later than the template's NotAfter. Outages,
// timeouts and the apiserver's 5xx and 429 wrap signer.ErrSignerUnavailable;
// refusals (RBAC, a Denied or Failed CSR) do not.
func (s *Signer) Sign(ctx context.Context, req signer.SignRequest) (*signer.Chain, error) {
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("kubernetes signer: %w", err)
	}
	if req.Template == nil || len(req.CSR) == 0 {
		return nil, errors.New("kubernetes signer: template and CSR are required")
	}
	if err := namesMatch(req.CSR, req.Template); err != nil {
		return nil, fmt.Errorf("kubernetes signer: %w", err)
	}
	life := time.Until(req.Template.NotAfter) - s.cfg.Timeout
	if life < minExpiration {
		return nil, fmt.Errorf("kubernetes signer: a lifetime of %s is too short: the CSR API's minimum is %s, and the lifetime is asked for %s (the timeout) short",
			time.Until(req.Template.NotAfter).Round(time.Second), minExpiration, s.cfg.Timeout)
	}
	ctx, cancel := context.WithTimeout(ctx, s.cfg.Timeout)
	defer cancel()
	csrs := s.cfg.Client.CertificatesV1().CertificateSigningRequests()
	created, err := csrs.Create(ctx, &certv1.CertificateSigningRequest{
		ObjectMeta: metav1.ObjectMeta{GenerateName: "castellan-", Labels: managedBy},
		Spec: certv1.CertificateSigningRequestSpec{
			Request:           pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: req.CSR}),
			SignerName:        s.cfg.SignerName,
			ExpirationSeconds: ptrInt32(int32(min(life, time.Duration(1<<31-1)*time.Second) / time.Second)),
			Usages:            usages(req),
		},
	}, metav1.CreateOptions{FieldManager: "castellan"})
	if err != nil {
		return nil, classify(ctx, "create CSR", err)
	}
	defer s.remove(ctx, created.Name)
	if s.cfg.Approve {
		approval := created.DeepCopy()
		approval.Status.Conditions = append(approval.Status.Conditions, certv1.CertificateSigningRequestCondition{
			Type: certv1.CertificateApproved, Status: corev1.ConditionTrue, Reason: "CastellanApproved",
			Message: "requested and approved by Castellan for " + req.Identity.String(), LastUpdateTime: metav1.Now(),
		})
		if _, err := csrs.UpdateApproval(ctx, created.Name, approval, metav1.UpdateOptions{FieldManager: "castellan"}); err != nil {
			return nil, classify(ctx, "approve CSR "+created.Name, err)
		}
	}
	pemChain, err := s.wait(ctx, created)
	if err != nil {
		return nil, err
	}
	certs, err := signer.ParseCertificatesPEM(pemChain)
	if err != nil {
		return nil, fmt.Errorf("kubernetes signer: CSR %s: status.certificate: %w", created.Name, err)
	}
	inter, _ := signer.SplitRoots(certs[1:])
	return &signer.Chain{Leaf: certs[0], Intermediates: inter}, nil
}

// wait watches csr until it has a certificate, is denied or failed, or ctx ends.
func (s *Signer) wait(ctx context.Context, csr *certv1.CertificateSigningRequest) ([]byte, error) {
	csrs := s.cfg.Client.CertificatesV1().CertificateSigningRequests()
	lw := &cache.ListWatch{WatchFuncWithContext: func(ctx context.Context, o metav1.ListOptions) (watch.Interface, error) {
		o.FieldSelector = fields.OneTermEqualSelector("metadata.name", csr.Name).String()
		return csrs.Watch(ctx, o)
	}}
	var answer []byte
	var refusal error
	_, err := watchtools.Until(ctx, csr.ResourceVersion, lw, func(ev watch.Event) (bool, error) {
		c, ok := ev.Object.(*certv1.CertificateSigningRequest)
		switch {
		case ev.Type == watch.Deleted:
			return false, fmt.Errorf("CSR %s was deleted before it was signed", csr.Name)
		case !ok:
			return false, nil
		case len(c.Status.Certificate) > 0:
			answer = c.Status.Certificate
			return true, nil
		}
		for _, cond := range c.Status.Conditions {
			if cond.Type == certv1.CertificateDenied || cond.Type == certv1.CertificateFailed {
				refusal = fmt.Errorf("kubernetes signer: CSR %s %s: %s: %s", csr.Name, strings.ToLower(string(cond.Type)), cond.Reason, cond.Message)
				return true, nil
			}
		}
		return false, nil
	})
	switch {
	case refusal != nil:
		return nil, refusal
	case err == nil:
		return answer, nil
	case ctx.Err() != nil && !errors.Is(context.Cause(ctx), context.DeadlineExceeded):
		return nil, fmt.Errorf("kubernetes signer: %w", ctx.Err()) // the caller gave up
	case ctx.Err() != nil, errors.Is(err, watchtools.ErrWatchClosed):
		return nil, fmt.Errorf("kubernetes signer: %w: CSR %s not signed within %s (is the signer %s running, and the CSR approved?)",
			signer.ErrSignerUnavailable, csr.Name, s.cfg.Timeout, s.cfg.SignerName)
	}
	return nil, classify(ctx, "watch CSR "+csr.Name, err)
}

// remove deletes the CSR, whatever became of the signing: its certificate
// is in the audit log, and a cluster keeps no trail of Castellan's requests.
func (s *Signer) remove(ctx context.Context, name string) {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
	defer cancel()
	err := s.cfg.Client.CertificatesV1().CertificateSigningRequests().Delete(ctx, name, metav1.DeleteOptions{})
	if err != nil && !apierrors.IsNotFound(err) {
		s.log.Warn("CSR not deleted", "csr", name, "error", err)
	}
}

// namesMatch checks that the CSR asks for exactly the template's SANs.
func namesMatch(der []byte, tmpl *x509.Certificate) error {
	csr, err := x509.ParseCertificateRequest(der)
	if err != nil {
		return fmt.Errorf("parse CSR: %w", err)
	}
	str := func(certURIs []string, dns []string) string { return fmt.Sprintf("URI %v DNS %v", certURIs, dns) }
	var got, want []string
	for _, u := range csr.URIs {
		got = append(got, u.String())
	}
	for _, u := range tmpl.URIs {
		want = append(want, u.String())
	}
	if !slices.Equal(got, want) || !slices.Equal(csr.DNSNames, tmpl.DNSNames) || len(csr.IPAddresses)+len(csr.EmailAddresses) > 0 {
		return fmt.Errorf("the CSR asks for %s, the grant is %s: the cluster's signer reads names only from the CSR, so it must carry exactly the granted ones",
			str(got, csr.DNSNames), str(want, tmpl.DNSNames))
	}
	return nil
}

// usages are the key usages of the workload profile for req's key.
func usages(req signer.SignRequest) []certv1.KeyUsage {
	u := []certv1.KeyUsage{certv1.UsageDigitalSignature}
	if _, isRSA := req.PublicKey.(*rsa.PublicKey); isRSA {
		u = append(u, certv1.UsageKeyEncipherment)
	}
	for _, e := range req.Template.ExtKeyUsage {
		switch e {
		case x509.ExtKeyUsageServerAuth:
			u = append(u, certv1.UsageServerAuth)
		case x509.ExtKeyUsageClientAuth:
			u = append(u, certv1.UsageClientAuth)
		}
	}
	return u
}

// classify wraps an apiserver error: no answer, a timeout, 429 or 5xx wrap
// signer.ErrSignerUnavailable; the caller's own cancellation stays a context
// error; other answers (RBAC, validation) are returned as they are.
func classify(ctx context.Context, what string, err error) error {
	var netErr net.Error
	switch {
	case ctx.Err() != nil && !errors.Is(context.Cause(ctx), context.DeadlineExceeded):
		return fmt.Errorf("kubernetes signer: %s: %w", what, ctx.Err())
	case apierrors.IsTooManyRequests(err), apierrors.IsServerTimeout(err), apierrors.IsTimeout(err),
		apierrors.IsInternalError(err), apierrors.IsServiceUnavailable(err), apierrors.IsUnexpectedServerError(err),
		errors.As(err, &netErr), errors.Is(err, context.DeadlineExceeded), isStatus5xx(err):
		return fmt.Errorf("kubernetes signer: %s: %w: %w", what, signer.ErrSignerUnavailable, err)
	}
	return fmt.Errorf("kubernetes signer: %s: %w", what, err)
}

func isStatus5xx(err error) bool {
	var st apierrors.APIStatus
	return errors.As(err, &st) && st.Status().Code >= 500
}

func ptrInt32(v int32) *int32 { return &v }
