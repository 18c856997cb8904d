// Package kubeenv starts a real etcd and kube-apiserver for end-to-end tests
// (built by `make kube` into the directory CASTELLAN_TEST_KUBE_BIN_DIR names),
// with a throwaway PKI, an admin kubeconfig, clients that authenticate as a
// node's kubelet, and helpers for the objects the tests need: namespaces,
// service accounts, nodes, pods bound to nodes, tokens.
package kubeenv

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"

	"github.com/castellan-ca/castellan/e2e/internal/testproc"
)

// BinDirEnv names the directory holding the kube-apiserver and etcd binaries.
const BinDirEnv = "CASTELLAN_TEST_KUBE_BIN_DIR"

// Bounds that turn a hang into a failure; none is an assertion about speed.
const (
	startTimeout = 90 * time.Second // process start to ready
	stopTimeout  = 30 * time.Second // SIGTERM to exit
	// CallTimeout bounds one API call of a helper.
	CallTimeout   = 30 * time.Second
	startAttempts = 3 // new ports when another process took ours first
)

// Env is a running etcd + kube-apiserver.
type Env struct {
	// Dir holds the PKI, the kubeconfig and etcd's data.
	Dir string
	// Kubeconfig is the path of an admin (system:masters) kubeconfig.
	Kubeconfig string
	// Config and Client are the admin's.
	Config *rest.Config
	Client kubernetes.Interface
	// URL is the apiserver's https://127.0.0.1:PORT; it is also the
	// service-account issuer (IssuerURL).
	URL, IssuerURL string
	// CAPEM is the CA of the apiserver's serving certificate.
	CAPEM []byte

	saKey *rsa.PrivateKey // the service-account signing key
	pki   *pki
}

// BinDir returns the directory of the binaries, or skips the test when it is
// not configured (fails it when CI is set: CI must never silently skip).
func BinDir(t testproc.TB) string {
	t.Helper()
	dir := os.Getenv(BinDirEnv)
	if dir == "" {
		if os.Getenv("CI") != "" {
			t.Fatalf("%s is not set; `make e2e` builds kube-apiserver and etcd and sets it", BinDirEnv)
		}
		t.Skipf("%s is not set: run `make e2e`, which builds kube-apiserver and etcd and sets it", BinDirEnv)
	}
	for _, b := range []string{"kube-apiserver", "etcd"} {
		if _, err := os.Stat(filepath.Join(dir, b)); err != nil {
			t.Fatalf("%s=%s: %v (run `make kube`)", BinDirEnv, dir, err)
		}
	}
	return dir
}

// Start starts etcd and kube-apiserver for the test and stops them (the
// apiserver first: its shutdown hangs when etcd is gone) when it ends.
func Start(t testproc.TB) *Env {
	t.Helper()
	bin := BinDir(t)
	dir := t.TempDir()
	p := newPKI(t, dir)
	return testproc.Retry(t, "etcd + kube-apiserver", startAttempts, func() (*Env, error) { return start(t, bin, dir, p) })
}

func start(t testproc.TB, bin, dir string, p *pki) (*Env, error) {
	etcdClient, etcdPeer, apiPort := testproc.FreePort(t), testproc.FreePort(t), testproc.FreePort(t)
	etcdDir := filepath.Join(dir, fmt.Sprintf("etcd-%d", etcdClient))
	etcd, err := startProcess(t, filepath.Join(bin, "etcd"),
		"--name", "e2e", "--data-dir", etcdDir,
		"--listen-client-urls", fmt.Sprintf("http://127.0.0.1:%d", etcdClient),
		"--advertise-client-urls", fmt.Sprintf("http://127.0.0.1:%d", etcdClient),
		"--listen-peer-urls", fmt.Sprintf("http://127.0.0.1:%d", etcdPeer),
		"--initial-advertise-peer-urls", fmt.Sprintf("http://127.0.0.1:%d", etcdPeer),
		"--initial-cluster", fmt.Sprintf("e2e=http://127.0.0.1:%d", etcdPeer),
		"--unsafe-no-fsync", "--log-level", "warn")
	if err != nil {
		return nil, err
	}
	if err := etcd.waitHTTP(fmt.Sprintf("http://127.0.0.1:%d/health", etcdClient), http.DefaultClient); err != nil {
		etcd.stop(t)
		return nil, fmt.Errorf("etcd: %w", err)
	}

	url := fmt.Sprintf("https://127.0.0.1:%d", apiPort)
	api, err := startProcess(t, filepath.Join(bin, "kube-apiserver"),
		"--bind-address=127.0.0.1", fmt.Sprintf("--secure-port=%d", apiPort),
		fmt.Sprintf("--etcd-servers=http://127.0.0.1:%d", etcdClient),
		"--tls-cert-file="+p.servingCert, "--tls-private-key-file="+p.servingKey,
		"--client-ca-file="+p.caCert,
		"--service-account-key-file="+p.saPub, "--service-account-signing-key-file="+p.saKey,
		"--service-account-issuer="+url, "--api-audiences="+url,
		// Discovery would otherwise advertise the JWKS at the host's external
		// address, where nothing listens (the apiserver binds loopback only).
		"--service-account-jwks-uri="+url+"/openid/v1/jwks",
		"--authorization-mode=Node,RBAC", "--service-cluster-ip-range=10.0.0.0/24",
		// NodeRestriction limits what a node's identity may write (its own
		// Node, PodCertificateRequests for its own pods), as on a real cluster.
		"--enable-admission-plugins=NodeRestriction",
		// certificates.k8s.io v1 (CSR, ClusterTrustBundle, PodCertificateRequest)
		// is on by default; v1beta1 is served too, for kubelets older than 1.37.
		"--runtime-config=certificates.k8s.io/v1beta1=true",
		"--endpoint-reconciler-type=none", "--profiling=false",
		"--cert-dir="+filepath.Join(dir, "apiserver-certs"))
	if err != nil {
		etcd.stop(t)
		return nil, err
	}
	env := &Env{Dir: dir, URL: url, IssuerURL: url, CAPEM: p.caPEM, saKey: p.saPrivate, pki: p}
	env.Kubeconfig = filepath.Join(dir, "admin.kubeconfig")
	if err := p.writeKubeconfig(env.Kubeconfig, url); err != nil {
		api.stop(t)
		etcd.stop(t)
		return nil, err
	}
	cfg, err := clientcmd.BuildConfigFromFlags("", env.Kubeconfig)
	if err != nil {
		api.stop(t)
		etcd.stop(t)
		return nil, err
	}
	cfg.QPS, cfg.Burst = 200, 400 // the tests create many objects quickly
	env.Config = cfg
	if env.Client, err = kubernetes.NewForConfig(cfg); err != nil {
		api.stop(t)
		etcd.stop(t)
		return nil, err
	}
	httpClient, err := rest.HTTPClientFor(cfg)
	if err != nil {
		api.stop(t)
		etcd.stop(t)
		return nil, err
	}
	if err := api.waitHTTP(url+"/readyz", httpClient); err != nil {
		api.stop(t)
		etcd.stop(t)
		if strings.Contains(api.logs.String(), "address already in use") || strings.Contains(etcd.logs.String(), "address already in use") {
			return nil, fmt.Errorf("%w: %w", testproc.ErrPortTaken, err)
		}
		return nil, fmt.Errorf("kube-apiserver: %w\n%s", err, api.logs.Tail(8<<10))
	}
	t.Cleanup(func() {
		// The apiserver first: with etcd gone, its shutdown hangs for over a minute.
		api.stop(t)
		etcd.stop(t)
		if t.Failed() {
			t.Logf("kube-apiserver logs (tail):\n%s", api.logs.Tail(16<<10))
		}
	})
	return env, nil
}

// process is a started binary with its output.
type process struct {
	name   string
	cmd    *exec.Cmd
	logs   *testproc.SyncBuffer
	exited chan struct{}
}

func startProcess(t testproc.TB, path string, args ...string) (*process, error) {
	p := &process{name: filepath.Base(path), logs: &testproc.SyncBuffer{}, exited: make(chan struct{})}
	p.cmd = exec.Command(path, args...)
	p.cmd.Stdout, p.cmd.Stderr = p.logs, p.logs
	if err := p.cmd.Start(); err != nil {
		return nil, fmt.Errorf("%s: %w", p.name, err)
	}
	go func() {
		_ = p.cmd.Wait()
		close(p.exited)
	}()
	t.Logf("started %s (pid %d)", p.name, p.cmd.Process.Pid)
	return p, nil
}

// waitHTTP polls url until it answers 200, the process exits or startTimeout passes.
func (p *process) waitHTTP(url string, client *http.Client) error {
	err := testproc.WaitOK(client, url, 2*time.Second, 100*time.Millisecond, startTimeout, p.exited)
	switch {
	case errors.Is(err, testproc.ErrExited):
		return fmt.Errorf("%s %w\n%s", p.name, err, p.logs.Tail(4<<10))
	case err != nil:
		return fmt.Errorf("%s %w", p.name, err)
	}
	return nil
}

// stop sends SIGTERM, then SIGKILL after stopTimeout.
func (p *process) stop(t testproc.TB) {
	select {
	case <-p.exited:
		return
	default:
	}
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.exited:
	case <-time.After(stopTimeout):
		t.Logf("%s did not exit %v after SIGTERM; killing it", p.name, stopTimeout)
		_ = p.cmd.Process.Kill()
		<-p.exited
	}
}

// pki is the throwaway PKI of one Env. Its CA issues the serving and all
// client certificates (the apiserver's --client-ca-file).
type pki struct {
	ca                              *x509.Certificate
	caKey                           *ecdsa.PrivateKey
	caPEM                           []byte
	caCert, servingCert, servingKey string
	adminCert, adminKey             string
	saKey, saPub                    string
	saPrivate                       *rsa.PrivateKey
}

func newPKI(t testproc.TB, dir string) *pki {
	t.Helper()
	ca, caKey := selfSigned(t, "kubeenv CA")
	p := &pki{ca: ca, caKey: caKey, caPEM: pemCert(ca.Raw)}
	p.caCert = write(t, dir, "ca.crt", p.caPEM)
	serving, servingKey := leaf(t, ca, caKey, &x509.Certificate{
		Subject:     pkix.Name{CommonName: "kube-apiserver"},
		DNSNames:    []string{"localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc", "kubernetes.default.svc.cluster.local"},
		IPAddresses: []net.IP{net.ParseIP("127.0.0.1"), net.ParseIP("10.0.0.1")},
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	})
	p.servingCert = write(t, dir, "apiserver.crt", pemCert(serving.Raw))
	p.servingKey = write(t, dir, "apiserver.key", pemKey(t, servingKey))
	adminCert, adminKey := p.clientCert(t, "kubeenv-admin", "system:masters")
	p.adminCert = write(t, dir, "admin.crt", adminCert)
	p.adminKey = write(t, dir, "admin.key", adminKey)
	sa, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	p.saPrivate = sa
	p.saKey = write(t, dir, "sa.key", pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(sa)}))
	pub, err := x509.MarshalPKIXPublicKey(&sa.PublicKey)
	if err != nil {
		t.Fatal(err)
	}
	p.saPub = write(t, dir, "sa.pub", pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: pub}))
	return p
}

// clientCert issues a client certificate (PEM certificate and key) for user
// cn in groups orgs, as the apiserver's x509 authenticator reads them.
func (p *pki) clientCert(t testproc.TB, cn string, orgs ...string) (certPEM, keyPEM []byte) {
	t.Helper()
	c, k := leaf(t, p.ca, p.caKey, &x509.Certificate{
		Subject:     pkix.Name{CommonName: cn, Organization: orgs},
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	})
	return pemCert(c.Raw), pemKey(t, k)
}

// NodeClient returns a client that authenticates as the kubelet of node
// (CN=system:node:<node>, O=system:nodes, from the apiserver's client CA), so
// the Node authorizer and NodeRestriction judge what it does.
func (e *Env) NodeClient(t testproc.TB, node string) kubernetes.Interface {
	t.Helper()
	certPEM, keyPEM := e.pki.clientCert(t, "system:node:"+node, "system:nodes")
	c, err := kubernetes.NewForConfig(&rest.Config{
		Host:            e.URL,
		TLSClientConfig: rest.TLSClientConfig{CAData: e.CAPEM, CertData: certPEM, KeyData: keyPEM},
		QPS:             e.Config.QPS, Burst: e.Config.Burst,
	})
	if err != nil {
		t.Fatalf("client for node %s: %v", node, err)
	}
	return c
}

// writeKubeconfig writes an admin kubeconfig for the apiserver at url.
func (p *pki) writeKubeconfig(path, url string) error {
	cfg := clientcmdapi.NewConfig()
	cfg.Clusters["e2e"] = &clientcmdapi.Cluster{Server: url, CertificateAuthority: p.caCert}
	cfg.AuthInfos["admin"] = &clientcmdapi.AuthInfo{ClientCertificate: p.adminCert, ClientKey: p.adminKey}
	cfg.Contexts["e2e"] = &clientcmdapi.Context{Cluster: "e2e", AuthInfo: "admin", Namespace: "default"}
	cfg.CurrentContext = "e2e"
	return clientcmd.WriteToFile(*cfg, path)
}

// KubeconfigForToken writes a kubeconfig that authenticates with a bearer
// token (e.g. a service account's, to run a client under its RBAC) and
// returns its path.
func (e *Env) KubeconfigForToken(t testproc.TB, name, token string) string {
	t.Helper()
	cfg := clientcmdapi.NewConfig()
	cfg.Clusters["e2e"] = &clientcmdapi.Cluster{Server: e.URL, CertificateAuthority: e.pki.caCert}
	cfg.AuthInfos[name] = &clientcmdapi.AuthInfo{Token: token}
	cfg.Contexts["e2e"] = &clientcmdapi.Context{Cluster: "e2e", AuthInfo: name, Namespace: "default"}
	cfg.CurrentContext = "e2e"
	path := filepath.Join(t.TempDir(), name+".kubeconfig")
	if err := clientcmd.WriteToFile(*cfg, path); err != nil {
		t.Fatal(err)
	}
	return path
}

func selfSigned(t testproc.TB, cn string) (*x509.Certificate, *ecdsa.PrivateKey) {
	t.Helper()
	key := ecKey(t)
	tmpl := &x509.Certificate{
		SerialNumber: serial(t), Subject: pkix.Name{CommonName: cn},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	c, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return c, key
}

func leaf(t testproc.TB, ca *x509.Certificate, caKey *ecdsa.PrivateKey, tmpl *x509.Certificate) (*x509.Certificate, *ecdsa.PrivateKey) {
	t.Helper()
	key := ecKey(t)
	tmpl.SerialNumber = serial(t)
	tmpl.NotBefore, tmpl.NotAfter = time.Now().Add(-time.Hour), time.Now().Add(24*time.Hour)
	tmpl.KeyUsage = x509.KeyUsageDigitalSignature
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	c, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return c, key
}

func ecKey(t testproc.TB) *ecdsa.PrivateKey {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func serial(t testproc.TB) *big.Int {
	t.Helper()
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		t.Fatal(err)
	}
	return n
}

func pemCert(der []byte) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
}

func pemKey(t testproc.TB, k *ecdsa.PrivateKey) []byte {
	t.Helper()
	der, err := x509.MarshalPKCS8PrivateKey(k)
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der})
}

func write(t testproc.TB, dir, name string, data []byte) string {
	t.Helper()
	p := filepath.Join(dir, name)
	if err := os.WriteFile(p, data, 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}
