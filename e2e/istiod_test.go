package e2e

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"io"
	"math/big"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/castellan-ca/castellan/e2e/internal/kubeenv"
	"github.com/castellan-ca/castellan/e2e/internal/testproc"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/utils/ptr"
)

// Timing of the Istio control-plane tests: the agent's certificates live
// 45 s (renewed at half life), istiod's 60 s, and the propagation window
// spans more than one agent renewal, as it must in production.
const (
	istioSecretTTL = 45 * time.Second
	istiodCertTTL  = 60 * time.Second
	istioWindow    = 30 * time.Second
	istioDialEvery = 2 * time.Second
	istioWait      = 90 * time.Second // bound on one eventual condition
	appNS, appSA   = "app", "app"
)

// istioMesh is one Castellan with a real istiod and pilot-agent around it.
type istioMesh struct {
	env      *kubeenv.Env
	srv      *server
	istiod   *proc
	agent    *proc
	istiodWD string // istiod's working directory
	agentWD  string
	secure   string // istiod's secure xDS address (localhost:PORT)
	watch    *xdsWatch
	// castellanKC is the kubeconfig Castellan runs with: its chart's ServiceAccount.
	castellanKC string
	// refusalsAsked counts the CSRs checkRemote made to be refused.
	refusalsAsked int
}

// TestIstioControlPlane runs Istio's own istiod (pilot-discovery, with
// ENABLE_CA_SERVER=false and the settings of deploy/istio/istiod-values.yaml
// as Istio's chart renders them) and pilot-agent (proxyless) against
// Castellan, which runs with the ServiceAccount, RBAC and configuration its
// chart renders: istiod serves with the Secret and reads the root ConfigMap
// Castellan wrote, the agent gets its certificate over Istio's real path, xDS
// clients holding it receive configuration, and the root is rotated while
// everything runs. Then the same with a plugged-in intermediate. Last,
// istiod as a registration authority for Castellan's CSR signer.
func TestIstioControlPlane(t *testing.T) {
	istioDirs(t)
	helmBin(t)
	t.Run("selfsigned root rotation", testIstioSelfSigned)
	t.Run("plugged-in intermediate", testIstioIntermediate)
	t.Run("istiod RA mode", testIstiodRA)
}

// testIstioSelfSigned rotates the generated root with castellanctl while a
// remote cluster follows the bundle.
func testIstioSelfSigned(t *testing.T) {
	env := kubeenv.Start(t)
	east := kubeenv.Start(t)
	eastKC := chartIdentity(t, east, nil, "../deploy/helm/castellan/ci/istio-values.yaml")
	m := startIstioMesh(t, env, meshOptions{}, serverConfig{signer: "selfsigned", extraArgs: []string{
		"--rotation-schedule=false", "--rotation-propagation-window", istioWindow.String(), "--remote-clusters", "east=" + eastKC,
		// The remote checks ask for an hour, like Istio's clients: clamped, so
		// the old root can retire within the test once their certificates expire.
		"--max-ttl", istioSecretTTL.String(), "--default-ttl", istioSecretTTL.String(), "--ttl-policy", "clamp"}})
	east.CreateNamespace(t, "remote-app", nil)
	east.CreateServiceAccount(t, "remote-app", "sleep")
	eastPod := east.CreatePod(t, "remote-app", "sleep-1", "sleep", "east-node")
	eastTok := east.Token(t, "remote-app", "sleep", kubeenv.TokenOptions{Audiences: []string{"istio-ca"}, Pod: eastPod})
	oldRoot := rotStatus(t, m.srv).only(t, "root", "active")
	m.checkRemote(t, east, eastTok)

	m.srv.ctl(t, "ca", "rotate", "prepare")
	newRoot := rotStatus(t, m.srv).only(t, "root", "prepared")
	m.waitBundleEverywhere(t, east)
	waitNextStep(t, m.srv, newRoot.KeyID)
	m.srv.ctl(t, "ca", "rotate", "activate")
	m.waitIssuer(t, newRoot.KeyID)
	m.checkRemote(t, east, eastTok)
	waitNextStep(t, m.srv, oldRoot.KeyID)
	m.srv.ctl(t, "ca", "rotate", "retire")
	m.waitBundleEverywhere(t, east)
	m.finish(t, m.bundle(t))
	m.checkRemote(t, east, eastTok)
	m.checkSecretPrivileges(t)
	m.checkRootCheck(t)
}

// testIstioIntermediate plugs in an intermediate (Istio's cacerts layout)
// and rotates its root the way an operator of a plug-in CA does: the new
// root added to root-cert.pem, then a new intermediate under it, then the old
// root removed.
func testIstioIntermediate(t *testing.T) {
	env := kubeenv.Start(t)
	oldCA, newCA := newPluginCA(t, "old"), newPluginCA(t, "new")
	dir := t.TempDir()
	oldCA.write(t, dir, oldCA.root)
	m := startIstioMesh(t, env, meshOptions{}, serverConfig{signer: "intermediate", cacertsDir: dir,
		extraArgs: []string{"--cacerts-poll-interval", "200ms"}}, "../deploy/helm/castellan/ci/intermediate-cacerts-values.yaml")

	oldCA.write(t, dir, oldCA.root, newCA.root) // prepare
	m.waitBundleEverywhere(t, nil)
	time.Sleep(istioWindow)                     // the propagation window: at least one agent renewal
	newCA.write(t, dir, oldCA.root, newCA.root) // activate
	m.waitIssuer(t, keyIDOf(newCA.inter))
	newCA.write(t, dir, newCA.root) // retire: the old root leaves once its certificates expired
	want := []*x509.Certificate{newCA.root}
	for deadline := time.Now().Add(2 * istioWait); !sameCertSet(m.bundle(t), want); time.Sleep(time.Second) {
		if time.Now().After(deadline) {
			t.Fatalf("bundle still %s, want the new root only", describeCerts(m.bundle(t)))
		}
	}
	m.waitBundleEverywhere(t, nil)
	m.finish(t, want)
}

// meshOptions vary the mesh startIstioMesh builds.
type meshOptions struct {
	// raValues, when set, is a values file for Istio's istiod chart (after
	// deploy/istio/istiod-values.yaml) that runs istiod as a registration
	// authority (EXTERNAL_CA=ISTIOD_RA_KUBERNETES_API, K8S_SIGNER): istiod
	// then runs under the ServiceAccount and RBAC its chart renders, reads
	// the RA's root from ./etc/external-ca-cert/root-cert.pem (projected from
	// the istio-ca-root-cert ConfigMap Castellan writes), and the agent asks
	// istiod for its certificate, which forwards the request to the CSR API.
	raValues string
}

// startIstioMesh applies Istio's CRDs, starts Castellan under its chart's
// identity and configuration (valueFiles after ci/istio-values.yaml), then
// istiod and the agent, and opens the xDS connections.
func startIstioMesh(t *testing.T, env *kubeenv.Env, o meshOptions, cfg serverConfig, valueFiles ...string) *istioMesh {
	t.Helper()
	bin, mod := istioDirs(t)
	ctx := context.Background()
	ap := newApplier(t, env.Config)
	crds, err := os.ReadFile(filepath.Join(mod, "manifests/charts/base/files/crd-all.gen.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	objs, err := decodeObjects(crds)
	if err != nil {
		t.Fatal(err)
	}
	if err := ap.apply(ctx, objs, false); err != nil {
		t.Fatalf("Istio CRDs: %v", err)
	}
	env.CreateNamespace(t, appNS, nil)
	env.CreateServiceAccount(t, appNS, appSA)
	pod := env.CreatePod(t, appNS, "app-1", appSA, "node-1")

	configFile := t.TempDir() + "/config.yaml"
	kc := chartIdentity(t, env, func(cm string) { writeFile(t, filepath.Dir(configFile), "config.yaml", []byte(cm), 0o600) },
		append([]string{"../deploy/helm/castellan/ci/istio-values.yaml"}, valueFiles...)...)
	cfg.configFile = configFile
	cfg.extraArgs = append([]string{"--kubeconfig", kc, "--leader-election-namespace", "castellan-system",
		"--istiod-cert-ttl", istiodCertTTL.String(), "--ca-state-poll-interval", "200ms", "--clock-skew", "1s"}, cfg.extraArgs...)
	m := &istioMesh{env: env, srv: startServer(t, cfg), castellanKC: kc}

	ports := map[string]int{}
	for _, p := range []string{"http", "grpc", "secure", "monitoring", "https", "ctrlz"} {
		ports[p] = testproc.FreePort(t)
	}
	m.secure = fmt.Sprintf("localhost:%d", ports["secure"])

	// istiod, in a working directory laid out as its pod's volumes.
	m.istiodWD = t.TempDir()
	pctx, cancel := context.WithCancel(ctx)
	t.Cleanup(cancel)
	tlsDir := filepath.Join(m.istiodWD, "var/run/secrets/istiod/tls")
	go projection{client: env.Client, secret: true, namespace: "istio-system", name: "istiod-tls",
		files: map[string]string{"tls.crt": tlsDir + "/tls.crt", "tls.key": tlsDir + "/tls.key", "ca.crt": tlsDir + "/ca.crt"}}.run(pctx)
	go projection{client: env.Client, namespace: "istio-system", name: "istio-ca-root-cert",
		files: map[string]string{"root-cert.pem": filepath.Join(m.istiodWD, "var/run/secrets/istiod/ca/root-cert.pem")}}.run(pctx)
	writeFile(t, mkdir(t, m.istiodWD, "etc/istio/config"), "mesh", []byte("trustDomain: "+trustDomain+"\n"), 0o644)
	istiodFiles := []string{"var/run/secrets/istiod/tls/tls.key", "var/run/secrets/istiod/ca/root-cert.pem"}
	istiodVals, istiodKC, wantCAServer := []string{"../deploy/istio/istiod-values.yaml"}, env.Kubeconfig, "ENABLE_CA_SERVER=false"
	agentCA, agentTTL := "localhost:"+m.srv.grpcAddr[strings.LastIndexByte(m.srv.grpcAddr, ':')+1:], istioSecretTTL
	if o.raValues != "" {
		istiodVals, wantCAServer = append(istiodVals, o.raValues), "ENABLE_CA_SERVER=true"
		// The CSR API refuses expirationSeconds under 600, and istiod passes the agent's TTL on.
		agentCA, agentTTL = m.secure, time.Hour
		go projection{client: env.Client, namespace: "istio-system", name: "istio-ca-root-cert",
			files: map[string]string{"root-cert.pem": filepath.Join(m.istiodWD, "etc/external-ca-cert/root-cert.pem")}}.run(pctx)
		istiodFiles = append(istiodFiles, "etc/external-ca-cert/root-cert.pem")
	}
	istiodEnv, istiodObjs := istiodChart(t, mod, istiodVals...)
	if !slices.Contains(istiodEnv, wantCAServer) {
		t.Fatalf("Istio's chart with %v does not set %s: %v", istiodVals, wantCAServer, istiodEnv)
	}
	if o.raValues != "" {
		istiodKC = istiodIdentity(t, env, istiodObjs)
	}
	for _, f := range istiodFiles {
		waitFile(t, filepath.Join(m.istiodWD, f), istioWait)
	}
	m.istiod = startProc(t, "pilot-discovery", filepath.Join(bin, "pilot-discovery"), m.istiodWD,
		append(istiodEnv, "POD_NAME=istiod-e2e", "POD_NAMESPACE=istio-system", "SERVICE_ACCOUNT=istiod"),
		"discovery", "--kubeconfig", istiodKC, "--meshConfig", "./etc/istio/config/mesh",
		"--httpAddr", fmt.Sprintf("127.0.0.1:%d", ports["http"]), "--grpcAddr", fmt.Sprintf("127.0.0.1:%d", ports["grpc"]),
		"--secureGRPCAddr", fmt.Sprintf("127.0.0.1:%d", ports["secure"]), "--monitoringAddr", fmt.Sprintf("127.0.0.1:%d", ports["monitoring"]),
		"--httpsAddr", fmt.Sprintf("127.0.0.1:%d", ports["https"]), "--ctrlz_port", fmt.Sprint(ports["ctrlz"]), "--shutdownDuration", "1s")
	m.istiod.waitUntil(t, "readiness", istioWait, func() bool { return httpOK(fmt.Sprintf("http://127.0.0.1:%d/ready", ports["http"])) })
	createServiceEntry(t, ap, xdsHosts[0])

	// pilot-agent, proxyless, with a pod-bound token and the app namespace's root ConfigMap.
	m.agentWD = t.TempDir()
	go projection{client: env.Client, namespace: appNS, name: "istio-ca-root-cert",
		files: map[string]string{"root-cert.pem": filepath.Join(m.agentWD, "var/run/secrets/istio/root-cert.pem")}}.run(pctx)
	token := env.Token(t, appNS, appSA, kubeenv.TokenOptions{Audiences: []string{"istio-ca"}, Pod: pod, ExpirationSeconds: 3600})
	writeFile(t, mkdir(t, m.agentWD, "var/run/secrets/tokens"), "istio-token", []byte(token), 0o600)
	waitFile(t, filepath.Join(m.agentWD, "var/run/secrets/istio/root-cert.pem"), istioWait)
	proxyDir := mkdir(t, m.agentWD, "etc/istio/proxy")
	mkdir(t, m.agentWD, "output") // the agent writes OUTPUT_CERTS into an existing directory only
	proxyConfig, err := json.Marshal(map[string]any{"discoveryAddress": m.secure, "statusPort": testproc.FreePort(t), "configPath": proxyDir})
	if err != nil {
		t.Fatal(err)
	}
	m.agent = startProc(t, "pilot-agent", filepath.Join(bin, "pilot-agent"), m.agentWD, []string{
		"DISABLE_ENVOY=true", "CA_ADDR=" + agentCA, "CLOUD_PLATFORM=none", "POD_NAME=" + pod.Name, "POD_NAMESPACE=" + appNS,
		"SERVICE_ACCOUNT=" + appSA, "INSTANCE_IP=127.0.0.1", "OUTPUT_CERTS=" + m.outputDir(), "SECRET_TTL=" + agentTTL.String(),
		"GRPC_XDS_BOOTSTRAP=" + filepath.Join(proxyDir, "grpc-bootstrap.json"), "PROXY_CONFIG=" + string(proxyConfig)},
		"proxy", "sidecar")
	m.agent.waitUntil(t, "workload certificate and gRPC bootstrap", istioWait, func() bool {
		_, e1 := os.Stat(filepath.Join(m.outputDir(), "cert-chain.pem"))
		_, e2 := os.Stat(filepath.Join(proxyDir, "grpc-bootstrap.json"))
		return e1 == nil && e2 == nil
	})
	node, uri := bootstrapNode(t, filepath.Join(proxyDir, "grpc-bootstrap.json"))
	viaAgent := agentSocketTarget(node, uri)
	direct := directTarget(node, m.secure, fileRootsTLS(filepath.Join(m.agentWD, "var/run/secrets/istio/root-cert.pem"),
		"istiod.istio-system.svc", m.outputDir()))
	// pilot-agent's xDS proxy serves one downstream stream at a time (a new
	// one closes the previous), so the new connections opened all along go
	// to istiod directly, authenticated by the pod's token as the agent's are:
	// istiod checks client certificates against the roots it read at start
	// (README, Istio integration), so a fresh mTLS connection with a renewed
	// certificate is not something istiod accepts across a root rotation.
	fresh := tokenTarget(node, m.secure, fileRootsTLS(filepath.Join(m.agentWD, "var/run/secrets/istio/root-cert.pem"),
		"istiod.istio-system.svc", ""), filepath.Join(m.agentWD, "var/run/secrets/tokens/istio-token"))
	m.watch = watchXDS(t, []xdsTarget{viaAgent, direct}, []xdsTarget{fresh}, istioDialEvery)
	t.Cleanup(func() { m.watch.halt() })
	m.watch.waitCluster(t, xdsHosts[0], istioWait)
	return m
}

// outputDir is where the agent writes its certificate (OUTPUT_CERTS).
func (m *istioMesh) outputDir() string { return filepath.Join(m.agentWD, "output") }

// bundle is Castellan's trust bundle now.
func (m *istioMesh) bundle(t *testing.T) []*x509.Certificate {
	t.Helper()
	b, err := parseCerts(m.srv.ctl(t, "bundle"))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// waitBundleEverywhere waits until the bundle is in every root ConfigMap
// (both clusters), in istiod's and the agent's projected files, and in
// istiod's Secret.
func (m *istioMesh) waitBundleEverywhere(t *testing.T, remote *kubeenv.Env) {
	t.Helper()
	want := m.bundle(t)
	files := []string{"var/run/secrets/istiod/ca/root-cert.pem", "var/run/secrets/istiod/tls/ca.crt"}
	for deadline := time.Now().Add(istioWait); ; time.Sleep(200 * time.Millisecond) {
		bad := ""
		for _, f := range files {
			if got, err := parseCerts(readOrEmpty(filepath.Join(m.istiodWD, f))); err != nil || !sameCertSet(got, want) {
				bad = "istiod's " + f
			}
		}
		if got, err := parseCerts(readOrEmpty(filepath.Join(m.agentWD, "var/run/secrets/istio/root-cert.pem"))); err != nil || !sameCertSet(got, want) {
			bad = "the agent's root-cert.pem"
		}
		if remote != nil {
			cm, err := remote.Client.CoreV1().ConfigMaps("remote-app").Get(context.Background(), "istio-ca-root-cert", metav1.GetOptions{})
			if got, perr := parseCerts([]byte(cmData(cm, err))); perr != nil || !sameCertSet(got, want) {
				bad = "the remote cluster's istio-ca-root-cert"
			}
		}
		if bad == "" {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s does not hold the bundle %s", bad, describeCerts(want))
		}
	}
}

func cmData(cm *corev1.ConfigMap, err error) string {
	if err != nil {
		return ""
	}
	return cm.Data["root-cert.pem"]
}

// readOrEmpty reads path; a missing file reads as empty.
func readOrEmpty(path string) []byte {
	b, _ := os.ReadFile(path)
	return b
}

// waitIssuer waits until istiod serves, and the agent holds, a certificate
// issued under the CA with keyID (its root, or its intermediate).
func (m *istioMesh) waitIssuer(t *testing.T, keyID string) {
	t.Helper()
	for deadline := time.Now().Add(istioWait); ; time.Sleep(500 * time.Millisecond) {
		served := m.istiodChain(t)
		agent, _ := parseCerts(readOrEmpty(filepath.Join(m.outputDir(), "cert-chain.pem")))
		if issuedUnder(served, keyID) && issuedUnder(agent, keyID) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("after %v istiod serves %s and the agent holds %s, want both under %s",
				istioWait, describeCerts(served), describeCerts(agent), keyID)
		}
	}
}

// issuedUnder reports whether the chain's leaf was signed by the CA keyID.
func issuedUnder(chain []*x509.Certificate, keyID string) bool {
	return len(chain) > 0 && fmt.Sprintf("%x", chain[0].AuthorityKeyId) == keyID
}

// istiodChain is the chain istiod presents on a new TLS connection.
func (m *istioMesh) istiodChain(t *testing.T) []*x509.Certificate {
	t.Helper()
	conn, err := tls.Dial("tcp", m.secure, &tls.Config{InsecureSkipVerify: true, ServerName: "istiod.istio-system.svc"}) // verified by the callers
	if err != nil {
		t.Logf("TLS to istiod: %v", err)
		return nil
	}
	defer conn.Close()
	return conn.ConnectionState().PeerCertificates
}

// finish checks the end state: a config change still reaches the long-lived
// xDS streams; no xDS connection and no CSR failed; istiod, its Secret, the
// agent and Castellan's own serving certificate chain to the new roots only.
func (m *istioMesh) finish(t *testing.T, newRoots []*x509.Certificate) {
	t.Helper()
	createServiceEntry(t, newApplier(t, m.env.Config), xdsHosts[1])
	m.watch.waitCluster(t, xdsHosts[1], istioWait)
	// One more agent renewal under the final bundle.
	first := readOrEmpty(filepath.Join(m.outputDir(), "cert-chain.pem"))
	m.agent.waitUntil(t, "renewal", istioWait, func() bool {
		return string(readOrEmpty(filepath.Join(m.outputDir(), "cert-chain.pem"))) != string(first)
	})
	failures := m.watch.halt()
	t.Logf("xDS: %d connections opened, %d pushes on the long-lived streams, %d failures", m.watch.opened.Load(), m.watch.responses.Load(), len(failures))
	if len(failures) > 0 {
		t.Errorf("xDS failures (want none):\n%s", strings.Join(failures, "\n"))
	}
	recs := m.srv.auditList(t)
	agentID := fmt.Sprintf("spiffe://%s/ns/%s/sa/%s", trustDomain, appNS, appSA)
	renewals, istiodCerts, refusals := 0, 0, 0
	for _, r := range recs {
		switch {
		case r.Kind == "csr" && r.Outcome != "issued" && r.Code == "Unauthenticated" && r.ClusterID == clusterID && refusals < m.refusalsAsked:
			refusals++ // checkRemote's remote token under the local clusterid
		case r.Kind == "csr" && r.Outcome != "issued":
			t.Errorf("CSR %s for %s (%s %s): want every CSR issued", r.Outcome, r.GrantedIdentity, r.Code, r.Reason)
		case r.Kind == "csr" && r.GrantedIdentity == agentID:
			renewals++
		case r.Kind == "operator" && strings.Contains(r.Detail, "istiod serving certificate") && r.Serial != "":
			istiodCerts++
		}
	}
	if refusals != m.refusalsAsked {
		t.Errorf("%d deliberate refusals audited, want %d", refusals, m.refusalsAsked)
	}
	t.Logf("agent certificates: %d, istiod certificates: %d (each audited)", renewals, istiodCerts)
	if renewals < 4 || istiodCerts < 3 {
		t.Errorf("%d agent certificates and %d istiod certificates: the agent did not renew or istiod's certificate was not reissued at each phase", renewals, istiodCerts)
	}

	newPool := x509.NewCertPool()
	for _, r := range newRoots {
		newPool.AddCert(r)
	}
	onlyNew := func(what string, chain []*x509.Certificate, usage x509.ExtKeyUsage) {
		if len(chain) == 0 {
			t.Errorf("%s: no certificate", what)
			return
		}
		inter := x509.NewCertPool()
		for _, c := range chain[1:] {
			inter.AddCert(c)
		}
		chains, err := chain[0].Verify(x509.VerifyOptions{Roots: newPool, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{usage}})
		if err != nil {
			t.Errorf("%s does not chain to the new root: %v", what, err)
			return
		}
		for _, c := range chains {
			if root := c[len(c)-1]; !containsCert(newRoots, root) {
				t.Errorf("%s chains to %s, not a new root", what, root.Subject)
			}
		}
	}
	onlyNew("istiod's served certificate", m.istiodChain(t), x509.ExtKeyUsageServerAuth)
	sec, err := m.env.Client.CoreV1().Secrets("istio-system").Get(context.Background(), "istiod-tls", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	secChain, _ := parseCerts(sec.Data["tls.crt"])
	onlyNew("the istiod-tls Secret", secChain, x509.ExtKeyUsageServerAuth)
	if got, _ := parseCerts(sec.Data["ca.crt"]); !sameCertSet(got, newRoots) {
		t.Errorf("istiod-tls ca.crt holds %s, want the new roots only", describeCerts(got))
	}
	agentChain, _ := parseCerts(readOrEmpty(filepath.Join(m.outputDir(), "cert-chain.pem")))
	onlyNew("the agent's workload certificate", agentChain, x509.ExtKeyUsageClientAuth)
	if got, _ := parseCerts(readOrEmpty(filepath.Join(m.outputDir(), "root-cert.pem"))); !sameCertSet(got, newRoots) {
		t.Errorf("the agent's root-cert.pem holds %s, want the new roots only", describeCerts(got))
	}
	conn, err := tls.Dial("tcp", m.srv.grpcAddr, &tls.Config{RootCAs: newPool, ServerName: "istiod.istio-system.svc", NextProtos: []string{"h2"}})
	if err != nil {
		t.Errorf("Castellan's serving certificate does not verify under the new root: %v", err)
	} else {
		_ = conn.Close() // a handshake check: nothing was sent
	}
}

func containsCert(set []*x509.Certificate, c *x509.Certificate) bool {
	for _, s := range set {
		if s.Equal(c) {
			return true
		}
	}
	return false
}

// checkRemote: a pod-bound token of the remote cluster is accepted with its
// clusterid, and refused with the local one.
func (m *istioMesh) checkRemote(t *testing.T, east *kubeenv.Env, token string) {
	t.Helper()
	id := fmt.Sprintf("spiffe://%s/ns/remote-app/sa/sleep", trustDomain)
	if code, chain := sidecarSign(t, m.srv, token, "east", id); code != codeOK || leafURI(t, chain) != id {
		t.Errorf("remote token with clusterid east: %s, want OK for %s", code, id)
	}
	m.refusalsAsked++
	if code, _ := sidecarSign(t, m.srv, token, clusterID, id); code != "Unauthenticated" {
		t.Errorf("remote token with the local clusterid: %s, want Unauthenticated", code)
	}
}

// chartIdentity renders the chart with valueFiles and applies what it
// renders to env, for real: the ServiceAccount, RBAC (ClusterRole, Roles,
// the ValidatingAdmissionPolicy) and the ConfigMap. It hands the rendered
// config.yaml to config (if not nil) and returns a kubeconfig holding a token
// of the chart's ServiceAccount, so Castellan runs under exactly that RBAC.
func chartIdentity(t *testing.T, env *kubeenv.Env, config func(string), valueFiles ...string) string {
	t.Helper()
	for _, ns := range []string{"castellan-system", "istio-system"} {
		if _, err := env.Client.CoreV1().Namespaces().Get(context.Background(), ns, metav1.GetOptions{}); err != nil {
			env.CreateNamespace(t, ns, nil)
		}
	}
	objs := renderChart(t, valueFiles...)
	if err := newApplier(t, env.Config).apply(context.Background(), objs, false); err != nil {
		t.Fatalf("apply the chart: %v", err)
	}
	for _, o := range objs {
		if o.GetKind() == "ConfigMap" && config != nil {
			cfg, _, _ := unstructured.NestedString(o.Object, "data", "config.yaml")
			config(cfg)
		}
	}
	token := env.Token(t, "castellan-system", "castellan", kubeenv.TokenOptions{ExpirationSeconds: 2 * 3600})
	return env.KubeconfigForToken(t, "castellan", token)
}

// createServiceEntry adds a ServiceEntry for host in the app namespace: a
// configuration change istiod pushes to every xDS client.
func createServiceEntry(t *testing.T, ap *applier, host string) {
	t.Helper()
	se := &unstructured.Unstructured{Object: map[string]any{
		"apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry",
		"metadata": map[string]any{"name": strings.ReplaceAll(host, ".", "-"), "namespace": appNS},
		"spec": map[string]any{"hosts": []any{host}, "location": "MESH_EXTERNAL", "resolution": "STATIC",
			"ports":     []any{map[string]any{"number": int64(80), "name": "http", "protocol": "HTTP"}},
			"endpoints": []any{map[string]any{"address": "127.0.0.1"}}},
	}}
	if err := ap.apply(context.Background(), []*unstructured.Unstructured{se}, false); err != nil {
		t.Fatal(err)
	}
}

// istiodChart renders Istio's istiod chart with valueFiles and returns the
// environment it gives the discovery container (literal values only; the
// pod fields are set by the caller, and KUBECONFIG is replaced by a flag)
// and the rendered objects.
func istiodChart(t *testing.T, mod string, valueFiles ...string) ([]string, []*unstructured.Unstructured) {
	t.Helper()
	out, err := helmTemplate(t, filepath.Join(mod, "manifests/charts/istio-control/istio-discovery"), "istiod", "istio-system", valueFiles...)
	if err != nil {
		t.Fatal(err)
	}
	objs, err := decodeObjects(out)
	if err != nil {
		t.Fatal(err)
	}
	var env []string
	for _, o := range objs {
		if o.GetKind() != "Deployment" {
			continue
		}
		containers, _, _ := unstructured.NestedSlice(o.Object, "spec", "template", "spec", "containers")
		for _, c := range containers {
			cm := c.(map[string]any)
			if cm["name"] != "discovery" {
				continue
			}
			vars, _ := cm["env"].([]any)
			for _, v := range vars {
				vm := v.(map[string]any)
				if val, ok := vm["value"].(string); ok && vm["name"] != "KUBECONFIG" {
					env = append(env, fmt.Sprintf("%s=%s", vm["name"], val))
				}
			}
		}
	}
	return env, objs
}

// istiodIdentity applies the ServiceAccount and RBAC among the istiod
// chart's objects and returns a kubeconfig holding a token of istiod's
// ServiceAccount, so istiod runs with exactly what its chart grants.
func istiodIdentity(t *testing.T, env *kubeenv.Env, objs []*unstructured.Unstructured) string {
	t.Helper()
	var rbac []*unstructured.Unstructured
	for _, o := range objs {
		switch o.GetKind() {
		case "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding":
			rbac = append(rbac, o)
		}
	}
	if err := newApplier(t, env.Config).apply(context.Background(), rbac, false); err != nil {
		t.Fatalf("apply istiod's RBAC: %v", err)
	}
	token := env.Token(t, "istio-system", "istiod", kubeenv.TokenOptions{ExpirationSeconds: 2 * 3600})
	return env.KubeconfigForToken(t, "istiod", token)
}

// pluginCA is an operator's CA for Istio's cacerts layout: a root and an
// intermediate under it.
type pluginCA struct {
	root, inter *x509.Certificate
	key         any
}

func newPluginCA(t *testing.T, name string) *pluginCA {
	t.Helper()
	now := time.Now()
	rootKey, interKey := testKey(t, name+"-plugin-root"), testKey(t, name+"-plugin-intermediate")
	root := createCert(t, &x509.Certificate{SerialNumber: big.NewInt(10), NotBefore: now.Add(-time.Hour), NotAfter: now.Add(24 * time.Hour),
		Subject: pkixName("castellan e2e " + name + " plug-in root"), KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true, IsCA: true}, nil, &rootKey.PublicKey, rootKey)
	inter := createCert(t, &x509.Certificate{SerialNumber: big.NewInt(11), NotBefore: now.Add(-time.Hour), NotAfter: now.Add(12 * time.Hour),
		Subject: pkixName("castellan e2e " + name + " plug-in intermediate"), KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true, IsCA: true, MaxPathLenZero: true}, root, &interKey.PublicKey, rootKey)
	return &pluginCA{root: root, inter: inter, key: interKey}
}

// write puts this CA's intermediate with roots into dir (cacerts layout),
// each file replaced atomically.
func (p *pluginCA) write(t *testing.T, dir string, roots ...*x509.Certificate) {
	t.Helper()
	der, err := x509.MarshalPKCS8PrivateKey(p.key)
	if err != nil {
		t.Fatal(err)
	}
	replaceFile(filepath.Join(dir, "ca-key.pem"), pemBlock("PRIVATE KEY", der))
	replaceFile(filepath.Join(dir, "ca-cert.pem"), encodeCerts(p.inter))
	replaceFile(filepath.Join(dir, "cert-chain.pem"), encodeCerts(p.inter, p.root))
	replaceFile(filepath.Join(dir, "root-cert.pem"), encodeCerts(roots...))
}

// waitFile waits until path exists.
func waitFile(t *testing.T, path string, timeout time.Duration) {
	t.Helper()
	for deadline := time.Now().Add(timeout); ; time.Sleep(100 * time.Millisecond) {
		if _, err := os.Stat(path); err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s did not appear within %v", path, timeout)
		}
	}
}

// mkdir creates dir/rel and returns it.
func mkdir(t *testing.T, dir, rel string) string {
	t.Helper()
	p := filepath.Join(dir, rel)
	if err := os.MkdirAll(p, 0o755); err != nil {
		t.Fatal(err)
	}
	return p
}

func pkixName(cn string) pkix.Name {
	return pkix.Name{Organization: []string{"castellan-e2e"}, CommonName: cn}
}

func pemBlock(typ string, der []byte) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der})
}

// checkSecretPrivileges: under the chart's RBAC and admission policy,
// Castellan's ServiceAccount can create no Secret in istio-system but its
// own, and read none but its own.
func (m *istioMesh) checkSecretPrivileges(t *testing.T) {
	t.Helper()
	ctx := context.Background()
	if _, err := m.env.Client.CoreV1().Secrets("istio-system").Create(ctx, &corev1.Secret{
		ObjectMeta: metav1.ObjectMeta{Name: "istiod-other"}, StringData: map[string]string{"k": "v"}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	cfg, err := clientcmd.BuildConfigFromFlags("", m.castellanKC)
	if err != nil {
		t.Fatal(err)
	}
	as, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		t.Fatal(err)
	}
	secrets := as.CoreV1().Secrets("istio-system")
	for _, sec := range []*corev1.Secret{
		{ObjectMeta: metav1.ObjectMeta{Name: "castellan-made"}, Type: corev1.SecretTypeOpaque},
		{ObjectMeta: metav1.ObjectMeta{Name: "sa-token", Annotations: map[string]string{"kubernetes.io/service-account.name": "istiod"}},
			Type: corev1.SecretTypeServiceAccountToken},
	} {
		_, err := secrets.Create(ctx, sec, metav1.CreateOptions{})
		if !apierrors.IsInvalid(err) || !strings.Contains(err.Error(), "may create only the kubernetes.io/tls Secret istiod-tls") {
			t.Errorf("create Secret %s as Castellan: %v, want the admission policy's refusal", sec.Name, err)
		}
	}
	if _, err := secrets.Get(ctx, "istiod-other", metav1.GetOptions{}); !apierrors.IsForbidden(err) {
		t.Errorf("get another Secret as Castellan: %v, want Forbidden", err)
	}
	if _, err := secrets.Get(ctx, "istiod-tls", metav1.GetOptions{}); err != nil {
		t.Errorf("get istiod-tls as Castellan: %v", err)
	}
}

// checkRootCheck: a root ConfigMap Castellan cannot fix (immutable, holding
// another root) shows in castellan_root_configmaps_out_of_sync and as a
// /readyz warning naming its namespace, while /readyz stays 200.
func (m *istioMesh) checkRootCheck(t *testing.T) {
	t.Helper()
	if got := m.srv.metrics(t)["castellan_root_configmaps_out_of_sync"]; got != 0 {
		t.Errorf("castellan_root_configmaps_out_of_sync = %v after the rotation, want 0", got)
	}
	m.env.CreateNamespace(t, "stale", nil)
	// Castellan may have written the namespace's ConfigMap already: then it
	// is replaced by the stale, immutable one (retried on a write conflict).
	stale := &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Name: "istio-ca-root-cert"}, Immutable: ptr.To(true),
		Data: map[string]string{"root-cert.pem": string(encodeCerts(newPluginCA(t, "stale").root))}}
	cms := m.env.Client.CoreV1().ConfigMaps("stale")
	for deadline := time.Now().Add(istioWait); ; time.Sleep(200 * time.Millisecond) {
		_, err := cms.Create(context.Background(), stale, metav1.CreateOptions{})
		if apierrors.IsAlreadyExists(err) {
			var cur *corev1.ConfigMap
			if cur, err = cms.Get(context.Background(), stale.Name, metav1.GetOptions{}); err == nil {
				cur.Data, cur.Immutable = stale.Data, stale.Immutable
				_, err = cms.Update(context.Background(), cur, metav1.UpdateOptions{})
			}
		}
		if err == nil {
			break
		}
		if (!apierrors.IsConflict(err) && !apierrors.IsNotFound(err)) || time.Now().After(deadline) {
			t.Fatalf("stale root ConfigMap: %v", err)
		}
	}
	for deadline := time.Now().Add(istioWait); ; time.Sleep(500 * time.Millisecond) {
		code, body := httpGet(t, "http://"+m.srv.monAddr+"/readyz")
		if m.srv.metrics(t)["castellan_root_configmaps_out_of_sync"] == 1 && code == 200 &&
			strings.Contains(body, "warning: root configmaps: cluster Kubernetes: 1 differ from the trust bundle (stale)") {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("/readyz %d %q, out of sync %v: want 200 with a warning naming stale, and 1",
				code, body, m.srv.metrics(t)["castellan_root_configmaps_out_of_sync"])
		}
	}
}

// httpGet returns the status and body of a GET.
func httpGet(t *testing.T, url string) (int, string) {
	t.Helper()
	resp, err := (&http.Client{Timeout: httpTimeout}).Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}
