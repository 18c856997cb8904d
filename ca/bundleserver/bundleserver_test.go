package bundleserver

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/castellan-ca/castellan/authn"
	"github.com/castellan-ca/castellan/ca"
	"github.com/castellan-ca/castellan/ca/rotation"
	"github.com/castellan-ca/castellan/internal/adminapi"
	"github.com/castellan-ca/castellan/signer/selfsigned"
	"github.com/castellan-ca/castellan/storage"
	"github.com/castellan-ca/castellan/storage/cafile"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/federation"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

var td = spiffeid.RequireTrustDomainFromString("mesh.example")

type discardAudit struct{}

func (discardAudit) Append(context.Context, *storage.Record) error { return nil }

type noAuthn struct{}

func (noAuthn) Authenticate(context.Context) (*authn.Caller, error) {
	return nil, authn.ErrNoCredentials
}

// newCA returns a rotation manager with a self-signed root in use, and an
// issuer on its authority.
func newCA(t *testing.T) (*rotation.Manager, *ca.Authority, *ca.Issuer) {
	t.Helper()
	store, err := cafile.Open(filepath.Join(t.TempDir(), "state.json"))
	if err != nil {
		t.Fatal(err)
	}
	authority := ca.NewAuthority()
	gen, err := selfsigned.NewGenerator(selfsigned.Options{TrustDomain: td})
	if err != nil {
		t.Fatal(err)
	}
	m, err := rotation.New(rotation.Config{Authority: authority, Store: store, Audit: discardAudit{}, Backend: gen, PropagationWindow: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	if err := m.Bootstrap(t.Context()); err != nil {
		t.Fatal(err)
	}
	is, err := ca.NewIssuer(ca.Config{TrustDomain: td, Authenticator: noAuthn{}, Audit: discardAudit{}, Authority: authority})
	if err != nil {
		t.Fatal(err)
	}
	return m, authority, is
}

func start(t *testing.T, cfg Config) string {
	t.Helper()
	cfg.Addr = "127.0.0.1:0"
	s, err := New(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan error, 1)
	go func() { served <- s.Serve() }()
	t.Cleanup(func() {
		if err := s.Close(context.Background()); err != nil {
			t.Errorf("Close: %v", err)
		}
		if err := <-served; err != nil {
			t.Errorf("Serve after Close: %v", err)
		}
	})
	return "https://" + s.Addr() + "/"
}

func sameRoots(got, want []*x509.Certificate) bool {
	if len(got) != len(want) {
		return false
	}
	for i := range got {
		if !got[i].Equal(want[i]) {
			return false
		}
	}
	return true
}

// TestSPIFFEAuth fetches the bundle with go-spiffe's federation client the
// way SPIRE does under https_spiffe, before and during a root rotation.
func TestSPIFFEAuth(t *testing.T) {
	m, authority, is := newCA(t)
	url := start(t, Config{Authority: authority, TrustDomain: td, Auth: AuthSPIFFE, Issuer: is, RefreshHint: time.Minute})
	endpointID := spiffeid.RequireFromPath(td, EndpointPath)
	ctx := t.Context()
	// The federating party's bootstrap bundle: what it trusts before the first fetch.
	bootstrap := x509bundle.FromX509Authorities(td, authority.Current().Roots)

	for _, tc := range []struct {
		name   string
		before func(t *testing.T)
	}{
		{"current root", func(*testing.T) {}},
		{"prepared root is served as soon as it exists", func(t *testing.T) {
			if _, err := m.Rotate(ctx, adminapi.RotateRequest{Step: adminapi.StepPrepare, Target: adminapi.TargetRoot, Caller: "test"}); err != nil {
				t.Fatal(err)
			}
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tc.before(t)
			b, err := federation.FetchBundle(ctx, td, url, federation.WithSPIFFEAuth(bootstrap, endpointID))
			if err != nil {
				t.Fatalf("FetchBundle: %v", err)
			}
			if !sameRoots(b.X509Authorities(), authority.Current().Roots) {
				t.Errorf("fetched %d roots, want the %d of the trust bundle", len(b.X509Authorities()), len(authority.Current().Roots))
			}
			if hint, ok := b.RefreshHint(); !ok || hint != time.Minute {
				t.Errorf("refresh hint %v (%v), want 1m", hint, ok)
			}
		})
	}

	t.Run("another endpoint ID is refused by the client", func(t *testing.T) {
		other := spiffeid.RequireFromPath(td, "/not/the/endpoint")
		if _, err := federation.FetchBundle(ctx, td, url, federation.WithSPIFFEAuth(bootstrap, other)); err == nil {
			t.Errorf("FetchBundle authorised an endpoint with another SPIFFE ID")
		}
	})
	t.Run("a party trusting another root is refused", func(t *testing.T) {
		_, stranger, _ := newCA(t)
		if _, err := federation.FetchBundle(t.Context(), td, url, federation.WithSPIFFEAuth(
			x509bundle.FromX509Authorities(td, stranger.Current().Roots), endpointID)); err == nil {
			t.Errorf("FetchBundle trusted an endpoint outside its bundle")
		}
	})
}

// TestWebPKIAuth serves under a Web PKI certificate from files and picks up
// a renewed certificate without a restart.
func TestWebPKIAuth(t *testing.T) {
	_, authority, _ := newCA(t)
	dir := t.TempDir()
	webCA, webKey := webCert(t, nil, nil, dir, "")
	certFile, keyFile := filepath.Join(dir, "tls.crt"), filepath.Join(dir, "tls.key")
	webCert(t, webCA, webKey, dir, "first")
	url := start(t, Config{Authority: authority, TrustDomain: td, Auth: AuthWeb, CertFile: certFile, KeyFile: keyFile})
	pool := x509.NewCertPool()
	pool.AddCert(webCA)
	ctx := context.Background()

	b, err := federation.FetchBundle(ctx, td, url, federation.WithWebPKIRoots(pool))
	if err != nil {
		t.Fatalf("FetchBundle: %v", err)
	}
	if !sameRoots(b.X509Authorities(), authority.Current().Roots) {
		t.Errorf("fetched roots differ from the trust bundle")
	}
	if _, err := federation.FetchBundle(ctx, td, url, federation.WithWebPKIRoots(x509.NewCertPool())); err == nil {
		t.Errorf("a client without the web CA accepted the endpoint")
	}

	// Renewal: a certificate from another CA replaces the files.
	otherCA, otherKey := webCert(t, nil, nil, t.TempDir(), "")
	webCert(t, otherCA, otherKey, dir, "second")
	otherPool := x509.NewCertPool()
	otherPool.AddCert(otherCA)
	if _, err := federation.FetchBundle(ctx, td, url, federation.WithWebPKIRoots(otherPool)); err != nil {
		t.Errorf("the renewed certificate is not served: %v", err)
	}
}

func TestStartErrors(t *testing.T) {
	_, authority, _ := newCA(t)
	for _, tc := range []struct {
		name string
		cfg  Config
	}{
		{"unknown auth", Config{Authority: authority, TrustDomain: td, Auth: "http"}},
		{"web without files", Config{Authority: authority, TrustDomain: td, Auth: AuthWeb, CertFile: "/nonexistent", KeyFile: "/nonexistent"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tc.cfg.Addr = "127.0.0.1:0"
			if _, err := New(context.Background(), tc.cfg); err == nil {
				t.Errorf("New succeeded")
			}
		})
	}
}

// webCert makes a CA (parent nil) or a localhost server certificate signed
// by parent, written as tls.crt/tls.key into dir.
func webCert(t *testing.T, parent *x509.Certificate, parentKey *ecdsa.PrivateKey, dir, name string) (*x509.Certificate, *ecdsa.PrivateKey) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(now.UnixNano()), Subject: pkix.Name{CommonName: "web " + name},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(time.Hour)}
	if parent == nil {
		tmpl.IsCA, tmpl.BasicConstraintsValid, tmpl.KeyUsage = true, true, x509.KeyUsageCertSign
		parent, parentKey = tmpl, key
	} else {
		tmpl.IPAddresses = []net.IP{net.IPv4(127, 0, 0, 1)}
		tmpl.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, key.Public(), parentKey)
	if err != nil {
		t.Fatal(err)
	}
	c, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	if name != "" {
		keyDER, _ := x509.MarshalPKCS8PrivateKey(key)
		for file, block := range map[string]*pem.Block{"tls.crt": {Type: "CERTIFICATE", Bytes: der}, "tls.key": {Type: "PRIVATE KEY", Bytes: keyDER}} {
			if err := os.WriteFile(filepath.Join(dir, file), pem.EncodeToMemory(block), 0o600); err != nil {
				t.Fatal(err)
			}
		}
	}
	return c, key
}
