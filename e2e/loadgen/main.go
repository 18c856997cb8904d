// Command loadgen drives a certificate authority that speaks Istio's CA API
// (istio.v1.auth.IstioCertificateService/CreateCertificate) over gRPC and TLS
// with N concurrent clients, each on its own connection with its own workload
// mTLS credential, sending pre-generated ECDSA P-256 CSRs. It prints
// throughput, latency percentiles, errors by gRPC code, and the server's
// resident memory and CPU time read from /proc.
//
// Targets and runs (-mode):
//
//   - castellan: a running `castellan serve` (-data-dir of that server, whose
//     server.json, root-cert.pem and operator credential are used), or one the
//     load generator starts itself from -castellan-bin on loopback ports. The
//     client credentials are issued through the admin API with the operator
//     credential.
//   - postgres: castellan started from -castellan-bin with the PostgreSQL
//     audit store, on a throwaway PostgreSQL 15 cluster (fsync and
//     synchronous_commit on) that the load generator starts; the CPU of every
//     PostgreSQL process is counted with the server's.
//   - istio: Istio's own CA gRPC server (istio.io/istio/security/pkg/server/ca
//     with its IstioCA from security/pkg/pki/ca and its ClientCertAuthenticator),
//     run by this same binary in a child process on loopback, so that its
//     memory and CPU are measured separately from the clients', as Castellan's are.
//   - compare: castellan (embedded store), postgres and istio back to back
//     with the same client settings, plus the crypto floor measured in this
//     process, and one table of the three.
//   - storm: a node-restart storm through a real kube-apiserver (storm.go).
//   - overload: the sustainable rate from a closed loop, then an open loop at
//     -overload-factor times it, then a lighter load to show recovery (overload.go).
//
// The targets are driven by the same client code. Everything listens and
// dials on 127.0.0.1 only, and every phase is bounded in time or count.
//
// Usage:
//
//	loadgen -mode castellan -castellan-bin ./bin/castellan -clients 32 -duration 30s
//	loadgen -mode castellan -data-dir ~/.local/state/castellan -pid $(pgrep -n castellan)
//	loadgen -mode istio -clients 32 -duration 30s
//	loadgen -mode compare -castellan-bin ./bin/castellan -clients 32 -duration 30s
//	loadgen -mode storm -castellan-bin ./bin/castellan -kube-bin-dir ~/.cache/castellan/kube-v1.37.2-etcd-v3.5.21
//	loadgen -mode overload -castellan-bin ./bin/castellan
//	loadgen -mode castellan -castellan-bin ./bin/castellan -duration 10m -report 30s   # soak
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/castellan-ca/castellan/e2e/internal/kubeenv"
)

// Hard bounds, so that no flag combination runs forever.
const (
	maxDuration  = 2 * time.Hour
	maxClients   = 4096
	startTimeout = 60 * time.Second // target start-up and client bootstrap
)

// options are the command-line settings.
type options struct {
	mode     string
	clients  int
	duration time.Duration
	requests int64
	warmup   time.Duration
	report   time.Duration
	timeout  time.Duration
	ttl      time.Duration
	csrs     int

	// castellan
	dataDir       string
	addr          string
	serverName    string
	pid           int
	castellanBin  string
	castellanArgs string
	keep          bool
	// castellanExtra are flags a mode adds to a started castellan's (after
	// the loadgen's own, before -castellan-args).
	castellanExtra []string

	// storm
	kubeBinDir  string
	stormPods   int
	stormNodes  int
	stormRounds int

	// overload
	overloadFactor   float64
	overloadProbe    time.Duration
	overloadDuration time.Duration
	recoveryDuration time.Duration

	// istio
	istioCAKey string
}

func main() {
	if len(os.Args) > 1 && os.Args[1] == istioServeCommand {
		if err := istioServe(os.Args[2:], os.Stdout); err != nil {
			fmt.Fprintf(os.Stderr, "loadgen %s: %v\n", istioServeCommand, err)
			os.Exit(1)
		}
		return
	}
	if err := runUntilSignal(os.Args[1:]); err != nil {
		fmt.Fprintf(os.Stderr, "loadgen: %v\n", err)
		os.Exit(1)
	}
}

// runUntilSignal is run, cancelled by SIGINT or SIGTERM; its deferred stop
// restores the default signal handling before main exits.
func runUntilSignal(args []string) error {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	return run(ctx, args, os.Stdout)
}

// parseOptions reads and checks the flags.
func parseOptions(args []string) (options, error) {
	var o options
	fs := flag.NewFlagSet("loadgen", flag.ContinueOnError)
	fs.StringVar(&o.mode, "mode", "castellan", "castellan, postgres, istio, compare, storm or overload")
	fs.IntVar(&o.clients, "clients", 32, "concurrent clients, each with its own connection and credential")
	fs.DurationVar(&o.duration, "duration", 0, "measured phase length (default 30s unless -requests is set)")
	fs.Int64Var(&o.requests, "requests", 0, "stop the measured phase after this many requests (0: by -duration)")
	fs.DurationVar(&o.warmup, "warmup", 3*time.Second, "unrecorded load before measuring (TLS, caches, page cache)")
	fs.DurationVar(&o.report, "report", 30*time.Second, "print an interval line (rate, latency, server memory) this often; 0: never")
	fs.DurationVar(&o.timeout, "timeout", 10*time.Second, "deadline of each request")
	fs.DurationVar(&o.ttl, "ttl", 24*time.Hour, "requested certificate lifetime (pilot-agent's default is 24h)")
	fs.IntVar(&o.csrs, "csrs-per-client", 4, "pre-generated P-256 CSRs per client, sent in turn")
	fs.StringVar(&o.dataDir, "data-dir", "", "castellan: data directory of a running server, or where a started one keeps its state (default: temporary)")
	fs.StringVar(&o.addr, "addr", "", "castellan: gRPC address (default: from server.json)")
	fs.StringVar(&o.serverName, "server-name", "", "castellan: TLS server name (default: from server.json)")
	fs.IntVar(&o.pid, "pid", 0, "castellan: process id of a running server, for its memory and CPU")
	fs.StringVar(&o.castellanBin, "castellan-bin", "", "castellan: start this binary on loopback instead of using a running server")
	fs.StringVar(&o.castellanArgs, "castellan-args", "", "castellan: extra `castellan serve` flags, space-separated")
	fs.BoolVar(&o.keep, "keep", false, "castellan: keep a temporary data directory after the run")
	fs.StringVar(&o.istioCAKey, "istio-ca-key", "ecdsa-p256", "istio: CA key, ecdsa-p256 (as Castellan's default root) or rsa-2048 (Istio's default self-signed root)")
	fs.StringVar(&o.kubeBinDir, "kube-bin-dir", os.Getenv(kubeenv.BinDirEnv), "storm: directory of the kube-apiserver and etcd binaries (`make kube`)")
	fs.IntVar(&o.stormPods, "storm-pods", 1000, "storm: pods, each with its own service account, spread over the nodes")
	fs.IntVar(&o.stormNodes, "storm-nodes", 10, "storm: nodes, each with one ztunnel")
	fs.IntVar(&o.stormRounds, "storm-rounds", 2, "storm: storms, each with fresh ztunnel tokens (as after a restart)")
	fs.Float64Var(&o.overloadFactor, "overload-factor", 4, "overload: offered rate as a multiple of the measured sustainable rate")
	fs.DurationVar(&o.overloadProbe, "overload-probe", 10*time.Second, "overload: closed-loop run that measures the sustainable rate")
	fs.DurationVar(&o.overloadDuration, "overload-duration", 15*time.Second, "overload: open-loop phase at -overload-factor")
	fs.DurationVar(&o.recoveryDuration, "recovery-duration", 15*time.Second, "overload: open-loop phase at half the sustainable rate that follows")
	if err := fs.Parse(args); err != nil {
		return o, err
	}
	if fs.NArg() != 0 {
		return o, fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	if o.duration == 0 && o.requests == 0 {
		o.duration = 30 * time.Second
	}
	startsCastellan := o.mode == "postgres" || o.mode == "compare" || o.mode == "storm" || o.mode == "overload"
	switch {
	case !slices.Contains(modes, o.mode):
		return o, fmt.Errorf("-mode %q: want one of %s", o.mode, strings.Join(modes, ", "))
	case o.clients < 1 || o.clients > maxClients:
		return o, fmt.Errorf("-clients %d: want 1..%d", o.clients, maxClients)
	case o.duration < 0 || o.duration > maxDuration || o.warmup < 0 || o.warmup > maxDuration:
		return o, fmt.Errorf("-duration and -warmup must be within 0..%v", maxDuration)
	case o.requests < 0:
		return o, errors.New("-requests must not be negative")
	case o.timeout <= 0 || o.ttl <= 0:
		return o, errors.New("-timeout and -ttl must be positive")
	case o.csrs < 1 || o.csrs > 64:
		return o, errors.New("-csrs-per-client must be within 1..64")
	case o.report < 0:
		return o, errors.New("-report must not be negative")
	case o.mode == "castellan" && o.castellanBin == "" && o.dataDir == "":
		return o, errors.New("castellan mode needs -castellan-bin (start a server) or -data-dir (use a running one)")
	case startsCastellan && o.castellanBin == "":
		return o, fmt.Errorf("%s mode needs -castellan-bin: it starts its own servers", o.mode)
	case (o.mode == "istio" || o.mode == "compare") && o.istioCAKey != "ecdsa-p256" && o.istioCAKey != "rsa-2048":
		return o, fmt.Errorf("-istio-ca-key %q: want ecdsa-p256 or rsa-2048", o.istioCAKey)
	case o.mode == "storm" && o.kubeBinDir == "":
		return o, fmt.Errorf("storm mode needs -kube-bin-dir (or %s): the kube-apiserver and etcd of `make kube`", kubeenv.BinDirEnv)
	case o.stormNodes < 1 || o.stormPods < o.stormNodes || o.stormPods > 100000 || o.stormRounds < 1 || o.stormRounds > 100:
		return o, errors.New("-storm-nodes must be at least 1, -storm-pods within nodes..100000, -storm-rounds within 1..100")
	case o.overloadFactor <= 0 || o.overloadFactor > 100:
		return o, errors.New("-overload-factor must be within 0..100")
	case o.overloadProbe <= 0 || o.overloadDuration <= 0 || o.recoveryDuration < 0 ||
		o.overloadProbe+o.overloadDuration+o.recoveryDuration > maxDuration:
		return o, fmt.Errorf("-overload-probe and -overload-duration must be positive, -recovery-duration not negative, together within %v", maxDuration)
	}
	return o, nil
}

// readStoreCPU reads the audit store's CPU time; 0 when it has no process of its own.
func (t *target) readStoreCPU() (time.Duration, error) {
	if t.storeCPU == nil {
		return 0, nil
	}
	return t.storeCPU()
}

// modes are the values of -mode.
var modes = []string{"castellan", "postgres", "istio", "compare", "storm", "overload"}

// target is a CA under load: where to dial, what to trust, the clients'
// credentials, and the process to watch.
type target struct {
	describe   string
	addr       string
	serverName string
	bundlePEM  string // roots the clients verify the server with
	creds      []credential
	pid        int    // 0: unknown
	monitor    string // castellan's monitoring listener (http://…), when started here
	// storeCPU, when set, reads the CPU time of the audit store's processes
	// (PostgreSQL), counted with the server's.
	storeCPU func() (time.Duration, error)
	stop     func() error
}

func run(ctx context.Context, args []string, out io.Writer) error {
	o, err := parseOptions(args)
	if err != nil {
		return err
	}
	switch o.mode {
	case "compare":
		return runCompare(ctx, o, out)
	case "storm":
		return runStorm(ctx, o, out)
	case "overload":
		return runOverload(ctx, o, out)
	}
	_, err = runClosedLoop(ctx, o, out)
	return err
}

// runClosedLoop starts the target of o.mode (castellan, postgres or istio),
// drives it with o.clients closed-loop clients, prints and returns the result.
func runClosedLoop(ctx context.Context, o options, out io.Writer) (*result, error) {
	startCtx, cancel := context.WithTimeout(ctx, startTimeout)
	defer cancel()
	t, err := startTarget(startCtx, o)
	if err != nil {
		return nil, err
	}
	defer stopTarget(t)
	fmt.Fprintf(out, "target: %s at %s (server pid %s)\n", t.describe, t.addr, pidString(t.pid))
	fmt.Fprintf(out, "clients: %d, %d P-256 CSRs each, ttl %v, warm-up %v, %s\n", o.clients, o.csrs, o.ttl, o.warmup, phaseString(o))
	clients, err := newClients(startCtx, t, o)
	if err != nil {
		return nil, err
	}
	defer closeClients(clients)
	res, err := drive(ctx, clients, t, o, out)
	if err != nil {
		return nil, err
	}
	res.print(out, o)
	return res, nil
}

// startTarget starts (or finds) the target of o.mode and says what it is.
func startTarget(ctx context.Context, o options) (*target, error) {
	var t *target
	var err error
	switch o.mode {
	case "castellan", "overload":
		t, err = castellanTarget(ctx, o)
	case "postgres":
		t, err = postgresTarget(ctx, o)
	case "istio":
		t, err = istioTarget(ctx, o)
	default:
		return nil, fmt.Errorf("mode %s has no single target", o.mode)
	}
	if err != nil {
		return nil, err
	}
	return t, nil
}

func stopTarget(t *target) {
	if err := t.stop(); err != nil {
		fmt.Fprintf(os.Stderr, "loadgen: stopping the target: %v\n", err)
	}
}

func pidString(pid int) string {
	if pid == 0 {
		return "unknown: pass -pid for memory"
	}
	return fmt.Sprint(pid)
}

func phaseString(o options) string {
	var parts []string
	if o.duration > 0 {
		parts = append(parts, fmt.Sprintf("measuring for %v", o.duration))
	}
	if o.requests > 0 {
		parts = append(parts, fmt.Sprintf("measuring %d requests", o.requests))
	}
	return strings.Join(parts, " or ")
}
