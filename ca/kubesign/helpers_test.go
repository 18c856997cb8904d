package kubesign

import (
	"context"
	"crypto"
	"crypto/rand"
	"crypto/x509"
	"errors"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	fakediscovery "k8s.io/client-go/discovery/fake"
	"k8s.io/client-go/kubernetes/fake"

	"github.com/castellan-ca/castellan/authn"
	"github.com/castellan-ca/castellan/ca"
	"github.com/castellan-ca/castellan/signer"
	"github.com/castellan-ca/castellan/signer/local"
	"github.com/castellan-ca/castellan/signer/signertest"
	"github.com/castellan-ca/castellan/storage"
	"github.com/castellan-ca/castellan/storage/embedded"
)

var td = spiffeid.RequireTrustDomainFromString("cluster.local")

// env is a real issuance pipeline (local signer over a test root, the
// embedded audit store) and a fake apiserver client for the controllers.
type env struct {
	client *fake.Clientset
	issuer *ca.Issuer
	store  *embedded.Store
	root   *signertest.CA
	pods   *podIndex
	// down makes the signer fail with signer.ErrSignerUnavailable.
	down atomic.Bool
}

func newEnv(t *testing.T, served ...string) *env {
	t.Helper()
	e := &env{client: fake.NewClientset(), pods: &podIndex{pods: map[string]*corev1.Pod{}}}
	d := e.client.Discovery().(*fakediscovery.FakeDiscovery)
	for _, gv := range served {
		d.Resources = append(d.Resources, &metav1.APIResourceList{GroupVersion: gv, APIResources: []metav1.APIResource{
			{Name: "podcertificaterequests"}, {Name: "certificatesigningrequests"}}})
	}
	e.root = signertest.NewRoot(t, "kubesign test root", signertest.CertOptions{})
	s, err := local.New(local.Config{Cert: e.root.Cert, Key: e.root.Key, Roots: []*x509.Certificate{e.root.Cert}})
	if err != nil {
		t.Fatal(err)
	}
	authority := ca.NewAuthority()
	if _, err := authority.Use("selfsigned", downSigner{Signer: s, down: &e.down}); err != nil {
		t.Fatal(err)
	}
	e.store, err = embedded.Open(context.Background(), filepath.Join(t.TempDir(), "audit.db"), embedded.Options{Writer: "test"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = e.store.Close() })
	e.issuer, err = ca.NewIssuer(ca.Config{TrustDomain: td, Authenticator: noAuthn{}, Audit: e.store, Authority: authority})
	if err != nil {
		t.Fatal(err)
	}
	return e
}

// records returns the audit log.
func (e *env) records(t *testing.T) []storage.Record {
	t.Helper()
	recs, err := e.store.List(context.Background(), storage.Query{Limit: storage.MaxLimit})
	if err != nil {
		t.Fatal(err)
	}
	return recs
}

// run runs fn (a controller's Run) until the test ends.
func run(t *testing.T, fn func(context.Context) error) {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- fn(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
	})
}

// eventually polls cond for up to 10 s.
func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); !cond(); time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
	}
}

// noAuthn: the controllers never authenticate through the pipeline.
type noAuthn struct{}

func (noAuthn) Authenticate(context.Context) (*authn.Caller, error) {
	return nil, errors.New("not used")
}

// downSigner is the real signer, or an outage.
type downSigner struct {
	signer.Signer
	down *atomic.Bool
}

func (d downSigner) Sign(ctx context.Context, req signer.SignRequest) (*signer.Chain, error) {
	if d.down.Load() {
		return nil, signer.ErrSignerUnavailable
	}
	return d.Signer.Sign(ctx, req)
}

// podIndex is a PodCache over a map.
type podIndex struct {
	mu   sync.Mutex
	pods map[string]*corev1.Pod
}

func (p *podIndex) Get(ns, name string) (*corev1.Pod, bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	pod, ok := p.pods[ns+"/"+name]
	return pod, ok
}

func (p *podIndex) HasSynced() bool { return true }

func (p *podIndex) put(pod *corev1.Pod) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.pods[pod.Namespace+"/"+pod.Name] = pod
}

// stubCSR is what the kubelet sends: an empty PKCS#10 request signed by key.
func stubCSR(t *testing.T, key crypto.Signer) []byte {
	t.Helper()
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, key)
	if err != nil {
		t.Fatal(err)
	}
	return der
}
