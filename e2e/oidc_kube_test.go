package e2e

import (
	"encoding/json"
	"testing"
	"time"

	"github.com/castellan-ca/castellan/e2e/internal/kubeenv"
)

// TestOIDCKubeIssuer points Castellan's OIDC authenticator at a real
// kube-apiserver's own service-account issuer: discovery
// (/.well-known/openid-configuration, then /openid/v1/jwks, read anonymously
// over HTTPS with the cluster CA as caCert) and real TokenRequest tokens.
// A second server runs OIDC for another issuer beside the Kubernetes token
// authenticator, to show that the apiserver's tokens pass through to it.
func TestOIDCKubeIssuer(t *testing.T) {
	env := kubeenv.Start(t)
	env.AllowAnonymousIssuerDiscovery(t)
	const ns, sa = "e2e", "workload" // workloadID
	env.CreateNamespace(t, ns, nil)
	env.CreateServiceAccount(t, ns, sa)
	pod := env.CreatePod(t, ns, "workload-1", sa, "node-a")
	dir := t.TempDir()
	caFile := writeFile(t, dir, "kube-ca.pem", env.CAPEM, 0o644)

	srv := startServer(t, serverConfig{signer: "selfsigned", configFile: oidcConfig(t, dir, [2]string{env.IssuerURL, caFile})})
	client := newTokenClient(t, srv)
	caller := env.IssuerURL + " sub=" + oidcWorkloadSub
	istioCA := kubeenv.TokenOptions{Audiences: []string{"istio-ca"}}
	tok := env.Token(t, ns, sa, istioCA)

	t.Run("TokenRequest token", func(t *testing.T) { client.wantIssued(t, tok, caller) })
	t.Run("pod-bound token", func(t *testing.T) {
		client.wantIssued(t, env.Token(t, ns, sa, kubeenv.TokenOptions{Audiences: []string{"istio-ca"}, Pod: pod}), caller)
	})

	now := time.Now().Unix()
	for _, tc := range []struct {
		name, tok string
	}{
		{"audience of the apiserver", env.Token(t, ns, sa, kubeenv.TokenOptions{})},
		{"other audience", env.Token(t, ns, sa, kubeenv.TokenOptions{Audiences: []string{"vault"}})},
		{"expired", env.Resign(t, tok, func(c map[string]any) { c["iat"], c["nbf"], c["exp"] = now-7200, now-7200, now-600 })},
		{"nbf in the future", env.Resign(t, tok, func(c map[string]any) { c["nbf"] = json.Number("9999999999") })},
		{"sub injects a path", env.Resign(t, tok, func(c map[string]any) { c["sub"] = "system:serviceaccount:e2e/sa/admin:x" })},
		{"sub injects dot dot", env.Resign(t, tok, func(c map[string]any) { c["sub"] = "system:serviceaccount:..:workload" })},
		{"tampered signature", flipSignature(t, tok)},
	} {
		t.Run("refused "+tc.name, func(t *testing.T) { client.wantRefused(t, tc.tok, "Unauthenticated", "refused", "authn.failed") })
	}

	t.Run("chain with the Kubernetes authenticator", func(t *testing.T) {
		iss := newOIDCIssuer(t, dir)
		both := startServer(t, serverConfig{signer: "selfsigned", configFile: oidcConfig(t, t.TempDir(), [2]string{iss.srv.URL, iss.caFile}),
			extraArgs: []string{"--kubeconfig", env.Kubeconfig, "--root-configmaps=false"}})
		c := newTokenClient(t, both)
		c.wantIssued(t, iss.mint(t, "k1", nil), iss.srv.URL+" sub="+oidcWorkloadSub)
		// The apiserver's token is not OIDC's (its iss is not configured): the
		// Kubernetes authenticator, next in the chain, accepts it.
		if _, err := c.sign(t, env.Token(t, ns, sa, kubeenv.TokenOptions{Audiences: []string{"istio-ca"}, Pod: pod})); err != nil {
			t.Fatalf("CSRSign with the apiserver's token: %v", err)
		}
		rec := lastCSRRecord(t, both)
		checkFields(t, "audit record", []field{{"auth_method", rec.AuthMethod, "kubernetes"}, {"outcome", rec.Outcome, "issued"},
			{"granted_identity", rec.GrantedIdentity, workloadID}})
	})
}
