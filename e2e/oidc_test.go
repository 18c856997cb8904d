package e2e

import (
	"crypto/ecdsa"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	jose "github.com/go-jose/go-jose/v4"
	"istio.io/istio/pkg/security"
	"istio.io/istio/security/pkg/credentialfetcher/plugin"
	"istio.io/istio/security/pkg/nodeagent/caclient/providers/citadel"
	"istio.io/istio/security/pkg/pki/util"

	"github.com/castellan-ca/castellan/e2e/internal/testproc"
)

// oidcWorkloadSub is the `sub` of the test tokens: the default identity rule
// maps it to workloadID.
const oidcWorkloadSub = "system:serviceaccount:e2e:workload"

// keyRefreshWait bounds how long a token signed by a newly published key may
// be refused: the server refetches keys for unknown kids at most every 10 s.
const keyRefreshWait = 30 * time.Second

// oidcIssuer is a real OIDC issuer over HTTPS (discovery document and JWKS)
// whose published signing keys a test can change.
type oidcIssuer struct {
	srv    *httptest.Server
	caFile string
	keys   map[string]*ecdsa.PrivateKey // kid → key; "rogue" is never published

	mu        sync.Mutex
	published []string
}

func newOIDCIssuer(t *testing.T, dir string) *oidcIssuer {
	t.Helper()
	o := &oidcIssuer{published: []string{"k1"}, keys: map[string]*ecdsa.PrivateKey{}}
	for _, kid := range []string{"k1", "k2", "rogue"} {
		o.keys[kid] = testKey(t, "oidc-"+kid)
	}
	mux := http.NewServeMux()
	mux.HandleFunc("/.well-known/openid-configuration", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(map[string]any{"issuer": o.srv.URL, "jwks_uri": o.srv.URL + "/jwks"})
	})
	mux.HandleFunc("/jwks", func(w http.ResponseWriter, _ *http.Request) {
		o.mu.Lock()
		var set jose.JSONWebKeySet
		for _, kid := range o.published {
			set.Keys = append(set.Keys, jose.JSONWebKey{Key: o.keys[kid].Public(), KeyID: kid, Algorithm: "ES256", Use: "sig"})
		}
		o.mu.Unlock()
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(set)
	})
	o.srv = httptest.NewTLSServer(mux)
	t.Cleanup(o.srv.Close)
	o.caFile = writeFile(t, dir, "oidc-issuer-ca.pem", pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: o.srv.Certificate().Raw}), 0o644)
	return o
}

func (o *oidcIssuer) publish(kids ...string) {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.published = kids
}

// mint returns a token signed by kid with the standard claims of a workload
// token (an hour's validity, audience istio-ca), overridden by c (nil removes).
func (o *oidcIssuer) mint(t *testing.T, kid string, c map[string]any) string {
	t.Helper()
	now := time.Now().Unix()
	claims := map[string]any{"iss": o.srv.URL, "sub": oidcWorkloadSub, "aud": "istio-ca", "iat": now, "nbf": now, "exp": now + 3600}
	for k, v := range c {
		if v == nil {
			delete(claims, k)
		} else {
			claims[k] = v
		}
	}
	signer, err := jose.NewSigner(jose.SigningKey{Algorithm: jose.ES256, Key: jose.JSONWebKey{Key: o.keys[kid], KeyID: kid}},
		(&jose.SignerOptions{}).WithType("JWT"))
	if err != nil {
		t.Fatal(err)
	}
	payload, err := json.Marshal(claims)
	if err != nil {
		t.Fatal(err)
	}
	obj, err := signer.Sign(payload)
	if err != nil {
		t.Fatal(err)
	}
	tok, err := obj.CompactSerialize()
	if err != nil {
		t.Fatal(err)
	}
	return tok
}

// forgeNone re-encodes tok's claims under `alg: none` with no signature.
func forgeNone(tok string) string {
	parts := strings.Split(tok, ".")
	return base64.RawURLEncoding.EncodeToString([]byte(`{"alg":"none","typ":"JWT","kid":"k1"}`)) + "." + parts[1] + "."
}

// forgeHS256 signs tok's claims with HS256 keyed by the PEM public key of k1.
func (o *oidcIssuer) forgeHS256(t *testing.T, tok string) string {
	t.Helper()
	der, err := x509.MarshalPKIXPublicKey(o.keys["k1"].Public())
	if err != nil {
		t.Fatal(err)
	}
	signer, err := jose.NewSigner(jose.SigningKey{Algorithm: jose.HS256,
		Key: jose.JSONWebKey{Key: pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der}), KeyID: "k1"}},
		(&jose.SignerOptions{}).WithType("JWT"))
	if err != nil {
		t.Fatal(err)
	}
	payload, err := base64.RawURLEncoding.DecodeString(strings.Split(tok, ".")[1])
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

// flipSignature changes one bit of tok's signature.
func flipSignature(t *testing.T, tok string) string {
	t.Helper()
	i := strings.LastIndexByte(tok, '.')
	sig, err := base64.RawURLEncoding.DecodeString(tok[i+1:])
	if err != nil {
		t.Fatal(err)
	}
	sig[0] ^= 0x80
	return tok[:i+1] + base64.RawURLEncoding.EncodeToString(sig)
}

// tokenClient is Istio's CA client as pilot-agent on a VM runs it with a
// platform token: the token is read from a file before every call, exactly
// as pilot-agent reads ./var/run/secrets/tokens/istio-token.
type tokenClient struct {
	srv       *server
	client    *citadel.CitadelClient
	tokenFile string
}

func newTokenClient(t *testing.T, srv *server) *tokenClient {
	t.Helper()
	tc := &tokenClient{srv: srv, tokenFile: filepath.Join(t.TempDir(), "istio-token")}
	c, err := citadel.NewCitadelClient(&security.Options{
		CAEndpoint:    srv.grpcAddr,
		CAEndpointSAN: caServerName,
		ClusterID:     clusterID,
		CredFetcher:   plugin.CreateTokenPlugin(tc.tokenFile),
	}, &citadel.TLSOptions{RootCert: filepath.Join(srv.dataDir, "root-cert.pem")})
	if err != nil {
		t.Fatalf("NewCitadelClient: %v", err)
	}
	t.Cleanup(c.Close)
	tc.client = c
	return tc
}

// sign asks for a certificate for workloadID presenting tok.
func (tc *tokenClient) sign(t *testing.T, tok string) ([]string, error) {
	t.Helper()
	if err := os.WriteFile(tc.tokenFile, []byte(tok), 0o600); err != nil {
		t.Fatal(err)
	}
	csrPEM, _, err := util.GenCSR(util.CertOptions{Host: workloadID, ECSigAlg: util.EcdsaSigAlg, ECCCurve: util.P256Curve})
	if err != nil {
		t.Fatal(err)
	}
	return csrSign(t, tc.client, csrPEM)
}

// lastCSRRecord is the newest CSR record of srv's audit log.
func lastCSRRecord(t *testing.T, srv *server) auditRecord {
	t.Helper()
	recs := csrRecords(srv.auditList(t))
	if len(recs) == 0 {
		t.Fatal("no CSR audit record")
	}
	return recs[len(recs)-1]
}

// wantIssued asserts that tok gets a certificate for workloadID, audited as
// an OIDC caller named caller.
func (tc *tokenClient) wantIssued(t *testing.T, tok, caller string) {
	t.Helper()
	chain, err := tc.sign(t, tok)
	if err != nil {
		t.Fatalf("CSRSign: %v", err)
	}
	leaf := readPEMLeaf(t, chain[0])
	if len(leaf.URIs) != 1 || leaf.URIs[0].String() != workloadID {
		t.Errorf("leaf URI SANs %v, want [%s]", leaf.URIs, workloadID)
	}
	rec := lastCSRRecord(t, tc.srv)
	checkFields(t, "audit record", []field{{"auth_method", rec.AuthMethod, "oidc"}, {"caller", rec.Caller, caller},
		{"outcome", rec.Outcome, "issued"}, {"granted_identity", rec.GrantedIdentity, workloadID}})
}

// wantRefused asserts that tok gets the gRPC code and no certificate, and an
// audit record with outcome and reason.
func (tc *tokenClient) wantRefused(t *testing.T, tok, code, outcome, reason string) {
	t.Helper()
	chain, err := tc.sign(t, tok)
	if err == nil {
		t.Fatalf("CSRSign returned %d certificates, want %s", len(chain), code)
	}
	if got := grpcCode(err); got != code {
		t.Fatalf("CSRSign: %v; want code %s", err, code)
	}
	rec := lastCSRRecord(t, tc.srv)
	checkFields(t, "audit record", []field{{"outcome", rec.Outcome, outcome}, {"reason", rec.Reason, reason},
		{"code", rec.Code, code}, {"serial", rec.Serial, ""}})
	if sig := tok[strings.LastIndexByte(tok, '.')+1:]; len(sig) > 8 && strings.Contains(rec.Detail, sig) {
		t.Errorf("audit detail holds the token: %q", rec.Detail)
	}
}

// oidcConfig is a configuration file trusting issuers (URL → caCert file).
func oidcConfig(t *testing.T, dir string, issuers ...[2]string) string {
	t.Helper()
	var b strings.Builder
	b.WriteString("oidc:\n  issuers:\n")
	for _, iss := range issuers {
		fmt.Fprintf(&b, "  - issuerURL: %s\n    audiences: [istio-ca]\n", iss[0])
		if iss[1] != "" {
			fmt.Fprintf(&b, "    caCert: %s\n", iss[1])
		}
	}
	return writeFile(t, dir, "castellan.yaml", []byte(b.String()), 0o644)
}

// TestOIDC runs the real binary configured with two OIDC issuers, a live
// HTTPS issuer whose CA is given as caCert and one that never answers, and
// drives it with Istio's CA client presenting platform tokens.
func TestOIDC(t *testing.T) {
	dir := t.TempDir()
	iss := newOIDCIssuer(t, dir)
	dead := "https://" + testproc.FreeAddr(t) // nothing listens there
	// The header limit is raised above its 16 KiB default so that the
	// oversized token reaches the authenticator's own limit (MaxTokenBytes,
	// also 16 KiB); with the default, gRPC refuses to even send it.
	srv := startServer(t, serverConfig{signer: "selfsigned", configFile: oidcConfig(t, dir, [2]string{iss.srv.URL, iss.caFile}, [2]string{dead, ""}),
		extraArgs: []string{"--max-header-bytes", "65536"}})
	client := newTokenClient(t, srv)
	caller := iss.srv.URL + " sub=" + oidcWorkloadSub

	good := iss.mint(t, "k1", nil)
	if !t.Run("accepted", func(t *testing.T) { client.wantIssued(t, good, caller) }) {
		return
	}
	now := time.Now().Unix()
	for _, tc := range []struct {
		name, tok, reason string
	}{
		{"alg none", forgeNone(good), "authn.failed"},
		{"HS256 keyed with the public key", iss.forgeHS256(t, good), "authn.failed"},
		{"unknown issuer", iss.mint(t, "k1", map[string]any{"iss": "https://issuer.invalid"}), "authn.no_credentials"},
		{"wrong audience", iss.mint(t, "k1", map[string]any{"aud": "kubernetes"}), "authn.failed"},
		{"expired", iss.mint(t, "k1", map[string]any{"iat": now - 7200, "nbf": now - 7200, "exp": now - 600}), "authn.failed"},
		{"nbf in the future", iss.mint(t, "k1", map[string]any{"nbf": now + 900}), "authn.failed"},
		{"unknown kid", iss.mint(t, "rogue", nil), "authn.failed"},
		{"tampered signature", flipSignature(t, good), "authn.failed"},
		{"sub injects a path", iss.mint(t, "k1", map[string]any{"sub": "system:serviceaccount:e2e/sa/admin:x"}), "authn.failed"},
		{"sub injects dot dot", iss.mint(t, "k1", map[string]any{"sub": "system:serviceaccount:..:workload"}), "authn.failed"},
		{"sub injects a trust domain", iss.mint(t, "k1", map[string]any{"sub": "system:serviceaccount:spiffe://evil.example/ns/e2e:x"}), "authn.failed"},
		{"oversized", iss.mint(t, "k1", map[string]any{"pad": strings.Repeat("x", 16<<10)}), "authn.failed"},
	} {
		t.Run("refused "+tc.name, func(t *testing.T) { client.wantRefused(t, tc.tok, "Unauthenticated", "refused", tc.reason) })
	}

	t.Run("unreachable issuer", func(t *testing.T) {
		client.wantRefused(t, iss.mint(t, "k1", map[string]any{"iss": dead}), "Unavailable", "failed", "authn.unavailable")
	})

	t.Run("key rotation", func(t *testing.T) {
		iss.publish("k1", "k2")
		rotated := iss.mint(t, "k2", nil)
		// Within 10 s of the last fetch the new kid may be refused (refreshes
		// are rate limited); poll until it is accepted.
		deadline := time.Now().Add(keyRefreshWait)
		for {
			if _, err := client.sign(t, rotated); err == nil {
				break
			} else if time.Now().After(deadline) {
				t.Fatalf("token of the rotated key still refused after %v: %v", keyRefreshWait, err)
			}
			time.Sleep(time.Second)
		}
		client.wantIssued(t, rotated, caller)
		client.wantIssued(t, good, caller) // k1 is still published
	})
}

// readPEMLeaf parses the one certificate of a response element.
func readPEMLeaf(t *testing.T, elem string) *x509.Certificate {
	t.Helper()
	certs, err := parseCerts([]byte(elem))
	if err != nil || len(certs) == 0 {
		t.Fatalf("response element: %v", err)
	}
	return certs[0]
}
