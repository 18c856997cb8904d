package authn_test

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"

	"github.com/castellan-ca/castellan/authn"
	"github.com/castellan-ca/castellan/ca"
	"github.com/castellan-ca/castellan/storage"
)

const appSPIFFE = "spiffe://cluster.local/ns/default/sa/app"

// TestOIDCKeyRotation drives the real pipeline against an HTTPS issuer that
// rotates its signing key: the new key is picked up on its first token, the
// retired one stops working once it has left the JWKS, and a flood of
// unknown key IDs costs at most one JWKS fetch per refresh interval.
func TestOIDCKeyRotation(t *testing.T) {
	clock := newOIDCClock()
	ti := newTestIssuer(t, "k1")
	a := newOIDC(t, clock, ti.config())
	p := newPipeline(t, a)
	caller := ti.srv.URL + " sub=system:serviceaccount:default:app"
	hits := ti.jwksHits.Load() // the fetch at start-up

	old := ti.mint(t, clock, "k1", nil)
	p.wantIssued(t, old, appSPIFFE, caller)

	// Rotation: k2 is published and signs from now on. Its first token
	// names an unknown kid, which refreshes the keys once.
	ti.publish("k1", "k2")
	clock.Advance(11 * time.Second)
	fresh := ti.mint(t, clock, "k2", nil)
	p.wantIssued(t, fresh, appSPIFFE, caller)
	if got := ti.jwksHits.Load() - hits; got != 1 {
		t.Fatalf("%d JWKS fetches for the new key, want 1", got)
	}
	p.wantIssued(t, old, appSPIFFE, caller) // still published
	p.wantIssued(t, fresh, appSPIFFE, caller)

	// Unknown kids right after a refresh: refused without fetching again,
	// however many arrive, concurrently or not.
	hits = ti.jwksHits.Load()
	p.wantRefused(t, ti.mint(t, clock, "rogue", nil), codes.Unauthenticated, ca.ReasonAuthnFailed)
	var wg sync.WaitGroup
	for i := range 20 {
		tok := ti.mint(t, clock, "rogue", claims{"jti": i})
		wg.Go(func() {
			if _, err := a.Authenticate(bearerCtx(tok)); err == nil || errors.Is(err, authn.ErrUnavailable) {
				t.Errorf("rogue token: %v, want refused", err)
			}
		})
	}
	wg.Wait()
	if got := ti.jwksHits.Load() - hits; got != 0 {
		t.Fatalf("%d JWKS fetches for unknown kids within the refresh interval, want 0", got)
	}
	// After the interval an unknown kid refreshes once, and is still refused.
	clock.Advance(11 * time.Second)
	p.wantRefused(t, ti.mint(t, clock, "rogue", nil), codes.Unauthenticated, ca.ReasonAuthnFailed)
	p.wantRefused(t, ti.mint(t, clock, "rogue", claims{"jti": "2"}), codes.Unauthenticated, ca.ReasonAuthnFailed)
	if got := ti.jwksHits.Load() - hits; got != 1 {
		t.Fatalf("%d JWKS fetches for unknown kids after the interval, want 1", got)
	}

	// Retirement: k1 leaves the JWKS. Once the cached keys are older than
	// their maximum age they are fetched again and k1's tokens are refused.
	ti.publish("k2")
	clock.Advance(61 * time.Minute)
	old = ti.mint(t, clock, "k1", nil)
	p.wantRefused(t, old, codes.Unauthenticated, ca.ReasonAuthnFailed)
	p.wantIssued(t, ti.mint(t, clock, "k2", nil), appSPIFFE, caller)
}

// TestOIDCRefusals sends each forgery and each invalid token through the real
// pipeline: every one is refused with Unauthenticated and audited.
func TestOIDCRefusals(t *testing.T) {
	clock := newOIDCClock()
	ti := newTestIssuer(t, "k1", "k2")
	templated := newTestIssuer(t, "k2")
	tcfg := templated.config()
	tcfg.Identity = authn.OIDCIdentity{Namespace: "{ns}", ServiceAccount: "{sa}"}
	a := newOIDC(t, clock, ti.config(), tcfg)
	p := newPipeline(t, a)
	now := clock.Now().Unix()
	valid := ti.fill(clock, nil)
	good := ti.mint(t, clock, "k1", nil)
	p.wantIssued(t, good, appSPIFFE, ti.srv.URL+" sub=system:serviceaccount:default:app")
	p.wantIssued(t, templated.mint(t, clock, "k2", claims{"ns": "ci", "sa": "build"}), "spiffe://cluster.local/ns/ci/sa/build",
		templated.srv.URL+" sub=system:serviceaccount:default:app")

	tests := []struct {
		name   string
		tok    string
		reason string // ReasonAuthnFailed unless set
		detail string // in the audit record's detail: the check that refused it
	}{
		{"alg none", unsignedJWT(t, valid), "", "algorithm \"none\""},
		{"HS256 keyed with the public key", hmacWithPublicKey(t, valid), "", "algorithm \"HS256\""},
		{"unknown issuer", ti.mint(t, clock, "k1", claims{"iss": "https://issuer.invalid"}), ca.ReasonNoCredentials, "no credentials"},
		{"another configured issuer's iss with this issuer's key", ti.mint(t, clock, "k1", claims{"iss": templated.srv.URL}), "", "does not verify"},
		{"wrong audience", ti.mint(t, clock, "k1", claims{"aud": []string{"kubernetes"}}), "", "audience"},
		{"no audience", ti.mint(t, clock, "k1", claims{"aud": nil}), "", "audience"},
		{"expired", ti.mint(t, clock, "k1", claims{"iat": now - 7200, "nbf": now - 7200, "exp": now - 120}), "", "expired"},
		{"no expiry", ti.mint(t, clock, "k1", claims{"exp": nil}), "", "no exp"},
		{"nbf in the future", ti.mint(t, clock, "k1", claims{"nbf": now + 600}), "", "(nbf)"},
		{"iat in the future", ti.mint(t, clock, "k1", claims{"iat": now + 600}), "", "(iat)"},
		{"unknown kid", ti.mint(t, clock, "rogue", nil), "", "does not verify"},
		{"kid of another key", signJWT(t, "k1", oidcKeys["rogue"], valid), "", "does not verify"},
		{"tampered signature", tamperSignature(t, good), "", "does not verify"},
		{"tampered claims", swapPayload(t, good, ti.fill(clock, claims{"sub": "system:serviceaccount:kube-system:admin"})), "", "does not verify"},
		{"not a JWT", "opaque-token", ca.ReasonNoCredentials, "no credentials"},
		{"oversized", ti.mint(t, clock, "k1", claims{"pad": strings.Repeat("x", authn.MaxTokenBytes)}), "", "byte limit"},
		{"sub not a service account", ti.mint(t, clock, "k1", claims{"sub": "alice"}), "", "not a workload identity"},
		{"sub injects a path", ti.mint(t, clock, "k1", claims{"sub": "system:serviceaccount:default/sa/admin:x"}), "", "not a workload identity"},
		{"sub injects dot dot", ti.mint(t, clock, "k1", claims{"sub": "system:serviceaccount:..:app"}), "", "not a workload identity"},
		{"sub injects a trust domain", ti.mint(t, clock, "k1", claims{"sub": "system:serviceaccount:spiffe://evil.example/ns/a:b"}), "", "not a workload identity"},
		{"claim injects a path", templated.mint(t, clock, "k2", claims{"ns": "ci/sa/admin", "sa": "x"}), "", "not a workload identity"},
		{"claim injects dot dot", templated.mint(t, clock, "k2", claims{"ns": "ci", "sa": "../../admin"}), "", "not a workload identity"},
		{"claim is dot dot", templated.mint(t, clock, "k2", claims{"ns": "..", "sa": "x"}), "", "not a workload identity"},
		{"claim injects a trust domain", templated.mint(t, clock, "k2", claims{"ns": "spiffe://evil.example/ns/a", "sa": "b"}), "", "not a workload identity"},
		{"claim missing", templated.mint(t, clock, "k2", claims{"ns": "ci"}), "", "not a workload identity"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			reason := tc.reason
			if reason == "" {
				reason = ca.ReasonAuthnFailed
			}
			rec := p.wantRefused(t, tc.tok, codes.Unauthenticated, reason)
			if rec.Outcome != storage.OutcomeRefused || !strings.Contains(rec.Detail, tc.detail) {
				t.Errorf("outcome %q detail %q, want refused by %q", rec.Outcome, rec.Detail, tc.detail)
			}
		})
	}
}

// TestOIDCUnreachableIssuer: an issuer that does not answer at start does not
// stop the authenticator; its tokens get Unavailable (Istio's client retries)
// until discovery succeeds in the background.
func TestOIDCUnreachableIssuer(t *testing.T) {
	clock := newOIDCClock()
	ti := newTestIssuer(t, "k1")
	ti.setDiscovery(http.StatusServiceUnavailable, "")
	a := startOIDC(t, clock, ti.config())
	p := newPipeline(t, a)
	tok := ti.mint(t, clock, "k1", nil)
	rec := p.wantRefused(t, tok, codes.Unavailable, ca.ReasonAuthnDown)
	if rec.Outcome != storage.OutcomeFailed {
		t.Errorf("outcome %q, want failed", rec.Outcome)
	}

	// A discovery document naming another issuer is refused just the same.
	ti.setDiscovery(http.StatusOK, "https://impostor.example")
	p.wantRefused(t, tok, codes.Unavailable, ca.ReasonAuthnDown)

	ti.setDiscovery(http.StatusOK, "")
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := a.Wait(ctx); err != nil {
		t.Fatal(err)
	}
	p.wantIssued(t, tok, appSPIFFE, ti.srv.URL+" sub=system:serviceaccount:default:app")
}

// TestOIDCUntrustedIssuerCertificate: without caCert the test issuer's
// certificate is not trusted, so its keys are never fetched.
func TestOIDCUntrustedIssuerCertificate(t *testing.T) {
	clock := newOIDCClock()
	ti := newTestIssuer(t, "k1")
	cfg := ti.config()
	cfg.CACert = ""
	a := startOIDC(t, clock, cfg)
	_, err := a.Authenticate(bearerCtx(ti.mint(t, clock, "k1", nil)))
	if !errors.Is(err, authn.ErrUnavailable) {
		t.Fatalf("Authenticate: %v, want ErrUnavailable", err)
	}
}

// TestOIDCStaticJWKS: keys from jwksURL (no discovery) and from a file, which
// is re-read when a token names a key it does not hold.
func TestOIDCStaticJWKS(t *testing.T) {
	clock := newOIDCClock()
	ti := newTestIssuer(t, "k1")
	ti.setDiscovery(http.StatusNotFound, "") // must not be needed
	byURL := ti.config()
	byURL.JWKSURL = ti.srv.URL + "/keys"
	a := newOIDC(t, clock, byURL)
	if _, err := a.Authenticate(bearerCtx(ti.mint(t, clock, "k1", nil))); err != nil {
		t.Fatalf("jwksURL: %v", err)
	}

	file := newTestIssuer(t)
	path := filepath.Join(t.TempDir(), "jwks.json")
	writeJWKS(t, path, ti.jwks())
	byFile := file.config()
	byFile.JWKSFile = path
	a = newOIDC(t, clock, byFile)
	caller, err := a.Authenticate(bearerCtx(file.mint(t, clock, "k1", nil)))
	if err != nil || caller.Identity.String() != appSPIFFE || caller.Method != authn.MethodOIDC {
		t.Fatalf("jwksFile: %+v, %v", caller, err)
	}
	ti.publish("k2")
	writeJWKS(t, path, ti.jwks())
	clock.Advance(11 * time.Second)
	if _, err := a.Authenticate(bearerCtx(file.mint(t, clock, "k2", nil))); err != nil {
		t.Fatalf("jwksFile after rotation: %v", err)
	}
	if got := file.jwksHits.Load(); got != 0 {
		t.Errorf("%d fetches from the network with jwksFile", got)
	}
}

func writeJWKS(t *testing.T, path string, set any) {
	t.Helper()
	b, err := json.Marshal(set)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, b, 0o644); err != nil {
		t.Fatal(err)
	}
}

// TestOIDCRequiredClaims: a GitHub-style issuer, where any repository can
// mint tokens for any audience, so the owner is pinned.
func TestOIDCRequiredClaims(t *testing.T) {
	clock := newOIDCClock()
	ti := newTestIssuer(t, "k1")
	cfg := ti.config()
	cfg.Audiences = []string{"castellan"}
	cfg.RequiredClaims = map[string]string{"repository_owner": "castellan-ca"}
	cfg.Identity = authn.OIDCIdentity{Namespace: "gh-{repository_owner_id}", ServiceAccount: "repo-{repository_id}"}
	a := newOIDC(t, clock, cfg)
	gh := func(owner string) claims {
		return claims{"aud": "castellan", "sub": "repo:" + owner + "/app:ref:refs/heads/main", "repository_owner": owner,
			"repository_owner_id": "1342004", "repository_id": "74"}
	}
	caller, err := a.Authenticate(bearerCtx(ti.mint(t, clock, "k1", gh("castellan-ca"))))
	if err != nil {
		t.Fatal(err)
	}
	if want := "spiffe://cluster.local/ns/gh-1342004/sa/repo-74"; caller.Identity.String() != want {
		t.Errorf("identity %s, want %s", caller.Identity, want)
	}
	if want := ti.srv.URL + " sub=repo:castellan-ca/app:ref:refs/heads/main"; caller.Name != want {
		t.Errorf("name %q, want %q", caller.Name, want)
	}
	if _, err := a.Authenticate(bearerCtx(ti.mint(t, clock, "k1", gh("someone-else")))); err == nil {
		t.Error("token of another repository owner accepted")
	}
}

// TestOIDCHeaders: which requests are the OIDC authenticator's at all.
func TestOIDCHeaders(t *testing.T) {
	clock := newOIDCClock()
	ti := newTestIssuer(t, "k1")
	a := newOIDC(t, clock, ti.config())
	tok := ti.mint(t, clock, "k1", nil)
	tests := []struct {
		name string
		md   metadata.MD
		want error // nil: accepted; errAny: refused
	}{
		{"bearer", metadata.Pairs("authorization", "Bearer "+tok), nil},
		{"lowercase scheme", metadata.Pairs("authorization", "bearer "+tok), nil},
		{"no header", metadata.MD{}, authn.ErrNoCredentials},
		{"basic scheme", metadata.Pairs("authorization", "Basic dXNlcjpwYXNz"), authn.ErrNoCredentials},
		{"empty bearer", metadata.Pairs("authorization", "Bearer "), authn.ErrNoCredentials},
		{"two headers", metadata.Pairs("authorization", "Bearer "+tok, "authorization", "Bearer "+tok), errAny},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := a.Authenticate(metadata.NewIncomingContext(context.Background(), tc.md))
			switch {
			case tc.want == nil && err != nil:
				t.Fatalf("refused: %v", err)
			case errors.Is(tc.want, errAny) && (err == nil || errors.Is(err, authn.ErrNoCredentials)):
				t.Fatalf("got %v, want a refusal", err)
			case tc.want != nil && !errors.Is(tc.want, errAny) && !errors.Is(err, tc.want):
				t.Fatalf("got %v, want %v", err, tc.want)
			}
		})
	}
}

var errAny = errors.New("any refusal")

// TestOIDCChainFallsThrough: a token of an issuer OIDC does not know reaches
// the next authenticator (the Kubernetes one in production).
func TestOIDCChainFallsThrough(t *testing.T) {
	clock := newOIDCClock()
	ti := newTestIssuer(t, "k1")
	a := newOIDC(t, clock, ti.config())
	next := &recordingAuthn{}
	chain := authn.Chain{a, next}
	if _, err := chain.Authenticate(bearerCtx(ti.mint(t, clock, "k1", claims{"iss": "https://kubernetes.default.svc"}))); err != nil || next.calls != 1 {
		t.Fatalf("foreign issuer: %v, next called %d times", err, next.calls)
	}
	if _, err := chain.Authenticate(bearerCtx(ti.mint(t, clock, "k1", claims{"aud": "other"}))); err == nil || next.calls != 1 {
		t.Fatalf("own issuer, bad token: %v, next called %d times; want refused without falling through", err, next.calls)
	}
}

type recordingAuthn struct{ calls int }

func (r *recordingAuthn) Authenticate(context.Context) (*authn.Caller, error) {
	r.calls++
	return &authn.Caller{Method: authn.MethodKubernetes, Name: "next"}, nil
}

// TestOIDCConfigErrors: bad configuration fails at start-up naming the key.
func TestOIDCConfigErrors(t *testing.T) {
	ti := newTestIssuer(t, "k1")
	tests := []struct {
		name   string
		modify func(*authn.OIDCIssuer)
		key    string
	}{
		{"no issuer", func(c *authn.OIDCIssuer) { c.IssuerURL = "" }, "oidc.issuers[0].issuerURL"},
		{"http issuer", func(c *authn.OIDCIssuer) { c.IssuerURL = "http://issuer.example" }, "oidc.issuers[0].issuerURL"},
		{"no audiences", func(c *authn.OIDCIssuer) { c.Audiences = nil }, "oidc.issuers[0].audiences"},
		{"empty audience", func(c *authn.OIDCIssuer) { c.Audiences = []string{""} }, "oidc.issuers[0].audiences"},
		{"alg none", func(c *authn.OIDCIssuer) { c.AllowedAlgorithms = []string{"none"} }, "oidc.issuers[0].allowedAlgorithms"},
		{"HS256", func(c *authn.OIDCIssuer) { c.AllowedAlgorithms = []string{"RS256", "HS256"} }, "oidc.issuers[0].allowedAlgorithms"},
		{"negative skew", func(c *authn.OIDCIssuer) { c.ClockSkew = -time.Second }, "oidc.issuers[0].clockSkew"},
		{"huge skew", func(c *authn.OIDCIssuer) { c.ClockSkew = time.Hour }, "oidc.issuers[0].clockSkew"},
		{"both jwks sources", func(c *authn.OIDCIssuer) { c.JWKSURL, c.JWKSFile = "https://x.example/keys", "/keys.json" }, "oidc.issuers[0].jwksURL"},
		{"http jwks", func(c *authn.OIDCIssuer) { c.JWKSURL = "http://x.example/keys" }, "oidc.issuers[0].jwksURL"},
		{"missing jwks file", func(c *authn.OIDCIssuer) { c.JWKSFile = "/nonexistent/jwks.json" }, "oidc.issuers[0].jwksFile"},
		{"missing CA file", func(c *authn.OIDCIssuer) { c.CACert = "/nonexistent/ca.pem" }, "oidc.issuers[0].caCert"},
		{"CA file without PEM", func(c *authn.OIDCIssuer) { c.CACert = os.Args[0] }, "oidc.issuers[0].caCert"},
		{"bad template", func(c *authn.OIDCIssuer) { c.Identity = authn.OIDCIdentity{Namespace: "{ns", ServiceAccount: "{sa}"} }, "oidc.issuers[0].identity"},
		{"one template", func(c *authn.OIDCIssuer) { c.Identity = authn.OIDCIdentity{Namespace: "{ns}"} }, "oidc.issuers[0].identity"},
		{"empty required value", func(c *authn.OIDCIssuer) { c.RequiredClaims = map[string]string{"owner": ""} }, "oidc.issuers[0].requiredClaims"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			cfg := ti.config()
			tc.modify(&cfg)
			_, err := authn.NewOIDC(context.Background(), authn.OIDCOptions{TrustDomain: td, Config: authn.OIDCConfig{Issuers: []authn.OIDCIssuer{cfg}}})
			if err == nil || !strings.Contains(err.Error(), tc.key+":") {
				t.Fatalf("NewOIDC: %v, want an error naming %s", err, tc.key)
			}
		})
	}
	t.Run("duplicate issuer", func(t *testing.T) {
		err := authn.OIDCConfig{Issuers: []authn.OIDCIssuer{ti.config(), ti.config()}}.Validate()
		if err == nil || !strings.Contains(err.Error(), "oidc.issuers[1].issuerURL:") {
			t.Fatalf("Validate: %v, want an error naming oidc.issuers[1].issuerURL", err)
		}
	})
}

// TestOIDCIssuerOutage: once keys are held, an issuer outage does not stop
// tokens signed by them (even past the keys' age), while a token naming a key
// that could not be fetched gets Unavailable, which clients retry.
func TestOIDCIssuerOutage(t *testing.T) {
	clock := newOIDCClock()
	ti := newTestIssuer(t, "k1")
	a := newOIDC(t, clock, ti.config())
	p := newPipeline(t, a)
	ti.srv.Close()
	clock.Advance(2 * time.Hour)
	p.wantIssued(t, ti.mint(t, clock, "k1", nil), appSPIFFE, ti.srv.URL+" sub=system:serviceaccount:default:app")
	clock.Advance(11 * time.Second)
	p.wantRefused(t, ti.mint(t, clock, "k2", nil), codes.Unavailable, ca.ReasonAuthnDown)
}
