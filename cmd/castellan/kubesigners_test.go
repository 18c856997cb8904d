package main

import (
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/castellan-ca/castellan/ca/kubesign"
	"github.com/castellan-ca/castellan/ca/publish"
)

func TestKubeSignerConfigKeys(t *testing.T) {
	for _, tc := range []struct {
		name    string
		file    string
		args    []string
		wantErr string // substring naming the key; "" = success
		check   func(t *testing.T, c Config)
	}{
		{name: "defaults", check: func(t *testing.T, c Config) {
			k := c.KubeSignersConfig
			if !slices.Equal(k.PodCertificateSigners, []string{kubesign.DefaultPodSignerName}) || !k.ClusterTrustBundles ||
				k.IstioClusterTrustBundle || k.IstioTrustBundleName != publish.IstioTrustBundleName || len(k.CSRSigners) != 0 ||
				k.KubernetesSigner.Timeout != 30*time.Second {
				t.Errorf("defaults = %+v", k)
			}
		}},
		{name: "file", file: "podCertificateSigners: [example.com/mesh, example.com/other]\nclusterTrustBundles: false\n" +
			"istioClusterTrustBundle: true\nistioTrustBundleName: mesh-roots\nkubeSignerWorkers: 8\n" +
			"csrSigners:\n- signerName: example.com/istiod-ra\n  requesters: [system:serviceaccount:istio-system:istiod]\n" +
			"- signerName: example.com/istiod-dns\n  requesters: [system:serviceaccount:istio-system:istiod]\n  identities: none\n" +
			"  dnsNames: [istiod.istio-system.svc]\n",
			check: func(t *testing.T, c Config) {
				k := c.KubeSignersConfig
				if !slices.Equal(k.PodCertificateSigners, []string{"example.com/mesh", "example.com/other"}) || k.ClusterTrustBundles ||
					!k.IstioClusterTrustBundle || k.IstioTrustBundleName != "mesh-roots" || k.KubeSignerWorkers != 8 || len(k.CSRSigners) != 2 ||
					k.CSRSigners[1].Identities != "none" || !slices.Equal(k.CSRSigners[1].DNSNames, []string{"istiod.istio-system.svc"}) {
					t.Errorf("got %+v", k)
				}
			}},
		{name: "flags", args: []string{"--pod-certificate-signers", "", "--istio-cluster-trust-bundle", "--kube-signer-workers", "2"},
			check: func(t *testing.T, c Config) {
				if k := c.KubeSignersConfig; len(k.PodCertificateSigners) != 0 || !k.IstioClusterTrustBundle || k.KubeSignerWorkers != 2 {
					t.Errorf("got %+v", k)
				}
			}},
		{name: "signer kubernetes", args: []string{"--signer", "kubernetes", "--kubernetes-signer-name", "example.com/mesh-ca",
			"--kubernetes-signer-roots-file", "/etc/roots.pem", "--kubernetes-signer-approve", "--kubernetes-signer-timeout", "10s"},
			check: func(t *testing.T, c Config) {
				if k := c.KubernetesSigner; k.SignerName != "example.com/mesh-ca" || k.RootsFile != "/etc/roots.pem" || !k.Approve || k.Timeout != 10*time.Second {
					t.Errorf("got %+v", k)
				}
			}},
		{name: "signer kubernetes in the file", file: "signer: kubernetes\nkubernetesSigner:\n  signerName: example.com/mesh-ca\n  rootsFile: /r\n",
			check: func(t *testing.T, c Config) {
				if c.KubernetesSigner.SignerName != "example.com/mesh-ca" {
					t.Errorf("got %+v", c.KubernetesSigner)
				}
			}},
		{name: "signer kubernetes without roots", args: []string{"--signer", "kubernetes", "--kubernetes-signer-name", "example.com/ca"},
			wantErr: "kubernetesSigner.rootsFile"},
		{name: "signer kubernetes for a Kubernetes signer", args: []string{"--signer", "kubernetes", "--kubernetes-signer-name", "kubernetes.io/legacy-unknown",
			"--kubernetes-signer-roots-file", "/r"}, wantErr: "kubernetesSigner.signerName"},
		{name: "pod signer of Kubernetes", args: []string{"--pod-certificate-signers", "kubernetes.io/kube-apiserver-client-pod"}, wantErr: "podCertificateSigners"},
		{name: "pod signer without path", args: []string{"--pod-certificate-signers", "example.com"}, wantErr: "podCertificateSigners"},
		{name: "csr signer of Kubernetes", file: "csrSigners:\n- signerName: kubernetes.io/kubelet-serving\n  requesters: [x]\n",
			wantErr: "csrSigners[0].signerName"},
		{name: "csr signer twice", file: "csrSigners:\n- signerName: example.com/a\n  requesters: [x]\n- signerName: example.com/a\n  requesters: [y]\n",
			wantErr: "csrSigners[1].signerName"},
		{name: "csr signer without requesters", file: "csrSigners:\n- signerName: example.com/a\n", wantErr: "csrSigners[0].requesters"},
		{name: "csr signer with unknown identities", file: "csrSigners:\n- signerName: example.com/a\n  requesters: [x]\n  identities: any\n",
			wantErr: "csrSigners[0].identities"},
		{name: "csr signer that signs nothing", file: "csrSigners:\n- signerName: example.com/a\n  requesters: [x]\n  identities: none\n",
			wantErr: "csrSigners[0].identities"},
		{name: "csr signer with a wildcard DNS name", file: "csrSigners:\n- signerName: example.com/a\n  requesters: [x]\n  dnsNames: ['*.example.com']\n",
			wantErr: "csrSigners[0].dnsNames"},
		{name: "bad Istio bundle name", args: []string{"--istio-cluster-trust-bundle", "--istio-trust-bundle-name", "Root_Cert"}, wantErr: "istioTrustBundleName"},
		{name: "unknown csr signer key", file: "csrSigners:\n- signerName: example.com/a\n  requesters: [x]\n  approve: true\n", wantErr: "approve"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			args := tc.args
			if tc.file != "" {
				args = append([]string{"--config", writeConfig(t, tc.file)}, args...)
			}
			c, err := loadConfig(args)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("loadConfig error = %v, want one naming %s", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			tc.check(t, c)
		})
	}
}
