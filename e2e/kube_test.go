package e2e

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/castellan-ca/castellan/e2e/internal/kubeenv"
	corev1 "k8s.io/api/core/v1"
)

// Bounds of the eventual conditions the Kubernetes tests wait for (informer
// propagation, the apiserver's ~10 s token cache). They only turn a hang into
// a failure.
const (
	eventualTimeout = 45 * time.Second
	eventualPoll    = 250 * time.Millisecond
)

// TestKubernetes runs Castellan against a real kube-apiserver + etcd: the
// token authenticator and node authorizer in both verification modes, the
// root ConfigMap controller and a second control plane as a remote cluster
// side by side, then the TokenReview count alone (it reads the
// apiserver-wide request counter).
func TestKubernetes(t *testing.T) {
	env := kubeenv.Start(t)
	// Every Castellan here runs as a service account with the chart's RBAC.
	kc := castellanKubeconfig(t, env, "cm-lease-a", "cm-lease-b")
	t.Run("group", func(t *testing.T) {
		for _, mode := range []string{"tokenreview", "jwks"} {
			t.Run("authn "+mode, func(t *testing.T) {
				t.Parallel()
				testKubeAuth(t, env, kc, mode)
			})
		}
		t.Run("root configmaps", func(t *testing.T) {
			t.Parallel()
			testRootConfigMaps(t, env, kc)
		})
		t.Run("remote cluster", func(t *testing.T) {
			t.Parallel()
			testRemoteCluster(t, env, kc)
		})
	})
	t.Run("tokenreview count", func(t *testing.T) { testReviewCount(t, env, kc) })
}

// kubeArgs are the flags of a Castellan with Kubernetes on through kubeconfig.
func kubeArgs(kubeconfig, mode string, more ...string) []string {
	return append([]string{"--kubeconfig", kubeconfig, "--token-verification", mode}, more...)
}

// kubeCase is one CreateCertificate call and what it must produce.
type kubeCase struct {
	name string
	// ztunnel calls with ImpersonatedIdentity = identity; otherwise Istio's
	// client asks for identity as a sidecar would.
	ztunnel   bool
	token     string
	clusterID string
	identity  string
	wantCode  string
	// want is the audit record; its detail is matched as a substring.
	want auditRecord
	// eventually: the state the case depends on propagates (a deleted pod),
	// so the call is repeated until it returns wantCode.
	eventually bool
}

// testKubeAuth checks every authentication and node-authorization case of
// the issue against one Castellan in the given verification mode.
func testKubeAuth(t *testing.T, env *kubeenv.Env, kubeconfig, mode string) {
	ns, zns := mode+"-app", mode+"-ztunnel"
	nodeA, nodeB := mode+"-node-a", mode+"-node-b"
	id := func(ns, sa string) string { return fmt.Sprintf("spiffe://%s/ns/%s/sa/%s", trustDomain, ns, sa) }
	env.CreateNamespace(t, ns, nil)
	env.CreateNamespace(t, zns, nil)
	for _, sa := range []string{"sleep", "other", "gone", "nopod", "done", "reborn"} {
		env.CreateServiceAccount(t, ns, sa)
	}
	env.CreateServiceAccount(t, zns, "ztunnel")
	sleep := env.CreatePod(t, ns, "sleep-1", "sleep", nodeA)
	env.CreatePod(t, ns, "other-1", "other", nodeB)
	env.CreatePod(t, ns, "gone-1", "gone", nodeA)
	env.CreatePod(t, ns, "done-1", "done", nodeA)
	env.SetPodPhase(t, ns, "done-1", corev1.PodSucceeded)
	reborn := env.CreatePod(t, ns, "reborn", "reborn", nodeA)
	zt := env.CreatePod(t, zns, "ztunnel-a", "ztunnel", nodeA)

	istioCA := []string{"istio-ca"}
	sleepTok := env.Token(t, ns, "sleep", kubeenv.TokenOptions{Audiences: istioCA, Pod: sleep})
	ztTok := env.Token(t, zns, "ztunnel", kubeenv.TokenOptions{Audiences: istioCA, Pod: zt})
	rebornTok := env.Token(t, ns, "reborn", kubeenv.TokenOptions{Audiences: istioCA, Pod: reborn})
	wrongAudTok := env.Token(t, ns, "sleep", kubeenv.TokenOptions{Audiences: []string{"not-istio-ca"}, Pod: sleep})
	unboundZtTok := env.Token(t, zns, "ztunnel", kubeenv.TokenOptions{Audiences: istioCA})
	expiredTok := env.Resign(t, sleepTok, func(c map[string]any) {
		now := time.Now()
		c["iat"], c["nbf"], c["exp"] = now.Add(-2*time.Hour).Unix(), now.Add(-2*time.Hour).Unix(), now.Add(-time.Hour).Unix()
	})

	srv := startServer(t, serverConfig{signer: "selfsigned", extraArgs: kubeArgs(kubeconfig, mode,
		"--trusted-node-accounts", zns+"/ztunnel", "--cluster-aliases", "alias-1", "--root-configmaps=false")})

	sleepID, ztID := id(ns, "sleep"), id(zns, "ztunnel")
	issued := func(caller, granted string) auditRecord {
		return auditRecord{Outcome: "issued", Code: codeOK, AuthMethod: "kubernetes", Caller: caller, GrantedIdentity: granted}
	}
	refusedAuthn := func(detail string) auditRecord {
		return auditRecord{Outcome: "refused", Code: "Unauthenticated", Reason: "authn.failed", AuthMethod: "kubernetes", Detail: detail}
	}
	refusedNode := func(caller, detail string) auditRecord {
		return auditRecord{Outcome: "refused", Code: "Unauthenticated", Reason: "authz.impersonation", AuthMethod: "kubernetes", Caller: caller, Detail: detail}
	}
	unbound := refusedNode(ztID, "did not authenticate with a pod-bound service-account token")
	if mode == "jwks" {
		unbound = refusedAuthn("not bound to a pod")
	}

	before := []kubeCase{
		{name: "sidecar gets its own identity", token: sleepTok, clusterID: clusterID, identity: sleepID,
			wantCode: codeOK, want: issued(sleepID, sleepID)},
		{name: "sidecar with an empty cluster id", token: sleepTok, clusterID: "", identity: sleepID,
			wantCode: codeOK, want: issued(sleepID, sleepID)},
		{name: "sidecar with a cluster alias", token: sleepTok, clusterID: "alias-1", identity: sleepID,
			wantCode: codeOK, want: issued(sleepID, sleepID)},
		{name: "ztunnel gets a pod on its node", ztunnel: true, token: ztTok, clusterID: clusterID, identity: sleepID,
			wantCode: codeOK, want: issued(ztID, sleepID)},
		{name: "reborn pod's token works before the pod is replaced", token: rebornTok, clusterID: clusterID, identity: id(ns, "reborn"),
			wantCode: codeOK, want: issued(id(ns, "reborn"), id(ns, "reborn"))},
		{name: "ztunnel refused for a pod on another node", ztunnel: true, token: ztTok, clusterID: clusterID, identity: id(ns, "other"),
			wantCode: "Unauthenticated", want: refusedNode(ztID, `no running pod of `+ns+`/other on node "`+nodeA+`"`)},
		{name: "ztunnel refused for a service account with no pod", ztunnel: true, token: ztTok, clusterID: clusterID, identity: id(ns, "nopod"),
			wantCode: "Unauthenticated", want: refusedNode(ztID, "no running pod of "+ns+"/nopod")},
		{name: "ztunnel refused for a finished pod on its node", ztunnel: true, token: ztTok, clusterID: clusterID, identity: id(ns, "done"),
			wantCode: "Unauthenticated", want: refusedNode(ztID, "no running pod of "+ns+"/done")},
		{name: "ztunnel refused for an ID in another trust domain", ztunnel: true, token: ztTok, clusterID: clusterID,
			identity: "spiffe://other.example/ns/" + ns + "/sa/sleep",
			wantCode: "Unauthenticated", want: refusedNode(ztID, `trust domain "other.example"`)},
		{name: "untrusted service account may not impersonate", ztunnel: true, token: sleepTok, clusterID: clusterID, identity: id(ns, "other"),
			wantCode: "Unauthenticated", want: refusedNode(sleepID, "not a trusted node account")},
		{name: "token with the wrong audience", token: wrongAudTok, clusterID: clusterID, identity: sleepID,
			wantCode: "Unauthenticated", want: refusedAuthn("service-account token")},
		{name: "expired token", token: expiredTok, clusterID: clusterID, identity: sleepID,
			wantCode: "Unauthenticated", want: refusedAuthn("service-account token")},
		{name: "ztunnel token not bound to a pod", ztunnel: true, token: unboundZtTok, clusterID: clusterID, identity: sleepID,
			wantCode: "Unauthenticated", want: unbound},
		{name: "unknown cluster id", token: sleepTok, clusterID: "no-such-cluster", identity: sleepID,
			wantCode: "Unauthenticated", want: refusedAuthn(`cluster id "no-such-cluster" is not configured`)},
	}
	for _, tc := range before {
		t.Run(tc.name, func(t *testing.T) { runKubeCase(t, srv, tc) })
	}

	// Pods go away: the pod a ztunnel asks for, and the pod a token is bound
	// to (replaced by a namesake with a new UID).
	env.DeletePod(t, ns, "gone-1")
	env.DeletePod(t, ns, "reborn")
	env.CreatePod(t, ns, "reborn", "reborn", nodeA)
	after := []kubeCase{
		{name: "ztunnel refused for a deleted pod", ztunnel: true, token: ztTok, clusterID: clusterID, identity: id(ns, "gone"),
			wantCode: "Unauthenticated", want: refusedNode(ztID, "no running pod of "+ns+"/gone"), eventually: true},
		{name: "token of a deleted pod (UID mismatch)", token: rebornTok, clusterID: clusterID, identity: id(ns, "reborn"),
			wantCode: "Unauthenticated", want: refusedAuthn("service-account token"), eventually: true},
	}
	for _, tc := range after {
		t.Run(tc.name, func(t *testing.T) { runKubeCase(t, srv, tc) })
	}
	if mode == "jwks" {
		// jwks: the pod check is exact, not the apiserver's "pod not found".
		t.Run("UID mismatch is named", func(t *testing.T) {
			recs := csrRecords(srv.auditList(t))
			if d := recs[len(recs)-1].Detail; !strings.Contains(d, "is bound to UID "+string(reborn.UID)) {
				t.Errorf("detail = %q, want the UID mismatch named", d)
			}
		})
	}
}

// runKubeCase makes the call of tc (repeatedly if tc.eventually) and checks
// the code, the certificate and the audit record.
func runKubeCase(t *testing.T, srv *server, tc kubeCase) {
	t.Helper()
	n := len(srv.auditList(t))
	call := func() (string, []string) {
		if tc.ztunnel {
			return ztunnelSign(t, srv, tc.token, tc.clusterID, tc.identity)
		}
		return sidecarSign(t, srv, tc.token, tc.clusterID, tc.identity)
	}
	code, chain := call()
	for deadline := time.Now().Add(eventualTimeout); tc.eventually && code != tc.wantCode && time.Now().Before(deadline); {
		time.Sleep(eventualPoll)
		code, chain = call()
	}
	if code != tc.wantCode {
		t.Fatalf("code = %s, want %s", code, tc.wantCode)
	}
	if code == codeOK {
		if got := leafURI(t, chain); got != tc.identity {
			t.Errorf("leaf URI SAN = %s, want %s", got, tc.identity)
		}
	}
	recs := csrRecords(srv.auditList(t)[n:])
	if !tc.eventually && len(recs) != 1 {
		t.Fatalf("new csr audit records = %d, want 1 (no retries): %+v", len(recs), recs)
	}
	if len(recs) == 0 {
		t.Fatal("no csr audit record")
	}
	r, w := recs[len(recs)-1], tc.want
	checkFields(t, "audit record", []field{
		{"outcome", r.Outcome, w.Outcome},
		{"code", r.Code, w.Code},
		{"reason", r.Reason, w.Reason},
		{"caller", r.Caller, w.Caller},
		{"cluster_id", r.ClusterID, tc.clusterID},
		{"granted_identity", r.GrantedIdentity, w.GrantedIdentity},
	})
	if w.AuthMethod != "" && r.AuthMethod != w.AuthMethod {
		t.Errorf("audit record auth_method = %q, want %q", r.AuthMethod, w.AuthMethod)
	}
	// The pipeline reads the requested identity only from an authenticated caller.
	wantRequested := ""
	if tc.ztunnel && w.Reason != "authn.failed" {
		wantRequested = tc.identity
	}
	if r.RequestedIdentity != wantRequested {
		t.Errorf("audit record requested_identity = %q, want %q", r.RequestedIdentity, wantRequested)
	}
	if w.Outcome == "issued" && (r.Serial == "" || r.CertSHA256 == "") {
		t.Errorf("issued record without serial or fingerprint: %+v", r)
	}
	if !strings.Contains(r.Detail, w.Detail) {
		t.Errorf("audit record detail = %q, want it to contain %q", r.Detail, w.Detail)
	}
}
