package publish

import (
	"context"
	"crypto"
	"crypto/x509"
	"log/slog"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/castellan-ca/castellan/authn"
	"github.com/castellan-ca/castellan/ca"
	"github.com/castellan-ca/castellan/signer"
	"github.com/castellan-ca/castellan/signer/local"
	"github.com/castellan-ca/castellan/signer/signertest"
	"github.com/castellan-ca/castellan/storage"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes/fake"
)

// memAudit keeps the records appended to it.
type memAudit struct {
	mu   sync.Mutex
	recs []storage.Record
}

func (m *memAudit) Append(_ context.Context, r *storage.Record) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.recs = append(m.recs, *r)
	return nil
}

func (m *memAudit) records() []storage.Record {
	m.mu.Lock()
	defer m.mu.Unlock()
	return slices.Clone(m.recs)
}

// testCA is a root with an intermediate that issues.
type testCA struct{ root, inter *signertest.CA }

func newTestCA(t *testing.T, name string) testCA {
	root := signertest.NewRoot(t, name+" root", signertest.CertOptions{})
	return testCA{root: root, inter: root.NewIntermediate(t, name+" intermediate", signertest.CertOptions{})}
}

// use makes c the authority's active CA, keeping retained roots in the bundle.
func (c testCA) use(t *testing.T, a *ca.Authority, retained ...*x509.Certificate) *ca.State {
	t.Helper()
	s, err := local.New(local.Config{Cert: c.inter.Cert, Key: c.inter.Key, Roots: []*x509.Certificate{c.root.Cert}})
	if err != nil {
		t.Fatal(err)
	}
	st, err := a.Use("intermediate", s, retained...)
	if err != nil {
		t.Fatal(err)
	}
	return st
}

func newIstiodCert(t *testing.T, client *fake.Clientset, a *ca.Authority, audit *memAudit, now func() time.Time) *IstiodCert {
	t.Helper()
	issuer, err := ca.NewIssuer(ca.Config{TrustDomain: spiffeid.RequireTrustDomainFromString("cluster.local"), Audit: audit, Authority: a,
		Authenticator: authn.Chain{}, Now: now})
	if err != nil {
		t.Fatal(err)
	}
	return &IstiodCert{Client: client, Issuer: issuer, Bundle: a, DNSNames: IstiodDNSNames(IstiodNamespace, []string{"canary"}),
		TTL: time.Hour, Now: now, Logger: slog.New(slog.DiscardHandler)}
}

// getter reads the Secret from the fake API, as the lister would.
func getter(client *fake.Clientset) func(string) (*corev1.Secret, error) {
	return func(name string) (*corev1.Secret, error) {
		o, err := client.Tracker().Get(corev1.SchemeGroupVersion.WithResource("secrets"), IstiodNamespace, name)
		if err != nil {
			return nil, err
		}
		return o.(*corev1.Secret), nil
	}
}

// checkSecret requires the Secret to hold a certificate for istiod's names
// under want's intermediate, its key, and ca.crt equal to the bundle.
func checkSecret(t *testing.T, client *fake.Clientset, st *ca.State, want testCA) *x509.Certificate {
	t.Helper()
	sec, err := getter(client)(IstiodSecretName)
	if err != nil {
		t.Fatal(err)
	}
	if sec.Type != corev1.SecretTypeTLS {
		t.Errorf("type = %s, want %s", sec.Type, corev1.SecretTypeTLS)
	}
	chain, err := signer.ParseCertificatesPEM(sec.Data[TLSCertKey])
	if err != nil {
		t.Fatal(err)
	}
	if len(chain) != 2 || !chain[1].Equal(want.inter.Cert) {
		t.Fatalf("tls.crt holds %d certificates, want the leaf then the issuing intermediate", len(chain))
	}
	leaf := chain[0]
	wantNames := []string{"istiod.istio-system.svc", "istiod.istio-system.svc.cluster.local",
		"istiod-canary.istio-system.svc", "istiod-canary.istio-system.svc.cluster.local"}
	if !sameNames(leaf.DNSNames, wantNames) || len(leaf.URIs) != 0 {
		t.Errorf("SANs = %v %v, want %v", leaf.DNSNames, leaf.URIs, wantNames)
	}
	if !slices.Equal(leaf.ExtKeyUsage, []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}) || leaf.IsCA {
		t.Errorf("usages %v, CA %v: want a server-only leaf", leaf.ExtKeyUsage, leaf.IsCA)
	}
	key, err := parseKey(sec.Data[TLSKeyKey])
	if err != nil {
		t.Fatal(err)
	}
	if pub, _ := key.Public().(interface{ Equal(crypto.PublicKey) bool }); pub == nil || !pub.Equal(leaf.PublicKey) {
		t.Error("tls.key does not match the leaf")
	}
	if string(sec.Data[CACertKey]) != st.BundlePEM {
		t.Errorf("ca.crt is not the trust bundle")
	}
	roots := x509.NewCertPool()
	roots.AddCert(want.root.Cert)
	inter := x509.NewCertPool()
	inter.AddCert(chain[1])
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: roots, Intermediates: inter, DNSName: "istiod.istio-system.svc", CurrentTime: leaf.NotBefore.Add(time.Minute)}); err != nil {
		t.Errorf("leaf does not verify for istiod.istio-system.svc under %s: %v", want.root.Cert.Subject.CommonName, err)
	}
	return leaf
}

// TestIstiodCertLifecycle follows the Secret through issuance, a restart of
// the controller (kept), each rotation phase (reissued), an edit and a
// renewal, counting audited issuances.
func TestIstiodCertLifecycle(t *testing.T) {
	ctx := context.Background()
	client := fake.NewClientset()
	a := ca.NewAuthority()
	oldCA, newCA := newTestCA(t, "old"), newTestCA(t, "new")
	st := oldCA.use(t, a)
	audit := &memAudit{}
	now := time.Now()
	clock := func() time.Time { return now }
	c := newIstiodCert(t, client, a, audit, clock)
	logger := slog.New(slog.DiscardHandler)

	issued := func(t *testing.T, want int) {
		t.Helper()
		n := 0
		for _, r := range audit.records() {
			if r.Kind == storage.KindOperator && r.Outcome == storage.OutcomeOK && r.Serial != "" {
				n++
			}
		}
		if n != want {
			t.Fatalf("%d audited issuances, want %d", n, want)
		}
	}
	step := func(t *testing.T, written uint64) uint64 {
		t.Helper()
		wait, gen, err := c.reconcile(ctx, getter(client), written, logger)
		if err != nil {
			t.Fatal(err)
		}
		if wait <= 0 || wait > time.Hour {
			t.Errorf("next check in %v, want within the certificate's life", wait)
		}
		return gen
	}

	gen := step(t, 0)
	first := checkSecret(t, client, st, oldCA)
	issued(t, 1)
	gen = step(t, gen)
	if !checkSecret(t, client, st, oldCA).Equal(first) {
		t.Fatal("a current Secret was rewritten")
	}
	issued(t, 1)

	// A new leader (written 0) keeps a Secret that is still current.
	if step(t, 0) != st.Generation {
		t.Error("new term did not adopt the current Secret's generation")
	}
	issued(t, 1)

	// prepare: the new root joins the bundle; the old CA still issues.
	st = oldCA.use(t, a, newCA.root.Cert)
	gen = step(t, gen)
	checkSecret(t, client, st, oldCA)
	issued(t, 2)
	// activate: the new CA issues, both roots trusted.
	st = newCA.use(t, a, oldCA.root.Cert)
	gen = step(t, gen)
	checkSecret(t, client, st, newCA)
	issued(t, 3)
	// retire: the old root leaves.
	st = newCA.use(t, a)
	gen = step(t, gen)
	current := checkSecret(t, client, st, newCA)
	issued(t, 4)

	// An edit (someone replaced ca.crt) is undone.
	sec, _ := getter(client)(IstiodSecretName)
	sec.Data[CACertKey] = []byte("tampered")
	if _, err := client.CoreV1().Secrets(IstiodNamespace).Update(ctx, sec, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	gen = step(t, gen)
	checkSecret(t, client, st, newCA)
	issued(t, 5)

	// Renewal at two thirds of the life.
	now = current.NotBefore.Add(current.NotAfter.Sub(current.NotBefore) * 2 / 3).Add(time.Second)
	step(t, gen)
	if checkSecret(t, client, st, newCA).Equal(current) {
		t.Error("not renewed after two thirds of its life")
	}
	issued(t, 6)
}

// TestIstiodCertRefusesOtherTypes leaves a Secret of another type alone.
func TestIstiodCertRefusesOtherTypes(t *testing.T) {
	client := fake.NewClientset(&corev1.Secret{ObjectMeta: metav1.ObjectMeta{Name: IstiodSecretName, Namespace: IstiodNamespace},
		Type: corev1.SecretTypeServiceAccountToken, Data: map[string][]byte{"token": []byte("x")}})
	a := ca.NewAuthority()
	newTestCA(t, "ca").use(t, a)
	audit := &memAudit{}
	c := newIstiodCert(t, client, a, audit, time.Now)
	if _, _, err := c.reconcile(context.Background(), getter(client), 0, slog.New(slog.DiscardHandler)); err == nil {
		t.Fatal("a service-account token Secret was accepted")
	}
	sec, _ := getter(client)(IstiodSecretName)
	if string(sec.Data["token"]) != "x" || len(sec.Data) != 1 {
		t.Errorf("the Secret was changed: %v", sec.Data)
	}
	if n := len(audit.records()); n != 0 {
		t.Errorf("%d audit records, want none (nothing issued)", n)
	}
}

// TestIstiodCertRun runs the controller: it writes the Secret, re-creates it
// when deleted and rewrites it when the CA changes.
func TestIstiodCertRun(t *testing.T) {
	client := fake.NewClientset()
	a := ca.NewAuthority()
	first, second := newTestCA(t, "first"), newTestCA(t, "second")
	st := first.use(t, a)
	c := newIstiodCert(t, client, a, &memAudit{}, time.Now)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- c.Run(ctx) }()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Error(err)
		}
	}()
	waitFor := func(what string, ok func(*corev1.Secret) bool) {
		t.Helper()
		for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
			sec, err := getter(client)(IstiodSecretName)
			if err == nil && ok(sec) {
				return
			}
			if err != nil && !apierrors.IsNotFound(err) {
				t.Fatal(err)
			}
		}
		t.Fatalf("timed out waiting for %s", what)
	}
	bundleIs := func(st *ca.State) func(*corev1.Secret) bool {
		return func(s *corev1.Secret) bool { return string(s.Data[CACertKey]) == st.BundlePEM }
	}
	waitFor("the Secret", bundleIs(st))
	checkSecret(t, client, st, first)
	if err := client.CoreV1().Secrets(IstiodNamespace).Delete(ctx, IstiodSecretName, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	waitFor("the Secret re-created", bundleIs(st))
	st = second.use(t, a, first.root.Cert)
	waitFor("the Secret under the new CA", bundleIs(st))
	checkSecret(t, client, st, second)
}

func TestIstiodDNSNames(t *testing.T) {
	for _, tc := range []struct {
		ns        string
		revisions []string
		want      []string
	}{
		{"istio-system", nil, []string{"istiod.istio-system.svc", "istiod.istio-system.svc.cluster.local"}},
		{"mesh", []string{"default", "1-28", ""}, []string{"istiod.mesh.svc", "istiod.mesh.svc.cluster.local",
			"istiod-1-28.mesh.svc", "istiod-1-28.mesh.svc.cluster.local"}},
	} {
		if got := IstiodDNSNames(tc.ns, tc.revisions); !slices.Equal(got, tc.want) {
			t.Errorf("IstiodDNSNames(%s, %v) = %v, want %v", tc.ns, tc.revisions, got, tc.want)
		}
	}
}
