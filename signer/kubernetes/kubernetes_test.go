package kubernetes

import (
	"context"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"math/big"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	certv1 "k8s.io/api/certificates/v1"
	"k8s.io/client-go/kubernetes/fake"

	"github.com/castellan-ca/castellan/signer"
	"github.com/castellan-ca/castellan/signer/signertest"
)

// The conformance suite runs against a real kube-apiserver with Castellan's
// own CSR signer as the cluster's CA: e2e/kube_backend_test.go.

var id = spiffeid.RequireFromString("spiffe://cluster.local/ns/app/sa/web")

func rootsFile(t *testing.T, certs ...*x509.Certificate) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "roots.pem")
	if err := os.WriteFile(p, []byte(signer.EncodePEM(certs...)), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestNew(t *testing.T) {
	root := signertest.NewRoot(t, "cluster CA", signertest.CertOptions{})
	leaf := root.Sign(t, signertest.Template(id, signertest.Key(1).Public(), bigOne(), time.Now(), time.Now().Add(time.Hour)), signertest.Key(1).Public())
	good := rootsFile(t, root.Cert)
	for _, tc := range []struct {
		name string
		cfg  Config
		want string // substring of the error; "" for success
	}{
		{"ok", Config{Client: fake.NewClientset(), SignerName: "example.com/mesh", RootsFile: good}, ""},
		{"no client", Config{SignerName: "example.com/mesh", RootsFile: good}, "client is required"},
		{"no path in the signer name", Config{Client: fake.NewClientset(), SignerName: "mesh", RootsFile: good}, "is not <domain>/<path>"},
		{"a Kubernetes signer", Config{Client: fake.NewClientset(), SignerName: "kubernetes.io/kube-apiserver-client", RootsFile: good}, "is a Kubernetes signer"},
		{"no roots", Config{Client: fake.NewClientset(), SignerName: "example.com/mesh"}, "roots file"},
		{"roots file missing", Config{Client: fake.NewClientset(), SignerName: "example.com/mesh", RootsFile: filepath.Join(t.TempDir(), "none")}, "no such file"},
		{"a leaf among the roots", Config{Client: fake.NewClientset(), SignerName: "example.com/mesh", RootsFile: rootsFile(t, root.Cert, leaf)}, "is not a CA"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s, err := New(tc.cfg)
			if tc.want == "" {
				if err != nil {
					t.Fatal(err)
				}
				if got := s.TrustBundle(); !signer.SameCertificates(got, []*x509.Certificate{root.Cert}) {
					t.Errorf("TrustBundle = %v, want the roots file", got)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("New = %v, want an error containing %q", err, tc.want)
			}
		})
	}
}

// TestRefresh checks that a changed roots file changes the bundle (and
// says so), and that a broken one keeps the current bundle.
func TestRefresh(t *testing.T) {
	r1 := signertest.NewRoot(t, "root 1", signertest.CertOptions{})
	r2 := signertest.NewRoot(t, "root 2", signertest.CertOptions{})
	path := rootsFile(t, r1.Cert)
	s, err := New(Config{Client: fake.NewClientset(), SignerName: "example.com/mesh", RootsFile: path})
	if err != nil {
		t.Fatal(err)
	}
	if changed, err := s.refresh(context.Background()); changed || err != nil {
		t.Fatalf("refresh of an unchanged file = %v, %v", changed, err)
	}
	if err := os.WriteFile(path, []byte(signer.EncodePEM(r1.Cert, r2.Cert)), 0o600); err != nil {
		t.Fatal(err)
	}
	if changed, err := s.refresh(context.Background()); !changed || err != nil {
		t.Fatalf("refresh after adding a root = %v, %v", changed, err)
	}
	if got := s.TrustBundle(); len(got) != 2 {
		t.Fatalf("bundle holds %d roots, want 2", len(got))
	}
	if err := os.WriteFile(path, []byte("garbage"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := s.refresh(context.Background()); err == nil {
		t.Fatal("refresh of a broken file succeeded")
	}
	if got := s.TrustBundle(); len(got) != 2 {
		t.Errorf("a broken file changed the bundle to %d roots", len(got))
	}
}

// TestSignRefusesBeforeCreating checks what Sign refuses without asking
// the cluster: a CSR whose names are not the grant's, too short a lifetime,
// a cancelled caller.
func TestSignRefusesBeforeCreating(t *testing.T) {
	root := signertest.NewRoot(t, "cluster CA", signertest.CertOptions{})
	client := fake.NewClientset()
	s, err := New(Config{Client: client, SignerName: "example.com/mesh", RootsFile: rootsFile(t, root.Cert), Timeout: 30 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	key := signertest.Key(2)
	now := time.Now()
	tmpl := signertest.Template(id, key.Public(), bigOne(), now, now.Add(time.Hour))
	other, _ := url.Parse("spiffe://cluster.local/ns/app/sa/other")
	cancelled, cancel := context.WithCancel(context.Background())
	cancel()
	for _, tc := range []struct {
		name string
		ctx  context.Context
		req  signer.SignRequest
		want error  // errors.Is target, or nil for a message check
		msg  string // substring
	}{
		{"CSR without SAN", context.Background(), signer.SignRequest{Template: tmpl, PublicKey: key.Public(), Identity: id,
			CSR: signertest.CSR(t, key, pkix.Name{}, nil)}, nil, "must carry exactly the granted ones"},
		{"CSR for another identity", context.Background(), signer.SignRequest{Template: tmpl, PublicKey: key.Public(), Identity: id,
			CSR: signertest.CSR(t, key, pkix.Name{}, other)}, nil, "must carry exactly the granted ones"},
		{"lifetime below the API's minimum", context.Background(), signertest.Request(t,
			signertest.Template(id, key.Public(), bigOne(), now, now.Add(5*time.Minute)), id, key), nil, "too short"},
		{"cancelled", cancelled, signertest.Request(t, tmpl, id, key), context.Canceled, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			chain, err := s.Sign(tc.ctx, tc.req)
			if chain != nil || err == nil {
				t.Fatalf("Sign = %v, %v; want a refusal", chain, err)
			}
			if tc.want != nil && !errors.Is(err, tc.want) || tc.msg != "" && !strings.Contains(err.Error(), tc.msg) {
				t.Errorf("Sign error = %v, want %v %q", err, tc.want, tc.msg)
			}
			if errors.Is(err, signer.ErrSignerUnavailable) {
				t.Errorf("a refusal of the request is retryable: %v", err)
			}
		})
	}
	if n := len(client.Actions()); n != 0 {
		t.Errorf("%d API calls for requests refused up front", n)
	}
}

func TestUsages(t *testing.T) {
	rsaKey := signertest.LeafKeys()["rsa-2048"]
	ec := signertest.Key(1)
	serving := &x509.Certificate{ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}
	for _, tc := range []struct {
		req  signer.SignRequest
		want []certv1.KeyUsage
	}{
		{signer.SignRequest{PublicKey: ec.Public(), Template: signertest.Template(id, ec.Public(), bigOne(), time.Now(), time.Now())},
			[]certv1.KeyUsage{certv1.UsageDigitalSignature, certv1.UsageServerAuth, certv1.UsageClientAuth}},
		{signer.SignRequest{PublicKey: rsaKey.Public(), Template: signertest.Template(id, rsaKey.Public(), bigOne(), time.Now(), time.Now())},
			[]certv1.KeyUsage{certv1.UsageDigitalSignature, certv1.UsageKeyEncipherment, certv1.UsageServerAuth, certv1.UsageClientAuth}},
		{signer.SignRequest{PublicKey: ec.Public(), Template: serving}, []certv1.KeyUsage{certv1.UsageDigitalSignature, certv1.UsageServerAuth}},
	} {
		if got := usages(tc.req); !slices.Equal(got, tc.want) {
			t.Errorf("usages = %v, want %v", got, tc.want)
		}
	}
}

func bigOne() *big.Int { return big.NewInt(1) }
