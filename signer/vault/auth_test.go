package vault_test

import (
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"net/http"
	"net/http/httptest"
	"sync/atomic"
	"testing"
	"time"

	"github.com/castellan-ca/castellan/ca/catest"
	"github.com/castellan-ca/castellan/signer/signertest"
	"github.com/castellan-ca/castellan/signer/vault"
	"github.com/castellan-ca/castellan/signer/vault/vaulttest"
)

// policy is what Castellan's Vault identity needs: sign on the PKI mount.
const policy = `path "pki_int/sign/*" { capabilities = ["update"] }
path "pki_int/sign-verbatim*" { capabilities = ["update"] }
path "pki_int/issuer/*" { capabilities = ["read"] }
`

// waitFor polls cond until it holds; the deadline only turns a hang into a failure.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// TestAuthMethods logs in with each method against OpenBao, with tokens far
// shorter-lived than the test, and shows that Run keeps the signer working:
// a periodic token is renewed, login tokens are replaced at their max TTL.
func TestAuthMethods(t *testing.T) {
	srv := vaulttest.Start(t)
	srv.SetupPKI(t, trustDomain)
	srv.Write(t, "sys/policies/acl/castellan", map[string]any{"policy": policy})

	t.Run("token renewed", func(t *testing.T) {
		tok := srv.Write(t, "auth/token/create", map[string]any{"policies": []string{"castellan"}, "period": "2s", "no_default_policy": false})
		token := tok.Auth.ClientToken
		var renewals atomic.Int32
		s := newSigner(t, srv, vault.Config{Mount: vaulttest.IntMount, Role: vaulttest.Role,
			Auth:           vault.Auth{Method: vault.AuthToken, TokenFile: writeFile(t, "token", token)},
			OnTokenRenewed: func() { renewals.Add(1) }})
		// Renewals without a request, past the token's period: only renewal
		// keeps it alive.
		created := time.Now()
		waitFor(t, "token renewals past its period", func() bool { return renewals.Load() >= 3 && time.Since(created) > 2*time.Second })
		if _, err := srv.Client(t).Auth().Token().LookupWithContext(t.Context(), token); err != nil {
			t.Fatalf("token expired although the signer should renew it: %v", err)
		}
		if s.Token() != token {
			t.Error("the signer replaced a token it should only renew")
		}
		sign(t, s)
	})

	srv.Write(t, "sys/auth/approle", map[string]any{"type": "approle"})
	appRole := func(t *testing.T, name string, ttl, maxTTL string) vault.Auth {
		srv.Write(t, "auth/approle/role/"+name, map[string]any{"token_policies": "castellan", "token_ttl": ttl, "token_max_ttl": maxTTL})
		rid, err := srv.Client(t).Logical().ReadWithContext(t.Context(), "auth/approle/role/"+name+"/role-id")
		if err != nil {
			t.Fatal(err)
		}
		secretID := srv.Write(t, "auth/approle/role/"+name+"/secret-id", nil).Data["secret_id"].(string)
		return vault.Auth{Method: vault.AuthAppRole, Role: rid.Data["role_id"].(string), SecretIDFile: writeFile(t, "secret-id", secretID)}
	}

	t.Run("approle relogin at max TTL", func(t *testing.T) {
		s := newSigner(t, srv, vault.Config{Mount: vaulttest.IntMount, Role: vaulttest.Role, Auth: appRole(t, "short", "2s", "3s")})
		first := s.Token()
		sign(t, s)
		// No request in between, so only Run's renewal loop can log in again.
		waitFor(t, "a new AppRole login", func() bool { return s.Token() != first })
		sign(t, s)
	})

	t.Run("kubernetes", func(t *testing.T) {
		apiserver := fakeTokenReview(t, "castellan-system", "castellan")
		caPEM := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: apiserver.Certificate().Raw})
		srv.Write(t, "sys/auth/kubernetes", map[string]any{"type": "kubernetes"})
		srv.Write(t, "auth/kubernetes/config", map[string]any{"kubernetes_host": apiserver.URL, "kubernetes_ca_cert": string(caPEM),
			"token_reviewer_jwt": "reviewer", "disable_local_ca_jwt": true})
		srv.Write(t, "auth/kubernetes/role/castellan", map[string]any{"bound_service_account_names": "castellan",
			"bound_service_account_namespaces": "castellan-system", "token_policies": "castellan", "token_ttl": "2s", "token_max_ttl": "3s"})
		s := newSigner(t, srv, vault.Config{Mount: vaulttest.IntMount, Role: vaulttest.Role,
			Auth: vault.Auth{Method: vault.AuthKubernetes, Role: "castellan", JWTFile: writeFile(t, "jwt", serviceAccountJWT(t, "castellan-system", "castellan"))}})
		first := s.Token()
		sign(t, s)
		waitFor(t, "a new Kubernetes login", func() bool { return s.Token() != first })
		sign(t, s)
	})

	t.Run("revoked token replaced on the next request", func(t *testing.T) {
		s := newSigner(t, srv, vault.Config{Mount: vaulttest.IntMount, Role: vaulttest.Role, Auth: appRole(t, "long", "1h", "2h")})
		before := s.Token()
		srv.Write(t, "auth/token/revoke", map[string]any{"token": s.Token()})
		sign(t, s) // 403, log in again, retry
		if s.Token() == before {
			t.Error("the signer still holds the revoked token")
		}
	})
}

func sign(t *testing.T, s *vault.Signer) {
	t.Helper()
	if res := catest.IssueThrough(t, vault.Backend, s, workload, signertest.Key(9), catest.CSROptions{}); res.Err != nil {
		t.Fatalf("issue: %v", res.Err)
	}
}

// fakeTokenReview stands in for the kube-apiserver's TokenReview API, which
// OpenBao calls to check the service-account token: it accepts every token as
// namespace/name.
func fakeTokenReview(t *testing.T, namespace, name string) *httptest.Server {
	t.Helper()
	srv := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var review struct {
			Spec struct {
				Audiences []string `json:"audiences"`
			} `json:"spec"`
		}
		if r.URL.Path != "/apis/authentication.k8s.io/v1/tokenreviews" || r.Header.Get("Authorization") != "Bearer reviewer" ||
			json.NewDecoder(r.Body).Decode(&review) != nil {
			http.Error(w, "unexpected request", http.StatusNotFound)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(map[string]any{
			"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
			"status": map[string]any{"authenticated": true, "audiences": review.Spec.Audiences, "user": map[string]any{
				"username": "system:serviceaccount:" + namespace + ":" + name, "uid": "uid-" + name,
				"groups": []string{"system:serviceaccounts", "system:serviceaccounts:" + namespace},
			}},
		})
	}))
	t.Cleanup(srv.Close)
	return srv
}

// serviceAccountJWT makes a projected service-account token's claims, signed
// with a throwaway key (OpenBao checks it through TokenReview, not locally).
func serviceAccountJWT(t *testing.T, namespace, name string) string {
	t.Helper()
	enc := func(v any) string {
		b, err := json.Marshal(v)
		if err != nil {
			t.Fatal(err)
		}
		return base64.RawURLEncoding.EncodeToString(b)
	}
	now := time.Now().Unix()
	unsigned := enc(map[string]any{"alg": "ES256", "typ": "JWT"}) + "." + enc(map[string]any{
		"iss": "https://kubernetes.default.svc", "sub": "system:serviceaccount:" + namespace + ":" + name,
		"aud": []string{"vault"}, "iat": now, "nbf": now, "exp": now + 3600,
		"kubernetes.io": map[string]any{"namespace": namespace, "serviceaccount": map[string]any{"name": name, "uid": "uid-" + name}},
	})
	key := signertest.Key(10).(*ecdsa.PrivateKey)
	sum := sha256.Sum256([]byte(unsigned))
	r, s, err := ecdsa.Sign(rand.Reader, key, sum[:])
	if err != nil {
		t.Fatal(err)
	}
	sig := make([]byte, 64)
	r.FillBytes(sig[:32])
	s.FillBytes(sig[32:])
	return unsigned + "." + base64.RawURLEncoding.EncodeToString(sig)
}
