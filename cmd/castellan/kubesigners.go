package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"time"

	"github.com/castellan-ca/castellan/ca"
	"github.com/castellan-ca/castellan/ca/kubesign"
	"github.com/castellan-ca/castellan/ca/publish"
	"github.com/castellan-ca/castellan/signer/kubernetes"
	"k8s.io/apimachinery/pkg/util/validation"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/rest"
)

// KubeSignersConfig holds the keys of Castellan's signers behind
// Kubernetes' certificate APIs, at the top level of the file.
type KubeSignersConfig struct {
	PodCertificateSigners   []string          `yaml:"podCertificateSigners"`
	ClusterTrustBundles     bool              `yaml:"clusterTrustBundles"`
	IstioClusterTrustBundle bool              `yaml:"istioClusterTrustBundle"`
	IstioTrustBundleName    string            `yaml:"istioTrustBundleName"`
	KubeSignerWorkers       int               `yaml:"kubeSignerWorkers"`
	CSRSigners              []CSRSignerConfig `yaml:"csrSigners"` // file only
	// KubernetesSigner configures signer kubernetes.
	KubernetesSigner KubernetesSignerConfig `yaml:"kubernetesSigner"`
}

// CSRSignerConfig is one entry of csrSigners: a signer name whose approved
// CertificateSigningRequests Castellan signs.
type CSRSignerConfig struct {
	SignerName string   `yaml:"signerName"`
	Requesters []string `yaml:"requesters"`
	Identities string   `yaml:"identities"`
	DNSNames   []string `yaml:"dnsNames"`
}

// KubernetesSignerConfig is the `kubernetesSigner:` section, used with
// signer kubernetes.
type KubernetesSignerConfig struct {
	SignerName      string        `yaml:"signerName"`
	Kubeconfig      string        `yaml:"kubeconfig"`
	Approve         bool          `yaml:"approve"`
	RootsFile       string        `yaml:"rootsFile"`
	Timeout         time.Duration `yaml:"timeout"`
	RefreshInterval time.Duration `yaml:"refreshInterval"`
}

func kubeSignersDefaults() KubeSignersConfig {
	return KubeSignersConfig{PodCertificateSigners: []string{kubesign.DefaultPodSignerName}, ClusterTrustBundles: true,
		IstioTrustBundleName: publish.IstioTrustBundleName, KubeSignerWorkers: kubesign.DefaultWorkers,
		KubernetesSigner: KubernetesSignerConfig{Timeout: kubernetes.DefaultTimeout, RefreshInterval: kubernetes.DefaultRefreshInterval}}
}

// bindKubeSignerFlags registers the flags of both sections.
func bindKubeSignerFlags(fs *flag.FlagSet, c *KubeSignersConfig) {
	k := &c.KubernetesSigner
	fs.Var(listFlag{&c.PodCertificateSigners}, "pod-certificate-signers", "comma-separated signer names whose PodCertificateRequests Castellan answers (empty: none)")
	fs.BoolVar(&c.ClusterTrustBundles, "cluster-trust-bundles", c.ClusterTrustBundles, "publish the trust bundle as the ClusterTrustBundle <signer>:"+publish.DefaultBundleSuffix+" of each pod certificate signer")
	fs.BoolVar(&c.IstioClusterTrustBundle, "istio-cluster-trust-bundle", c.IstioClusterTrustBundle, "also publish Istio's ClusterTrustBundle istio.io:istiod-ca:<istioTrustBundleName>")
	fs.StringVar(&c.IstioTrustBundleName, "istio-trust-bundle-name", c.IstioTrustBundleName, "last part of Istio's ClusterTrustBundle name (Istio's global.trustBundleName)")
	fs.IntVar(&c.KubeSignerWorkers, "kube-signer-workers", c.KubeSignerWorkers, "Kubernetes certificate requests signed at once, per API")

	fs.StringVar(&k.SignerName, "kubernetes-signer-name", k.SignerName, "signer kubernetes: the signerName of the CertificateSigningRequests Castellan creates")
	fs.StringVar(&k.Kubeconfig, "kubernetes-signer-kubeconfig", k.Kubeconfig, "signer kubernetes: kubeconfig of the cluster whose signer signs (default: --kubeconfig, else in-cluster)")
	fs.BoolVar(&k.Approve, "kubernetes-signer-approve", k.Approve, "signer kubernetes: approve the CSRs Castellan creates (needs approve on the signer name)")
	fs.StringVar(&k.RootsFile, "kubernetes-signer-roots-file", k.RootsFile, "signer kubernetes: PEM roots of the cluster's signer (the trust bundle), re-read when it changes")
	fs.DurationVar(&k.Timeout, "kubernetes-signer-timeout", k.Timeout, "signer kubernetes: bound on one signing (create, approve, wait, delete)")
	fs.DurationVar(&k.RefreshInterval, "kubernetes-signer-refresh-interval", k.RefreshInterval, "signer kubernetes: how often the roots file is re-read")
}

// validate checks the keys of Kubernetes' certificate APIs (those of signer
// kubernetes only with that signer, see Config.Validate).
func (c KubeSignersConfig) validate(bad func(key, format string, a ...any)) {
	for _, n := range c.PodCertificateSigners {
		if err := checkSignerName(n); err != nil {
			bad("podCertificateSigners", "%v", err)
		}
	}
	if c.IstioClusterTrustBundle {
		if errs := validation.IsDNS1123Subdomain(c.IstioTrustBundleName); len(errs) > 0 {
			bad("istioTrustBundleName", "%q: %s", c.IstioTrustBundleName, strings.Join(errs, "; "))
		}
	}
	if c.KubeSignerWorkers <= 0 {
		bad("kubeSignerWorkers", "must be positive")
	}
	seen := map[string]bool{}
	for i, s := range c.CSRSigners {
		key := fmt.Sprintf("csrSigners[%d]", i)
		if err := checkSignerName(s.SignerName); err != nil {
			bad(key+".signerName", "%v", err)
		}
		if seen[s.SignerName] {
			bad(key+".signerName", "%q is given twice", s.SignerName)
		}
		seen[s.SignerName] = true
		if len(s.Requesters) == 0 {
			bad(key+".requesters", "at least one requester (a username, e.g. system:serviceaccount:istio-system:istiod) is required")
		}
		switch s.Identities {
		case "", kubesign.IdentitiesWorkload, kubesign.IdentitiesTrustDomain:
		case kubesign.IdentitiesNone:
			if len(s.DNSNames) == 0 {
				bad(key+".identities", "none, and no dnsNames: the signer could sign nothing")
			}
		default:
			bad(key+".identities", "%q is not workload, trustDomain or none", s.Identities)
		}
		for _, d := range s.DNSNames {
			if errs := validation.IsDNS1123Subdomain(d); len(errs) > 0 {
				bad(key+".dnsNames", "%q: %s", d, strings.Join(errs, "; "))
			}
		}
	}
}

// validate checks the `kubernetesSigner:` keys; only called with signer kubernetes.
func (k KubernetesSignerConfig) validate(bad func(key, format string, a ...any)) {
	if err := checkSignerName(k.SignerName); err != nil {
		bad("kubernetesSigner.signerName", "%v", err)
	}
	if k.RootsFile == "" {
		bad("kubernetesSigner.rootsFile", "required with signer kubernetes: the PEM roots the cluster's signer chains to")
	}
	if k.Timeout <= 0 || k.RefreshInterval <= 0 {
		bad("kubernetesSigner.timeout", "kubernetesSigner.timeout and kubernetesSigner.refreshInterval must be positive")
	}
}

// checkSignerName accepts <domain>/<path> signer names outside Kubernetes'
// own domains.
func checkSignerName(name string) error {
	domain, path, ok := strings.Cut(name, "/")
	if !ok || path == "" {
		return fmt.Errorf("signer name %q is not <domain>/<path>", name)
	}
	if errs := validation.IsDNS1123Subdomain(domain); len(errs) > 0 {
		return fmt.Errorf("signer name %q: domain: %s", name, strings.Join(errs, "; "))
	}
	if kubesign.ReservedSignerName(name) {
		return fmt.Errorf("signer name %q is Kubernetes' own (kubernetes.io, k8s.io): Castellan never signs for it", name)
	}
	return nil
}

// kubeSignersLease is the Lease the replicas elect the signers' leader on.
const kubeSignersLease = "castellan-kube-signers"

// startKubeSigners runs, on the elected replica, the PodCertificateRequest
// and CertificateSigningRequest signers and the ClusterTrustBundle writer,
// all through s's issuer. Nothing runs when Kubernetes is off.
func (s *server) startKubeSigners(context.Context) error {
	cfg := s.cfg
	k := s.kube
	if k == nil {
		if len(cfg.CSRSigners) > 0 {
			s.logger.Warn("csrSigners are configured but Kubernetes is off (no kubeconfig, not in a pod): they do not run")
		}
		return nil
	}
	var bundles []publish.ClusterTrustBundle
	if cfg.ClusterTrustBundles {
		for _, n := range cfg.PodCertificateSigners {
			bundles = append(bundles, publish.SignerBundle(n, publish.DefaultBundleSuffix))
		}
	}
	if cfg.IstioClusterTrustBundle {
		bundles = append(bundles, publish.IstioBundle(cfg.IstioTrustBundleName))
	}
	if len(cfg.PodCertificateSigners)+len(cfg.CSRSigners)+len(bundles) == 0 {
		return nil
	}
	client, err := newKubeClient(cfg, k.restCfg)
	if err != nil {
		return err
	}
	dyn, err := dynamic.NewForConfig(rateLimited(cfg, k.restCfg))
	if err != nil {
		return err
	}
	logger := s.logger.With("component", "kube-signers")
	metrics := kubesign.NewMetrics(s.registry)
	runs := map[string]func(context.Context) error{}
	if len(cfg.PodCertificateSigners) > 0 {
		runs["podcertificaterequest signer"] = (&kubesign.PodCertificates{Client: client, Issuer: s.issuer, Pods: k.local.Pods(),
			SignerNames: cfg.PodCertificateSigners, ClusterID: cfg.ClusterID, Workers: cfg.KubeSignerWorkers, Metrics: metrics, Logger: logger}).Run
	}
	if len(cfg.CSRSigners) > 0 {
		var policies []kubesign.CSRPolicy
		for _, c := range cfg.CSRSigners {
			policies = append(policies, kubesign.CSRPolicy{SignerName: c.SignerName, Requesters: c.Requesters, Identities: c.Identities,
				DNSNames: c.DNSNames})
		}
		runs["certificatesigningrequest signer"] = (&kubesign.CSRSigners{Client: client, Issuer: s.issuer, Signers: policies,
			ClusterID: cfg.ClusterID, Workers: cfg.KubeSignerWorkers, Metrics: metrics, Logger: logger}).Run
	}
	if len(bundles) > 0 {
		runs["cluster trust bundles"] = (&publish.TrustBundles{Dynamic: dyn, Discovery: client.Discovery(), Bundle: s.authority,
			Bundles: bundles, Logger: logger}).Run
	}
	election := s.leaders.track(&publish.Election{Client: client, Namespace: k.clusters[0].leaseNS, Name: kubeSignersLease,
		Identity: electionIdentity(), Logger: logger}, electionKubeSigners, k.clusters[0].id)
	s.lc.start("kubernetes signers").Go(func(ctx context.Context) error {
		err := election.Run(ctx, func(ctx context.Context) {
			var wg sync.WaitGroup
			for name, run := range runs {
				wg.Go(func() {
					err := run(ctx)
					switch {
					case errors.Is(err, kubesign.ErrNotServed):
						logger.Warn(name+" not running: the apiserver does not serve the API", "error", err)
					case err != nil:
						logger.Error(name+" stopped", "error", err)
					}
				})
			}
			wg.Wait()
		})
		if err != nil {
			logger.Error("leader election stopped", "error", err)
		}
		return nil
	})
	return nil
}

// startKubernetesSigner signs through the cluster's CSR API and keeps the
// trust bundle following the roots file, in c.
func startKubernetesSigner(c *component, cfg Config, authority *ca.Authority, audit *ca.Auditor, logger *slog.Logger) error {
	k := cfg.KubernetesSigner
	path := k.Kubeconfig
	if path == "" {
		path = cfg.Kubeconfig
	}
	restCfg, _, err := loadKubeconfig(path)
	if err != nil {
		return fmt.Errorf("kubernetesSigner: %w", err)
	}
	if restCfg == nil {
		return errors.New("kubernetesSigner: no cluster: set kubernetesSigner.kubeconfig or kubeconfig, or run in a pod")
	}
	client, err := newKubeClient(cfg, restCfg)
	if err != nil {
		return err
	}
	var s *kubernetes.Signer
	s, err = kubernetes.New(kubernetes.Config{Client: client, SignerName: k.SignerName, Approve: k.Approve, RootsFile: k.RootsFile,
		Timeout: k.Timeout, RefreshInterval: k.RefreshInterval, Logger: logger,
		OnChange: func() {
			reuseSigner(c.ctx, authority, audit, logger, kubernetes.Backend, s, "roots of Kubernetes signer "+k.SignerName+" changed", nil)
		},
	})
	if err != nil {
		return err
	}
	if _, err := authority.Use(kubernetes.Backend, s); err != nil {
		return err
	}
	c.Go(func(ctx context.Context) error { s.Run(ctx); return nil })
	return nil
}

// rateLimited is restCfg with the client-side rate limits, so that a
// restart storm is paced here rather than throttled by the apiserver.
func rateLimited(cfg Config, restCfg *rest.Config) *rest.Config {
	rc := rest.CopyConfig(restCfg)
	rc.QPS, rc.Burst = float32(cfg.KubeQPS), cfg.KubeBurst
	rc.UserAgent = "castellan"
	return rc
}
