package e2e

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/encoding/protojson"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/castellan-ca/castellan/e2e/internal/testproc"
)

// Where `make istio` puts pilot-discovery and pilot-agent, and the
// istio.io/istio module directory (CRDs and charts under manifests/).
const (
	istioBinEnv = "CASTELLAN_TEST_ISTIO_BIN_DIR"
	istioModEnv = "CASTELLAN_TEST_ISTIO_MOD_DIR"
)

// cdsType is the xDS type the xDS clients ask for.
const cdsType = "type.googleapis.com/envoy.config.cluster.v3.Cluster"

// xdsHosts are the ServiceEntry hosts whose clusters the xDS clients
// subscribe to: one created before the rotation, one after it. istiod's
// generator for proxyless gRPC nodes (the bootstrap's node) answers named
// CDS requests only, as gRPC's own xDS client sends them; a cluster whose
// ServiceEntry does not exist yet arrives in the push that follows its
// creation.
var xdsHosts = []string{"before-rotation.example.internal", "after-rotation.example.internal"}

// xdsClusterNames are the CDS names of xdsHosts (port 80).
func xdsClusterNames() []string {
	var names []string
	for _, h := range xdsHosts {
		names = append(names, "outbound|80||"+h)
	}
	return names
}

// istioDirs returns the binaries' directory and the module directory, or
// skips the test when they are not configured (fails it when CI is set).
func istioDirs(t *testing.T) (bin, mod string) {
	t.Helper()
	bin, mod = os.Getenv(istioBinEnv), os.Getenv(istioModEnv)
	if bin == "" || mod == "" {
		if os.Getenv("CI") != "" {
			t.Fatalf("%s and %s must be set; `make e2e` builds Istio and sets them", istioBinEnv, istioModEnv)
		}
		t.Skipf("%s and %s are not set: run `make e2e`, which builds pilot-discovery and pilot-agent", istioBinEnv, istioModEnv)
	}
	for _, p := range []string{filepath.Join(bin, "pilot-discovery"), filepath.Join(bin, "pilot-agent"), filepath.Join(mod, "manifests")} {
		if _, err := os.Stat(p); err != nil {
			t.Fatalf("%v (run `make istio`)", err)
		}
	}
	return bin, mod
}

// projection copies keys of a Secret or ConfigMap into files, as the
// kubelet does for a pod's volumes: polled, each file replaced atomically
// when its content changes. A missing object leaves the files as they are.
type projection struct {
	client    kubernetes.Interface
	secret    bool
	namespace string
	name      string
	files     map[string]string // key → path
}

// run projects until ctx ends.
func (p projection) run(ctx context.Context) {
	for ctx.Err() == nil {
		data := map[string][]byte{}
		var err error
		if p.secret {
			var s *corev1.Secret
			s, err = p.client.CoreV1().Secrets(p.namespace).Get(ctx, p.name, metav1.GetOptions{})
			if err == nil {
				data = s.Data
			}
		} else {
			var c *corev1.ConfigMap
			c, err = p.client.CoreV1().ConfigMaps(p.namespace).Get(ctx, p.name, metav1.GetOptions{})
			if err == nil {
				for k, v := range c.Data {
					data[k] = []byte(v)
				}
			}
		}
		if err == nil {
			for key, path := range p.files {
				if v, ok := data[key]; ok {
					replaceFile(path, v)
				}
			}
		} else if !apierrors.IsNotFound(err) && ctx.Err() == nil {
			time.Sleep(time.Second)
		}
		select {
		case <-ctx.Done():
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// replaceFile writes data to path through a rename, unless it already holds it.
func replaceFile(path string, data []byte) {
	if old, err := os.ReadFile(path); err == nil && bytes.Equal(old, data) {
		return
	}
	_ = os.MkdirAll(filepath.Dir(path), 0o755)
	tmp := path + ".tmp"
	if os.WriteFile(tmp, data, 0o600) == nil {
		_ = os.Rename(tmp, path)
	}
}

// proc is a running Istio binary with its logs.
type proc struct {
	name   string
	cmd    *exec.Cmd
	logs   *testproc.SyncBuffer
	exited chan struct{}
}

// startProc starts bin in dir with env (added to this process's) and args;
// it is stopped, and its logs printed on failure, when the test ends.
func startProc(t *testing.T, name, bin, dir string, env []string, args ...string) *proc {
	t.Helper()
	p := &proc{name: name, logs: &testproc.SyncBuffer{}, exited: make(chan struct{})}
	p.cmd = exec.Command(bin, args...)
	p.cmd.Dir = dir
	p.cmd.Env = append(os.Environ(), env...)
	p.cmd.Stdout, p.cmd.Stderr = p.logs, p.logs
	if err := p.cmd.Start(); err != nil {
		t.Fatalf("start %s: %v", name, err)
	}
	go func() { _ = p.cmd.Wait(); close(p.exited) }()
	t.Logf("started %s (pid %d) in %s", name, p.cmd.Process.Pid, dir)
	t.Cleanup(func() {
		p.stop()
		if t.Failed() {
			t.Logf("%s logs (tail):\n%s", name, p.logs.Tail(24<<10))
		}
	})
	return p
}

// stop sends SIGTERM, then SIGKILL after 15 s.
func (p *proc) stop() {
	select {
	case <-p.exited:
		return
	default:
	}
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.exited:
	case <-time.After(15 * time.Second):
		_ = p.cmd.Process.Kill()
		<-p.exited
	}
}

// waitUntil polls cond until it holds, the process exits or timeout passes.
func (p *proc) waitUntil(t *testing.T, what string, timeout time.Duration, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(timeout); ; time.Sleep(100 * time.Millisecond) {
		if cond() {
			return
		}
		select {
		case <-p.exited:
			t.Fatalf("%s exited while waiting for %s:\n%s", p.name, what, p.logs.Tail(16<<10))
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: no %s within %v", p.name, what, timeout)
		}
	}
}

// httpOK reports whether url answers 200.
func httpOK(url string) bool {
	c := &http.Client{Timeout: 2 * time.Second}
	resp, err := c.Get(url)
	if err != nil {
		return false
	}
	_ = resp.Body.Close() // a readiness probe: the status is all it reads
	return resp.StatusCode == http.StatusOK
}

// fileRootsTLS is a TLS configuration that verifies the server against the
// roots in rootFile, read at each handshake (as Istio's agent re-reads its
// root file), for serverName; with certDir it presents the certificate in
// certDir/cert-chain.pem and key.pem, also read at each handshake.
func fileRootsTLS(rootFile, serverName, certDir string) *tls.Config {
	cfg := &tls.Config{
		MinVersion:         tls.VersionTLS12,
		InsecureSkipVerify: true, // verified below against the roots of the moment
		VerifyConnection: func(cs tls.ConnectionState) error {
			pem, err := os.ReadFile(rootFile)
			if err != nil {
				return err
			}
			roots := x509.NewCertPool()
			if !roots.AppendCertsFromPEM(pem) {
				return errors.New("no roots in " + rootFile)
			}
			inter := x509.NewCertPool()
			for _, c := range cs.PeerCertificates[1:] {
				inter.AddCert(c)
			}
			_, err = cs.PeerCertificates[0].Verify(x509.VerifyOptions{Roots: roots, Intermediates: inter, DNSName: serverName})
			return err
		},
	}
	if certDir != "" {
		cfg.GetClientCertificate = func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
			c, err := tls.LoadX509KeyPair(filepath.Join(certDir, "cert-chain.pem"), filepath.Join(certDir, "key.pem"))
			return &c, err
		}
	}
	return cfg
}

// bootstrapNode reads the node and the xDS server of the gRPC bootstrap
// pilot-agent writes (GRPC_XDS_BOOTSTRAP): what a proxyless gRPC client uses.
func bootstrapNode(t *testing.T, path string) (*corev3.Node, string) {
	t.Helper()
	raw, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var b struct {
		XDSServers []struct {
			ServerURI string `json:"server_uri"`
		} `json:"xds_servers"`
		Node json.RawMessage `json:"node"`
	}
	if err := json.Unmarshal(raw, &b); err != nil || len(b.XDSServers) == 0 {
		t.Fatalf("gRPC bootstrap %s: %v\n%s", path, err, raw)
	}
	node := &corev3.Node{}
	if err := (protojson.UnmarshalOptions{DiscardUnknown: true}).Unmarshal(b.Node, node); err != nil {
		t.Fatalf("gRPC bootstrap node: %v", err)
	}
	return node, b.XDSServers[0].ServerURI
}

// xdsTarget is how an xDS client reaches istiod: through the agent's socket
// (what the bootstrap names) or directly over mutual TLS.
type xdsTarget struct {
	name string
	addr string
	opts []grpc.DialOption
	node *corev3.Node
}

func agentSocketTarget(node *corev3.Node, uri string) xdsTarget {
	return xdsTarget{name: "through pilot-agent", addr: uri, node: node,
		opts: []grpc.DialOption{grpc.WithTransportCredentials(insecure.NewCredentials())}}
}

func directTarget(node *corev3.Node, addr string, tlsCfg *tls.Config) xdsTarget {
	return xdsTarget{name: "direct mTLS", addr: addr, node: node,
		opts: []grpc.DialOption{grpc.WithTransportCredentials(credentials.NewTLS(tlsCfg))}}
}

// tokenTarget reaches istiod directly over TLS (verified by tlsCfg) and
// authenticates with the bearer token in tokenFile, read at each call, as
// the agent's own xDS proxy does upstream.
func tokenTarget(node *corev3.Node, addr string, tlsCfg *tls.Config, tokenFile string) xdsTarget {
	return xdsTarget{name: "direct TLS with the pod's token", addr: addr, node: node,
		opts: []grpc.DialOption{grpc.WithTransportCredentials(credentials.NewTLS(tlsCfg)), grpc.WithPerRPCCredentials(fileToken(tokenFile))}}
}

// fileToken is gRPC per-call credentials: `authorization: Bearer` with the
// token read from the file.
type fileToken string

func (f fileToken) GetRequestMetadata(context.Context, ...string) (map[string]string, error) {
	tok, err := os.ReadFile(string(f))
	if err != nil {
		return nil, err
	}
	return map[string]string{"authorization": "Bearer " + strings.TrimSpace(string(tok))}, nil
}

func (fileToken) RequireTransportSecurity() bool { return true }

// xdsStream is one ADS stream asking for every cluster.
type xdsStream struct {
	conn   *grpc.ClientConn
	stream discoveryv3.AggregatedDiscoveryService_StreamAggregatedResourcesClient
	cancel context.CancelFunc
}

// openXDS connects, sends a CDS request and waits for the first response,
// which must list clusters.
func openXDS(target xdsTarget, timeout time.Duration) (*xdsStream, *discoveryv3.DiscoveryResponse, error) {
	conn, err := grpc.NewClient(target.addr, target.opts...)
	if err != nil {
		return nil, nil, err
	}
	ctx, cancel := context.WithCancel(context.Background())
	s := &xdsStream{conn: conn, cancel: cancel}
	if s.stream, err = discoveryv3.NewAggregatedDiscoveryServiceClient(conn).StreamAggregatedResources(ctx); err != nil {
		s.close()
		return nil, nil, err
	}
	if err := s.stream.Send(&discoveryv3.DiscoveryRequest{Node: target.node, TypeUrl: cdsType, ResourceNames: xdsClusterNames()}); err != nil {
		s.close()
		return nil, nil, err
	}
	type res struct {
		r   *discoveryv3.DiscoveryResponse
		err error
	}
	ch := make(chan res, 1)
	go func() { r, err := s.recvACK(); ch <- res{r, err} }()
	select {
	case r := <-ch:
		if r.err == nil && len(r.r.Resources) == 0 {
			r.err = errors.New("CDS response without clusters")
		}
		if r.err != nil {
			s.close()
		}
		return s, r.r, r.err
	case <-time.After(timeout):
		s.close()
		return nil, nil, fmt.Errorf("no CDS response within %v", timeout)
	}
}

// recvACK receives one response and acknowledges it (with the same
// subscription: an ACK without names would unsubscribe).
func (s *xdsStream) recvACK() (*discoveryv3.DiscoveryResponse, error) {
	r, err := s.stream.Recv()
	if err != nil {
		return nil, err
	}
	err = s.stream.Send(&discoveryv3.DiscoveryRequest{TypeUrl: r.TypeUrl, VersionInfo: r.VersionInfo, ResponseNonce: r.Nonce, ResourceNames: xdsClusterNames()})
	return r, err
}

func (s *xdsStream) close() {
	s.cancel()
	_ = s.conn.Close()
}

// hasCluster reports whether a CDS response names a cluster for host.
func hasCluster(r *discoveryv3.DiscoveryResponse, host string) bool {
	for _, a := range r.Resources {
		if strings.Contains(string(a.Value), host) {
			return true
		}
	}
	return false
}

// xdsWatch keeps one long-lived ADS stream per target, from before the
// rotation to the end, and opens a new connection to each target every
// interval; every failure is counted.
type xdsWatch struct {
	mu        sync.Mutex
	failures  []string
	latest    map[string]*discoveryv3.DiscoveryResponse // per long-lived stream
	streams   []*xdsStream
	opened    atomic.Int64
	responses atomic.Int64
	stop      chan struct{}
	wg        sync.WaitGroup
}

func (w *xdsWatch) failf(format string, a ...any) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.failures = append(w.failures, time.Now().Format("15:04:05.000 ")+fmt.Sprintf(format, a...))
}

// watchXDS opens the long-lived streams (failing the test if one cannot be
// opened) and starts the periodic connections of the targets in fresh.
func watchXDS(t *testing.T, long, fresh []xdsTarget, interval time.Duration) *xdsWatch {
	t.Helper()
	w := &xdsWatch{latest: map[string]*discoveryv3.DiscoveryResponse{}, stop: make(chan struct{})}
	for _, target := range long {
		s, first, err := openXDS(target, 30*time.Second)
		if err != nil {
			t.Fatalf("xDS %s: %v", target.name, err)
		}
		w.opened.Add(1)
		w.latest[target.name] = first
		w.streams = append(w.streams, s)
		w.wg.Go(func() {
			for {
				r, err := s.recvACK()
				select {
				case <-w.stop:
					return
				default:
				}
				if err != nil {
					w.failf("long-lived xDS stream %s broke: %v", target.name, err)
					return
				}
				w.responses.Add(1)
				w.mu.Lock()
				w.latest[target.name] = r
				w.mu.Unlock()
			}
		})
	}
	for _, target := range fresh {
		w.wg.Go(func() {
			for {
				select {
				case <-w.stop:
					return
				case <-time.After(interval):
				}
				s, _, err := openXDS(target, 20*time.Second)
				if err != nil {
					w.failf("new xDS connection %s: %v", target.name, err)
					continue
				}
				w.opened.Add(1)
				s.close()
			}
		})
	}
	return w
}

// waitCluster waits until every long-lived stream has received a response
// naming host.
func (w *xdsWatch) waitCluster(t *testing.T, host string, timeout time.Duration) {
	t.Helper()
	for deadline := time.Now().Add(timeout); ; time.Sleep(200 * time.Millisecond) {
		w.mu.Lock()
		missing := ""
		for name, r := range w.latest {
			if !hasCluster(r, host) {
				missing = name
			}
		}
		w.mu.Unlock()
		if missing == "" {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("long-lived xDS stream %s: no push of %s within %v", missing, host, timeout)
		}
	}
}

// halt stops the connections and returns the failures.
func (w *xdsWatch) halt() []string {
	select {
	case <-w.stop:
	default:
		close(w.stop)
		for _, s := range w.streams {
			s.close()
		}
	}
	w.wg.Wait()
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.failures
}
