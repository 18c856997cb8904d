package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"time"

	"github.com/castellan-ca/castellan/authn"
	"github.com/castellan-ca/castellan/ca"
	"github.com/castellan-ca/castellan/ca/admin"
	"github.com/castellan-ca/castellan/ca/rotation"
	"github.com/castellan-ca/castellan/cmd/internal/datadir"
	"github.com/castellan-ca/castellan/internal/atomicfile"
	"github.com/castellan-ca/castellan/internal/keyfile"
	adminpb "github.com/castellan-ca/castellan/proto/castellan/admin/v1"
	authpb "github.com/castellan-ca/castellan/proto/istio/v1/auth"
	"github.com/castellan-ca/castellan/signer"
	"github.com/castellan-ca/castellan/signer/googlecas"
	"github.com/castellan-ca/castellan/signer/vault"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/keepalive"
)

// operatorPath is the SPIFFE path of the castellanctl credential; it is not a
// workload path, so no workload request can ever be granted it.
const operatorPath = "/castellan/operator"

// serve runs the CA until ctx ends.
func serve(ctx context.Context, args []string, stderr io.Writer) error {
	cfg, err := loadConfig(args)
	if err != nil {
		return err
	}
	logger := newLogger(cfg, stderr)
	td := spiffeid.RequireTrustDomainFromString(cfg.TrustDomain)
	operatorID := spiffeid.RequireFromPath(td, operatorPath)
	if err := os.MkdirAll(cfg.DataDir, 0o700); err != nil {
		return fmt.Errorf("data dir: %w", err)
	}

	store, err := openAuditStore(ctx, cfg, logger)
	if err != nil {
		return fmt.Errorf("open audit store: %w", err)
	}
	defer store.Close()

	authority := ca.NewAuthority()
	rot, err := startSigner(ctx, cfg, td, authority, store, logger)
	if err != nil {
		return err
	}
	// Local CAs run through the rotation manager, which tracks what each CA
	// issued; remote backends (Vault, CAS) rotate their own keys.
	var (
		issuerAudit ca.AuditLog = store
		rotationAPI admin.Rotation
	)
	if rot != nil {
		issuerAudit, rotationAPI = rot.TrackDependents(store), rot
	}

	chain := authn.Chain{
		&authn.ClientCert{TrustDomain: td, Roots: authority.Roots, Operators: []spiffeid.ID{operatorID}},
	}
	// OIDC goes before Kubernetes tokens: it claims only tokens whose iss is
	// one of its issuers and passes every other token on.
	if len(cfg.OIDC.Issuers) > 0 {
		oidcAuthn, err := authn.NewOIDC(ctx, authn.OIDCOptions{TrustDomain: td, Config: cfg.OIDC, Logger: logger})
		if err != nil {
			return err
		}
		chain = append(chain, oidcAuthn)
	}
	// Kubernetes service-account tokens come last: they claim every bearer token left.
	kubeParts, err := startKube(ctx, cfg, td, authority, logger)
	if err != nil {
		return err
	}
	var nodeAuthz ca.NodeAuthorizer
	if kubeParts != nil {
		chain = append(chain, kubeParts.authenticator)
		nodeAuthz = kubeParts.nodes
	}

	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	issuer, err := ca.NewIssuer(ca.Config{
		TrustDomain:    td,
		TTL:            ca.TTLPolicy{Default: cfg.DefaultTTL, Max: cfg.MaxTTL, Mode: ca.TTLMode(cfg.TTLPolicy)},
		ClockSkew:      cfg.ClockSkew,
		Authenticator:  chain,
		NodeAuthorizer: nodeAuthz,
		Audit:          issuerAudit,
		Authority:      authority,
		Metrics:        ca.NewMetrics(reg),
		Logger:         logger,
		MaxInFlight:    cfg.MaxInFlight,
		AuditTimeout:   cfg.AuditTimeout,
	})
	if err != nil {
		return err
	}
	serving := &ca.ServingCert{Issuer: issuer, DNSNames: cfg.ServingDNSNames, TTL: cfg.ServingCertTTL, Logger: logger}
	if _, err := serving.Current(ctx); err != nil {
		return fmt.Errorf("serving certificate: %w", err)
	}
	if err := ensureOperatorCredential(ctx, issuer, authority, cfg, operatorID, logger); err != nil {
		return err
	}
	// Written once before serving, so castellanctl (which reads it as soon as
	// server.json exists) never finds it missing; then kept current.
	bundlePath := filepath.Join(cfg.DataDir, datadir.RootCert)
	if err := atomicfile.Write(bundlePath, []byte(authority.Current().BundlePEM), 0o644); err != nil {
		return fmt.Errorf("write trust bundle: %w", err)
	}
	go publishBundle(ctx, authority, bundlePath, logger)
	go keepOperatorCredential(ctx, issuer, authority, cfg, operatorID, logger)
	stopBundleEndpoint, err := startBundleEndpoint(ctx, cfg, td, authority, issuer, logger)
	if err != nil {
		return err
	}
	defer stopBundleEndpoint()

	lis, err := net.Listen("tcp", cfg.Listen)
	if err != nil {
		return fmt.Errorf("listen: %w", err)
	}
	srv := grpc.NewServer(
		grpc.Creds(credentials.NewTLS(&tls.Config{
			MinVersion: tls.VersionTLS12,
			// Requested, not required: only VMs renewing with an existing certificate
			// send one; authn.ClientCert verifies it so that failures are audited.
			ClientAuth:     tls.RequestClientCert,
			GetCertificate: serving.GetCertificate,
		})),
		grpc.MaxRecvMsgSize(cfg.MaxRecvBytes),
		// Istio's clients ping after 30 s idle; allow down to 10 s so they are never cut off.
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: 10 * time.Second, PermitWithoutStream: true}),
		grpc.KeepaliveParams(keepalive.ServerParameters{Time: 2 * time.Minute, Timeout: 20 * time.Second}),
	)
	authpb.RegisterIstioCertificateServiceServer(srv, &ca.Server{Issuer: issuer})
	adminpb.RegisterAdminServiceServer(srv, &admin.Server{Issuer: issuer, Audit: store, Rotation: rotationAPI, Logger: logger})

	// Ready means able to issue: each component that can stop issuance adds a check.
	ready := []readyCheck{
		{"signer", func(context.Context) error {
			if authority.Current() == nil {
				return errors.New("no active signer")
			}
			return nil
		}},
		{"audit store", store.Ping},
		{"serving certificate", func(ctx context.Context) error { _, err := serving.Current(ctx); return err }},
	}
	if kubeParts != nil {
		ready = append(ready, kubeParts.ready)
	}
	// server.json before /readyz answers: whoever waits for readiness (the
	// e2e harness, a readiness gate) may run castellanctl at once.
	infoPath := filepath.Join(cfg.DataDir, datadir.ServerInfo)
	if err := writeServerInfo(infoPath, cfg, lis.Addr()); err != nil {
		lis.Close()
		return err
	}
	// A stale server.json would send castellanctl to a dead address.
	defer os.Remove(infoPath)
	mon, err := startMonitoring(cfg.MonitoringListen, reg, ready, logger)
	if err != nil {
		lis.Close()
		return err
	}
	defer func() {
		shutCtx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		mon.srv.Shutdown(shutCtx)
	}()
	logger.Info("castellan serving", "listen", lis.Addr().String(), "monitoring", mon.addr, "trust_domain", td.Name(),
		"signer", authority.Current().Backend, "data_dir", cfg.DataDir)

	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(lis) }()
	select {
	case err := <-errc:
		return fmt.Errorf("grpc server: %w", err)
	case <-ctx.Done():
	}
	logger.Info("shutting down")
	stopped := make(chan struct{})
	go func() { srv.GracefulStop(); close(stopped) }()
	select {
	case <-stopped:
	case <-time.After(10 * time.Second):
		srv.Stop()
	}
	return nil
}

// startSigner loads the configured backend into authority. The local
// backends (selfsigned, intermediate) run through the CA rotation manager,
// which it returns; the remote ones (vault, googlecas) return nil.
func startSigner(ctx context.Context, cfg Config, td spiffeid.TrustDomain, authority *ca.Authority, store auditStore, logger *slog.Logger) (*rotation.Manager, error) {
	switch cfg.Signer {
	case vault.Backend:
		return nil, startVault(ctx, cfg, authority, &ca.Auditor{Log: store, Timeout: cfg.AuditTimeout, Logger: logger}, logger)
	case googlecas.Backend:
		return nil, startGoogleCAS(ctx, cfg, authority, &ca.Auditor{Log: store, Timeout: cfg.AuditTimeout, Logger: logger}, logger)
	}
	m, err := startRotation(ctx, cfg, td, authority, store, logger)
	if err != nil {
		return nil, err
	}
	go m.Run(ctx)
	return m, nil
}

// ensureOperatorCredential writes castellanctl's client certificate on first
// start, and replaces it when it no longer chains to the trust bundle or is
// past two thirds of its life.
func ensureOperatorCredential(ctx context.Context, issuer *ca.Issuer, authority *ca.Authority, cfg Config, id spiffeid.ID, logger *slog.Logger) error {
	dir := filepath.Join(cfg.DataDir, datadir.OperatorDir)
	certPath, keyPath := filepath.Join(dir, datadir.OperatorCert), filepath.Join(dir, datadir.OperatorKey)
	if b, err := os.ReadFile(certPath); err == nil {
		if certs, err := signer.ParseCertificatesPEM(b); err == nil {
			leaf := certs[0]
			inter := x509.NewCertPool()
			for _, c := range certs[1:] {
				inter.AddCert(c)
			}
			_, verr := leaf.Verify(x509.VerifyOptions{Roots: authority.Roots(), Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}})
			renewAt := leaf.NotBefore.Add(leaf.NotAfter.Sub(leaf.NotBefore) * 2 / 3)
			if _, kerr := os.Stat(keyPath); verr == nil && kerr == nil && time.Now().Before(renewAt) && issuedByActive(leaf, authority) {
				return nil
			}
		}
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("operator credential dir: %w", err)
	}
	key, err := keyfile.GenerateKey("ecdsa-p256")
	if err != nil {
		return err
	}
	chain, _, err := issuer.IssueInternal(ctx, "operator credential", ca.ClientTemplate(id.URL()), key, cfg.OperatorCertTTL)
	if err != nil {
		return err
	}
	keyPEM, err := keyfile.MarshalPrivateKeyPEM(key)
	if err != nil {
		return err
	}
	if err := atomicfile.Write(keyPath, keyPEM, 0o600); err != nil {
		return fmt.Errorf("write operator key: %w", err)
	}
	if err := atomicfile.Write(certPath, []byte(signer.EncodePEM(append([]*x509.Certificate{chain.Leaf}, chain.Intermediates...)...)), 0o644); err != nil {
		return fmt.Errorf("write operator certificate: %w", err)
	}
	logger.Info("operator credential written", "identity", id.String(), "dir", dir, "not_after", chain.Leaf.NotAfter)
	return nil
}

// publishBundle keeps path equal to the current trust bundle.
func publishBundle(ctx context.Context, authority *ca.Authority, path string, logger *slog.Logger) {
	for {
		changed := authority.Changed()
		if st := authority.Current(); st != nil {
			if err := atomicfile.Write(path, []byte(st.BundlePEM), 0o644); err != nil {
				logger.Error("write trust bundle", "path", path, "error", err)
			}
		}
		select {
		case <-ctx.Done():
			return
		case <-changed:
		}
	}
}

// writeServerInfo tells castellanctl where to connect.
func writeServerInfo(path string, cfg Config, addr net.Addr) error {
	host, port, err := net.SplitHostPort(addr.String())
	if err != nil {
		return err
	}
	if ip := net.ParseIP(host); ip == nil || ip.IsUnspecified() {
		host = "localhost"
	}
	b, err := json.MarshalIndent(datadir.Server{Address: net.JoinHostPort(host, port), ServerName: cfg.ServingDNSNames[0],
		TrustDomain: cfg.TrustDomain}, "", "  ")
	if err != nil {
		return err
	}
	return atomicfile.Write(path, append(b, '\n'), 0o644)
}

type monitoring struct {
	srv  *http.Server
	addr string
}

// readyCheck is one condition of /readyz.
type readyCheck struct {
	name  string
	check func(context.Context) error
}

// startMonitoring serves /metrics, /healthz (process alive) and /readyz (can issue).
func startMonitoring(addr string, reg *prometheus.Registry, ready []readyCheck, logger *slog.Logger) (*monitoring, error) {
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{Registry: reg}))
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) { io.WriteString(w, "ok\n") })
	mux.HandleFunc("/readyz", func(w http.ResponseWriter, r *http.Request) {
		ctx, cancel := context.WithTimeout(r.Context(), 2*time.Second)
		defer cancel()
		for _, c := range ready {
			if err := c.check(ctx); err != nil {
				http.Error(w, "not ready: "+c.name+": "+err.Error(), http.StatusServiceUnavailable)
				return
			}
		}
		io.WriteString(w, "ok\n")
	})
	lis, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("monitoring listen: %w", err)
	}
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	go func() {
		if err := srv.Serve(lis); err != nil && !errors.Is(err, http.ErrServerClosed) {
			logger.Error("monitoring server", "error", err)
		}
	}()
	return &monitoring{srv: srv, addr: lis.Addr().String()}, nil
}

func newLogger(cfg Config, w io.Writer) *slog.Logger {
	var level slog.Level
	_ = level.UnmarshalText([]byte(cfg.LogLevel))
	opts := &slog.HandlerOptions{Level: level}
	if cfg.LogFormat == "json" {
		return slog.New(slog.NewJSONHandler(w, opts))
	}
	return slog.New(slog.NewTextHandler(w, opts))
}
