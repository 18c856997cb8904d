package e2e

import (
	"bufio"
	"bytes"
	"context"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/castellan-ca/castellan/e2e/internal/kubeenv"
	"github.com/castellan-ca/castellan/e2e/internal/testproc"
)

// remotePKI is the external PKI a vault, googlecas or awspca server signs through.
type remotePKI struct {
	// args are the castellan serve flags that select and reach it.
	args []string
	// roots are the trust bundle it must publish; intermediates the chain
	// between leaf and root every response must carry.
	roots, intermediates []*x509.Certificate
	// env are variables the server needs to reach it (credentials).
	env []string
	// leafSubject is the subject workload leaves carry; empty means none.
	leafSubject string
}

// remoteBackends start the external PKI of each remote signer.
var remoteBackends = map[string]func(*testing.T) *remotePKI{
	"vault":     startOpenBao,
	"googlecas": startFakeCAS,
	"awspca":    func(t *testing.T) *remotePKI { return startFakePCA(t).pki },
}

// startOpenBao runs OpenBao (openBao) and gives Castellan a token limited to
// signing.
func startOpenBao(t *testing.T) *remotePKI {
	pki, bao := openBao(t)
	token := bao.write("auth/token/create", map[string]any{"policies": []string{"castellan"}, "period": "1h"})
	tokenFile := writeFile(t, t.TempDir(), "vault-token", []byte(token["client_token"].(string)), 0o600)
	pki.args = append(pki.args, "--vault-auth-method", "token", "--vault-token-file", tokenFile)
	return pki
}

// openBao runs OpenBao in dev mode (the e2e tests need no restart) with a
// root and an intermediate mount, the roles from the README and a policy
// "castellan" that may only sign; the process ends with the test. The
// returned args select the mount and roles, not yet an auth method.
func openBao(t *testing.T) (*remotePKI, *baoClient) {
	bin := os.Getenv("CASTELLAN_TEST_BAO_BIN")
	switch {
	case bin == "" && os.Getenv("CI") != "":
		t.Fatal("CASTELLAN_TEST_BAO_BIN is not set: CI must run the vault e2e test (`make e2e` builds OpenBao and sets it)")
	case bin == "":
		t.Skip("CASTELLAN_TEST_BAO_BIN is not set: run `make e2e` to test the vault signer against a real OpenBao")
	}
	addr := testproc.FreeAddr(t)
	cmd := exec.Command(bin, "server", "-dev", "-dev-root-token-id=root", "-dev-listen-address="+addr)
	logs := &testproc.SyncBuffer{}
	cmd.Stdout, cmd.Stderr = logs, logs
	if err := cmd.Start(); err != nil {
		t.Fatalf("start openbao: %v", err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
		if t.Failed() {
			t.Logf("openbao logs:\n%s", logs.Tail(maxLoggedBytes))
		}
	})
	bao := &baoClient{t: t, url: "http://" + addr + "/v1/"}
	deadline := time.Now().Add(readyTimeout)
	for !bao.healthy() {
		if time.Now().After(deadline) {
			t.Fatalf("openbao not ready within %v", readyTimeout)
		}
		time.Sleep(pollInterval)
	}

	bao.write("sys/mounts/pki_root", map[string]any{"type": "pki", "config": map[string]any{"max_lease_ttl": "87600h"}})
	bao.write("sys/mounts/pki_int", map[string]any{"type": "pki", "config": map[string]any{"max_lease_ttl": "43800h"}})
	rootPEM := bao.write("pki_root/root/generate/internal", map[string]any{"common_name": "e2e Vault root", "key_type": "ec", "ttl": "87600h"})["certificate"].(string)
	csr := bao.write("pki_int/intermediate/generate/internal", map[string]any{"common_name": "e2e Vault intermediate", "key_type": "ec"})["csr"].(string)
	intPEM := bao.write("pki_root/root/sign-intermediate", map[string]any{"csr": csr, "format": "pem", "ttl": "43800h"})["certificate"].(string)
	bao.write("pki_int/intermediate/set-signed", map[string]any{"certificate": intPEM + "\n" + rootPEM})
	for role, usage := range map[string]string{"workload": "DigitalSignature", "workload-rsa": "DigitalSignature,KeyEncipherment"} {
		bao.write("pki_int/roles/"+role, map[string]any{
			"allowed_uri_sans": "spiffe://" + trustDomain + "/*", "allowed_domains": "istiod.istio-system.svc,castellan.castellan-system.svc",
			"allow_bare_domains": true, "allow_localhost": true, "require_cn": false, "use_csr_common_name": false, "use_csr_sans": false,
			"key_type": "any", "key_usage": usage, "basic_constraints_valid_for_non_ca": true, "not_before_duration": "120s",
			"max_ttl": "2160h", "no_store": true,
		})
	}
	bao.write("sys/policies/acl/castellan", map[string]any{"policy": `path "pki_int/sign/*" { capabilities = ["update"] }`})

	return &remotePKI{
		args: []string{"--vault-address", "http://" + addr, "--vault-mount", "pki_int",
			"--vault-role", "workload", "--vault-rsa-role", "workload-rsa"},
		roots:         mustParse(t, rootPEM),
		intermediates: mustParse(t, intPEM),
	}, bao
}

// TestVaultKubernetesAuth runs Castellan with the vault signer logging in to
// OpenBao with a real service-account token, which OpenBao checks with a real
// kube-apiserver's TokenReview API: the server can only become ready (its
// serving certificate comes from Vault) and issue if that login worked.
func TestVaultKubernetesAuth(t *testing.T) {
	env := kubeenv.Start(t)
	pki, bao := openBao(t)

	env.CreateNamespace(t, "castellan-system", nil)
	env.CreateServiceAccount(t, "castellan-system", "castellan")
	env.CreateServiceAccount(t, "castellan-system", "vault-reviewer")
	ctx, cancel := context.WithTimeout(context.Background(), kubeenv.CallTimeout)
	defer cancel()
	if _, err := env.Client.RbacV1().ClusterRoleBindings().Create(ctx, &rbacv1.ClusterRoleBinding{
		ObjectMeta: metav1.ObjectMeta{Name: "vault-reviewer"},
		RoleRef:    rbacv1.RoleRef{APIGroup: "rbac.authorization.k8s.io", Kind: "ClusterRole", Name: "system:auth-delegator"},
		Subjects:   []rbacv1.Subject{{Kind: "ServiceAccount", Namespace: "castellan-system", Name: "vault-reviewer"}},
	}, metav1.CreateOptions{}); err != nil {
		t.Fatalf("bind vault-reviewer to system:auth-delegator: %v", err)
	}
	bao.write("sys/auth/kubernetes", map[string]any{"type": "kubernetes"})
	bao.write("auth/kubernetes/config", map[string]any{"kubernetes_host": env.URL, "kubernetes_ca_cert": string(env.CAPEM),
		"token_reviewer_jwt": env.Token(t, "castellan-system", "vault-reviewer", kubeenv.TokenOptions{}), "disable_local_ca_jwt": true})
	bao.write("auth/kubernetes/role/castellan", map[string]any{"bound_service_account_names": "castellan",
		"bound_service_account_namespaces": "castellan-system", "audience": "vault", "token_policies": "castellan", "token_ttl": "1h"})
	jwtFile := writeFile(t, t.TempDir(), "token", []byte(env.Token(t, "castellan-system", "castellan", kubeenv.TokenOptions{Audiences: []string{"vault"}})), 0o600)

	srv := startServer(t, serverConfig{signer: "vault", extraArgs: append(pki.args,
		"--vault-auth-method", "kubernetes", "--vault-kubernetes-role", "castellan", "--vault-jwt-file", jwtFile)})
	out := t.TempDir()
	srv.ctl(t, "issue", "--identity", workloadID, "--out-dir", out)
	chain := readCerts(t, filepath.Join(out, "cert-chain.pem"))
	roots := x509.NewCertPool()
	roots.AddCert(pki.roots[0])
	inter := x509.NewCertPool()
	for _, c := range chain[1:] {
		inter.AddCert(c)
	}
	if _, err := chain[0].Verify(x509.VerifyOptions{Roots: roots, Intermediates: inter}); err != nil {
		t.Errorf("issued certificate does not chain to the Vault root: %v", err)
	}
}

// baoClient makes root-token calls to OpenBao's HTTP API.
type baoClient struct {
	t   *testing.T
	url string
}

func (c *baoClient) healthy() bool {
	resp, err := http.Get(c.url + "sys/health")
	if err != nil {
		return false
	}
	_ = resp.Body.Close() // only the status is read; nothing to lose
	return resp.StatusCode == http.StatusOK
}

// write POSTs body to path and returns the response's data (or auth) object.
func (c *baoClient) write(path string, body map[string]any) map[string]any {
	c.t.Helper()
	b, err := json.Marshal(body)
	if err != nil {
		c.t.Fatalf("openbao %s: %v", path, err)
	}
	req, _ := http.NewRequest(http.MethodPost, c.url+path, bytes.NewReader(b))
	req.Header.Set("X-Vault-Token", "root")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		c.t.Fatalf("openbao %s: %v", path, err)
	}
	defer resp.Body.Close()
	raw, _ := io.ReadAll(resp.Body)
	if resp.StatusCode >= 300 {
		c.t.Fatalf("openbao %s: %s: %s", path, resp.Status, raw)
	}
	var out struct {
		Data map[string]any `json:"data"`
		Auth map[string]any `json:"auth"`
	}
	if len(raw) > 0 {
		if err := json.Unmarshal(raw, &out); err != nil {
			c.t.Fatalf("openbao %s: %v", path, err)
		}
	}
	if out.Auth != nil {
		return out.Auth
	}
	return out.Data
}

// startFakeCAS runs the fake Google CAS (signer/googlecas/castest) as a
// process; castellan reaches it through --google-cas-endpoint and the
// test-only --google-cas-insecure.
func startFakeCAS(t *testing.T) *remotePKI {
	chainFile := filepath.Join(t.TempDir(), "chain.pem")
	_, _, line := startFake(t, fakeCASBin, "-chain-out", chainFile)
	var addr, pool string
	if _, err := fmt.Sscanf(strings.TrimSpace(line), "listening on %s pool %s", &addr, &pool); err != nil {
		t.Fatalf("fakecas printed %q: %v", line, err)
	}
	chain := readCerts(t, chainFile) // issuing CA, root
	return &remotePKI{
		args:  []string{"--google-cas-ca-pool", pool, "--google-cas-endpoint", addr, "--google-cas-insecure"},
		roots: chain[1:], intermediates: chain[:1],
	}
}

// startFake runs a fake backend's process (fakecas, fakepca) until the test
// ends, when its stdin closes, and returns its stdin, the rest of its stdout
// and its first line ("listening on ...").
func startFake(t *testing.T, bin string, args ...string) (io.WriteCloser, *bufio.Reader, string) {
	t.Helper()
	cmd := exec.Command(bin, args...)
	stdin, err := cmd.StdinPipe() // the fake exits when this closes
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatalf("start %s: %v", bin, err)
	}
	t.Cleanup(func() { _ = stdin.Close(); _ = cmd.Wait() }) // closing stdin stops the fake; its exit status is not under test
	out := bufio.NewReader(stdout)
	line, err := out.ReadString('\n')
	if err != nil {
		t.Fatalf("%s: %v", bin, err)
	}
	return stdin, out, line
}

func mustParse(t *testing.T, p string) []*x509.Certificate {
	t.Helper()
	certs, err := parseCerts([]byte(p))
	if err != nil {
		t.Fatal(err)
	}
	return certs
}
