package authn_test

import (
	"context"
	"crypto"
	"crypto/rand"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	jose "github.com/go-jose/go-jose/v4"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/peer"

	"github.com/castellan-ca/castellan/authn"
	"github.com/castellan-ca/castellan/ca"
	"github.com/castellan-ca/castellan/signer/local"
	"github.com/castellan-ca/castellan/signer/signertest"
	"github.com/castellan-ca/castellan/storage"
	"github.com/castellan-ca/castellan/storage/embedded"
)

// oidcClock is the authenticator's injected clock; tokens are minted from it
// too, so advancing it (past the key refresh interval or key age) keeps them valid.
type oidcClock struct{ ns atomic.Int64 }

func newOIDCClock() *oidcClock {
	c := &oidcClock{}
	c.ns.Store(time.Now().Truncate(time.Second).UnixNano())
	return c
}

func (c *oidcClock) Now() time.Time          { return time.Unix(0, c.ns.Load()) }
func (c *oidcClock) Advance(d time.Duration) { c.ns.Add(int64(d)) }

// issuerKey is a signing key of the test issuer.
type issuerKey struct {
	alg jose.SignatureAlgorithm
	key crypto.Signer
}

// Pre-generated keys: kid → key. "rogue" is never published.
var oidcKeys = map[string]issuerKey{
	"k1":    {jose.RS256, signertest.LeafKeys()["rsa-2048"]},
	"k2":    {jose.ES256, signertest.Key(10)},
	"rogue": {jose.ES256, signertest.Key(11)},
}

// testIssuer is a real OIDC issuer over HTTPS: discovery document and JWKS,
// with the published keys changeable mid-test.
type testIssuer struct {
	srv    *httptest.Server
	caFile string // PEM of the server's certificate, for caCert

	mu        sync.Mutex
	published []string // kids in the JWKS
	discovery int      // HTTP status of discovery; 200 unless a test breaks it
	claimed   string   // issuer in the discovery document; srv.URL unless set

	jwksHits atomic.Int64
}

func newTestIssuer(t *testing.T, kids ...string) *testIssuer {
	t.Helper()
	ti := &testIssuer{published: kids, discovery: http.StatusOK}
	mux := http.NewServeMux()
	mux.HandleFunc("/.well-known/openid-configuration", func(w http.ResponseWriter, _ *http.Request) {
		ti.mu.Lock()
		status, iss := ti.discovery, ti.claimed
		ti.mu.Unlock()
		if status != http.StatusOK {
			http.Error(w, "unavailable", status)
			return
		}
		if iss == "" {
			iss = ti.srv.URL
		}
		writeJSON(w, map[string]any{"issuer": iss, "jwks_uri": ti.srv.URL + "/keys",
			"id_token_signing_alg_values_supported": []string{"RS256", "ES256"}})
	})
	mux.HandleFunc("/keys", func(w http.ResponseWriter, _ *http.Request) {
		ti.jwksHits.Add(1)
		writeJSON(w, ti.jwks())
	})
	ti.srv = httptest.NewTLSServer(mux)
	t.Cleanup(ti.srv.Close)
	ti.caFile = filepath.Join(t.TempDir(), "issuer-ca.pem")
	writePEM(t, ti.caFile, ti.srv.Certificate())
	return ti
}

func writeJSON(w http.ResponseWriter, v any) {
	w.Header().Set("Content-Type", "application/json")
	if err := json.NewEncoder(w).Encode(v); err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
	}
}

func writePEM(t *testing.T, path string, certs ...*x509.Certificate) {
	t.Helper()
	var b []byte
	for _, c := range certs {
		b = append(b, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})...)
	}
	if err := os.WriteFile(path, b, 0o644); err != nil {
		t.Fatal(err)
	}
}

// jwks is the published key set.
func (ti *testIssuer) jwks() jose.JSONWebKeySet {
	ti.mu.Lock()
	defer ti.mu.Unlock()
	var set jose.JSONWebKeySet
	for _, kid := range ti.published {
		k := oidcKeys[kid]
		set.Keys = append(set.Keys, jose.JSONWebKey{Key: k.key.Public(), KeyID: kid, Algorithm: string(k.alg), Use: "sig"})
	}
	return set
}

// publish replaces the published keys (rotation).
func (ti *testIssuer) publish(kids ...string) {
	ti.mu.Lock()
	defer ti.mu.Unlock()
	ti.published = kids
}

func (ti *testIssuer) setDiscovery(status int, claimedIssuer string) {
	ti.mu.Lock()
	defer ti.mu.Unlock()
	ti.discovery, ti.claimed = status, claimedIssuer
}

// claims are a token's claims; standard ones are filled by mint unless present
// (a nil value removes the claim).
type claims map[string]any

// mint returns a token of this issuer signed with kid's key, valid for a day
// from now on clock, for audience istio-ca, subject default/app.
func (ti *testIssuer) mint(t testing.TB, clock *oidcClock, kid string, c claims) string {
	t.Helper()
	return signJWT(t, kid, oidcKeys[kid], ti.fill(clock, c))
}

func (ti *testIssuer) fill(clock *oidcClock, c claims) claims {
	now := clock.Now().Unix()
	full := claims{"iss": ti.srv.URL, "sub": "system:serviceaccount:default:app", "aud": []string{"istio-ca"},
		"iat": now, "nbf": now, "exp": now + 24*3600}
	for k, v := range c {
		if v == nil {
			delete(full, k)
		} else {
			full[k] = v
		}
	}
	return full
}

// signJWT signs claims with go-jose, the way a real issuer does.
func signJWT(t testing.TB, kid string, k issuerKey, c claims) string {
	t.Helper()
	signer, err := jose.NewSigner(jose.SigningKey{Algorithm: k.alg, Key: jose.JSONWebKey{Key: k.key, KeyID: kid}},
		(&jose.SignerOptions{}).WithType("JWT"))
	if err != nil {
		t.Fatal(err)
	}
	return signPayload(t, signer, c)
}

func signPayload(t testing.TB, signer jose.Signer, c claims) string {
	t.Helper()
	payload, err := json.Marshal(c)
	if err != nil {
		t.Fatal(err)
	}
	obj, err := signer.Sign(payload)
	if err != nil {
		t.Fatal(err)
	}
	s, err := obj.CompactSerialize()
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// unsignedJWT builds an `alg: none` token by hand (no library signs one).
func unsignedJWT(t testing.TB, c claims) string {
	t.Helper()
	header := base64.RawURLEncoding.EncodeToString([]byte(`{"alg":"none","typ":"JWT","kid":"k1"}`))
	payload, err := json.Marshal(c)
	if err != nil {
		t.Fatal(err)
	}
	return header + "." + base64.RawURLEncoding.EncodeToString(payload) + "."
}

// hmacWithPublicKey signs claims with HS256 keyed by the PEM of k1's public
// key, the classic algorithm-confusion forgery.
func hmacWithPublicKey(t testing.TB, c claims) string {
	t.Helper()
	der, err := x509.MarshalPKIXPublicKey(oidcKeys["k1"].key.Public())
	if err != nil {
		t.Fatal(err)
	}
	secret := pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der})
	signer, err := jose.NewSigner(jose.SigningKey{Algorithm: jose.HS256, Key: jose.JSONWebKey{Key: secret, KeyID: "k1"}},
		(&jose.SignerOptions{}).WithType("JWT"))
	if err != nil {
		t.Fatal(err)
	}
	return signPayload(t, signer, c)
}

// tamper flips one bit of a token's signature.
func tamperSignature(t testing.TB, tok string) string {
	t.Helper()
	i := strings.LastIndexByte(tok, '.')
	sig, err := base64.RawURLEncoding.DecodeString(tok[i+1:])
	if err != nil {
		t.Fatal(err)
	}
	sig[len(sig)/2] ^= 0x01
	return tok[:i+1] + base64.RawURLEncoding.EncodeToString(sig)
}

// swapPayload keeps tok's header and signature but replaces its claims.
func swapPayload(t testing.TB, tok string, c claims) string {
	t.Helper()
	parts := strings.Split(tok, ".")
	payload, err := json.Marshal(c)
	if err != nil {
		t.Fatal(err)
	}
	return parts[0] + "." + base64.RawURLEncoding.EncodeToString(payload) + "." + parts[2]
}

// issuerConfig is the configuration trusting ti over HTTPS with its own CA.
func (ti *testIssuer) config() authn.OIDCIssuer {
	return authn.OIDCIssuer{IssuerURL: ti.srv.URL, Audiences: []string{"istio-ca"}, CACert: ti.caFile}
}

// newOIDC starts an authenticator and waits for its issuers' keys.
func newOIDC(t *testing.T, clock *oidcClock, issuers ...authn.OIDCIssuer) *authn.OIDC {
	t.Helper()
	a := startOIDC(t, clock, issuers...)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := a.Wait(ctx); err != nil {
		t.Fatal(err)
	}
	return a
}

// startOIDC starts an authenticator without waiting; its background
// discovery ends with the test.
func startOIDC(t *testing.T, clock *oidcClock, issuers ...authn.OIDCIssuer) *authn.OIDC {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	a, err := authn.NewOIDC(ctx, authn.OIDCOptions{
		TrustDomain: td,
		Config:      authn.OIDCConfig{Issuers: issuers},
		Now:         clock.Now,
		RetryMin:    time.Millisecond,
		RetryMax:    20 * time.Millisecond,
		KeyMaxAge:   time.Hour,
	})
	if err != nil {
		t.Fatalf("NewOIDC: %v", err)
	}
	return a
}

// bearerCtx is the context gRPC gives a handler for a call carrying tok.
func bearerCtx(tok string) context.Context {
	ctx := peer.NewContext(context.Background(), &peer.Peer{
		Addr:     &net.TCPAddr{IP: net.IPv4(10, 1, 2, 3), Port: 40000},
		AuthInfo: credentials.TLSInfo{},
	})
	if tok == "" {
		return ctx
	}
	return metadata.NewIncomingContext(ctx, metadata.Pairs("authorization", "Bearer "+tok))
}

// pipeline is the real issuance pipeline: a local signer over a test root,
// the embedded audit store and the authenticator under test.
type pipeline struct {
	issuer *ca.Issuer
	store  *embedded.Store
	csr    string
}

func newPipeline(t *testing.T, a ca.Authenticator) *pipeline {
	t.Helper()
	root := signertest.NewRoot(t, "OIDC Test Root", signertest.CertOptions{})
	s, err := local.New(local.Config{Cert: root.Cert, Key: root.Key, Roots: []*x509.Certificate{root.Cert}})
	if err != nil {
		t.Fatal(err)
	}
	authority := ca.NewAuthority()
	if _, err := authority.Use("selfsigned", s); err != nil {
		t.Fatal(err)
	}
	store, err := embedded.Open(context.Background(), filepath.Join(t.TempDir(), "audit.db"), embedded.Options{Writer: "test"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = store.Close() })
	is, err := ca.NewIssuer(ca.Config{TrustDomain: td, Authenticator: a, Audit: store, Authority: authority})
	if err != nil {
		t.Fatal(err)
	}
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, signertest.Key(12))
	if err != nil {
		t.Fatal(err)
	}
	return &pipeline{issuer: is, store: store, csr: string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der}))}
}

// issue sends one CSR with tok and returns the outcome and its audit record.
func (p *pipeline) issue(t *testing.T, tok string) (*ca.Issued, codes.Code, storage.Record) {
	t.Helper()
	out, err := p.issuer.Issue(bearerCtx(tok), ca.Request{CSR: p.csr, Peer: "10.1.2.3:40000"})
	recs, lerr := p.store.List(context.Background(), storage.Query{Limit: storage.MaxLimit})
	if lerr != nil || len(recs) == 0 {
		t.Fatalf("audit list: %d records, %v", len(recs), lerr)
	}
	return out, ca.Status(err).Code(), recs[len(recs)-1]
}

// wantIssued asserts that tok got a certificate for id, audited as an OIDC caller.
func (p *pipeline) wantIssued(t *testing.T, tok, id, caller string) {
	t.Helper()
	out, code, rec := p.issue(t, tok)
	if code != codes.OK || out == nil {
		t.Fatalf("got %v (%s: %s), want a certificate", code, rec.Reason, rec.Detail)
	}
	if got := out.Chain.Leaf.URIs[0].String(); got != id {
		t.Errorf("leaf URI SAN %s, want %s", got, id)
	}
	if rec.Outcome != storage.OutcomeIssued || rec.AuthMethod != authn.MethodOIDC || rec.Caller != caller || rec.GrantedIdentity != id {
		t.Errorf("audit record %+v, want issued to %s by oidc caller %q", rec, id, caller)
	}
}

// wantRefused asserts that tok was refused with code and reason, and audited so.
func (p *pipeline) wantRefused(t *testing.T, tok string, code codes.Code, reason string) storage.Record {
	t.Helper()
	out, got, rec := p.issue(t, tok)
	t.Logf("refused: %s", rec.Detail)
	if out != nil || got != code {
		t.Fatalf("got %v and a certificate=%v, want %v", got, out != nil, code)
	}
	if rec.Reason != reason || rec.Code != code.String() || rec.Serial != "" || rec.GrantedIdentity != "" {
		t.Errorf("audit record %+v, want reason %s code %s and nothing issued", rec, reason, code)
	}
	if sig := tok[strings.LastIndexByte(tok, '.')+1:]; len(sig) > 8 && strings.Contains(rec.Detail, sig) {
		t.Errorf("audit detail holds the token: %q", rec.Detail)
	}
	return rec
}
