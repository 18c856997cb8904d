package kube

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/castellan-ca/castellan/authn"
	jose "github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
)

// Signature algorithms a service-account issuer uses (RSA or ECDSA keys).
var saTokenAlgs = []jose.SignatureAlgorithm{jose.RS256, jose.RS384, jose.RS512, jose.ES256, jose.ES384, jose.ES512}

// clockLeeway tolerates clock skew between the apiserver and us on exp/nbf.
const clockLeeway = 30 * time.Second

// issuerKeys is one fetch of the apiserver's service-account issuer.
type issuerKeys struct {
	issuer  string
	keys    jose.JSONWebKeySet
	fetched time.Time
}

// keySet holds the issuer's JWKS: fetched at start, re-fetched when a token
// names an unknown key (at most once per minRefresh, so forged key IDs cannot
// turn into a fetch per request) and when older than maxAge (so removed keys
// stop verifying).
type keySet struct {
	fetch      func(context.Context) (*issuerKeys, error)
	minRefresh time.Duration
	maxAge     time.Duration
	timeout    time.Duration // bounds one fetch; requests wait on it
	now        func() time.Time

	cur         atomic.Pointer[issuerKeys]
	mu          sync.Mutex // serialises fetches
	lastAttempt time.Time
	lastErr     error
}

// lookup returns the issuer and the keys that may have signed a token with
// key ID kid, refreshing the set when kid is unknown or the set is stale.
func (s *keySet) lookup(ctx context.Context, kid string) (string, []jose.JSONWebKey, error) {
	cur := s.cur.Load()
	if cur != nil && s.now().Sub(cur.fetched) < s.maxAge {
		if keys := candidates(cur.keys, kid); len(keys) > 0 {
			return cur.issuer, keys, nil
		}
	}
	cur, err := s.refresh(ctx, cur)
	if cur == nil {
		return "", nil, fmt.Errorf("%w: service-account issuer keys: %w", authn.ErrUnavailable, err)
	}
	if keys := candidates(cur.keys, kid); len(keys) > 0 {
		return cur.issuer, keys, nil
	}
	if err != nil {
		return "", nil, fmt.Errorf("%w: key %q unknown and the issuer keys cannot be fetched: %w", authn.ErrUnavailable, kid, err)
	}
	return "", nil, fmt.Errorf("token signed by key %q, which the issuer does not publish", kid)
}

// refresh fetches the key set unless another caller did since seen was
// loaded or the last attempt was under minRefresh ago. It returns the newest
// set (possibly seen itself) and the error of a failed fetch.
func (s *keySet) refresh(ctx context.Context, seen *issuerKeys) (*issuerKeys, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if cur := s.cur.Load(); cur != seen {
		return cur, nil
	}
	now := s.now()
	if !s.lastAttempt.IsZero() && now.Sub(s.lastAttempt) < s.minRefresh {
		return seen, s.lastErr
	}
	s.lastAttempt = now
	// Detached: the fetch serves every waiter, not just the caller that started it.
	fctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), s.timeout)
	defer cancel()
	next, err := s.fetch(fctx)
	s.lastErr = err
	if err != nil {
		return seen, err
	}
	next.fetched = now
	s.cur.Store(next)
	return next, nil
}

// ready reports whether keys have been loaded.
func (s *keySet) ready() error {
	if s.cur.Load() == nil {
		s.mu.Lock()
		defer s.mu.Unlock()
		if s.lastErr == nil {
			return errors.New("service-account issuer keys not loaded yet")
		}
		return fmt.Errorf("service-account issuer keys not loaded yet (last error: %w)", s.lastErr)
	}
	return nil
}

// candidates returns the keys of set that may verify a signature by kid
// (every key when the token names none).
func candidates(set jose.JSONWebKeySet, kid string) []jose.JSONWebKey {
	if kid == "" {
		return set.Keys
	}
	return set.Key(kid)
}

// fetchIssuerKeys reads the issuer from the apiserver's OIDC discovery
// document and the keys from its JWKS endpoint, both through client's own
// authenticated connection: the discovery document's jwks_uri may name an
// external address we cannot reach, while the apiserver always serves both.
func fetchIssuerKeys(client kubernetes.Interface) func(context.Context) (*issuerKeys, error) {
	return func(ctx context.Context) (*issuerKeys, error) {
		rc := client.Discovery().RESTClient()
		disco, err := rc.Get().AbsPath("/.well-known/openid-configuration").DoRaw(ctx)
		if err != nil {
			return nil, fmt.Errorf("OIDC discovery: %w", err)
		}
		var doc struct {
			Issuer string `json:"issuer"`
		}
		if err := json.Unmarshal(disco, &doc); err != nil || doc.Issuer == "" {
			return nil, fmt.Errorf("OIDC discovery: no issuer in %.200q", disco)
		}
		raw, err := rc.Get().AbsPath("/openid/v1/jwks").DoRaw(ctx)
		if err != nil {
			return nil, fmt.Errorf("JWKS: %w", err)
		}
		var set jose.JSONWebKeySet
		if err := json.Unmarshal(raw, &set); err != nil {
			return nil, fmt.Errorf("JWKS: %w", err)
		}
		return &issuerKeys{issuer: doc.Issuer, keys: set}, nil
	}
}

// saClaims are the claims of a projected service-account token.
type saClaims struct {
	Kubernetes *struct {
		Namespace      string `json:"namespace"`
		ServiceAccount *ref   `json:"serviceaccount"`
		Pod            *ref   `json:"pod"`
		Node           *ref   `json:"node"`
	} `json:"kubernetes.io"`
}

// ref names an object a token is bound to.
type ref struct {
	Name string `json:"name"`
	UID  string `json:"uid"`
}

// jwksVerifier checks service-account tokens locally: signature against the
// issuer's JWKS, iss, aud, exp and nbf, then the bound pod in the informer
// cache. It accepts only pod-bound tokens: the pod is what it can check
// without a call per request (the apiserver also checks the service account
// and secret bindings, which a local check cannot).
type jwksVerifier struct {
	keys      *keySet
	audiences []string
	pods      *Pods
	client    kubernetes.Interface
	calls     *apiCalls
	now       func() time.Time
}

// verify implements verifier.
func (v *jwksVerifier) verify(ctx context.Context, token string) (*TokenInfo, error) {
	info, err := v.verifyToken(ctx, token)
	if err != nil {
		return nil, err
	}
	if err := v.checkPod(ctx, info); err != nil {
		return nil, err
	}
	return info, nil
}

// verifyToken checks the signature and claims of token.
func (v *jwksVerifier) verifyToken(ctx context.Context, token string) (*TokenInfo, error) {
	tok, err := jwt.ParseSigned(token, saTokenAlgs)
	if err != nil {
		return nil, fmt.Errorf("token: %w", err)
	}
	if len(tok.Headers) != 1 {
		return nil, errors.New("token: want exactly one signature")
	}
	issuer, keys, err := v.keys.lookup(ctx, tok.Headers[0].KeyID)
	if err != nil {
		return nil, err
	}
	var std jwt.Claims
	var priv saClaims
	verified := false
	for i := range keys {
		if tok.Claims(keys[i].Key, &std, &priv) == nil {
			verified = true
			break
		}
	}
	if !verified {
		return nil, errors.New("token signature does not verify with the issuer's keys")
	}
	return checkClaims(std, priv, issuer, v.audiences, v.now())
}

// checkClaims applies the checks of a TokenReview to verified claims.
func checkClaims(std jwt.Claims, priv saClaims, issuer string, audiences []string, now time.Time) (*TokenInfo, error) {
	if std.Expiry == nil {
		return nil, errors.New("token has no exp claim")
	}
	if err := std.ValidateWithLeeway(jwt.Expected{Issuer: issuer, AnyAudience: audiences, Time: now}, clockLeeway); err != nil {
		return nil, fmt.Errorf("token claims (iss %q, aud %q): %w", std.Issuer, []string(std.Audience), err)
	}
	k := priv.Kubernetes
	if k == nil || k.ServiceAccount == nil {
		return nil, errors.New("token has no kubernetes.io service-account claims")
	}
	ns, sa, err := parseServiceAccount(std.Subject)
	if err != nil {
		return nil, fmt.Errorf("token subject: %w", err)
	}
	if ns != k.Namespace || sa != k.ServiceAccount.Name {
		return nil, fmt.Errorf("token subject %q disagrees with its kubernetes.io claims", std.Subject)
	}
	if k.Pod == nil || k.Pod.Name == "" || k.Pod.UID == "" {
		return nil, errors.New("token is not bound to a pod (jwks verification accepts only pod-bound tokens)")
	}
	info := &TokenInfo{Namespace: ns, ServiceAccount: sa, Pod: &authn.Pod{Namespace: ns, Name: k.Pod.Name, UID: k.Pod.UID}}
	if k.Node != nil {
		info.Pod.NodeName = k.Node.Name
	}
	return info, nil
}

// checkPod requires the bound pod, by name and UID, to exist. The informer
// cache answers almost always; only when it disagrees (a pod created moments
// ago, or one deleted) is the apiserver asked, once, to tell lag from deletion.
func (v *jwksVerifier) checkPod(ctx context.Context, info *TokenInfo) error {
	if podInCache(v.pods, info) == nil {
		return nil
	}
	return v.calls.do(ctx, func(ctx context.Context) error {
		pod, err := v.client.CoreV1().Pods(info.Pod.Namespace).Get(ctx, info.Pod.Name, metav1.GetOptions{})
		switch {
		case apierrors.IsNotFound(err):
			return fmt.Errorf("bound pod %s/%s does not exist", info.Pod.Namespace, info.Pod.Name)
		case err != nil:
			return fmt.Errorf("%w: get bound pod: %w", authn.ErrUnavailable, err)
		}
		return checkBoundPod(pod, info)
	})
}

// podInCache checks the token's bound pod against the informer cache.
func podInCache(pods *Pods, info *TokenInfo) error {
	pod, ok := pods.Get(info.Pod.Namespace, info.Pod.Name)
	if !ok {
		return fmt.Errorf("bound pod %s/%s is not in the pod cache", info.Pod.Namespace, info.Pod.Name)
	}
	return checkBoundPod(pod, info)
}

// checkBoundPod checks that pod is the one the token was minted for.
func checkBoundPod(pod *corev1.Pod, info *TokenInfo) error {
	if pod.Namespace != info.Namespace {
		return fmt.Errorf("bound pod %s/%s is not in the token's namespace %s", pod.Namespace, pod.Name, info.Namespace)
	}
	if string(pod.UID) != info.Pod.UID {
		return fmt.Errorf("bound pod %s/%s has UID %s, the token is bound to UID %s", pod.Namespace, pod.Name, pod.UID, info.Pod.UID)
	}
	if sa := serviceAccountOf(pod); sa != info.ServiceAccount {
		return fmt.Errorf("bound pod %s/%s runs as service account %q, the token is for %q", pod.Namespace, pod.Name, sa, info.ServiceAccount)
	}
	return nil
}
