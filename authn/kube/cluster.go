package kube

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
)

// Verification selects how service-account tokens are checked.
type Verification string

const (
	// VerifyTokenReview asks the apiserver (TokenReview), caching positive answers.
	VerifyTokenReview Verification = "tokenreview"
	// VerifyJWKS verifies tokens locally against the issuer's JWKS and the pod cache.
	VerifyJWKS Verification = "jwks"
)

// Defaults of ClusterConfig.
const (
	DefaultMaxConcurrentCalls = 16
	DefaultCallTimeout        = 5 * time.Second
	DefaultCacheSize          = 10000
	// DefaultCacheMaxTTL bounds a cached review below the token's own expiry,
	// so that a deleted service account (which a pod-cache check cannot see)
	// stops authenticating within minutes even for long-lived tokens.
	DefaultCacheMaxTTL = 5 * time.Minute
)

// jwksMinRefresh and jwksMaxAge pace the JWKS fetches of VerifyJWKS.
const (
	jwksMinRefresh = 10 * time.Second
	jwksMaxAge     = 10 * time.Minute
)

// verifier checks a bearer token.
type verifier interface {
	verify(ctx context.Context, token string) (*TokenInfo, error)
}

// ClusterConfig configures one cluster. Zero values get the defaults.
type ClusterConfig struct {
	// ID is the cluster's canonical id, recorded in Caller.ClusterID.
	ID     string
	Client kubernetes.Interface
	// Verification is tokenreview (default) or jwks.
	Verification Verification
	// Audiences the token must carry at least one of; required.
	Audiences []string
	// MaxConcurrentCalls bounds TokenReviews (and pod lookups) in flight.
	MaxConcurrentCalls int
	// CallTimeout bounds one apiserver call, and the wait for a free slot.
	CallTimeout time.Duration
	// CacheSize bounds the TokenReview cache (entries).
	CacheSize int
	// CacheMaxTTL bounds how long a review is cached, below the token's expiry.
	CacheMaxTTL time.Duration
	// Metrics, when set, count the TokenReview cache's lookups and the reviews sent.
	Metrics *Metrics
	Logger  *slog.Logger
	Now     func() time.Time
}

// Cluster is one Kubernetes cluster whose service-account tokens are
// accepted: its token verifier and its pod cache.
type Cluster struct {
	id       string
	factory  informers.SharedInformerFactory
	pods     *Pods
	verifier verifier
	keys     *keySet // jwks mode only
	logger   *slog.Logger
}

// NewCluster builds a cluster; Run runs its informers.
func NewCluster(cfg ClusterConfig) (*Cluster, error) {
	switch {
	case cfg.ID == "":
		return nil, errors.New("kube cluster: id is required")
	case cfg.Client == nil:
		return nil, fmt.Errorf("kube cluster %s: client is required", cfg.ID)
	case len(cfg.Audiences) == 0:
		return nil, fmt.Errorf("kube cluster %s: at least one token audience is required", cfg.ID)
	}
	if cfg.MaxConcurrentCalls <= 0 {
		cfg.MaxConcurrentCalls = DefaultMaxConcurrentCalls
	}
	if cfg.CallTimeout <= 0 {
		cfg.CallTimeout = DefaultCallTimeout
	}
	if cfg.CacheSize <= 0 {
		cfg.CacheSize = DefaultCacheSize
	}
	if cfg.CacheMaxTTL <= 0 {
		cfg.CacheMaxTTL = DefaultCacheMaxTTL
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	factory := NewPodsFactory(cfg.Client)
	pods, err := newPods(factory)
	if err != nil {
		return nil, err
	}
	c := &Cluster{id: cfg.ID, factory: factory, pods: pods, logger: cfg.Logger.With("cluster", cfg.ID)}
	calls := &apiCalls{slots: make(chan struct{}, cfg.MaxConcurrentCalls), timeout: cfg.CallTimeout}
	switch cfg.Verification {
	case VerifyTokenReview, "":
		c.verifier = &tokenReviewer{client: cfg.Client, audiences: cfg.Audiences, cache: newTokenCache(cfg.CacheSize, cfg.CacheMaxTTL),
			calls: calls, pods: pods, now: cfg.Now, counters: cfg.Metrics.forCluster(cfg.ID)}
	case VerifyJWKS:
		c.keys = &keySet{fetch: fetchIssuerKeys(cfg.Client), minRefresh: jwksMinRefresh, maxAge: jwksMaxAge, timeout: cfg.CallTimeout, now: cfg.Now}
		c.verifier = &jwksVerifier{keys: c.keys, audiences: cfg.Audiences, pods: pods, client: cfg.Client, calls: calls, now: cfg.Now}
	default:
		return nil, fmt.Errorf("kube cluster %s: token verification %q is not tokenreview or jwks", cfg.ID, cfg.Verification)
	}
	return c, nil
}

// ID returns the cluster's canonical id.
func (c *Cluster) ID() string { return c.id }

// Pods returns the cluster's pod cache.
func (c *Cluster) Pods() *Pods { return c.pods }

// Run runs the informers (and, in jwks mode, loads the issuer keys,
// retrying until it succeeds) until ctx ends, and returns once they have
// stopped.
func (c *Cluster) Run(ctx context.Context) {
	c.factory.Start(ctx.Done())
	var wg sync.WaitGroup
	if c.keys != nil {
		wg.Go(func() { c.loadKeys(ctx) })
	}
	<-ctx.Done()
	wg.Wait()
	c.factory.Shutdown()
}

// loadKeys loads the issuer keys, retrying with back-off until it succeeds
// or ctx ends.
func (c *Cluster) loadKeys(ctx context.Context) {
	for delay := jwksMinRefresh; ; delay = min(2*delay, 5*time.Minute) {
		_, err := c.keys.refresh(ctx, nil)
		if c.keys.ready() == nil || ctx.Err() != nil {
			return
		}
		c.logger.Warn("service-account issuer keys not loaded; retrying", "error", err, "retry_in", delay)
		select {
		case <-ctx.Done():
			return
		case <-time.After(delay):
		}
	}
}

// Ready reports whether the cluster can authenticate and authorize: the pod
// cache has synced (and, in jwks mode, the issuer keys are loaded).
func (c *Cluster) Ready(context.Context) error {
	if !c.pods.HasSynced() {
		return fmt.Errorf("cluster %s: pod cache not synced", c.id)
	}
	if c.keys != nil {
		if err := c.keys.ready(); err != nil {
			return fmt.Errorf("cluster %s: %w", c.id, err)
		}
	}
	return nil
}

// Verify checks a service-account token.
func (c *Cluster) Verify(ctx context.Context, token string) (*TokenInfo, error) {
	return c.verifier.verify(ctx, token)
}

// Clusters is the set of clusters that the clusterid header selects from.
type Clusters struct {
	local *Cluster
	names map[string]*Cluster // accepted clusterid values
	byID  map[string]*Cluster // canonical ids
}

// NewClusters indexes the local cluster (answering to its id, each alias and
// the empty id, which pilot-agent may send) and the remote ones (their ids).
func NewClusters(local *Cluster, aliases []string, remote ...*Cluster) (*Clusters, error) {
	cs := &Clusters{local: local, names: map[string]*Cluster{}, byID: map[string]*Cluster{}}
	add := func(name string, c *Cluster) error {
		if _, dup := cs.names[name]; dup {
			return fmt.Errorf("cluster id %q is configured twice", name)
		}
		cs.names[name] = c
		return nil
	}
	for _, n := range append([]string{local.ID(), ""}, aliases...) {
		if err := add(n, local); err != nil {
			return nil, err
		}
	}
	cs.byID[local.ID()] = local
	for _, c := range remote {
		if err := add(c.ID(), c); err != nil {
			return nil, err
		}
		cs.byID[c.ID()] = c
	}
	return cs, nil
}

// Select returns the cluster a request's clusterid header names.
func (cs *Clusters) Select(clusterID string) (*Cluster, bool) {
	c, ok := cs.names[clusterID]
	return c, ok
}

// Get returns the cluster with canonical id (Caller.ClusterID).
func (cs *Clusters) Get(id string) (*Cluster, bool) {
	c, ok := cs.byID[id]
	return c, ok
}

// Local returns the cluster Castellan runs in (or was pointed at first).
func (cs *Clusters) Local() *Cluster { return cs.local }

// All returns every cluster, the local one first.
func (cs *Clusters) All() []*Cluster {
	out := []*Cluster{cs.local}
	for id, c := range cs.byID {
		if id != cs.local.ID() {
			out = append(out, c)
		}
	}
	return out
}

// Run runs every cluster (Cluster.Run) until ctx ends, and returns once all
// have stopped.
func (cs *Clusters) Run(ctx context.Context) {
	var wg sync.WaitGroup
	for _, c := range cs.All() {
		wg.Go(func() { c.Run(ctx) })
	}
	wg.Wait()
}

// Ready reports whether every cluster is ready.
func (cs *Clusters) Ready(ctx context.Context) error {
	for _, c := range cs.All() {
		if err := c.Ready(ctx); err != nil {
			return err
		}
	}
	return nil
}
