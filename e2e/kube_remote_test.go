package e2e

import (
	"fmt"
	"testing"

	"github.com/castellan-ca/castellan/e2e/internal/kubeenv"
)

// testRemoteCluster runs a second control plane as the remote cluster
// "east": its tokens are checked by its own apiserver when the clusterid
// header names it, its ztunnel is authorized against its own pods, and a
// token is refused when the header names the other cluster.
func testRemoteCluster(t *testing.T, local *kubeenv.Env, localKubeconfig string) {
	east := kubeenv.Start(t)
	const ns, zns = "remote-app", "remote-ztunnel"
	for _, env := range []*kubeenv.Env{local, east} {
		env.CreateNamespace(t, ns, nil)
		env.CreateServiceAccount(t, ns, "sleep")
	}
	east.CreateNamespace(t, zns, nil)
	east.CreateServiceAccount(t, zns, "ztunnel")
	istioCA := []string{"istio-ca"}
	eastSleep := east.CreatePod(t, ns, "sleep-1", "sleep", "east-node")
	eastZt := east.CreatePod(t, zns, "ztunnel-1", "ztunnel", "east-node")
	localSleep := local.CreatePod(t, ns, "sleep-1", "sleep", "local-node")
	eastTok := east.Token(t, ns, "sleep", kubeenv.TokenOptions{Audiences: istioCA, Pod: eastSleep})
	eastZtTok := east.Token(t, zns, "ztunnel", kubeenv.TokenOptions{Audiences: istioCA, Pod: eastZt})
	localTok := local.Token(t, ns, "sleep", kubeenv.TokenOptions{Audiences: istioCA, Pod: localSleep})

	srv := startServer(t, serverConfig{signer: "selfsigned", extraArgs: kubeArgs(localKubeconfig, "tokenreview",
		"--remote-clusters", "east="+east.Kubeconfig, "--trusted-node-accounts", zns+"/ztunnel", "--root-configmaps=false")})
	sleepID := fmt.Sprintf("spiffe://%s/ns/%s/sa/sleep", trustDomain, ns)
	ztID := fmt.Sprintf("spiffe://%s/ns/%s/sa/ztunnel", trustDomain, zns)
	issued := func(caller, granted string) auditRecord {
		return auditRecord{Outcome: "issued", Code: codeOK, AuthMethod: "kubernetes", Caller: caller, GrantedIdentity: granted}
	}
	refused := auditRecord{Outcome: "refused", Code: "Unauthenticated", Reason: "authn.failed", AuthMethod: "kubernetes", Detail: "service-account token"}
	for _, tc := range []kubeCase{
		{name: "remote token with the remote cluster id", token: eastTok, clusterID: "east", identity: sleepID,
			wantCode: codeOK, want: issued(sleepID, sleepID)},
		{name: "local token with the local cluster id", token: localTok, clusterID: clusterID, identity: sleepID,
			wantCode: codeOK, want: issued(sleepID, sleepID)},
		{name: "remote ztunnel gets a pod on its node", ztunnel: true, token: eastZtTok, clusterID: "east", identity: sleepID,
			wantCode: codeOK, want: issued(ztID, sleepID)},
		{name: "remote token with the local cluster id", token: eastTok, clusterID: clusterID, identity: sleepID,
			wantCode: "Unauthenticated", want: refused},
		{name: "local token with the remote cluster id", token: localTok, clusterID: "east", identity: sleepID,
			wantCode: "Unauthenticated", want: refused},
	} {
		t.Run(tc.name, func(t *testing.T) { runKubeCase(t, srv, tc) })
	}
}
