// Command loadgen drives a certificate authority that speaks Istio's CA API
// (istio.v1.auth.IstioCertificateService/CreateCertificate) over gRPC and TLS
// with N concurrent clients, each on its own connection with its own workload
// mTLS credential, sending pre-generated ECDSA P-256 CSRs. It prints
// throughput, latency percentiles, errors by gRPC code, and the server's
// resident memory and CPU time read from /proc.
//
// Targets (-mode):
//
//   - castellan: a running `castellan serve` (-data-dir of that server, whose
//     server.json, root-cert.pem and operator credential are used), or one the
//     load generator starts itself from -castellan-bin on loopback ports. The
//     client credentials are issued through the admin API with the operator
//     credential.
//   - istio: Istio's own CA gRPC server (istio.io/istio/security/pkg/server/ca
//     with its IstioCA from security/pkg/pki/ca and its ClientCertAuthenticator),
//     run by this same binary in a child process on loopback, so that its
//     memory and CPU are measured separately from the clients', as Castellan's are.
//
// Both targets are driven by the same client code. Everything listens and
// dials on 127.0.0.1 only, and every phase is bounded in time or count.
//
// Usage:
//
//	loadgen -mode castellan -castellan-bin ./bin/castellan -clients 32 -duration 30s
//	loadgen -mode castellan -data-dir ~/.local/state/castellan -pid $(pgrep -n castellan)
//	loadgen -mode istio -clients 32 -duration 30s
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
	"strings"
	"syscall"
	"time"
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
	fs.StringVar(&o.mode, "mode", "castellan", "target: castellan or istio")
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
	if err := fs.Parse(args); err != nil {
		return o, err
	}
	if fs.NArg() != 0 {
		return o, fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	if o.duration == 0 && o.requests == 0 {
		o.duration = 30 * time.Second
	}
	switch {
	case o.mode != "castellan" && o.mode != "istio":
		return o, fmt.Errorf("-mode %q: want castellan or istio", o.mode)
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
	case o.mode == "istio" && o.istioCAKey != "ecdsa-p256" && o.istioCAKey != "rsa-2048":
		return o, fmt.Errorf("-istio-ca-key %q: want ecdsa-p256 or rsa-2048", o.istioCAKey)
	}
	return o, nil
}

// target is a CA under load: where to dial, what to trust, the clients'
// credentials, and the process to watch.
type target struct {
	describe   string
	addr       string
	serverName string
	bundlePEM  string // roots the clients verify the server with
	creds      []credential
	pid        int // 0: unknown
	stop       func() error
}

func run(ctx context.Context, args []string, out io.Writer) error {
	o, err := parseOptions(args)
	if err != nil {
		return err
	}
	startCtx, cancel := context.WithTimeout(ctx, startTimeout)
	defer cancel()
	var t *target
	switch o.mode {
	case "castellan":
		t, err = castellanTarget(startCtx, o)
	case "istio":
		t, err = istioTarget(startCtx, o)
	}
	if err != nil {
		return err
	}
	defer func() {
		if err := t.stop(); err != nil {
			fmt.Fprintf(os.Stderr, "loadgen: stopping the target: %v\n", err)
		}
	}()
	fmt.Fprintf(out, "target: %s at %s (server pid %s)\n", t.describe, t.addr, pidString(t.pid))
	fmt.Fprintf(out, "clients: %d, %d P-256 CSRs each, ttl %v, warm-up %v, %s\n", o.clients, o.csrs, o.ttl, o.warmup, phaseString(o))

	clients, err := newClients(startCtx, t, o)
	if err != nil {
		return err
	}
	defer closeClients(clients)
	res, err := drive(ctx, clients, t, o, out)
	if err != nil {
		return err
	}
	res.print(out, o)
	return nil
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
