package e2e

import (
	"context"
	"crypto"
	"crypto/x509"
	"errors"
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"

	certv1 "k8s.io/api/certificates/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/watch"

	"github.com/castellan-ca/castellan/e2e/internal/kubeenv"
)

// ctbVersion is one content of a ClusterTrustBundle and when it was seen.
type ctbVersion struct {
	name  string
	seen  time.Time
	roots []*x509.Certificate
}

// ctbLeaf is a certificate a PodCertificateRequest got and when it was seen.
type ctbLeaf struct {
	seen  time.Time
	chain []*x509.Certificate
}

// TestClusterTrustBundleRotation follows the root through prepare, activate
// while a kubelet keeps getting pod certificates: every version of the
// ClusterTrustBundles (the signer's and Istio's), as a watch sees it, holds
// the root of every certificate live while it is current; retire is refused
// while pod certificates chain to the old root, and once forced the bundle
// has gone {old}, {old, new}, {new}.
func TestClusterTrustBundleRotation(t *testing.T) {
	env := kubeenv.Start(t)
	const ns, leaseNS = "ctb", "ctb-lease"
	bundles := []string{"castellan.io:workload-identity:trust-bundle", "istio.io:istiod-ca:root-cert"}
	kc := castellanKubeconfigFor(t, env, signerRBAC{podSigners: []string{defaultPodSigner}, istioBundle: true}, leaseNS)
	env.CreateNamespace(t, ns, nil)
	sa := env.CreateServiceAccount(t, ns, "web")
	kl := newKubelet(t, env, "ctb-node")
	pod := env.CreatePod(t, ns, "web-1", "web", kl.node.Name, meshVolume(defaultPodSigner))
	key := testKey(t, "ctb")

	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	var (
		mu       sync.Mutex
		versions []ctbVersion
		leaves   []ctbLeaf
		failures []error
	)
	fail := func(err error) { mu.Lock(); failures = append(failures, err); mu.Unlock() }
	w, err := env.Client.CertificatesV1().ClusterTrustBundles().Watch(ctx, metav1.ListOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer w.Stop()
	var wg sync.WaitGroup
	wg.Go(func() {
		for ev := range w.ResultChan() {
			ctb, ok := ev.Object.(*certv1.ClusterTrustBundle)
			if !ok || (ev.Type != watch.Added && ev.Type != watch.Modified) {
				if (ev.Type == watch.Deleted || ev.Type == watch.Error) && ctx.Err() == nil {
					fail(fmt.Errorf("ClusterTrustBundle watch: %s %v", ev.Type, ev.Object))
				}
				continue
			}
			roots, err := parseCerts([]byte(ctb.Spec.TrustBundle))
			if err != nil {
				fail(fmt.Errorf("ClusterTrustBundle %s: %w", ctb.Name, err))
				continue
			}
			mu.Lock()
			versions = append(versions, ctbVersion{name: ctb.Name, seen: time.Now(), roots: roots})
			mu.Unlock()
		}
		if ctx.Err() == nil {
			fail(errors.New("ClusterTrustBundle watch ended early"))
		}
	})

	srv := startServer(t, serverConfig{signer: "selfsigned", extraArgs: kubeArgs(kc, "tokenreview", "--root-configmaps=false",
		"--leader-election-namespace", leaseNS, "--istio-cluster-trust-bundle",
		"--intermediate-lifetime", "48h", "--rotation-propagation-window", rotWindow.String(), "--rotation-schedule=false",
		"--ca-state-poll-interval", "200ms", "--clock-skew", "1s")})

	// The kubelet asks for a certificate every rotRenewal.
	wg.Go(func() {
		for ctx.Err() == nil {
			if leaf, err := podCertificate(ctx, env, kl, pod, sa, key); err != nil {
				if ctx.Err() == nil {
					fail(err)
				}
			} else {
				mu.Lock()
				leaves = append(leaves, ctbLeaf{seen: time.Now(), chain: leaf})
				mu.Unlock()
			}
			select {
			case <-ctx.Done():
			case <-time.After(rotRenewal):
			}
		}
	})
	waitLeaves := func(n int) {
		t.Helper()
		deadline := time.Now().Add(rotStepLimit)
		mu.Lock()
		want := len(leaves) + n
		mu.Unlock()
		for {
			mu.Lock()
			got := len(leaves)
			mu.Unlock()
			if got >= want {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("%d pod certificates within %v, want %d", got, rotStepLimit, want)
			}
			time.Sleep(eventualPoll)
		}
	}

	waitLeaves(2)
	oldRoot := rotStatus(t, srv).only(t, "root", "active")
	srv.ctl(t, "ca", "rotate", "prepare")
	newRoot := rotStatus(t, srv).only(t, "root", "prepared")
	waitLeaves(1)
	waitNextStep(t, srv, newRoot.KeyID)
	srv.ctl(t, "ca", "rotate", "activate")
	activated := time.Now().Add(time.Second) // the leader applies the state within its poll interval
	waitLeaves(2)
	// Pod certificates live at least an hour (the API's minimum): the old
	// root stays while they do, and only a forced retire drops it.
	refused(t, srv, "has certificates chaining to it", "ca", "rotate", "retire")
	retired := time.Now()
	srv.ctl(t, "ca", "rotate", "retire", "--force")
	waitLeaves(2)
	cancel()
	w.Stop()
	wg.Wait()

	for _, err := range failures {
		t.Error(err)
	}
	// The roots of each bundle's versions, in order: {old}, {old, new}, {new}.
	for _, name := range bundles {
		var seq [][]string
		for _, v := range versions {
			if v.name != name {
				continue
			}
			var ids []string
			for _, r := range v.roots {
				ids = append(ids, keyIDOf(r))
			}
			slices.Sort(ids) // a set: the active root comes first
			if len(seq) == 0 || fmt.Sprint(seq[len(seq)-1]) != fmt.Sprint(ids) {
				seq = append(seq, ids)
			}
		}
		both := []string{oldRoot.KeyID, newRoot.KeyID}
		slices.Sort(both)
		want := fmt.Sprint([][]string{{oldRoot.KeyID}, both, {newRoot.KeyID}})
		if got := fmt.Sprint(seq); got != want {
			t.Errorf("ClusterTrustBundle %s went through roots %s, want %s", name, got, want)
		}
	}
	// Every certificate live while a version was current chains to it.
	checked := 0
	for i, v := range versions {
		until := time.Now()
		for _, next := range versions[i+1:] {
			if next.name == v.name {
				until = next.seen
				break
			}
		}
		pool := x509.NewCertPool()
		for _, r := range v.roots {
			pool.AddCert(r)
		}
		for _, l := range leaves {
			if !l.seen.Before(until) || !l.chain[0].NotAfter.After(v.seen) {
				continue // issued after this version, or expired before it
			}
			if v.seen.After(retired) && l.seen.Before(activated) {
				continue // the forced retire dropped their root on purpose
			}
			inter := x509.NewCertPool()
			for _, c := range l.chain[1:] {
				inter.AddCert(c)
			}
			checked++
			if _, err := l.chain[0].Verify(x509.VerifyOptions{Roots: pool, Intermediates: inter, CurrentTime: l.chain[0].NotBefore.Add(time.Second),
				KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err != nil {
				t.Errorf("%s as seen at %s misses the root of a live certificate (serial %x): %v", v.name, v.seen.Format(time.StampMilli), l.chain[0].SerialNumber, err)
			}
		}
	}
	t.Logf("%d pod certificates, %d bundle versions, %d (version, live certificate) pairs checked", len(leaves), len(versions), checked)
	if checked == 0 {
		t.Error("no certificate was checked against any bundle version")
	}
}

// podCertificate has kl request a certificate for pod and waits for it.
func podCertificate(ctx context.Context, env *kubeenv.Env, kl *kubelet, pod *corev1.Pod, sa *corev1.ServiceAccount, key crypto.Signer) ([]*x509.Certificate, error) {
	pcr, err := kl.request(ctx, pod, sa, defaultPodSigner, key, 3600)
	if err != nil {
		return nil, err
	}
	wctx, cancel := context.WithTimeout(ctx, pcrTimeout)
	defer cancel()
	for {
		got, err := env.Client.CertificatesV1().PodCertificateRequests(pcr.Namespace).Get(wctx, pcr.Name, metav1.GetOptions{})
		if err != nil {
			return nil, err
		}
		if c := got.Status.Conditions; len(c) > 0 {
			if c[0].Type != certv1.PodCertificateRequestConditionTypeIssued {
				return nil, fmt.Errorf("PodCertificateRequest %s: %s (%s): %s", got.Name, c[0].Type, c[0].Reason, c[0].Message)
			}
			return parseCerts([]byte(got.Status.CertificateChain))
		}
		select {
		case <-wctx.Done():
			return nil, fmt.Errorf("PodCertificateRequest %s not answered: %w", pcr.Name, wctx.Err())
		case <-time.After(eventualPoll):
		}
	}
}
