package main

import (
	"cmp"
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"strings"

	"github.com/castellan-ca/castellan/authn/kube"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/klog/v2"
)

// KubeConfig holds the Kubernetes keys of Config (inlined there).
// Kubernetes is used only when Kubeconfig is set or Castellan runs in a pod.
type KubeConfig struct {
	Kubeconfig          string   `yaml:"kubeconfig"`
	TokenAudiences      []string `yaml:"tokenAudiences"`
	ClusterID           string   `yaml:"clusterID"`
	ClusterAliases      []string `yaml:"clusterAliases"`
	RemoteClusters      []string `yaml:"remoteClusters"` // "<cluster id>=<kubeconfig path>"
	TrustedNodeAccounts []string `yaml:"trustedNodeAccounts"`
	TokenVerification   string   `yaml:"tokenVerification"`
	MaxTokenReviews     int      `yaml:"maxConcurrentTokenReviews"`
	TokenCacheSize      int      `yaml:"tokenCacheSize"`
	KubeQPS             float64  `yaml:"kubeQPS"`
	KubeBurst           int      `yaml:"kubeBurst"`
	RootConfigMaps      bool     `yaml:"rootConfigMaps"`
	RootCMSelector      string   `yaml:"rootConfigMapNamespaceSelector"`
	LeaderElectionNS    string   `yaml:"leaderElectionNamespace"`
	// KubeSignersConfig holds the keys of Kubernetes' certificate APIs and
	// of signer kubernetes (kubesigners.go).
	KubeSignersConfig `yaml:",inline"`
	// IstiodConfig holds the keys of istiod's serving certificate (publish.go).
	IstiodConfig `yaml:",inline"`
}

// kubeDefaults are the Kubernetes defaults.
func kubeDefaults() KubeConfig {
	return KubeConfig{
		TokenAudiences:    []string{"istio-ca"},
		ClusterID:         "Kubernetes",
		TokenVerification: string(kube.VerifyTokenReview),
		MaxTokenReviews:   kube.DefaultMaxConcurrentCalls,
		TokenCacheSize:    kube.DefaultCacheSize,
		KubeQPS:           50,
		KubeBurst:         100,
		RootConfigMaps:    true,
		KubeSignersConfig: kubeSignersDefaults(),
		IstiodConfig:      istiodDefaults(),
	}
}

// bindKubeFlags registers the Kubernetes flags.
func bindKubeFlags(fs *flag.FlagSet, c *KubeConfig) {
	fs.StringVar(&c.Kubeconfig, "kubeconfig", c.Kubeconfig, "kubeconfig of the local cluster (default: in-cluster config when running in a pod; none: Kubernetes off)")
	fs.Var(listFlag{&c.TokenAudiences}, "token-audiences", "comma-separated audiences a service-account token must carry one of")
	fs.StringVar(&c.ClusterID, "cluster-id", c.ClusterID, "id of the local cluster in the clusterid header")
	fs.Var(listFlag{&c.ClusterAliases}, "cluster-aliases", "comma-separated other clusterid values meaning the local cluster")
	fs.Var(listFlag{&c.RemoteClusters}, "remote-clusters", "comma-separated <cluster id>=<kubeconfig path> of remote clusters whose tokens are accepted")
	fs.Var(listFlag{&c.TrustedNodeAccounts}, "trusted-node-accounts", "comma-separated <namespace>/<service account> that may obtain identities of pods on their node (ztunnel)")
	fs.StringVar(&c.TokenVerification, "token-verification", c.TokenVerification, "tokenreview | jwks (local verification, pod-bound tokens only)")
	fs.IntVar(&c.MaxTokenReviews, "max-concurrent-token-reviews", c.MaxTokenReviews, "TokenReviews (and pod lookups) in flight per cluster")
	fs.IntVar(&c.TokenCacheSize, "token-cache-size", c.TokenCacheSize, "cached TokenReview results per cluster")
	fs.Float64Var(&c.KubeQPS, "kube-qps", c.KubeQPS, "client-side rate limit of apiserver calls per cluster")
	fs.IntVar(&c.KubeBurst, "kube-burst", c.KubeBurst, "client-side burst of apiserver calls per cluster")
	fs.BoolVar(&c.RootConfigMaps, "root-configmaps", c.RootConfigMaps, "keep the istio-ca-root-cert ConfigMap in every namespace equal to the trust bundle")
	fs.StringVar(&c.RootCMSelector, "root-configmap-namespace-selector", c.RootCMSelector, "label selector of the namespaces that get istio-ca-root-cert (default: all)")
	fs.StringVar(&c.LeaderElectionNS, "leader-election-namespace", c.LeaderElectionNS, "namespace of the leader election Lease (default: Castellan's own, from the in-cluster or kubeconfig namespace)")
	bindKubeSignerFlags(fs, &c.KubeSignersConfig)
	bindIstiodFlags(fs, &c.IstiodConfig)
}

// validate checks the Kubernetes keys.
func (c KubeConfig) validate(bad func(key, format string, a ...any)) {
	if len(c.TokenAudiences) == 0 {
		bad("tokenAudiences", "at least one audience is required")
	}
	if c.ClusterID == "" {
		bad("clusterID", "must be set")
	}
	ids := map[string]bool{c.ClusterID: true, "": true}
	for _, a := range c.ClusterAliases {
		if ids[a] {
			bad("clusterAliases", "%q is given twice", a)
		}
		ids[a] = true
	}
	for _, r := range c.RemoteClusters {
		id, path, ok := strings.Cut(r, "=")
		switch {
		case !ok || id == "" || path == "":
			bad("remoteClusters", "%q is not <cluster id>=<kubeconfig path>", r)
		case ids[id]:
			bad("remoteClusters", "cluster id %q is given twice", id)
		}
		ids[id] = true
	}
	for _, a := range c.TrustedNodeAccounts {
		if _, err := kube.ParseNodeAccount(a); err != nil {
			bad("trustedNodeAccounts", "%v", err)
		}
	}
	switch kube.Verification(c.TokenVerification) {
	case kube.VerifyTokenReview, kube.VerifyJWKS:
	default:
		bad("tokenVerification", "%q is not tokenreview or jwks", c.TokenVerification)
	}
	if c.MaxTokenReviews <= 0 {
		bad("maxConcurrentTokenReviews", "must be positive")
	}
	if c.TokenCacheSize <= 0 {
		bad("tokenCacheSize", "must be positive")
	}
	if c.KubeQPS <= 0 || c.KubeBurst <= 0 {
		bad("kubeQPS", "kubeQPS and kubeBurst must be positive")
	}
	if _, err := labels.Parse(c.RootCMSelector); err != nil {
		bad("rootConfigMapNamespaceSelector", "%v", err)
	}
	c.KubeSignersConfig.validate(bad)
	c.IstiodConfig.validate(bad)
}

// kubeParts is what the Kubernetes integration adds to the server.
type kubeParts struct {
	authenticator *kube.Authenticator
	nodes         *kube.NodeAuthorizer
	ready         readyCheck
	// local is the local cluster (its pod cache) and restCfg reaches
	// it, for the signers of its certificate APIs.
	local   *kube.Cluster
	restCfg *rest.Config
	// clusters are where Castellan writes (publish.go): the local one first.
	clusters []writeTarget
}

// writeTarget is one cluster Castellan writes root ConfigMaps (and, the
// local one, istiod's Secret) in, under its own leader election.
type writeTarget struct {
	id      string
	restCfg *rest.Config
	// leaseNS is the namespace of the cluster's Lease.
	leaseNS string
}

// inClusterNamespaceFile holds the namespace of the pod we run in.
const inClusterNamespaceFile = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"

// startKube connects to the configured clusters and runs, in c, their
// informers. It returns nil when Kubernetes is off (no kubeconfig, not in a
// pod); what Castellan writes in the clusters starts later (startPublish).
func startKube(ctx context.Context, c *component, cfg Config, td spiffeid.TrustDomain, metrics *kube.Metrics, logger *slog.Logger) (*kubeParts, error) {
	restCfg, ownNS, err := loadKubeconfig(cfg.Kubeconfig)
	if err != nil || restCfg == nil {
		return nil, err
	}
	// client-go logs through klog (informers, leader election): one logging stack.
	klog.SetSlogLogger(logger.With("component", "client-go"))
	local, err := newKubeCluster(cfg, cfg.ClusterID, restCfg, metrics, logger)
	if err != nil {
		return nil, err
	}
	localLease := cmp.Or(cfg.LeaderElectionNS, ownNS, "default")
	targets := []writeTarget{{id: cfg.ClusterID, restCfg: restCfg, leaseNS: localLease}}
	var remotes []*kube.Cluster
	for _, r := range cfg.RemoteClusters {
		id, path, _ := strings.Cut(r, "=")
		rc, remoteNS, err := loadKubeconfig(path)
		if err != nil {
			return nil, fmt.Errorf("remoteClusters %s: %w", id, err)
		}
		c, err := newKubeCluster(cfg, id, rc, metrics, logger)
		if err != nil {
			return nil, err
		}
		remotes = append(remotes, c)
		targets = append(targets, writeTarget{id: id, restCfg: rc, leaseNS: cmp.Or(cfg.LeaderElectionNS, remoteNS, localLease)})
	}
	clusters, err := kube.NewClusters(local, cfg.ClusterAliases, remotes...)
	if err != nil {
		return nil, err
	}
	var trusted []kube.NodeAccount
	for _, a := range cfg.TrustedNodeAccounts {
		na, err := kube.ParseNodeAccount(a)
		if err != nil {
			return nil, err
		}
		trusted = append(trusted, na)
	}
	c.Go(func(ctx context.Context) error { clusters.Run(ctx); return nil })
	logger.Info("kubernetes authentication on", "cluster_id", cfg.ClusterID, "remote_clusters", len(remotes),
		"token_verification", cfg.TokenVerification, "trusted_node_accounts", strings.Join(cfg.TrustedNodeAccounts, ","))
	return &kubeParts{
		authenticator: &kube.Authenticator{TrustDomain: td, Clusters: clusters},
		nodes:         &kube.NodeAuthorizer{TrustDomain: td, Clusters: clusters, Trusted: trusted},
		ready:         readyCheck{name: "kubernetes", check: clusters.Ready},
		local:         local, restCfg: restCfg,
		clusters: targets,
	}, nil
}

// newKubeCluster builds one cluster's client and verifier.
func newKubeCluster(cfg Config, id string, restCfg *rest.Config, metrics *kube.Metrics, logger *slog.Logger) (*kube.Cluster, error) {
	client, err := newKubeClient(cfg, restCfg)
	if err != nil {
		return nil, fmt.Errorf("cluster %s: %w", id, err)
	}
	return kube.NewCluster(kube.ClusterConfig{
		ID: id, Client: client, Verification: kube.Verification(cfg.TokenVerification), Audiences: cfg.TokenAudiences,
		MaxConcurrentCalls: cfg.MaxTokenReviews, CacheSize: cfg.TokenCacheSize, Metrics: metrics, Logger: logger,
	})
}

// newKubeClient applies the client-side rate limits, so that a restart storm
// is paced here rather than throttled by the apiserver.
func newKubeClient(cfg Config, restCfg *rest.Config) (kubernetes.Interface, error) {
	return kubernetes.NewForConfig(rateLimited(cfg, restCfg))
}

// loadKubeconfig returns the config of the kubeconfig at path, or the
// in-cluster config when path is empty, with the namespace it names; nil
// when path is empty and we do not run in a pod. ~/.kube/config and
// $KUBECONFIG are ignored on purpose: a developer's cluster must not switch
// Kubernetes authentication on.
func loadKubeconfig(path string) (*rest.Config, string, error) {
	if path == "" {
		rc, err := rest.InClusterConfig()
		if errors.Is(err, rest.ErrNotInCluster) {
			return nil, "", nil
		}
		if err != nil {
			return nil, "", fmt.Errorf("in-cluster kubernetes config: %w", err)
		}
		ns, _ := os.ReadFile(inClusterNamespaceFile)
		return rc, strings.TrimSpace(string(ns)), nil
	}
	cc := clientcmd.NewNonInteractiveDeferredLoadingClientConfig(&clientcmd.ClientConfigLoadingRules{ExplicitPath: path}, &clientcmd.ConfigOverrides{})
	rc, err := cc.ClientConfig()
	if err != nil {
		return nil, "", fmt.Errorf("kubeconfig %s: %w", path, err)
	}
	ns, _, err := cc.Namespace()
	if err != nil {
		return nil, "", fmt.Errorf("kubeconfig %s: %w", path, err)
	}
	return rc, ns, nil
}
