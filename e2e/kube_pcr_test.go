package e2e

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"fmt"
	"strings"
	"testing"
	"time"

	certv1 "k8s.io/api/certificates/v1"
	certv1beta1 "k8s.io/api/certificates/v1beta1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"
	"k8s.io/utils/ptr"

	"github.com/castellan-ca/castellan/e2e/internal/kubeenv"
)

// What the PodCertificateRequest tests wait for: bounds that only turn a
// hang into a failure.
const pcrTimeout = 60 * time.Second

// kubelet acts as a node's kubelet: it authenticates as system:node:<node>,
// so NodeRestriction admits only requests for pods on its node that mount a
// podCertificate volume of the signer, with the right node, pod and service
// account UIDs and a proof of possession.
type kubelet struct {
	node   *corev1.Node
	client kubernetes.Interface
}

func newKubelet(t *testing.T, env *kubeenv.Env, node string) *kubelet {
	t.Helper()
	return &kubelet{node: env.CreateNode(t, node), client: env.NodeClient(t, node)}
}

// meshVolume mounts a certificate from signer and the signer's trust bundle
// (every ClusterTrustBundle of the signer), as the README's pod spec does.
func meshVolume(signer string) corev1.Volume {
	return corev1.Volume{Name: "mesh-identity", VolumeSource: corev1.VolumeSource{Projected: &corev1.ProjectedVolumeSource{
		Sources: []corev1.VolumeProjection{
			{PodCertificate: &corev1.PodCertificateProjection{SignerName: signer, KeyType: "ECDSAP256", CredentialBundlePath: "credentialbundle.pem"}},
			{ClusterTrustBundle: &corev1.ClusterTrustBundleProjection{SignerName: ptr.To(signer), LabelSelector: &metav1.LabelSelector{}, Path: "ca.crt"}},
		}}}}
}

// request creates a PodCertificateRequest for pod as the kubelet does: a
// stub PKCS#10 request signed by key (the proof of possession).
func (k *kubelet) request(ctx context.Context, pod *corev1.Pod, sa *corev1.ServiceAccount, signer string, key crypto.Signer, maxExp int32) (*certv1.PodCertificateRequest, error) {
	stub, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, key)
	if err != nil {
		return nil, err
	}
	return k.client.CertificatesV1().PodCertificateRequests(pod.Namespace).Create(ctx, &certv1.PodCertificateRequest{
		ObjectMeta: metav1.ObjectMeta{GenerateName: pod.Name + "-"},
		Spec: certv1.PodCertificateRequestSpec{
			SignerName: signer, PodName: pod.Name, PodUID: pod.UID,
			ServiceAccountName: sa.Name, ServiceAccountUID: sa.UID, NodeName: k.nodeName(), NodeUID: k.node.UID,
			MaxExpirationSeconds: ptr.To(maxExp), StubPKCS10Request: stub,
		},
	}, metav1.CreateOptions{})
}

func (k *kubelet) nodeName() types.NodeName { return types.NodeName(k.node.Name) }

// mustRequest is request, failing the test on an error.
func (k *kubelet) mustRequest(t *testing.T, pod *corev1.Pod, sa *corev1.ServiceAccount, signer string, key crypto.Signer) *certv1.PodCertificateRequest {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), kubeenv.CallTimeout)
	defer cancel()
	pcr, err := k.request(ctx, pod, sa, signer, key, 86400)
	if err != nil {
		t.Fatalf("kubelet %s: create PodCertificateRequest for %s/%s: %v", k.node.Name, pod.Namespace, pod.Name, err)
	}
	return pcr
}

// awaitPCR polls the request until it has a condition and returns it.
func awaitPCR(t *testing.T, env *kubeenv.Env, pcr *certv1.PodCertificateRequest) *certv1.PodCertificateRequest {
	t.Helper()
	deadline := time.Now().Add(pcrTimeout)
	for {
		got, err := env.Client.CertificatesV1().PodCertificateRequests(pcr.Namespace).Get(context.Background(), pcr.Name, metav1.GetOptions{})
		if err != nil {
			t.Fatalf("get PodCertificateRequest %s/%s: %v", pcr.Namespace, pcr.Name, err)
		}
		if len(got.Status.Conditions) > 0 {
			return got
		}
		if time.Now().After(deadline) {
			t.Fatalf("PodCertificateRequest %s/%s not answered within %s", pcr.Namespace, pcr.Name, pcrTimeout)
		}
		time.Sleep(eventualPoll)
	}
}

// wantCondition checks that got has exactly one condition, of type typ
// with reason, and (unless Issued) no certificate.
func wantCondition(t *testing.T, got *certv1.PodCertificateRequest, typ, reason string) {
	t.Helper()
	c := got.Status.Conditions
	if len(c) != 1 || c[0].Type != typ || c[0].Reason != reason || c[0].Status != metav1.ConditionTrue {
		t.Fatalf("conditions = %+v, want exactly one %s (%s)", c, typ, reason)
	}
	if typ != certv1.PodCertificateRequestConditionTypeIssued && (got.Status.CertificateChain != "" || got.Status.NotBefore != nil) {
		t.Errorf("a %s request carries a certificate: %+v", typ, got.Status)
	}
}

// pcrPeer is how the audit log names a PodCertificateRequest.
func pcrPeer(pcr *certv1.PodCertificateRequest) string {
	return fmt.Sprintf("pcr/%s/%s/%s", pcr.Namespace, pcr.Name, pcr.UID)
}

// pcrRecords returns the audit records of PodCertificateRequests, by peer.
func pcrRecords(recs []auditRecord) map[string][]auditRecord {
	return recordsByPeer(recs, "kubernetes.pcr")
}

// recordsByPeer returns the audit records of auth method, by peer.
func recordsByPeer(recs []auditRecord, method string) map[string][]auditRecord {
	out := map[string][]auditRecord{}
	for _, r := range recs {
		if r.AuthMethod == method {
			out[r.Peer] = append(out[r.Peer], r)
		}
	}
	return out
}

// trustBundle reads the ClusterTrustBundle name.
func trustBundle(t *testing.T, env *kubeenv.Env, name string) (signerName string, roots []*x509.Certificate) {
	t.Helper()
	ctb, err := env.Client.CertificatesV1().ClusterTrustBundles().Get(context.Background(), name, metav1.GetOptions{})
	if err != nil {
		t.Fatalf("get ClusterTrustBundle %s: %v", name, err)
	}
	roots, err = parseCerts([]byte(ctb.Spec.TrustBundle))
	if err != nil {
		t.Fatalf("ClusterTrustBundle %s: %v", name, err)
	}
	return ctb.Spec.SignerName, roots
}

// verifyIssued checks an Issued answer: its chain verifies to roots, the
// leaf has the profile for id and key, and status times match the leaf.
func verifyIssued(t *testing.T, got *certv1.PodCertificateRequest, roots []*x509.Certificate, id string, pub crypto.PublicKey) *x509.Certificate {
	t.Helper()
	chain, err := parseCerts([]byte(got.Status.CertificateChain))
	if err != nil {
		t.Fatalf("certificateChain: %v", err)
	}
	pool, inter := x509.NewCertPool(), x509.NewCertPool()
	for _, r := range roots {
		pool.AddCert(r)
	}
	for _, c := range chain[1:] {
		inter.AddCert(c)
	}
	leaf := chain[0]
	verified, err := leaf.Verify(x509.VerifyOptions{Roots: pool, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}})
	if err != nil {
		t.Fatalf("leaf does not chain to the ClusterTrustBundle: %v", err)
	}
	checkProfile(t, leaf, verified[0][1], id, pub, 128, "")
	st := got.Status
	if !st.NotBefore.Time.Equal(leaf.NotBefore) || !st.NotAfter.Time.Equal(leaf.NotAfter) {
		t.Errorf("status validity %s..%s, leaf %s..%s", st.NotBefore, st.NotAfter, leaf.NotBefore, leaf.NotAfter)
	}
	if br := st.BeginRefreshAt.Time; br.Before(leaf.NotBefore.Add(10*time.Minute)) || br.After(leaf.NotAfter.Add(-10*time.Minute)) {
		t.Errorf("beginRefreshAt %s outside [notBefore+10m, notAfter-10m]", br)
	}
	if life, max := leaf.NotAfter.Sub(leaf.NotBefore), time.Duration(*got.Spec.MaxExpirationSeconds)*time.Second; life > max || life < time.Hour {
		t.Errorf("lifetime %s, want within [1h, maxExpirationSeconds %s]", life, max)
	}
	return leaf
}

// TestPodCertificates runs Castellan's PodCertificateRequest signer against
// a real kube-apiserver 1.37 with NodeRestriction on, driven by a "kubelet"
// with a node's identity: issued with the pod's identity and the profile,
// chaining to the signer's ClusterTrustBundle; refused for an unsupported
// key type and for pods deleted or re-created before signing; requests for
// other signers ignored; one audit record per answer.
func TestPodCertificates(t *testing.T) {
	env := kubeenv.Start(t)
	const ns, leaseNS = "pcr", "pcr-lease"
	kc := castellanKubeconfigFor(t, env, defaultSignerRBAC, leaseNS)
	env.CreateNamespace(t, ns, nil)
	web := env.CreateServiceAccount(t, ns, "web")
	kl := newKubelet(t, env, "pcr-node-a")
	vol := meshVolume(defaultPodSigner)
	key := testKey(t, "pcr-p256")

	// Requests whose pod goes away before Castellan signs: made while it is
	// not running yet. NodeRestriction admitted them, for the pod as it was.
	gone := env.CreatePod(t, ns, "gone", "web", kl.node.Name, vol)
	reborn := env.CreatePod(t, ns, "reborn", "web", kl.node.Name, vol)
	gonePCR := kl.mustRequest(t, gone, web, defaultPodSigner, key)
	rebornPCR := kl.mustRequest(t, reborn, web, defaultPodSigner, key)
	env.DeletePod(t, ns, "gone")
	env.DeletePod(t, ns, "reborn")
	env.CreatePod(t, ns, "reborn", "web", kl.node.Name, vol)

	srv := startServer(t, serverConfig{signer: "selfsigned", extraArgs: kubeArgs(kc, "tokenreview", "--root-configmaps=false",
		"--leader-election-namespace", leaseNS)})
	answered := map[string]string{} // peer → outcome of every request answered

	t.Run("pod deleted before signing", func(t *testing.T) {
		got := awaitPCR(t, env, gonePCR)
		wantCondition(t, got, "Denied", "PodNotFound")
		answered[pcrPeer(got)] = "refused"
	})
	t.Run("pod re-created with another UID before signing", func(t *testing.T) {
		got := awaitPCR(t, env, rebornPCR)
		wantCondition(t, got, "Denied", "PodUIDMismatch")
		answered[pcrPeer(got)] = "refused"
	})

	pod := env.CreatePod(t, ns, "web-1", "web", kl.node.Name, vol)
	wantID := "spiffe://" + trustDomain + "/ns/" + ns + "/sa/web"
	rsaKey, err := rsa.GenerateKey(rand.Reader, 3072) // NodeRestriction admits RSA 3072 and 4096 only
	if err != nil {
		t.Fatal(err)
	}
	_, edKey, _ := ed25519.GenerateKey(rand.Reader)
	p384, _ := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	for name, k := range map[string]crypto.Signer{"ECDSA P-256": key, "ECDSA P-384": p384, "RSA 3072": rsaKey, "Ed25519": edKey} {
		t.Run("issued "+name, func(t *testing.T) {
			pcr := kl.mustRequest(t, pod, web, defaultPodSigner, k)
			got := awaitPCR(t, env, pcr)
			wantCondition(t, got, "Issued", "Issued")
			signerName, roots := trustBundle(t, env, "castellan.io:workload-identity:trust-bundle")
			if signerName != defaultPodSigner {
				t.Errorf("ClusterTrustBundle signer = %q, want %q", signerName, defaultPodSigner)
			}
			if bundle, _ := parseCerts(srv.ctl(t, "bundle")); !sameCertSet(roots, bundle) {
				t.Errorf("ClusterTrustBundle = %s, castellanctl bundle = %s", describeCerts(roots), describeCerts(bundle))
			}
			leaf := verifyIssued(t, got, roots, wantID, k.Public())
			recs := pcrRecords(srv.auditList(t))[pcrPeer(got)]
			if len(recs) != 1 || recs[0].Outcome != "issued" || recs[0].GrantedIdentity != wantID || recs[0].Serial == "" ||
				recordsWithSerial(t, recs, leaf.SerialNumber) == nil {
				t.Errorf("audit records of the request = %+v, want one issuance of serial %x", recs, leaf.SerialNumber)
			}
			answered[pcrPeer(got)] = "issued"
		})
	}

	t.Run("unsupported key type", func(t *testing.T) {
		p521, err := ecdsa.GenerateKey(elliptic.P521(), rand.Reader) // the apiserver admits it; the policy does not
		if err != nil {
			t.Fatal(err)
		}
		got := awaitPCR(t, env, kl.mustRequest(t, pod, web, defaultPodSigner, p521))
		wantCondition(t, got, "Denied", "UnsupportedKeyType")
		answered[pcrPeer(got)] = "refused"
	})

	t.Run("kubelet of 1.35 through v1beta1", func(t *testing.T) {
		// pkixPublicKey and a proof of possession over the pod UID: through v1
		// its stubPKCS10Request is empty (DESIGN.md §11).
		pkix, err := x509.MarshalPKIXPublicKey(key.Public())
		if err != nil {
			t.Fatal(err)
		}
		sum := sha256.Sum256([]byte(pod.UID))
		proof, err := ecdsa.SignASN1(rand.Reader, key, sum[:])
		if err != nil {
			t.Fatal(err)
		}
		beta, err := kl.client.CertificatesV1beta1().PodCertificateRequests(ns).Create(context.Background(), &certv1beta1.PodCertificateRequest{
			ObjectMeta: metav1.ObjectMeta{GenerateName: "old-kubelet-"},
			Spec: certv1beta1.PodCertificateRequestSpec{SignerName: defaultPodSigner, PodName: pod.Name, PodUID: pod.UID,
				ServiceAccountName: web.Name, ServiceAccountUID: web.UID, NodeName: kl.nodeName(), NodeUID: kl.node.UID,
				MaxExpirationSeconds: ptr.To[int32](3600),
				PKIXPublicKey:        pkix,  //nolint:staticcheck // SA1019: what a 1.35 kubelet sends, the case under test
				ProofOfPossession:    proof, //nolint:staticcheck // SA1019: likewise
			},
		}, metav1.CreateOptions{})
		if err != nil {
			t.Fatalf("create through v1beta1: %v", err)
		}
		got := awaitPCR(t, env, &certv1.PodCertificateRequest{ObjectMeta: beta.ObjectMeta})
		if len(got.Spec.StubPKCS10Request) != 0 {
			t.Logf("v1 shows a stubPKCS10Request for a v1beta1 request (the apiserver changed)")
		}
		wantCondition(t, got, "Issued", "Issued")
		_, roots := trustBundle(t, env, "castellan.io:workload-identity:trust-bundle")
		leaf := verifyIssued(t, got, roots, wantID, key.Public())
		if d := leaf.NotAfter.Sub(leaf.NotBefore); d != time.Hour {
			t.Errorf("lifetime %s, want maxExpirationSeconds (1h)", d)
		}
		answered[pcrPeer(got)] = "issued"
	})

	t.Run("other signer ignored", func(t *testing.T) {
		const other = "example.com/not-castellan"
		otherPod := env.CreatePod(t, ns, "other-1", "web", kl.node.Name, meshVolume(other))
		ignored := kl.mustRequest(t, otherPod, web, other, key)
		// A request of ours made after it is answered after it was seen.
		marker := awaitPCR(t, env, kl.mustRequest(t, pod, web, defaultPodSigner, key))
		answered[pcrPeer(marker)] = "issued"
		got, err := env.Client.CertificatesV1().PodCertificateRequests(ns).Get(context.Background(), ignored.Name, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if len(got.Status.Conditions) != 0 {
			t.Errorf("request for %s answered: %+v", other, got.Status)
		}
		if recs := pcrRecords(srv.auditList(t))[pcrPeer(got)]; len(recs) != 0 {
			t.Errorf("request for %s audited: %+v", other, recs)
		}
	})

	t.Run("one audit record per answer", func(t *testing.T) {
		recs := pcrRecords(srv.auditList(t))
		if len(recs) != len(answered) {
			t.Errorf("audit holds records of %d requests, %d were answered", len(recs), len(answered))
		}
		for peer, outcome := range answered {
			if r := recs[peer]; len(r) != 1 || r[0].Outcome != outcome || !strings.HasPrefix(r[0].Caller, "pod ") || r[0].ClusterID != clusterID {
				t.Errorf("records of %s = %+v, want one %s", peer, r, outcome)
			}
		}
		if r := srv.runCtl(t, "audit", "verify"); r.err != nil {
			t.Errorf("audit verify: %v\n%s", r.err, r.stderr)
		}
	})
}
