package e2e

import (
	"crypto/x509"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"k8s.io/client-go/kubernetes"

	"github.com/castellan-ca/castellan/e2e/internal/kubeenv"
	"github.com/castellan-ca/castellan/signer"
	kubesigner "github.com/castellan-ca/castellan/signer/kubernetes"
	"github.com/castellan-ca/castellan/signer/signertest"
)

// meshCASigner is the signer name of the cluster CA that signer kubernetes
// forwards to in these tests.
const meshCASigner = "castellan.io/mesh-ca"

// kubeCA is a real kube-apiserver whose CSR signer meshCASigner is a
// Castellan (signer intermediate with a test CA), and a service account
// that may create and approve CSRs for it: what signer kubernetes needs.
type kubeCA struct {
	env *kubeenv.Env
	ca  *testCA
	// srv is the cluster CA; cfg restarts it.
	srv *server
	cfg serverConfig
	// requester is the mesh Castellan's client, kubeconfig its credentials.
	requester  kubernetes.Interface
	kubeconfig string
	rootsFile  string
}

// startKubeCA starts the cluster and its CA. The cluster CA signs any ID of
// the trust domain for the requester only: the mesh Castellan has already
// decided what each caller may get.
func startKubeCA(t *testing.T) *kubeCA {
	t.Helper()
	const leaseNS, meshNS, meshSA = "kube-ca-lease", "mesh-system", "castellan-mesh"
	k := &kubeCA{env: kubeenv.Start(t), ca: newTestCA(t)}
	kc := castellanKubeconfigFor(t, k.env, signerRBAC{csrSigners: []string{meshCASigner}}, leaseNS)
	k.env.CreateNamespace(t, meshNS, nil)
	var token string
	k.requester, token = csrRequester(t, k.env, meshNS, meshSA, meshCASigner)
	k.kubeconfig = k.env.KubeconfigForToken(t, meshSA, token)

	dir := t.TempDir()
	cfgFile := filepath.Join(dir, "cluster-ca.yaml")
	// The DNS names are those of the mesh Castellan's serving certificate
	// (its defaults), which it gets through the cluster CA too.
	cfgYAML := fmt.Sprintf(`podCertificateSigners: []
csrSigners:
- signerName: %s
  requesters: [system:serviceaccount:%s:%s]
  identities: trustDomain
  dnsNames: [istiod.istio-system.svc, castellan.castellan-system.svc, localhost]
`, meshCASigner, meshNS, meshSA)
	if err := os.WriteFile(cfgFile, []byte(cfgYAML), 0o600); err != nil {
		t.Fatal(err)
	}
	k.rootsFile = writeFile(t, dir, "roots.pem", []byte(signer.EncodePEM(k.ca.root)), 0o600)
	k.cfg = serverConfig{signer: "intermediate", cacertsDir: k.ca.writeCACerts(t), configFile: cfgFile,
		// Lifetimes are the mesh Castellan's to decide: the cluster CA only
		// keeps leaves within its intermediate's.
		extraArgs: append(kubeArgs(kc, "tokenreview", "--root-configmaps=false", "--leader-election-namespace", leaseNS), "--max-ttl", "87600h")}
	k.srv = startServer(t, k.cfg)
	return k
}

// startKubernetesBackend is the remote PKI of signer kubernetes: a cluster
// whose CSR signer is another Castellan.
func startKubernetesBackend(t *testing.T) *remotePKI {
	k := startKubeCA(t)
	return &remotePKI{
		args: []string{"--kubernetes-signer-name", meshCASigner, "--kubernetes-signer-kubeconfig", k.kubeconfig,
			"--kubernetes-signer-approve", "--kubernetes-signer-roots-file", k.rootsFile},
		roots: []*x509.Certificate{k.ca.root}, intermediates: []*x509.Certificate{k.ca.intermediate},
	}
}

// TestKubernetesBackendConformance runs the signer conformance suite against
// signer kubernetes on a real kube-apiserver 1.37, with Castellan's own CSR
// signer as the cluster's CA; the outage is the cluster CA stopped.
func TestKubernetesBackendConformance(t *testing.T) {
	k := startKubeCA(t)
	signertest.Run(t, signertest.Factory{
		New: func(t *testing.T) signer.Signer {
			s, err := kubesigner.New(kubesigner.Config{Client: k.requester, SignerName: meshCASigner, Approve: true,
				RootsFile: k.rootsFile, Timeout: 10 * time.Second})
			if err != nil {
				t.Fatal(err)
			}
			return s
		},
		Outage: func(t *testing.T, _ signer.Signer) func() {
			k.srv.stop(t)
			return func() {
				srv, err := launch(t, k.cfg, k.srv.dataDir)
				if err != nil {
					t.Fatalf("restart the cluster CA: %v", err)
				}
				k.srv = srv
			}
		},
		ServerSerial: true,
		Remote:       true,
		// The cluster CA backdates NotBefore by its clock-skew allowance and
		// counts expirationSeconds from when it signs.
		NotBeforeSlack: clockSkew + time.Minute,
		NotAfterSlack:  time.Minute,
	})
}
