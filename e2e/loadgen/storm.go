package main

import (
	"context"
	"crypto"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/structpb"
	corev1 "k8s.io/api/core/v1"

	pb "istio.io/api/security/v1alpha1"
	"istio.io/istio/pkg/security"

	"github.com/castellan-ca/castellan/e2e/internal/kubeenv"
)

// The storm's Kubernetes objects: ztunnels run as ztunnel in istio-system,
// as Istio installs them; the pods' namespaces hold podsPerNamespace each.
const (
	stormZtunnelNS   = "istio-system"
	stormZtunnelSA   = "ztunnel"
	podsPerNamespace = 100
	stormAudience    = "istio-ca"
	stormClusterID   = "Kubernetes"
	stormWorkers     = 8 // parallel object creation
)

// stormPod is one workload pod of the storm: its own service account, so
// that every pod is one identity its node's ztunnel must get a certificate for.
type stormPod struct {
	ns, sa, name, node string
}

func stormNode(i int) string { return fmt.Sprintf("storm-node-%d", i) }

// stormLayout spreads pods over nodes round-robin, podsPerNamespace to a
// namespace, each pod with its own service account.
func stormLayout(pods, nodes int) []stormPod {
	out := make([]stormPod, pods)
	for i := range out {
		out[i] = stormPod{
			ns:   fmt.Sprintf("storm-%d", i/podsPerNamespace),
			sa:   fmt.Sprintf("sa-%d", i),
			name: fmt.Sprintf("pod-%d", i),
			node: stormNode(i % nodes),
		}
	}
	return out
}

// id is the pod's SPIFFE ID in trust domain td.
func (p stormPod) id(td string) string { return fmt.Sprintf("spiffe://%s/ns/%s/sa/%s", td, p.ns, p.sa) }

// stormEnv is the storm's cluster and server: the apiserver, the ztunnel
// pods (one per node), the workload pods by node, and castellan.
type stormEnv struct {
	h        *harness
	kube     *kubeenv.Env
	ztunnels []*corev1.Pod         // ztunnels[n] runs on stormNode(n)
	byNode   map[string][]stormPod // workload pods by node
	addr     string
	name     string // TLS server name
	td       string
	roots    *x509.CertPool
	pid      int
}

// runStorm starts a kube-apiserver (the e2e harness's), creates the nodes,
// a ztunnel pod on each, and the workload pods with their service accounts,
// starts castellan trusting istio-system/ztunnel as node proxies (token
// reviews cached, default rate limits), then runs -storm-rounds storms: each
// ztunnel, with a fresh pod-bound token as after a restart, on a new
// connection, asks for every identity on its node at once. It prints
// certs/s, latency and the apiserver's own request counts per 100 CSRs.
func runStorm(ctx context.Context, o options, out io.Writer) error {
	if err := os.Setenv(kubeenv.BinDirEnv, o.kubeBinDir); err != nil {
		return err
	}
	h := newHarness(os.Stderr)
	defer h.close()
	var env *stormEnv
	if err := h.do(func() { env = setupStorm(h, o) }); err != nil { //nolint:contextcheck // the e2e harness bounds each step itself
		return fmt.Errorf("storm setup: %w", err)
	}
	if err := env.startCastellan(ctx, o); err != nil {
		return err
	}
	fmt.Fprintf(out, "storm: %d pods (one service account each) on %d nodes, one ztunnel per node, castellan %s (pid %d), kube-apiserver %s\n",
		o.stormPods, o.stormNodes, env.addr, env.pid, env.kube.URL)
	var results []stormResult
	for r := range o.stormRounds {
		var res stormResult
		if err := h.do(func() { res = env.round(ctx, o) }); err != nil {
			return fmt.Errorf("storm round %d: %w", r+1, err)
		}
		res.print(out, r+1)
		results = append(results, res)
	}
	printStormTable(out, results)
	return nil
}

// setupStorm starts the apiserver and creates the objects.
func setupStorm(h *harness, o options) *stormEnv {
	kube := kubeenv.Start(h)
	e := &stormEnv{h: h, kube: kube, byNode: map[string][]stormPod{}}
	kube.CreateNamespace(h, stormZtunnelNS, nil)
	kube.CreateServiceAccount(h, stormZtunnelNS, stormZtunnelSA)
	for n := range o.stormNodes {
		kube.CreateNode(h, stormNode(n))
		e.ztunnels = append(e.ztunnels, kube.CreatePod(h, stormZtunnelNS, "ztunnel-"+stormNode(n), stormZtunnelSA, stormNode(n)))
	}
	pods := stormLayout(o.stormPods, o.stormNodes)
	for i := 0; i < len(pods); i += podsPerNamespace {
		kube.CreateNamespace(h, pods[i].ns, nil)
	}
	work := make(chan stormPod)
	var wg sync.WaitGroup
	for range stormWorkers {
		wg.Go(func() {
			for p := range work {
				kube.CreateServiceAccount(h, p.ns, p.sa)
				kube.CreatePod(h, p.ns, p.name, p.sa, p.node)
			}
		})
	}
	for _, p := range pods {
		if h.Failed() {
			break
		}
		work <- p
		e.byNode[p.node] = append(e.byNode[p.node], p)
	}
	close(work)
	wg.Wait()
	if err := h.failure(); err != nil {
		h.Fatal(err) // a worker's Fatal ended only the worker
	}
	return e
}

// startCastellan starts castellan on the cluster: kubeconfig, TokenReview
// verification (cached), the ztunnels' account trusted as node proxies.
func (e *stormEnv) startCastellan(ctx context.Context, o options) error {
	o.castellanExtra = append(o.castellanExtra, "--kubeconfig", e.kube.Kubeconfig, "--token-verification", "tokenreview",
		"--trusted-node-accounts", stormZtunnelNS+"/"+stormZtunnelSA, "--root-configmaps=false")
	startCtx, cancel := context.WithTimeout(ctx, startTimeout)
	defer cancel()
	p, err := startCastellan(startCtx, o)
	if err != nil {
		return err
	}
	e.h.Cleanup(func() {
		if err := p.stop(); err != nil {
			fmt.Fprintf(os.Stderr, "loadgen: stopping castellan: %v\n", err)
		}
	})
	info, err := readServerInfo(p.dataDir)
	if err != nil {
		return err
	}
	bundle, err := os.ReadFile(filepath.Join(p.dataDir, rootCertFile))
	if err != nil {
		return err
	}
	e.roots = x509.NewCertPool()
	if !e.roots.AppendCertsFromPEM(bundle) {
		return fmt.Errorf("%s holds no certificate", rootCertFile)
	}
	e.addr, e.name, e.td, e.pid = info.Address, info.ServerName, info.TrustDomain, p.pid
	return nil
}

// stormCall is one CSR of a storm and its answer.
type stormCall struct {
	id      string // the pod's SPIFFE ID
	csr     string
	key     crypto.PublicKey
	token   string
	lat     time.Duration
	err     error
	chain   []string
	retries int // attempts refused with ResourceExhausted, then retried
}

// stormResult is what one storm measured; latencies run from a call's
// first attempt to its certificate.
type stormResult struct {
	csrs     int
	wall     time.Duration // first dial to last answer
	hist     histogram
	errs     map[string]int // by gRPC code
	example  map[string]string
	apiCalls map[string]float64 // apiserver requests during the storm, by resource
	cpu      time.Duration      // castellan's
	retries  int                // refusals (ResourceExhausted) retried
	load     [2]string
}

// round runs one storm with fresh ztunnel tokens and new connections.
func (e *stormEnv) round(ctx context.Context, o options) stormResult {
	h := e.h
	tokens := make([]string, len(e.ztunnels))
	for n, zt := range e.ztunnels {
		//nolint:contextcheck // kubeenv bounds each call (CallTimeout)
		tokens[n] = e.kube.Token(h, stormZtunnelNS, stormZtunnelSA, kubeenv.TokenOptions{Audiences: []string{stormAudience}, Pod: zt})
	}
	calls := make([][]*stormCall, len(e.ztunnels))
	for n := range e.ztunnels {
		for _, p := range e.byNode[stormNode(n)] {
			csr, key, err := newCSR(p.id(e.td))
			if err != nil {
				h.Fatal(err)
			}
			calls[n] = append(calls[n], &stormCall{id: p.id(e.td), csr: csr, key: key, token: tokens[n]})
		}
	}
	res := stormResult{errs: map[string]int{}, example: map[string]string{}, hist: make(histogram, histBuckets), load: [2]string{loadAverage()}}
	before := e.kube.RequestCounts(h) //nolint:contextcheck // kubeenv bounds each call (CallTimeout)
	cpu0, _ := readCPU(e.pid)
	start := time.Now()
	var wg sync.WaitGroup
	var conns []*grpc.ClientConn
	for n := range e.ztunnels {
		conn, err := grpc.NewClient(e.addr, grpc.WithTransportCredentials(credentials.NewTLS(&tls.Config{
			RootCAs: e.roots, ServerName: e.name, MinVersion: tls.VersionTLS13, // ztunnel: TLS 1.3, no client certificate
		})))
		if err != nil {
			h.Fatal(err)
		}
		conns = append(conns, conn)
		api := pb.NewIstioCertificateServiceClient(conn)
		for _, c := range calls[n] {
			wg.Go(func() { c.do(ctx, api, o) })
		}
	}
	wg.Wait()
	res.wall = time.Since(start)
	cpu1, _ := readCPU(e.pid)
	res.cpu = cpu1 - cpu0
	after := e.kube.RequestCounts(h) //nolint:contextcheck // kubeenv bounds each call (CallTimeout)
	res.load[1] = loadAverage()
	for _, c := range conns {
		_ = c.Close() // fails only on a second close
	}
	res.apiCalls = map[string]float64{}
	for k, v := range after {
		if d := v - before[k]; d > 0 && k != "" { // "": this program's GET /metrics
			res.apiCalls[k] = d
		}
	}
	for _, cs := range calls {
		for _, c := range cs {
			res.csrs++
			res.retries += c.retries
			if c.err == nil {
				c.err = c.check(e.roots)
			}
			if c.err != nil {
				code := codeName(c.err)
				res.errs[code]++
				if _, ok := res.example[code]; !ok {
					res.example[code] = c.err.Error()
				}
				continue
			}
			res.hist[bucketOf(c.lat)]++
		}
	}
	return res
}

// do sends the call the way ztunnel does: bearer token, cluster id, and the
// pod's identity as ImpersonatedIdentity; a refusal for overload
// (ResourceExhausted) is retried after a backoff, as ztunnel and Istio's
// agent do, until o.timeout from the first attempt. lat is the time from the
// first attempt to the certificate.
func (c *stormCall) do(ctx context.Context, api pb.IstioCertificateServiceClient, o options) {
	meta, err := structpb.NewStruct(map[string]any{security.ImpersonatedIdentity: c.id})
	if err != nil {
		c.err = err
		return
	}
	ctx, cancel := context.WithTimeout(metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+c.token, "clusterid", stormClusterID), o.timeout)
	defer cancel()
	t0 := time.Now()
	for attempt := 0; ; attempt++ {
		resp, err := api.CreateCertificate(ctx, &pb.IstioCertificateRequest{Csr: c.csr, ValidityDuration: int64(o.ttl / time.Second), Metadata: meta})
		if err == nil {
			c.lat, c.err, c.chain = time.Since(t0), nil, resp.GetCertChain()
			return
		}
		c.err = err
		if status.Code(err) != codes.ResourceExhausted {
			return
		}
		c.retries++
		select {
		case <-time.After(backoff(attempt, rand.Float64())): //nolint:gosec // jitter, not a secret
		case <-ctx.Done():
			return
		}
	}
}

// backoff is the wait before retry attempt+1: 100 ms doubling up to 1 s,
// scaled by 0.5 + jitter (jitter in [0, 1)) so that refused clients do not
// come back in step.
func backoff(attempt int, jitter float64) time.Duration {
	d := time.Second
	if attempt < 4 {
		d = min(100*time.Millisecond<<attempt, time.Second)
	}
	return time.Duration(float64(d) * (0.5 + jitter))
}

// check verifies an answer: the leaf certifies the CSR's key for the pod's
// identity and chains to the server's bundle.
func (c *stormCall) check(roots *x509.CertPool) error {
	cl := &client{id: c.id, roots: roots}
	return cl.checkLeaf(c.chain, c.key)
}

// codeName names an error's gRPC code, or BadResponse for a wrong answer.
func codeName(err error) string {
	if errors.Is(err, errBadResponse) {
		return "BadResponse"
	}
	return status.Code(err).String()
}

// calls sums the apiserver requests of the listed resources (all when none).
func (r stormResult) calls(resources ...string) float64 {
	var n float64
	for k, v := range r.apiCalls {
		if len(resources) == 0 || slices.Contains(resources, k) {
			n += v
		}
	}
	return n
}

func (r stormResult) ok() int {
	n := r.csrs
	for _, c := range r.errs {
		n -= c
	}
	return n
}

func (r stormResult) print(out io.Writer, round int) {
	fmt.Fprintf(out, "\n== storm %d: %d CSRs, %d issued in %s: %.0f certs/s; latency p50 %s p99 %s max %s; castellan CPU %.0f µs per certificate\n",
		round, r.csrs, r.ok(), r.wall.Round(time.Millisecond), float64(r.ok())/r.wall.Seconds(),
		ms(r.hist.quantile(0.5)), ms(r.hist.quantile(0.99)), ms(r.hist.quantile(1)), us(r.cpu)/max(float64(r.ok()), 1))
	fmt.Fprintf(out, "refused with ResourceExhausted and retried after a backoff: %d times\n", r.retries)
	for code, n := range r.errs {
		fmt.Fprintf(out, "errors: %s %d (e.g. %s)\n", code, n, truncate(r.example[code], 160))
	}
	keys := make([]string, 0, len(r.apiCalls))
	for k := range r.apiCalls {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	var parts []string
	for _, k := range keys {
		parts = append(parts, fmt.Sprintf("%s %.0f", k, r.apiCalls[k]))
	}
	fmt.Fprintf(out, "kube-apiserver requests during the storm (its apiserver_request_total): %s; per 100 CSRs: %.1f (tokenreviews + pods: %.1f)\n",
		strings.Join(parts, ", "), 100*r.calls()/float64(r.csrs), 100*r.calls("tokenreviews", "pods")/float64(r.csrs))
	fmt.Fprintf(out, "load avg: %s at the start, %s at the end\n", r.load[0], r.load[1])
}

// printStormTable prints the rounds as one markdown table.
func printStormTable(out io.Writer, rs []stormResult) {
	fmt.Fprintln(out, "\n| storm | CSRs | issued | errors | refusals retried | certs/s | p50 | p99 | castellan CPU per cert | apiserver calls per 100 CSRs (all) | of which TokenReviews | pod reads | load avg start → end |")
	fmt.Fprintln(out, "|---|---|---|---|---|---|---|---|---|---|---|---|---|")
	for i, r := range rs {
		fmt.Fprintf(out, "| %d | %d | %d | %d | %d | %.0f | %s | %s | %.0f µs | %.1f | %.1f | %.1f | %s → %s |\n", i+1, r.csrs, r.ok(), r.csrs-r.ok(), r.retries,
			float64(r.ok())/r.wall.Seconds(), ms(r.hist.quantile(0.5)), ms(r.hist.quantile(0.99)), us(r.cpu)/max(float64(r.ok()), 1),
			100*r.calls()/float64(r.csrs), 100*r.calls("tokenreviews")/float64(r.csrs), 100*r.calls("pods")/float64(r.csrs), r.load[0], r.load[1])
	}
}
