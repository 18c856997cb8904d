package kube

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/castellan-ca/castellan/authn"
	"golang.org/x/sync/singleflight"
	authnv1 "k8s.io/api/authentication/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
)

// user.extra keys the apiserver fills for pod-bound tokens.
const (
	extraPodName  = "authentication.kubernetes.io/pod-name"
	extraPodUID   = "authentication.kubernetes.io/pod-uid"
	extraNodeName = "authentication.kubernetes.io/node-name"
)

// TokenInfo is what a verified service-account token proves.
type TokenInfo struct {
	Namespace, ServiceAccount string
	// Pod is the pod the token is bound to; nil for a token bound to no pod.
	Pod *authn.Pod
}

// apiCalls bounds how many calls to the apiserver run at once, so that a
// restart storm queues here instead of throttling the apiserver.
type apiCalls struct {
	slots   chan struct{}
	timeout time.Duration
}

// do runs call with a slot and a deadline. The call is detached from ctx's
// cancellation because its result is shared with other waiters; a slot not
// free within the timeout fails fast with authn.ErrUnavailable.
func (a *apiCalls) do(ctx context.Context, call func(context.Context) error) error {
	cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), a.timeout)
	defer cancel()
	select {
	case a.slots <- struct{}{}:
		defer func() { <-a.slots }()
	case <-cctx.Done():
		return fmt.Errorf("%w: all %d apiserver call slots busy for %v", authn.ErrUnavailable, cap(a.slots), a.timeout)
	}
	return call(cctx)
}

// tokenReviewer verifies tokens with the TokenReview API, caching positive
// results by token hash until the token expires. Concurrent requests with the
// same token share one review; failures are never cached.
type tokenReviewer struct {
	client    kubernetes.Interface
	audiences []string
	cache     *tokenCache
	calls     *apiCalls
	pods      *Pods
	now       func() time.Time
	group     singleflight.Group
	counters  reviewCounters
}

// verify implements verifier.
func (r *tokenReviewer) verify(ctx context.Context, token string) (*TokenInfo, error) {
	k := keyOf(token)
	if info, ok := r.cache.get(k, r.now()); ok {
		if info.Pod == nil || podInCache(r.pods, info) == nil {
			inc(r.counters.hit)
			return info, nil
		}
		// The bound pod left the informer cache or was replaced: the cached
		// answer no longer holds. Ask the apiserver, which is authoritative.
		r.cache.remove(k)
	}
	inc(r.counters.miss)
	ch := r.group.DoChan(string(k[:]), func() (any, error) { return r.review(ctx, token, k) })
	select {
	case res := <-ch:
		if res.Err != nil {
			return nil, res.Err
		}
		return res.Val.(*TokenInfo), nil
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// review asks the apiserver about token and caches a positive answer.
func (r *tokenReviewer) review(ctx context.Context, token string, k tokenKey) (*TokenInfo, error) {
	var status authnv1.TokenReviewStatus
	err := r.calls.do(ctx, func(ctx context.Context) error {
		tr, err := r.client.AuthenticationV1().TokenReviews().Create(ctx, &authnv1.TokenReview{
			Spec: authnv1.TokenReviewSpec{Token: token, Audiences: r.audiences},
		}, metav1.CreateOptions{})
		if err != nil {
			return fmt.Errorf("%w: TokenReview: %w", authn.ErrUnavailable, err)
		}
		status = tr.Status
		return nil
	})
	if err != nil {
		inc(r.counters.callError)
		return nil, err
	}
	info, err := checkReview(status, r.audiences)
	if err != nil {
		inc(r.counters.rejected)
		return nil, err
	}
	inc(r.counters.authenticated)
	// exp is read without verification only to bound the cache; a token
	// without one is not cached (every use is reviewed).
	if exp, err := unverifiedExpiry(token); err == nil {
		r.cache.put(k, info, exp, r.now())
	}
	return info, nil
}

// checkReview applies the checks of DESIGN.md §3 to a TokenReview status.
func checkReview(st authnv1.TokenReviewStatus, audiences []string) (*TokenInfo, error) {
	if !st.Authenticated {
		if st.Error != "" {
			return nil, fmt.Errorf("token review: not authenticated: %s", st.Error)
		}
		return nil, errors.New("token review: not authenticated")
	}
	// An empty status.audiences means an authenticator that ignores audiences
	// vouched for the token: only the intersection proves it was minted for us.
	if !slices.ContainsFunc(st.Audiences, func(a string) bool { return slices.Contains(audiences, a) }) {
		return nil, fmt.Errorf("token review: audiences %q include none of %q", st.Audiences, audiences)
	}
	if !slices.Contains(st.User.Groups, saGroup) {
		return nil, fmt.Errorf("token review: user %q is not in group %s", st.User.Username, saGroup)
	}
	ns, sa, err := parseServiceAccount(st.User.Username)
	if err != nil {
		return nil, fmt.Errorf("token review: %w", err)
	}
	info := &TokenInfo{Namespace: ns, ServiceAccount: sa}
	name, uid, node := single(st.User.Extra[extraPodName]), single(st.User.Extra[extraPodUID]), single(st.User.Extra[extraNodeName])
	switch {
	case name != "" && uid != "":
		info.Pod = &authn.Pod{Namespace: ns, Name: name, UID: uid, NodeName: node}
	case name != "" || uid != "":
		return nil, errors.New("token review: pod binding has a name or a UID but not both")
	}
	return info, nil
}

// single returns the only value of a user.extra entry, or "" when there is
// not exactly one.
func single(v authnv1.ExtraValue) string {
	if len(v) != 1 {
		return ""
	}
	return v[0]
}
