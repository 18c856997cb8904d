package kubesign

import (
	"context"
	"crypto"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"time"

	"github.com/castellan-ca/castellan/authn"
	"github.com/castellan-ca/castellan/authn/kube"
	"github.com/castellan-ca/castellan/ca"
	"github.com/castellan-ca/castellan/signer"
	certv1 "k8s.io/api/certificates/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"
)

// DefaultPodSignerName is the signer name PodCertificates answers by default.
const DefaultPodSignerName = "castellan.io/workload-identity"

// MethodPCR is the audit auth_method of PodCertificateRequests.
const MethodPCR = "kubernetes.pcr"

// What the apiserver accepts in a PodCertificateRequest's answer.
const (
	// minPodCertLifetime is the shortest certificate it accepts.
	minPodCertLifetime = time.Hour
	// defaultMaxExpiration is maxExpirationSeconds when the spec has none.
	defaultMaxExpiration = 24 * time.Hour
	// refreshMargin: beginRefreshAt lies at least this far from both ends.
	refreshMargin = 10 * time.Minute
	// notBeforeWindow: notBefore must be within 5 minutes of the apiserver's
	// clock, so a certificate whose status write failed is written again
	// only while its notBefore (backdated by the clock skew) is this young.
	notBeforeWindow = 4 * time.Minute
)

// fieldManager names Castellan in the managed fields of what it writes.
const fieldManager = "castellan"

// PodCache is the pod informer cache (authn/kube.Pods).
type PodCache interface {
	Get(ns, name string) (*corev1.Pod, bool)
	HasSynced() bool
}

// PodCertificates answers the PodCertificateRequests of SignerNames: the
// identity is spiffe://<trust domain>/ns/<namespace>/sa/<serviceAccountName>
// from the request's spec, granted only while the pod it names exists with
// that UID, service account and node and mounts a podCertificate volume of
// the signer (NodeRestriction checks this only for kubelets, and the pod may
// have changed since). The key is the request's (proof of possession is the
// apiserver's check); its type must be one the policy accepts, else the
// request is Denied with reason UnsupportedKeyType. The lifetime is the
// lesser of maxExpirationSeconds and the policy's maximum. Each request gets
// one status update: Issued with the chain, notBefore, notAfter and
// beginRefreshAt of the leaf, or Denied or Failed with a reason.
type PodCertificates struct {
	Client kubernetes.Interface
	Issuer Issuer
	Pods   PodCache
	// SignerNames are the signer names answered (default DefaultPodSignerName).
	SignerNames []string
	// ClusterID names the cluster in audit records.
	ClusterID string
	// Workers is how many requests are signed at once (default DefaultWorkers).
	Workers int
	// RetryWindow bounds retries after transient failures (default DefaultRetryWindow).
	RetryWindow time.Duration
	Metrics     *Metrics
	Logger      *slog.Logger
	Now         func() time.Time
}

// podSigner is one run of PodCertificates.
type podSigner struct {
	*PodCertificates
	*answerer
	api     pcrAPI
	listers []func(ns, name string) (*request, bool)
}

// Run answers requests until ctx ends. It returns ErrNotServed when the
// apiserver serves no PodCertificateRequest API, or an error when its caches
// cannot sync.
func (p *PodCertificates) Run(ctx context.Context) error {
	s := &podSigner{PodCertificates: p}
	s.fill()
	api, err := discoverPCR(p.Client.Discovery())
	if err != nil {
		return err
	}
	s.api = api
	c := newController("podcertificaterequests", s.Workers, s.Logger)
	synced := []cache.InformerSynced{s.Pods.HasSynced}
	for _, name := range s.SignerNames {
		f := informers.NewSharedInformerFactoryWithOptions(s.Client, 0, informers.WithTweakListOptions(func(o *metav1.ListOptions) {
			o.FieldSelector = fields.OneTermEqualSelector("spec.signerName", name).String()
		}))
		var inf cache.SharedIndexInformer
		if api.v1 {
			i := f.Certificates().V1().PodCertificateRequests()
			inf, s.listers = i.Informer(), append(s.listers, func(ns, n string) (*request, bool) {
				r, err := i.Lister().PodCertificateRequests(ns).Get(n)
				return &request{PodCertificateRequest: r}, err == nil
			})
		} else {
			i := f.Certificates().V1beta1().PodCertificateRequests()
			inf, s.listers = i.Informer(), append(s.listers, func(ns, n string) (*request, bool) {
				r, err := i.Lister().PodCertificateRequests(ns).Get(n)
				if err != nil {
					return nil, false
				}
				return fromBeta(r), true
			})
		}
		if _, err := inf.AddEventHandler(c.handlers()); err != nil {
			return err
		}
		synced = append(synced, inf.HasSynced)
		f.Start(ctx.Done())
		defer f.Shutdown()
	}
	if err := waitSynced(ctx, "podcertificaterequests", synced...); err != nil || ctx.Err() != nil {
		return err
	}
	version := "v1"
	if !api.v1 {
		version = "v1beta1"
	}
	s.Logger.Info("podcertificaterequest signer running", "signers", strings.Join(s.SignerNames, ","), "version", version, "v1beta1_served", api.v1beta1)
	c.handle, c.stopped = s.handle, s.abandon
	c.run(ctx)
	return nil
}

func (s *podSigner) fill() {
	if len(s.SignerNames) == 0 {
		s.SignerNames = []string{DefaultPodSignerName}
	}
	s.answerer = newAnswerer(apiPCR, s.Issuer, s.Metrics, &s.Workers, &s.RetryWindow, &s.Logger, &s.Now)
	s.reusable = func(out *ca.Issued, now time.Time) bool { return now.Sub(out.Chain.Leaf.NotBefore) < notBeforeWindow }
}

// handle answers the request with key, unless it has its answer; true
// means try again later.
func (s *podSigner) handle(ctx context.Context, key string) bool {
	ns, name, err := cache.SplitMetaNamespaceKey(key)
	if err != nil {
		return false
	}
	var req *request
	for _, get := range s.listers {
		if r, ok := get(ns, name); ok {
			req = r
			break
		}
	}
	if req == nil || req.final() || s.answers.answered(req.UID) || !slices.Contains(s.SignerNames, req.Spec.SignerName) {
		return false
	}
	if req.needsBeta() && s.api.v1beta1 {
		cctx, cancel := context.WithTimeout(ctx, callTimeout)
		defer cancel()
		beta, err := get(cctx, s.Client, ns, name, true)
		switch {
		case apierrors.IsNotFound(err):
			return false
		case err != nil:
			s.Logger.Warn("podcertificaterequest not read through v1beta1; retrying", "request", key, "error", err)
			return true
		}
		req = beta
	}
	return s.respond(ctx, pcrTarget{s: s, req: req})
}

// pcrTarget is one PodCertificateRequest being answered.
type pcrTarget struct {
	s   *podSigner
	req *request
}

func (t pcrTarget) id() string         { return "podcertificaterequest " + t.req.Namespace + "/" + t.req.Name }
func (t pcrTarget) uid() types.UID     { return t.req.UID }
func (t pcrTarget) signerName() string { return t.req.Spec.SignerName }
func (t pcrTarget) since() time.Time   { return t.req.CreationTimestamp.Time }

func (t pcrTarget) grant() ca.GrantRequest {
	req := t.req
	return ca.GrantRequest{
		Method: MethodPCR, ClusterID: t.s.ClusterID,
		Caller:    fmt.Sprintf("pod %s/%s (%s) on node %s", req.Namespace, req.Spec.PodName, req.Spec.PodUID, req.Spec.NodeName),
		Peer:      fmt.Sprintf("pcr/%s/%s/%s", req.Namespace, req.Name, req.UID),
		Requested: fmt.Sprintf("spiffe://%s/ns/%s/sa/%s", t.s.Issuer.TrustDomain().Name(), req.Namespace, req.Spec.ServiceAccountName),
		Authorize: func(ctx context.Context) (*ca.Grant, error) { return t.s.authorize(ctx, req) },
	}
}

// issue writes the chain (leaf and intermediates: the kubelet presents them
// in TLS handshakes), the leaf's validity and when to renew, and Issued.
func (t pcrTarget) issue(ctx context.Context, out *ca.Issued) error {
	leaf := out.Chain.Leaf
	nb, na, refresh := metav1.NewTime(leaf.NotBefore), metav1.NewTime(leaf.NotAfter), metav1.NewTime(refreshAt(leaf))
	return t.s.write(ctx, t.req, certv1.PodCertificateRequestStatus{
		Conditions: []metav1.Condition{{
			Type: certv1.PodCertificateRequestConditionTypeIssued, Status: metav1.ConditionTrue, Reason: "Issued",
			Message:            fmt.Sprintf("issued %s, serial %s", out.Record.GrantedIdentity, out.Record.Serial),
			LastTransitionTime: metav1.NewTime(t.s.Now()), ObservedGeneration: t.req.Generation,
		}},
		CertificateChain: signer.EncodePEM(append([]*x509.Certificate{leaf}, out.Chain.Intermediates...)...),
		NotBefore:        &nb, NotAfter: &na, BeginRefreshAt: &refresh,
	})
}

// refuse writes Denied or Failed, and nothing else, as the API requires.
func (t pcrTarget) refuse(ctx context.Context, err error, fail bool) (string, error) {
	typ, v := certv1.PodCertificateRequestConditionTypeDenied, denied
	if fail {
		typ, v = certv1.PodCertificateRequestConditionTypeFailed, failed
	}
	reason := conditionReason(err, v)
	return reason, t.s.write(ctx, t.req, certv1.PodCertificateRequestStatus{Conditions: []metav1.Condition{{
		Type: typ, Status: metav1.ConditionTrue, Reason: reason, Message: message(err),
		LastTransitionTime: metav1.NewTime(t.s.Now()), ObservedGeneration: t.req.Generation,
	}}})
}

// write updates req's status to st. On a conflict it reads the request
// again and retries, unless it was answered or deleted meanwhile (errAnswered).
func (s *podSigner) write(ctx context.Context, req *request, st certv1.PodCertificateRequestStatus) error {
	for range 3 {
		cctx, cancel := context.WithTimeout(ctx, callTimeout)
		err := updateStatus(cctx, s.Client, req, st)
		if err == nil || !apierrors.IsConflict(err) {
			cancel()
			if apierrors.IsNotFound(err) {
				return fmt.Errorf("%w: deleted", errAnswered)
			}
			return err
		}
		fresh, err := get(cctx, s.Client, req.Namespace, req.Name, req.beta != nil)
		cancel()
		switch {
		case apierrors.IsNotFound(err):
			return fmt.Errorf("%w: deleted", errAnswered)
		case err != nil:
			return err
		case fresh.UID != req.UID || fresh.final():
			return fmt.Errorf("%w: by another writer", errAnswered)
		}
		req = fresh
	}
	return errors.New("status update kept conflicting")
}

// authorize decides what req may be granted: the pod's identity, if the
// pod is the one the request names.
func (s *podSigner) authorize(ctx context.Context, req *request) (*ca.Grant, error) {
	if n := len(req.Spec.UnverifiedUserAnnotations); n > 0 {
		return nil, ca.Refuse(ca.ErrInvalidRequest, reasonPCRAnnotations,
			fmt.Errorf("%d unverifiedUserAnnotations given; this signer recognizes none", n))
	}
	id, err := authn.WorkloadID(s.Issuer.TrustDomain(), req.Namespace, req.Spec.ServiceAccountName)
	if err != nil {
		return nil, ca.Refuse(ca.ErrInvalidRequest, ca.ReasonBadIdentity, err)
	}
	if err := s.checkPod(ctx, req); err != nil {
		return nil, err
	}
	pub, csr, err := publicKey(req)
	if err != nil {
		return nil, ca.Refuse(ca.ErrInvalidRequest, reasonPCRRequest, err)
	}
	maxLife := defaultMaxExpiration
	if m := req.Spec.MaxExpirationSeconds; m != nil {
		maxLife = time.Duration(*m) * time.Second
	}
	return &ca.Grant{Identity: id, PublicKey: pub, CSR: csr, Lifetime: maxLife, MaxLifetime: maxLife, MinLifetime: minPodCertLifetime}, nil
}

// checkPod checks the pod req names, as it is now: in the cache, or, when
// the cache disagrees (a pod created moments ago, or deleted, or replaced),
// as the apiserver has it.
func (s *podSigner) checkPod(ctx context.Context, req *request) error {
	spec := req.Spec
	pod, ok := s.Pods.Get(req.Namespace, spec.PodName)
	if !ok || pod.UID != spec.PodUID {
		cctx, cancel := context.WithTimeout(ctx, callTimeout)
		defer cancel()
		var err error
		pod, err = s.Client.CoreV1().Pods(req.Namespace).Get(cctx, spec.PodName, metav1.GetOptions{})
		switch {
		case apierrors.IsNotFound(err):
			return ca.Refuse(ca.ErrPermissionDenied, reasonPodNotFound, fmt.Errorf("pod %s/%s does not exist", req.Namespace, spec.PodName))
		case err != nil:
			return ca.Refuse(ca.ErrUnavailable, reasonPodLookup, fmt.Errorf("get pod %s/%s: %w", req.Namespace, spec.PodName, err))
		}
	}
	return podMatches(pod, req)
}

// podMatches checks that pod is the one req was made for, as it runs now.
func podMatches(pod *corev1.Pod, req *request) error {
	spec, what := req.Spec, "pod "+req.Namespace+"/"+req.Spec.PodName
	sa := pod.Spec.ServiceAccountName
	if sa == "" {
		sa = "default"
	}
	switch {
	case pod.UID != spec.PodUID:
		return ca.Refuse(ca.ErrPermissionDenied, reasonPodUID, fmt.Errorf("%s has UID %s, the request names %s (deleted and re-created)", what, pod.UID, spec.PodUID))
	case sa != spec.ServiceAccountName:
		return ca.Refuse(ca.ErrPermissionDenied, reasonPodServiceAccount, fmt.Errorf("%s runs as service account %q, the request names %q", what, sa, spec.ServiceAccountName))
	case pod.Spec.NodeName != string(spec.NodeName):
		return ca.Refuse(ca.ErrPermissionDenied, reasonPodNode, fmt.Errorf("%s is on node %q, the request names %q", what, pod.Spec.NodeName, spec.NodeName))
	case pod.Status.Phase == corev1.PodSucceeded || pod.Status.Phase == corev1.PodFailed:
		return ca.Refuse(ca.ErrPermissionDenied, reasonPodFinished, fmt.Errorf("%s has finished (%s)", what, pod.Status.Phase))
	case !kube.MountsPodCertificate(pod, spec.SignerName):
		return ca.Refuse(ca.ErrPermissionDenied, reasonPodVolume, fmt.Errorf("%s mounts no podCertificate volume of signer %s", what, spec.SignerName))
	}
	return nil
}

// publicKey is the key req asks to certify and, when it came in a stub
// PKCS#10 request, that request (remote backends sign a CSR). The apiserver
// verified the proof of possession at admission; the stub's signature is
// checked again here all the same.
func publicKey(req *request) (crypto.PublicKey, []byte, error) {
	if stub := req.Spec.StubPKCS10Request; len(stub) > 0 {
		csr, err := x509.ParseCertificateRequest(stub)
		if err != nil {
			return nil, nil, fmt.Errorf("stubPKCS10Request: %w", err)
		}
		if err := csr.CheckSignature(); err != nil {
			return nil, nil, fmt.Errorf("stubPKCS10Request signature: %w", err)
		}
		return csr.PublicKey, stub, nil
	}
	if len(req.pkix) > 0 {
		pub, err := x509.ParsePKIXPublicKey(req.pkix)
		if err != nil {
			return nil, nil, fmt.Errorf("pkixPublicKey: %w", err)
		}
		return pub, nil, nil
	}
	return nil, nil, errors.New("the request carries no public key: stubPKCS10Request is empty, and pkixPublicKey (a request made through v1beta1) cannot be read because the apiserver does not serve v1beta1")
}

// refreshAt is when the kubelet should renew leaf: half-way through its
// life (as Istio's agents renew), within the bounds the apiserver accepts.
func refreshAt(leaf *x509.Certificate) time.Time {
	nb, na := leaf.NotBefore, leaf.NotAfter
	at := nb.Add(na.Sub(nb) / 2).Truncate(time.Second)
	if lo := nb.Add(refreshMargin); at.Before(lo) {
		at = lo
	}
	if hi := na.Add(-refreshMargin); at.After(hi) {
		at = hi
	}
	return at
}
