package authn_test

import (
	"context"
	"crypto"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"math/big"
	"net"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/peer"

	"github.com/castellan-ca/castellan/authn"
	"github.com/castellan-ca/castellan/signer/signertest"
)

var (
	appID      = spiffeid.RequireFromPath(td, "/ns/default/sa/app")
	operatorID = spiffeid.RequireFromPath(td, "/castellan/operator")
)

// issueCert signs a client certificate for uris with parent, valid around now
// unless modify says otherwise.
func issueCert(t *testing.T, parent *signertest.CA, key crypto.Signer, uris []string, modify func(*x509.Certificate)) *x509.Certificate {
	t.Helper()
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber:          newSerial(),
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(time.Hour),
		KeyUsage:              x509.KeyUsageDigitalSignature,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		BasicConstraintsValid: true,
	}
	for _, u := range uris {
		pu, err := url.Parse(u)
		if err != nil {
			t.Fatal(err)
		}
		tmpl.URIs = append(tmpl.URIs, pu)
	}
	if modify != nil {
		modify(tmpl)
	}
	return parent.Sign(t, tmpl, key.Public())
}

func newSerial() *big.Int {
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		panic(err)
	}
	return n.Add(n, big.NewInt(1))
}

func tlsPeer(certs ...*x509.Certificate) context.Context {
	return peer.NewContext(context.Background(), &peer.Peer{
		Addr:     &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 1234},
		AuthInfo: credentials.TLSInfo{State: tls.ConnectionState{PeerCertificates: certs}},
	})
}

func TestClientCert(t *testing.T) {
	root := signertest.NewRoot(t, "Authn Test Root", signertest.CertOptions{})
	inter := root.NewIntermediate(t, "Authn Test Intermediate", signertest.CertOptions{})
	otherRoot := signertest.NewRoot(t, "Other Root", signertest.CertOptions{})
	key := signertest.Key(1)
	a := &authn.ClientCert{
		TrustDomain: td,
		Roots: func() *x509.CertPool {
			p := x509.NewCertPool()
			p.AddCert(root.Cert)
			return p
		},
		Operators: []spiffeid.ID{operatorID},
	}
	app := appID.String()
	leafOnInter := issueCert(t, inter, key, []string{app}, nil)

	tests := []struct {
		name       string
		ctx        context.Context
		want       *authn.Caller
		noCreds    bool
		errContain string
		// kind, when set, is the crypto/x509 error the refusal must wrap.
		kind  func(error) bool
		badID bool
	}{
		{name: "workload certificate", ctx: tlsPeer(issueCert(t, root, key, []string{app}, nil)),
			want: &authn.Caller{Method: authn.MethodMTLS, Identity: appID, Name: app}},
		{name: "client-auth only EKU", ctx: tlsPeer(issueCert(t, root, key, []string{app}, func(c *x509.Certificate) {
			c.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}
		})), want: &authn.Caller{Method: authn.MethodMTLS, Identity: appID, Name: app}},
		{name: "workload certificate via intermediate", ctx: tlsPeer(leafOnInter, inter.Cert),
			want: &authn.Caller{Method: authn.MethodMTLS, Identity: appID, Name: app}},
		{name: "operator certificate", ctx: tlsPeer(issueCert(t, root, key, []string{operatorID.String()}, nil)),
			want: &authn.Caller{Method: authn.MethodOperator, Name: operatorID.String(), Operator: true}},

		{name: "intermediate not presented", ctx: tlsPeer(leafOnInter), kind: unknownAuthority},
		{name: "another CA", ctx: tlsPeer(issueCert(t, otherRoot, key, []string{app}, nil)), kind: unknownAuthority},
		{name: "operator ID from another CA", ctx: tlsPeer(issueCert(t, otherRoot, key, []string{operatorID.String()}, nil)), kind: unknownAuthority},
		{name: "self-signed leaf", ctx: tlsPeer(selfSigned(t, key, app)), kind: unknownAuthority},
		{name: "expired", ctx: tlsPeer(issueCert(t, root, key, []string{app}, func(c *x509.Certificate) {
			c.NotBefore, c.NotAfter = time.Now().Add(-2*time.Hour), time.Now().Add(-time.Minute)
		})), kind: invalidCert(x509.Expired)},
		{name: "not yet valid", ctx: tlsPeer(issueCert(t, root, key, []string{app}, func(c *x509.Certificate) {
			c.NotBefore, c.NotAfter = time.Now().Add(time.Hour), time.Now().Add(2*time.Hour)
		})), kind: invalidCert(x509.Expired)},
		{name: "serverAuth-only EKU", ctx: tlsPeer(issueCert(t, root, key, []string{app}, func(c *x509.Certificate) {
			c.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}
		})), kind: invalidCert(x509.IncompatibleUsage)},
		{name: "two URI SANs", ctx: tlsPeer(issueCert(t, root, key, []string{app, "spiffe://cluster.local/ns/prod/sa/db"}, nil)), errContain: "exactly one URI SAN"},
		{name: "operator plus workload URI", ctx: tlsPeer(issueCert(t, root, key, []string{operatorID.String(), app}, nil)), errContain: "exactly one URI SAN"},
		{name: "no URI SAN", ctx: tlsPeer(issueCert(t, root, key, nil, nil)), errContain: "exactly one URI SAN"},
		{name: "DNS SAN beside the URI", ctx: tlsPeer(issueCert(t, root, key, []string{app}, func(c *x509.Certificate) {
			c.DNSNames = []string{"app.default.svc"}
		})), errContain: "exactly one URI SAN"},
		{name: "URI in another trust domain", ctx: tlsPeer(issueCert(t, root, key, []string{"spiffe://evil.example/ns/default/sa/app"}, nil)), badID: true},
		{name: "non-workload path", ctx: tlsPeer(issueCert(t, root, key, []string{"spiffe://cluster.local/castellan/other"}, nil)), badID: true},
		{name: "extra path segments", ctx: tlsPeer(issueCert(t, root, key, []string{app + "/x"}, nil)), badID: true},
		{name: "not a SPIFFE URI", ctx: tlsPeer(issueCert(t, root, key, []string{"https://cluster.local/ns/default/sa/app"}, nil)), errContain: "URI SAN"},
		{name: "CA certificate as leaf", ctx: tlsPeer(issueCert(t, root, key, []string{app}, func(c *x509.Certificate) {
			c.IsCA = true
			c.KeyUsage |= x509.KeyUsageCertSign
		})), errContain: "CA certificate"},
		{name: "root itself as leaf", ctx: tlsPeer(root.Cert), errContain: "CA certificate"},

		{name: "no peer", ctx: context.Background(), noCreds: true},
		{name: "peer without auth info", ctx: peer.NewContext(context.Background(), &peer.Peer{Addr: &net.TCPAddr{}}), noCreds: true},
		{name: "plaintext peer", ctx: peer.NewContext(context.Background(), &peer.Peer{Addr: &net.TCPAddr{}, AuthInfo: plainInfo{}}), noCreds: true},
		{name: "TLS without client certificate", ctx: tlsPeer(), noCreds: true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := a.Authenticate(tc.ctx)
			switch {
			case tc.want != nil:
				if err != nil {
					t.Fatalf("Authenticate: %v", err)
				}
				if *got != *tc.want {
					t.Errorf("caller = %+v, want %+v", *got, *tc.want)
				}
			case tc.noCreds:
				if !errors.Is(err, authn.ErrNoCredentials) || got != nil {
					t.Fatalf("Authenticate = %+v, %v; want ErrNoCredentials", got, err)
				}
			default:
				if err == nil || got != nil {
					t.Fatalf("Authenticate = %+v, %v; want an error", got, err)
				}
				if errors.Is(err, authn.ErrNoCredentials) || errors.Is(err, authn.ErrUnavailable) {
					t.Fatalf("error %v must be a refusal, not %v", err, errors.Unwrap(err))
				}
				if tc.badID != errors.Is(err, authn.ErrBadIdentity) {
					t.Errorf("errors.Is(err, ErrBadIdentity) = %v, want %v (err %v)", !tc.badID, tc.badID, err)
				}
				if tc.kind != nil && !tc.kind(err) {
					t.Errorf("error %v does not wrap the expected crypto/x509 error", err)
				}
				// Refusals without a kind of their own are told apart by the
				// detail they leave in the audit record.
				if !strings.Contains(err.Error(), tc.errContain) {
					t.Errorf("error %q does not mention %q", err, tc.errContain)
				}
			}
		})
	}
}

// TestClientCertRootsPerRequest: the trust bundle is read per request, so a
// rotation applies to the next call without rebuilding the authenticator.
func TestClientCertRootsPerRequest(t *testing.T) {
	oldRoot := signertest.NewRoot(t, "Old", signertest.CertOptions{})
	newRoot := signertest.NewRoot(t, "New", signertest.CertOptions{})
	pool := x509.NewCertPool()
	pool.AddCert(oldRoot.Cert)
	a := &authn.ClientCert{TrustDomain: td, Roots: func() *x509.CertPool { return pool }}
	onNew := tlsPeer(issueCert(t, newRoot, signertest.Key(2), []string{appID.String()}, nil))
	onOld := tlsPeer(issueCert(t, oldRoot, signertest.Key(2), []string{appID.String()}, nil))
	if _, err := a.Authenticate(onNew); err == nil {
		t.Fatal("certificate of a root not yet trusted was accepted")
	}
	if _, err := a.Authenticate(onOld); err != nil {
		t.Fatalf("old root: %v", err)
	}
	pool = x509.NewCertPool()
	pool.AddCert(newRoot.Cert)
	if _, err := a.Authenticate(onNew); err != nil {
		t.Fatalf("after rotation: %v", err)
	}
	if _, err := a.Authenticate(onOld); err == nil {
		t.Fatal("certificate of a retired root was accepted")
	}
}

// TestClientCertRealHandshake feeds the authenticator the connection state of a
// real TLS handshake in which the server only requests a certificate.
func TestClientCertRealHandshake(t *testing.T) {
	root := signertest.NewRoot(t, "Handshake Root", signertest.CertOptions{})
	inter := root.NewIntermediate(t, "Handshake Intermediate", signertest.CertOptions{})
	serverKey, clientKey := signertest.Key(5), signertest.Key(6)
	serverCert := issueCert(t, root, serverKey, nil, func(c *x509.Certificate) {
		c.DNSNames = []string{"istiod.istio-system.svc"}
		c.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}
	})
	clientCert := issueCert(t, inter, clientKey, []string{appID.String()}, nil)
	roots := x509.NewCertPool()
	roots.AddCert(root.Cert)

	handshake := func(t *testing.T, client []tls.Certificate) tls.ConnectionState {
		t.Helper()
		c, s := net.Pipe()
		defer c.Close()
		defer s.Close()
		srv := tls.Server(s, &tls.Config{
			Certificates: []tls.Certificate{{Certificate: [][]byte{serverCert.Raw}, PrivateKey: serverKey}},
			ClientAuth:   tls.RequestClientCert,
			MinVersion:   tls.VersionTLS12,
		})
		cli := tls.Client(c, &tls.Config{RootCAs: roots, ServerName: "istiod.istio-system.svc", Certificates: client})
		errc := make(chan error, 1)
		go func() { errc <- cli.Handshake() }()
		if err := srv.Handshake(); err != nil {
			t.Fatalf("server handshake: %v", err)
		}
		if err := <-errc; err != nil {
			t.Fatalf("client handshake: %v", err)
		}
		return srv.ConnectionState()
	}
	a := &authn.ClientCert{TrustDomain: td, Roots: func() *x509.CertPool { return roots }}
	ctxOf := func(st tls.ConnectionState) context.Context {
		return peer.NewContext(context.Background(), &peer.Peer{Addr: &net.TCPAddr{}, AuthInfo: credentials.TLSInfo{State: st}})
	}

	st := handshake(t, []tls.Certificate{{Certificate: [][]byte{clientCert.Raw, inter.Cert.Raw}, PrivateKey: clientKey}})
	caller, err := a.Authenticate(ctxOf(st))
	if err != nil {
		t.Fatalf("Authenticate after handshake: %v", err)
	}
	if caller.Method != authn.MethodMTLS || caller.Identity != appID {
		t.Errorf("caller = %+v", caller)
	}
	st = handshake(t, nil)
	if _, err := a.Authenticate(ctxOf(st)); !errors.Is(err, authn.ErrNoCredentials) {
		t.Errorf("no client certificate: err = %v, want ErrNoCredentials", err)
	}
}

func selfSigned(t *testing.T, key crypto.Signer, uri string) *x509.Certificate {
	t.Helper()
	tmpl := &x509.Certificate{SerialNumber: newSerial(), NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}, BasicConstraintsValid: true}
	pu, _ := url.Parse(uri)
	tmpl.URIs = []*url.URL{pu}
	// Self-signed: the template is its own issuer.
	return (&signertest.CA{Cert: tmpl, Key: key}).Sign(t, tmpl, key.Public())
}

// plainInfo is the AuthInfo of a connection without TLS.
type plainInfo struct{ credentials.CommonAuthInfo }

func (plainInfo) AuthType() string { return "insecure" }

// stubAuthn is an Authenticator returning fixed results and counting calls.
type stubAuthn struct {
	caller *authn.Caller
	err    error
	calls  int
}

func (s *stubAuthn) Authenticate(context.Context) (*authn.Caller, error) {
	s.calls++
	return s.caller, s.err
}

func TestChain(t *testing.T) {
	alice := &authn.Caller{Method: "test", Identity: appID, Name: appID.String()}
	bob := &authn.Caller{Method: "other", Name: "bob", Operator: true}
	refused := errors.New("token expired")
	tests := []struct {
		name      string
		chain     func() (authn.Chain, []*stubAuthn)
		want      *authn.Caller
		wantErr   error
		wantCalls []int
	}{
		{name: "empty chain", chain: func() (authn.Chain, []*stubAuthn) { return nil, nil }, wantErr: authn.ErrNoCredentials},
		{name: "first accepts", chain: stubs(&stubAuthn{caller: alice}, &stubAuthn{caller: bob}), want: alice, wantCalls: []int{1, 0}},
		{name: "no credentials falls through", chain: stubs(&stubAuthn{err: authn.ErrNoCredentials}, &stubAuthn{caller: bob}), want: bob, wantCalls: []int{1, 1}},
		{name: "wrapped no credentials falls through", chain: stubs(&stubAuthn{err: errors.Join(errors.New("x"), authn.ErrNoCredentials)}, &stubAuthn{caller: bob}), want: bob, wantCalls: []int{1, 1}},
		{name: "real error stops the chain", chain: stubs(&stubAuthn{err: refused}, &stubAuthn{caller: bob}), wantErr: refused, wantCalls: []int{1, 0}},
		{name: "unavailable stops the chain", chain: stubs(&stubAuthn{err: authn.ErrUnavailable}, &stubAuthn{caller: bob}), wantErr: authn.ErrUnavailable, wantCalls: []int{1, 0}},
		{name: "all without credentials", chain: stubs(&stubAuthn{err: authn.ErrNoCredentials}, &stubAuthn{err: authn.ErrNoCredentials}), wantErr: authn.ErrNoCredentials, wantCalls: []int{1, 1}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			chain, s := tc.chain()
			got, err := chain.Authenticate(context.Background())
			if tc.wantErr != nil {
				if !errors.Is(err, tc.wantErr) || got != nil {
					t.Fatalf("Authenticate = %+v, %v; want %v", got, err, tc.wantErr)
				}
			} else if err != nil || got != tc.want {
				t.Fatalf("Authenticate = %+v, %v; want %+v", got, err, tc.want)
			}
			for i, n := range tc.wantCalls {
				if s[i].calls != n {
					t.Errorf("authenticator %d called %d times, want %d", i, s[i].calls, n)
				}
			}
		})
	}

	t.Run("real ClientCert without a certificate falls through", func(t *testing.T) {
		root := signertest.NewRoot(t, "Chain Root", signertest.CertOptions{})
		cc := &authn.ClientCert{TrustDomain: td, Roots: func() *x509.CertPool { p := x509.NewCertPool(); p.AddCert(root.Cert); return p }}
		next := &stubAuthn{caller: alice}
		got, err := authn.Chain{cc, next}.Authenticate(tlsPeer())
		if err != nil || got != alice {
			t.Fatalf("Authenticate = %+v, %v; want the next authenticator's caller", got, err)
		}
		// A presented but invalid certificate is refused, not skipped.
		bad := issueCert(t, signertest.NewRoot(t, "Other", signertest.CertOptions{}), signertest.Key(1), []string{appID.String()}, nil)
		got, err = authn.Chain{cc, next}.Authenticate(tlsPeer(bad))
		if err == nil || errors.Is(err, authn.ErrNoCredentials) || got != nil {
			t.Fatalf("Authenticate with a foreign certificate = %+v, %v; want a refusal", got, err)
		}
		if next.calls != 1 {
			t.Errorf("next authenticator called %d times, want 1", next.calls)
		}
		// The refusal names the method, so the audit record says who refused.
		var f *authn.Failure
		if !errors.As(err, &f) || f.Method != authn.MethodMTLS {
			t.Errorf("refusal %v does not name method %q", err, authn.MethodMTLS)
		}
	})
}

func stubs(s ...*stubAuthn) func() (authn.Chain, []*stubAuthn) {
	return func() (authn.Chain, []*stubAuthn) {
		c := make(authn.Chain, len(s))
		for i := range s {
			c[i] = s[i]
		}
		return c, s
	}
}

// unknownAuthority reports whether err wraps x509.UnknownAuthorityError.
func unknownAuthority(err error) bool {
	var e x509.UnknownAuthorityError
	return errors.As(err, &e)
}

// invalidCert returns a check that err wraps an x509.CertificateInvalidError
// for reason.
func invalidCert(reason x509.InvalidReason) func(error) bool {
	return func(err error) bool {
		var e x509.CertificateInvalidError
		return errors.As(err, &e) && e.Reason == reason
	}
}
