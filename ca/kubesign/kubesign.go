// Package kubesign is Castellan's signer behind Kubernetes' certificate APIs:
// PodCertificateRequests (projected podCertificate volumes, PodCertificates)
// and certificates.k8s.io/v1 CertificateSigningRequests (CSRSigners), for
// the signer names it is configured with. Each request enters the one
// issuance pipeline through ca.Issuer.IssueGrant, so it gets the profile,
// signing, result check, audit record and metrics of every other issuance;
// the controllers decide only what may be granted, and write the answer
// into the object's status once its audit record is committed.
//
// A controller must run on one replica at a time (publish.Election): each
// request is then answered by one process, once. Within it, a request is
// handled by one worker at a time (the workqueue), a request answered here is
// never answered again from a stale cache (answers), and a certificate whose
// status write failed is written again rather than signed again.
package kubesign

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"time"
	"unicode/utf8"

	"github.com/castellan-ca/castellan/ca"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/util/workqueue"
)

// Defaults of the controllers.
const (
	// DefaultWorkers is how many requests a controller handles at once.
	DefaultWorkers = 4
	// DefaultRetryWindow is how long after its creation a request whose
	// signing failed transiently (signer or audit store down) is retried
	// before it is answered Failed: well inside the 15 minutes after which
	// kube-controller-manager deletes a PodCertificateRequest.
	DefaultRetryWindow = 10 * time.Minute
	// callTimeout bounds one apiserver call.
	callTimeout = 10 * time.Second
	// handleTimeout bounds the answer to one request (signing, audit, status
	// write); finishTimeout what is left of it once leadership ends: less
	// than the lease's margin between a missed renewal and its expiry.
	handleTimeout = 30 * time.Second
	finishTimeout = 4 * time.Second
	// maxMessage bounds a condition message (the API allows 32 KiB).
	maxMessage = 1024
)

// Issuer is the issuance pipeline (ca.Issuer).
type Issuer interface {
	IssueGrant(ctx context.Context, req ca.GrantRequest) (*ca.Issued, error)
	Undelivered(ctx context.Context, out *ca.Issued, cause error)
	TrustDomain() spiffeid.TrustDomain
}

// verdict is what a refusal means for the request.
type verdict int

const (
	// denied: the request is refused for good (policy, the request itself).
	denied verdict = iota
	// failed: Castellan could not sign it (the CA misbehaved or ends too soon).
	failed
	// retry: a transient failure; try again until the retry window closes.
	retry
)

// judge classifies a pipeline error by its kind, as ca.Status does: a
// Refusal's Kind alone decides, whatever its cause wraps.
func judge(err error) verdict {
	var r *ca.Refusal
	kind := err
	if errors.As(err, &r) {
		kind = r.Kind
	}
	switch {
	case errors.Is(kind, ca.ErrUnavailable), errors.Is(kind, ca.ErrOverloaded),
		errors.Is(kind, context.Canceled), errors.Is(kind, context.DeadlineExceeded):
		return retry
	case r == nil, errors.Is(kind, ca.ErrInternal):
		return failed // unclassified: ours
	}
	return denied
}

// conditionReasons turn audit reason codes into condition reasons
// (CamelCase, as Kubernetes condition reasons are).
var conditionReasons = map[string]string{
	ca.ReasonKeyType:         "UnsupportedKeyType",
	ca.ReasonTTL:             "InvalidLifetime",
	ca.ReasonShortLifetime:   "CAExpiresTooSoon",
	ca.ReasonSignerBadChain:  "SignerMisbehaved",
	ca.ReasonBadIdentity:     "InvalidIdentity",
	ca.ReasonNoNames:         "NoNames",
	reasonPodNotFound:        "PodNotFound",
	reasonPodUID:             "PodUIDMismatch",
	reasonPodServiceAccount:  "ServiceAccountMismatch",
	reasonPodNode:            "NodeMismatch",
	reasonPodFinished:        "PodFinished",
	reasonPodVolume:          "NoPodCertificateVolume",
	reasonPCRRequest:         "InvalidRequest",
	reasonPCRAnnotations:     "InvalidUnverifiedUserAnnotations",
	reasonRequester:          "RequesterNotAuthorized",
	reasonCSRParse:           "InvalidRequest",
	reasonCSRUsages:          "UnsupportedUsages",
	reasonCSRSAN:             "ForbiddenSubjectAltName",
	reasonRetriesExhausted:   "SignerUnavailable",
	reasonUnknownSigner:      "UnknownSigner",
	reasonReservedSignerName: "ReservedSignerName",
	ca.ReasonSignerDown:      "SignerUnavailable",
	ca.ReasonAuditDown:       "SignerUnavailable",
	ca.ReasonSignerError:     "SigningFailed",
	ca.ReasonNoSigner:        "SignerUnavailable",
	ca.ReasonOverload:        "SignerUnavailable",
	ca.ReasonCallerGone:      "SignerUnavailable",
	reasonPodLookup:          "SignerUnavailable",
}

// Reasons the controllers give refusals (audit reason codes).
const (
	reasonPodNotFound        = "pod.not_found"
	reasonPodUID             = "pod.uid_mismatch"
	reasonPodServiceAccount  = "pod.service_account"
	reasonPodNode            = "pod.node"
	reasonPodFinished        = "pod.finished"
	reasonPodVolume          = "pod.no_volume"
	reasonPodLookup          = "pod.lookup"
	reasonPCRRequest         = "pcr.request"
	reasonPCRAnnotations     = "pcr.annotations"
	reasonRequester          = "authz.requester"
	reasonCSRParse           = "csr.parse"
	reasonCSRUsages          = "csr.usages"
	reasonCSRSAN             = "csr.forbidden_san"
	reasonRetriesExhausted   = "signer.retries_exhausted"
	reasonUnknownSigner      = "signer.unknown_name"
	reasonReservedSignerName = "signer.reserved_name"
)

// conditionReason is the condition reason of a refusal.
func conditionReason(err error, v verdict) string {
	if r, ok := conditionReasons[ca.ReasonOf(err)]; ok {
		return r
	}
	if v == denied {
		return "Refused"
	}
	return "SigningFailed"
}

// message is err as a condition message: valid UTF-8, bounded.
func message(err error) string {
	s := strings.ToValidUTF8(err.Error(), "\uFFFD")
	if len(s) <= maxMessage {
		return s
	}
	n := maxMessage
	for n > 0 && !utf8.RuneStart(s[n]) {
		n--
	}
	return s[:n]
}

// controller is the queue and workers a signer controller runs: keys of
// objects (namespace/name), each handled by one worker at a time; handle
// returns true to have the key retried with back-off.
type controller struct {
	name    string
	queue   workqueue.TypedRateLimitingInterface[string]
	workers int
	handle  func(ctx context.Context, key string) (again bool)
	// stopped runs once the workers have returned.
	stopped func()
	logger  *slog.Logger
}

func newController(name string, workers int, logger *slog.Logger) *controller {
	return &controller{
		name:    name,
		queue:   workqueue.NewTypedRateLimitingQueueWithConfig(workqueue.DefaultTypedControllerRateLimiter[string](), workqueue.TypedRateLimitingQueueConfig[string]{Name: name}),
		workers: max(workers, 1),
		logger:  logger,
	}
}

// enqueue queues an informer event's object.
func (c *controller) enqueue(obj any) {
	key, err := cache.DeletionHandlingMetaNamespaceKeyFunc(obj)
	if err == nil {
		c.queue.Add(key)
	}
}

// handlers queue additions and updates (deletions need no answer).
func (c *controller) handlers() cache.ResourceEventHandler {
	return cache.ResourceEventHandlerFuncs{AddFunc: c.enqueue, UpdateFunc: func(_, o any) { c.enqueue(o) }}
}

// run works the queue until ctx ends, then returns once every worker has.
// A request being answered when ctx ends (this replica stops leading) is
// finished, within finishTimeout, rather than cut off between its audit
// record and its status write; no new one is started.
func (c *controller) run(ctx context.Context) {
	var wg sync.WaitGroup
	for range c.workers {
		wg.Go(func() {
			for {
				key, shutdown := c.queue.Get()
				if shutdown {
					return
				}
				if ctx.Err() != nil {
					// No longer leading: the queue still hands out what it
					// holds, which the next leader answers; start none of it.
					c.queue.Done(key)
					return
				}
				ictx, cancel := context.WithTimeout(context.WithoutCancel(ctx), handleTimeout)
				stop := context.AfterFunc(ctx, func() {
					// Leadership ended: finish within the bound, not callTimeout's.
					time.AfterFunc(finishTimeout, cancel)
				})
				again := c.handle(ictx, key)
				stop()
				cancel()
				if again && ctx.Err() == nil {
					c.queue.AddRateLimited(key)
				} else {
					c.queue.Forget(key)
				}
				c.queue.Done(key)
			}
		})
	}
	<-ctx.Done()
	c.queue.ShutDown()
	wg.Wait()
	if c.stopped != nil {
		c.stopped()
	}
}

// waitSynced waits for the informers' caches, or reports why not.
func waitSynced(ctx context.Context, what string, synced ...cache.InformerSynced) error {
	// ctx ending first (leadership or the process is over) is no failure.
	if cache.WaitForCacheSync(ctx.Done(), synced...) {
		return nil
	}
	if ctx.Err() != nil {
		return nil //nolint:nilerr // the caller's end, not a failure of the caches
	}
	return fmt.Errorf("%s: caches did not sync", what)
}

// ReservedSignerName reports whether name is reserved for Kubernetes itself
// (kubernetes.io/*, and the k8s.io domain): Castellan never signs for them.
func ReservedSignerName(name string) bool {
	domain, _, _ := strings.Cut(name, "/")
	return domain == "kubernetes.io" || strings.HasSuffix(domain, ".kubernetes.io") ||
		domain == "k8s.io" || strings.HasSuffix(domain, ".k8s.io")
}
