package main

import (
	"context"
	"errors"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

func TestKubeConfigKeys(t *testing.T) {
	for _, tc := range []struct {
		name    string
		file    string
		args    []string
		wantErr string // substring naming the key; "" = success
		check   func(t *testing.T, c KubeConfig)
	}{
		{name: "defaults", check: func(t *testing.T, c KubeConfig) {
			if c.Kubeconfig != "" || !slices.Equal(c.TokenAudiences, []string{"istio-ca"}) || c.ClusterID != "Kubernetes" ||
				c.TokenVerification != "tokenreview" || !c.RootConfigMaps || len(c.TrustedNodeAccounts) != 0 {
				t.Errorf("defaults = %+v", c)
			}
		}},
		{name: "file keys at the top level", file: "kubeconfig: /k\ntokenAudiences: [a, b]\nclusterID: east\nclusterAliases: [e1]\n" +
			"remoteClusters: [west=/w]\ntrustedNodeAccounts: [istio-system/ztunnel]\ntokenVerification: jwks\n" +
			"rootConfigMaps: false\nrootConfigMapNamespaceSelector: mesh=on\nleaderElectionNamespace: castellan\n" +
			"kubeQPS: 5\nkubeBurst: 10\nmaxConcurrentTokenReviews: 4\ntokenCacheSize: 99\n",
			check: func(t *testing.T, c KubeConfig) {
				want := KubeConfig{Kubeconfig: "/k", TokenAudiences: []string{"a", "b"}, ClusterID: "east", ClusterAliases: []string{"e1"},
					RemoteClusters: []string{"west=/w"}, TrustedNodeAccounts: []string{"istio-system/ztunnel"}, TokenVerification: "jwks",
					MaxTokenReviews: 4, TokenCacheSize: 99, KubeQPS: 5, KubeBurst: 10, RootCMSelector: "mesh=on", LeaderElectionNS: "castellan"}
				if !equalKube(c, want) {
					t.Errorf("got %+v\nwant %+v", c, want)
				}
			}},
		{name: "flags", args: []string{"--kubeconfig", "/k", "--token-audiences", "x,y", "--cluster-id", "c1", "--cluster-aliases", "a1,a2",
			"--trusted-node-accounts", "istio-system/ztunnel,kube-system/ztunnel", "--token-verification", "jwks",
			"--root-configmap-namespace-selector", "istio-injection=enabled", "--root-configmaps=false"},
			check: func(t *testing.T, c KubeConfig) {
				if c.Kubeconfig != "/k" || !slices.Equal(c.TokenAudiences, []string{"x", "y"}) || c.ClusterID != "c1" ||
					len(c.ClusterAliases) != 2 || len(c.TrustedNodeAccounts) != 2 || c.TokenVerification != "jwks" ||
					c.RootCMSelector != "istio-injection=enabled" || c.RootConfigMaps {
					t.Errorf("got %+v", c)
				}
			}},
		{name: "no audience", args: []string{"--token-audiences", ""}, wantErr: "tokenAudiences"},
		{name: "empty cluster id", args: []string{"--cluster-id", ""}, wantErr: "clusterID"},
		{name: "alias repeats the id", args: []string{"--cluster-aliases", "Kubernetes"}, wantErr: "clusterAliases"},
		{name: "remote without path", args: []string{"--remote-clusters", "west"}, wantErr: "remoteClusters"},
		{name: "remote repeats an alias", args: []string{"--cluster-aliases", "west", "--remote-clusters", "west=/w"}, wantErr: "remoteClusters"},
		{name: "node account without sa", args: []string{"--trusted-node-accounts", "istio-system"}, wantErr: "trustedNodeAccounts"},
		{name: "unknown verification", args: []string{"--token-verification", "trust-me"}, wantErr: "tokenVerification"},
		{name: "bad selector", args: []string{"--root-configmap-namespace-selector", "a in ("}, wantErr: "rootConfigMapNamespaceSelector"},
		{name: "zero reviews", args: []string{"--max-concurrent-token-reviews", "0"}, wantErr: "maxConcurrentTokenReviews"},
		{name: "unknown key", file: "tokenAudience: [x]\n", wantErr: "tokenAudience"},
		{name: "istiod defaults", check: func(t *testing.T, c KubeConfig) {
			want := []string{"istiod.istio-system.svc", "istiod.istio-system.svc.cluster.local"}
			if c.IstiodCert || c.IstiodSecret != "istiod-tls" || c.IstiodNamespace != "istio-system" || c.IstiodCertTTL != 24*time.Hour ||
				!slices.Equal(c.dnsNames(), want) {
				t.Errorf("istiod defaults = %+v, names %v", c.IstiodConfig, c.dnsNames())
			}
		}},
		{name: "istiod keys in the file", file: "istiodCert: true\nistiodCertSecret: pilot-tls\nistiodNamespace: mesh\n" +
			"istiodRevisions: [canary]\nistiodCertTTL: 12h\n",
			check: func(t *testing.T, c KubeConfig) {
				want := []string{"istiod.mesh.svc", "istiod.mesh.svc.cluster.local", "istiod-canary.mesh.svc", "istiod-canary.mesh.svc.cluster.local"}
				if !c.IstiodCert || c.IstiodSecret != "pilot-tls" || c.IstiodNamespace != "mesh" || c.IstiodCertTTL != 12*time.Hour ||
					!slices.Equal(c.dnsNames(), want) {
					t.Errorf("got %+v, names %v", c.IstiodConfig, c.dnsNames())
				}
			}},
		{name: "istiod flags", args: []string{"--istiod-cert", "--istiod-cert-dns-names", "istiod.example.internal,localhost"},
			check: func(t *testing.T, c KubeConfig) {
				if !c.IstiodCert || !slices.Equal(c.dnsNames(), []string{"istiod.example.internal", "localhost"}) {
					t.Errorf("got %+v", c.IstiodConfig)
				}
			}},
		{name: "istiod secret name invalid", args: []string{"--istiod-cert-secret", "Istiod_TLS"}, wantErr: "istiodCertSecret"},
		{name: "istiod namespace invalid", args: []string{"--istiod-namespace", "istio.system"}, wantErr: "istiodNamespace"},
		{name: "istiod DNS name invalid", args: []string{"--istiod-cert-dns-names", "*.bad name"}, wantErr: "istiodCertDNSNames"},
		{name: "istiod names and revisions", args: []string{"--istiod-cert-dns-names", "a.b", "--istiod-revisions", "r1"}, wantErr: "istiodRevisions"},
		{name: "istiod ttl zero", args: []string{"--istiod-cert-ttl", "0s"}, wantErr: "istiodCertTTL"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if c, ok := loadCase(t, tc.file, tc.args, tc.wantErr); ok {
				tc.check(t, c.KubeConfig)
			}
		})
	}
}

func equalKube(a, b KubeConfig) bool {
	return a.Kubeconfig == b.Kubeconfig && slices.Equal(a.TokenAudiences, b.TokenAudiences) && a.ClusterID == b.ClusterID &&
		slices.Equal(a.ClusterAliases, b.ClusterAliases) && slices.Equal(a.RemoteClusters, b.RemoteClusters) &&
		slices.Equal(a.TrustedNodeAccounts, b.TrustedNodeAccounts) && a.TokenVerification == b.TokenVerification &&
		a.MaxTokenReviews == b.MaxTokenReviews && a.TokenCacheSize == b.TokenCacheSize && a.KubeQPS == b.KubeQPS &&
		a.KubeBurst == b.KubeBurst && a.RootConfigMaps == b.RootConfigMaps && a.RootCMSelector == b.RootCMSelector &&
		a.LeaderElectionNS == b.LeaderElectionNS && a.IstiodCert == b.IstiodCert
}

// Without a kubeconfig and outside a pod, Kubernetes stays off (the
// embedded-defaults quick start needs no cluster); a kubeconfig that cannot
// be read stops the start.
func TestStartKubeOff(t *testing.T) {
	t.Setenv("KUBERNETES_SERVICE_HOST", "")
	cfg := defaults()
	td := spiffeid.RequireTrustDomainFromString("cluster.local")
	lc := newLifecycle(context.Background(), slog.New(slog.DiscardHandler))
	defer lc.shutdown()
	c := lc.start("kubernetes")
	parts, err := startKube(context.Background(), c, cfg, td, slog.New(slog.DiscardHandler))
	if err != nil || parts != nil {
		t.Fatalf("startKube without kubeconfig = %v, %v; want Kubernetes off", parts, err)
	}
	cfg.Kubeconfig = filepath.Join(t.TempDir(), "missing.kubeconfig")
	if _, err := startKube(context.Background(), c, cfg, td, slog.New(slog.DiscardHandler)); err == nil ||
		!strings.Contains(err.Error(), "missing.kubeconfig") {
		t.Fatalf("startKube with a missing kubeconfig = %v, want an error naming it", err)
	}
}

// A failing warnOnly check is listed in /readyz, which stays 200; any other
// failing check makes it 503.
func TestReadyzWarnings(t *testing.T) {
	fail := func(context.Context) error { return errors.New("cluster east: 2 differ from the trust bundle (a, b)") }
	pass := func(context.Context) error { return nil }
	for _, tc := range []struct {
		name     string
		checks   []readyCheck
		wantCode int
		wantBody string
	}{
		{"all pass", []readyCheck{{name: "signer", check: pass}, {name: "root configmaps", check: pass, warnOnly: true}}, 200, "ok\n"},
		{"warning only", []readyCheck{{name: "signer", check: pass}, {name: "root configmaps", check: fail, warnOnly: true}}, 200,
			"ok\nwarning: root configmaps: cluster east: 2 differ from the trust bundle (a, b)\n"},
		{"failing check", []readyCheck{{name: "signer", check: fail}, {name: "root configmaps", check: fail, warnOnly: true}}, 503,
			"not ready: signer: cluster east: 2 differ from the trust bundle (a, b)\n"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rec := httptest.NewRecorder()
			monitoringHandler(prometheus.NewRegistry(), tc.checks, false).ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/readyz", nil))
			if rec.Code != tc.wantCode || rec.Body.String() != tc.wantBody {
				t.Errorf("/readyz = %d %q, want %d %q", rec.Code, rec.Body.String(), tc.wantCode, tc.wantBody)
			}
		})
	}
}
