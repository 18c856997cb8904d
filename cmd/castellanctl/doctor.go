package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"slices"
	"strings"
	"time"

	"github.com/castellan-ca/castellan/internal/adminapi"
	adminpb "github.com/castellan-ca/castellan/proto/castellan/admin/v1"
	"github.com/castellan-ca/castellan/storage"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// doctorOptions are doctor's flags.
type doctorOptions struct {
	names       []string
	full        bool
	auditTail   uint64
	caWarn      time.Duration
	maxSkew     time.Duration
	kubeconfig  string
	kubeContext string
	as          string
	nsSelector  string
	leaseNS     string
	istiodCert  bool
	now         func() time.Time
}

// cmdDoctor checks a deployment the way an operator would and prints one
// line per check; it exits 1 when a check failed.
func cmdDoctor(ctx context.Context, g *globals, args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("doctor", stderr)
	o := doctorOptions{now: time.Now}
	var names string
	fs.StringVar(&names, "names", "", "comma-separated DNS names the serving certificate must also carry (besides --server-name)")
	fs.BoolVar(&o.full, "full", false, "verify the whole audit log (server side) instead of the tail of each chain")
	fs.Uint64Var(&o.auditTail, "audit-tail", 1000, "records verified at the end of each writer's chain (without --full)")
	fs.DurationVar(&o.caWarn, "ca-expiry-warning", 30*24*time.Hour, "a CA expiring sooner than this needs a prepared successor (or the rotation schedule)")
	fs.DurationVar(&o.maxSkew, "max-clock-skew", 30*time.Second, "warn when the server's clock differs from this machine's by more")
	fs.StringVar(&o.kubeconfig, "kubeconfig", "", "kubeconfig of the cluster: enables the ConfigMap, ClusterTrustBundle and RBAC checks")
	fs.StringVar(&o.kubeContext, "context", "", "kubeconfig context (default: its current context)")
	fs.StringVar(&o.as, "as", "", "check RBAC as this user (impersonation), e.g. system:serviceaccount:castellan-system:castellan (default: the kubeconfig's identity)")
	fs.StringVar(&o.nsSelector, "root-configmap-namespace-selector", "", "the server's rootConfigMapNamespaceSelector: only these namespaces hold root ConfigMaps")
	fs.StringVar(&o.leaseNS, "lease-namespace", "castellan-system", "namespace of the server's leader-election Leases (its Role is checked there)")
	fs.BoolVar(&o.istiodCert, "istiod-cert", false, "the server keeps istiod's serving certificate: check its Role too")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("doctor: unexpected arguments %v", fs.Args())
	}
	if names != "" {
		o.names = strings.Split(names, ",")
	}
	results := runDoctor(ctx, g, o)
	out := textOut{stdout}
	failed := 0
	for _, r := range results {
		if r.Hint != "" && r.Status != statusOK {
			out.printf("%-4s  %-12s  %s -- fix: %s\n", r.Status, r.Name, r.Finding, r.Hint)
		} else {
			out.printf("%-4s  %-12s  %s\n", r.Status, r.Name, r.Finding)
		}
		if r.failed() {
			failed++
		}
	}
	if failed > 0 {
		out.printf("%d of %d checks failed\n", failed, len(results))
		return exitError{1}
	}
	return nil
}

// runDoctor runs every check, in order; a check whose inputs another check
// could not get is skipped, not failed twice.
func runDoctor(ctx context.Context, g *globals, o doctorOptions) []checkResult {
	var results []checkResult
	addr, name, err := g.target()
	if err != nil {
		results = append(results, failedCheck(checkServer, "give --server and --server-name, or --data-dir of a running server", err))
		for _, n := range []string{checkBundle, checkAudit, checkCA, checkSkew} {
			results = append(results, skipped(n, errNoAdmin))
		}
		return append(results, doctorRBAC(ctx, o))
	}

	// 1. The serving certificate, as any client sees it.
	roots, rootsErr := g.roots()
	server := probeServing(ctx, addr, name, roots, rootsErr, o)

	// The admin API: the server's bundle and its clock.
	var (
		client    adminpb.AdminServiceClient
		bundle    *adminpb.GetTrustBundleResponse
		sent, got time.Time
		adminErr  error
	)
	client, closeConn, adminErr := g.dial()
	if adminErr == nil {
		defer closeConn()
		// Twice: the first call carries the connection's set-up, which would
		// widen the margin of the clock reading; the second is timed.
		if _, adminErr = client.GetTrustBundle(ctx, &adminpb.GetTrustBundleRequest{}); adminErr == nil {
			sent = o.now()
			bundle, adminErr = client.GetTrustBundle(ctx, &adminpb.GetTrustBundleRequest{})
			got = o.now()
		}
	}
	if adminErr != nil && !server.failed() {
		server = failedCheck(checkServer, "check the operator credential (--cert, --key; default DATA_DIR/operator) and the server's logs",
			fmt.Errorf("the TLS handshake works but the admin API does not answer: %w", adminErr))
	}
	results = append(results, server)

	// 2. The trust bundle everywhere it is published.
	var sources []bundleSource
	if adminErr == nil {
		sources = append(sources, bundleSource{Name: "server", Kind: sourceServer, PEM: bundle.GetBundlePem()})
	}
	fileSrc := bundleSource{Name: g.trustFile(), Kind: sourceFile, Err: rootsErr}
	if rootsErr == nil {
		b, err := os.ReadFile(g.trustFile())
		fileSrc.PEM, fileSrc.Err = string(b), err
	}
	sources = append(sources, fileSrc)
	kube, _ := loadKube(o.kubeconfig, o.kubeContext) // an error is the RBAC check's finding
	if kube != nil {
		more, err := kubeBundleSources(ctx, kube, o.nsSelector)
		if err != nil {
			more = append(more, bundleSource{Name: "the cluster's copies", Kind: sourceConfigMap, Err: err})
		}
		sources = append(sources, more...)
	}
	results = append(results, evalBundles(sources))

	// 3-5: what only the admin API knows.
	if adminErr != nil {
		results = append(results, skipped(checkAudit, errNoAdmin), skipped(checkCA, errNoAdmin), skipped(checkSkew, errNoAdmin))
	} else {
		var serverTime time.Time // zero: a server that does not report it
		if ts := bundle.GetServerTime(); ts != nil {
			serverTime = ts.AsTime()
		}
		results = append(results, doctorAudit(ctx, client, o), doctorCA(ctx, client, o), evalSkew(sent, got, serverTime, o.maxSkew))
	}

	// 6. Kubernetes RBAC (it reports a kubeconfig that does not load).
	return append(results, doctorRBAC(ctx, o))
}

// probeServing makes a TLS handshake with the server and judges the chain
// it presents against the trust bundle file and the names a client dials.
func probeServing(ctx context.Context, addr, name string, roots []*x509.Certificate, rootsErr error, o doctorOptions) checkResult {
	names := []string{name}
	if host, _, err := net.SplitHostPort(addr); err == nil && host != "" && net.ParseIP(host) == nil {
		names = append(names, host) // a DNS name dialled must be in the certificate too
	}
	for _, n := range o.names {
		if n = strings.TrimSpace(n); n != "" {
			names = append(names, n)
		}
	}
	slices.Sort(names)
	names = slices.Compact(names)
	d := tls.Dialer{NetDialer: &net.Dialer{Timeout: 10 * time.Second}, Config: &tls.Config{
		MinVersion: tls.VersionTLS12, ServerName: name, NextProtos: []string{"h2"},
		// Only to read the chain: evalServingCert verifies it below, and
		// nothing is sent on this connection.
		InsecureSkipVerify: true, //nolint:gosec // G402: verified by evalServingCert, which reports why it fails
	}}
	conn, err := d.DialContext(ctx, "tcp", addr)
	var op *net.OpError
	switch {
	case errors.As(err, &op) && op.Op == "remote error": // a TLS alert from the server
		// The server answered but ended the handshake: it has no serving
		// certificate to present (it would rather fail than present one
		// past its NotAfter).
		return failedCheck(checkServer, "the server could not issue its serving certificate: check that its CA is valid (castellanctl ca status "+
			"from a working replica, or the cacerts files) and its logs for \"serving certificate\"", fmt.Errorf("%s: TLS handshake refused: %w", addr, err))
	case err != nil:
		return failedCheck(checkServer, "check that the server runs and listens on this address (--server, or DATA_DIR/server.json), and firewalls",
			fmt.Errorf("%s unreachable: %w", addr, err))
	}
	chain := conn.(*tls.Conn).ConnectionState().PeerCertificates
	_ = conn.Close() // only read from
	if rootsErr != nil {
		return failedCheck(checkServer, "give the trust bundle with --ca, or --data-dir of the server", rootsErr)
	}
	r := evalServingCert(chain, roots, names, o.now())
	r.Finding = addr + ": " + r.Finding
	return r
}

// doctorAudit verifies the tail of each chain, or the whole log with --full.
func doctorAudit(ctx context.Context, client adminpb.AdminServiceClient, o doctorOptions) checkResult {
	if o.full {
		res, err := client.VerifyAuditLog(ctx, &adminpb.VerifyAuditLogRequest{})
		if err != nil {
			return failedCheck(checkAudit, "check the audit store (castellanctl audit verify; the server's /readyz)", err)
		}
		return evalAudit(storage.VerifyResult{OK: res.GetOk(), Records: int(res.GetRecords()), Writers: int(res.GetWriters()),
			Problem: res.GetProblem(), Writer: res.GetWriter(), Seq: res.GetSeq()}, "whole log")
	}
	res, err := verifyAuditTail(ctx, client, o.auditTail)
	if err != nil {
		return failedCheck(checkAudit, "check the audit store (the server's /readyz)", err)
	}
	return evalAudit(res, fmt.Sprintf("last %d records of each chain", o.auditTail))
}

// doctorCA judges the rotation status; a server without the rotation
// workflow (an external signer) has nothing to report.
func doctorCA(ctx context.Context, client adminpb.AdminServiceClient, o doctorOptions) checkResult {
	resp, err := client.GetCAStatus(ctx, &adminpb.GetCAStatusRequest{})
	switch status.Code(err) {
	case codes.OK:
	case codes.FailedPrecondition, codes.Unimplemented:
		return skipped(checkCA, fmt.Errorf("no rotation workflow on this server: %s", status.Convert(err).Message()))
	default:
		return failedCheck(checkCA, "check the server's logs and its CA state storage", err)
	}
	return evalCA(adminapi.RotationStatusFromProto(resp.GetStatus()), o.now(), o.caWarn)
}

// errNoKubeconfig is why the RBAC check is skipped.
var errNoKubeconfig = errors.New("no --kubeconfig given")
