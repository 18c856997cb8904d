package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"math"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/castellan-ca/castellan/ca/publish"
	"github.com/prometheus/client_golang/prometheus"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/util/validation"
)

// IstiodConfig holds the keys of istiod's serving certificate (inlined in
// KubeConfig, so at the top level of the file).
type IstiodConfig struct {
	IstiodCert      bool          `yaml:"istiodCert"`
	IstiodSecret    string        `yaml:"istiodCertSecret"`
	IstiodNamespace string        `yaml:"istiodNamespace"`
	IstiodDNSNames  []string      `yaml:"istiodCertDNSNames"`
	IstiodRevisions []string      `yaml:"istiodRevisions"`
	IstiodCertTTL   time.Duration `yaml:"istiodCertTTL"`
}

// istiodDefaults are istiod's own defaults: the Secret its chart mounts.
func istiodDefaults() IstiodConfig {
	return IstiodConfig{IstiodSecret: publish.IstiodSecretName, IstiodNamespace: publish.IstiodNamespace,
		IstiodCertTTL: publish.DefaultIstiodCertTTL}
}

// bindIstiodFlags registers the flags of istiod's serving certificate.
func bindIstiodFlags(fs *flag.FlagSet, c *IstiodConfig) {
	fs.BoolVar(&c.IstiodCert, "istiod-cert", c.IstiodCert, "keep istiod's serving certificate in its kubernetes.io/tls Secret (istiod then runs with ENABLE_CA_SERVER=false)")
	fs.StringVar(&c.IstiodSecret, "istiod-cert-secret", c.IstiodSecret, "name of istiod's serving certificate Secret")
	fs.StringVar(&c.IstiodNamespace, "istiod-namespace", c.IstiodNamespace, "namespace of istiod and its Secret")
	fs.Var(listFlag{&c.IstiodDNSNames}, "istiod-cert-dns-names", "comma-separated DNS SANs of istiod's certificate (default: istiod[-<revision>].<namespace>.svc[.cluster.local])")
	fs.Var(listFlag{&c.IstiodRevisions}, "istiod-revisions", "comma-separated istiod revisions whose istiod-<revision> names the certificate also carries")
	fs.DurationVar(&c.IstiodCertTTL, "istiod-cert-ttl", c.IstiodCertTTL, "lifetime of istiod's certificate (renewed at two thirds and at every CA change)")
}

// validate checks the istiod keys.
func (c IstiodConfig) validate(bad func(key, format string, a ...any)) {
	for _, e := range validation.IsDNS1123Subdomain(c.IstiodSecret) {
		bad("istiodCertSecret", "%s", e)
	}
	for _, e := range validation.IsDNS1123Label(c.IstiodNamespace) {
		bad("istiodNamespace", "%s", e)
	}
	for _, n := range c.IstiodDNSNames {
		for _, e := range validation.IsDNS1123Subdomain(n) {
			bad("istiodCertDNSNames", "%q: %s", n, e)
		}
	}
	for _, r := range c.IstiodRevisions {
		for _, e := range validation.IsDNS1123Label(r) {
			bad("istiodRevisions", "%q: %s", r, e)
		}
	}
	if len(c.IstiodDNSNames) > 0 && len(c.IstiodRevisions) > 0 {
		bad("istiodRevisions", "give either istiodCertDNSNames (the complete list) or istiodRevisions, not both")
	}
	if c.IstiodCertTTL <= 0 {
		bad("istiodCertTTL", "must be positive, got %s", c.IstiodCertTTL)
	}
}

// dnsNames are the SANs of istiod's certificate.
func (c IstiodConfig) dnsNames() []string {
	if len(c.IstiodDNSNames) > 0 {
		return c.IstiodDNSNames
	}
	return publish.IstiodDNSNames(c.IstiodNamespace, c.IstiodRevisions)
}

// leaseName is the Lease, in each cluster, that elects the replica writing
// there: the root ConfigMaps and, in the local cluster, istiod's Secret.
const leaseName = "castellan-root-configmaps"

// startPublish runs what Castellan writes in the clusters: on the elected
// replica of each cluster, the root ConfigMaps and (local cluster) istiod's
// Secret; on every replica, the check of the root ConfigMaps, reported in
// /metrics and as a /readyz detail.
func (s *server) startPublish(context.Context) error {
	if s.kube == nil {
		if s.cfg.IstiodCert {
			return errors.New("istiodCert: needs Kubernetes (kubeconfig, or running in a pod)")
		}
		return nil
	}
	var sel labels.Selector
	if s.cfg.RootCMSelector != "" {
		var err error
		if sel, err = labels.Parse(s.cfg.RootCMSelector); err != nil {
			return fmt.Errorf("rootConfigMapNamespaceSelector: %w", err)
		}
	}
	c := s.lc.start("kubernetes publishing")
	identity := electionIdentity()
	outOfSync := prometheus.NewDesc("castellan_root_configmaps_out_of_sync",
		"istio-ca-root-cert ConfigMaps (selected namespaces) that are missing or hold other roots than the trust bundle; NaN until the caches synced.",
		[]string{"cluster"}, nil)
	var checks []clusterCheck
	for i, target := range s.kube.clusters {
		client, err := newKubeClient(s.cfg, target.restCfg)
		if err != nil {
			return fmt.Errorf("cluster %s: %w", target.id, err)
		}
		logger := s.logger.With("cluster", target.id)
		check := &publish.RootCheck{Client: client, Bundle: s.authority, NamespaceSelector: sel}
		c.Go(check.Run)
		checks = append(checks, clusterCheck{id: target.id, check: check})

		var work []func(context.Context) error
		if s.cfg.RootConfigMaps {
			cms := &publish.ConfigMaps{Client: client, Bundle: s.authority, NamespaceSelector: sel,
				Logger: logger.With("component", "root-configmaps")}
			work = append(work, cms.Run)
		}
		if i == 0 && s.cfg.IstiodCert {
			ic := &publish.IstiodCert{Client: client, Issuer: s.issuer, Bundle: s.authority, Namespace: s.cfg.IstiodNamespace,
				Name: s.cfg.IstiodSecret, DNSNames: s.cfg.dnsNames(), TTL: s.cfg.IstiodCertTTL, Logger: logger.With("component", "istiod-cert")}
			work = append(work, ic.Run)
		}
		if len(work) == 0 {
			continue
		}
		election := s.leaders.track(&publish.Election{Client: client, Namespace: target.leaseNS, Name: leaseName, Identity: identity,
			Logger: logger.With("component", "leader-election")}, electionRootConfigMaps, target.id)
		c.Go(func(ctx context.Context) error {
			if err := election.Run(ctx, func(ctx context.Context) { runAll(ctx, logger, work) }); err != nil {
				logger.Error("leader election stopped", "error", err)
			}
			return nil
		})
	}
	if err := s.registry.Register(checkCollector{desc: outOfSync, checks: checks}); err != nil {
		return err
	}
	s.ready = append(s.ready, readyCheck{name: "root configmaps", warnOnly: true, check: func(context.Context) error {
		return describeOutOfSync(checks)
	}})
	return nil
}

// runAll runs every controller of one leadership term and returns when all
// have (the term ends with ctx).
func runAll(ctx context.Context, logger *slog.Logger, work []func(context.Context) error) {
	var wg sync.WaitGroup
	for _, w := range work {
		wg.Go(func() {
			if err := w(ctx); err != nil {
				logger.Error("controller stopped", "error", err)
			}
		})
	}
	wg.Wait()
}

// electionIdentity names this process in every Lease: host name plus random
// bytes, unique per start.
func electionIdentity() string {
	host, _ := os.Hostname()
	var suffix [6]byte
	_, _ = rand.Read(suffix[:])
	return host + "_" + hex.EncodeToString(suffix[:])
}

// clusterCheck is the root ConfigMap check of one cluster.
type clusterCheck struct {
	id    string
	check *publish.RootCheck
}

// describeOutOfSync names, per cluster, the namespaces whose root ConfigMap
// differs from the bundle (at most 5 each); nil when none does.
func describeOutOfSync(checks []clusterCheck) error {
	var parts []string
	for _, c := range checks {
		ns, err := c.check.OutOfSync()
		switch {
		case err != nil:
			parts = append(parts, fmt.Sprintf("cluster %s: %v", c.id, err))
		case len(ns) > 5:
			parts = append(parts, fmt.Sprintf("cluster %s: %d differ from the trust bundle (%s, …)", c.id, len(ns), strings.Join(ns[:5], ", ")))
		case len(ns) > 0:
			parts = append(parts, fmt.Sprintf("cluster %s: %d differ from the trust bundle (%s)", c.id, len(ns), strings.Join(ns, ", ")))
		}
	}
	if len(parts) == 0 {
		return nil
	}
	return errors.New(strings.Join(parts, "; "))
}

// checkCollector exports castellan_root_configmaps_out_of_sync, computed
// from the informer caches at scrape time.
type checkCollector struct {
	desc   *prometheus.Desc
	checks []clusterCheck
}

// Describe implements prometheus.Collector.
func (c checkCollector) Describe(ch chan<- *prometheus.Desc) { ch <- c.desc }

// Collect implements prometheus.Collector.
func (c checkCollector) Collect(ch chan<- prometheus.Metric) {
	for _, cc := range c.checks {
		v := math.NaN()
		if ns, err := cc.check.OutOfSync(); err == nil {
			v = float64(len(ns))
		}
		ch <- prometheus.MustNewConstMetric(c.desc, prometheus.GaugeValue, v, cc.id)
	}
}
