package main

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	httppprof "net/http/pprof"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/castellan-ca/castellan/authn"
	"github.com/castellan-ca/castellan/ca"
	"github.com/castellan-ca/castellan/ca/admin"
	"github.com/castellan-ca/castellan/ca/bundleserver"
	"github.com/castellan-ca/castellan/cmd/internal/datadir"
	"github.com/castellan-ca/castellan/internal/atomicfile"
	"github.com/castellan-ca/castellan/internal/netlimit"
	adminpb "github.com/castellan-ca/castellan/proto/castellan/admin/v1"
	authpb "github.com/castellan-ca/castellan/proto/istio/v1/auth"
	"github.com/castellan-ca/castellan/signer/awspca"
	"github.com/castellan-ca/castellan/signer/googlecas"
	"github.com/castellan-ca/castellan/signer/kubernetes"
	"github.com/castellan-ca/castellan/signer/vault"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
)

// operatorPath is the SPIFFE path of the castellanctl credential; it is not a
// workload path, so no workload request can ever be granted it.
const operatorPath = "/castellan/operator"

// serve runs the CA until ctx ends.
func serve(ctx context.Context, args []string, stderr io.Writer) error {
	return serveWith(ctx, args, stderr, faultHooks{})
}

// faultHooks are the fault-injection seams of in-process tests; main sets none.
type faultHooks struct {
	// beforeSign becomes ca.Config.BeforeSign of the workload pipeline.
	beforeSign func(ctx context.Context, grant spiffeid.ID)
}

// serveWith is serve with test hooks.
func serveWith(ctx context.Context, args []string, stderr io.Writer, hooks faultHooks) error {
	cfg, err := loadConfig(args)
	if err != nil {
		return err
	}
	logger := newLogger(cfg, stderr)
	if err := os.MkdirAll(cfg.DataDir, 0o700); err != nil {
		return fmt.Errorf("data dir: %w", err)
	}
	s := newServer(ctx, cfg, logger)
	s.hooks = hooks
	if err := s.start(ctx); err != nil {
		_ = s.lc.shutdown() // stop what started; the start error is the one to report
		return err
	}
	logger.Info("castellan serving", "listen", s.grpcAddr, "monitoring", s.monitoringAddr, "trust_domain", s.td.Name(),
		"signer", s.authority.Current().Backend, "data_dir", cfg.DataDir)
	return s.lc.wait(ctx, cfg.ShutdownGracePeriod)
}

// server is what serve builds, one component after the other; each start
// step adds a component to the lifecycle and fills the fields later ones use.
type server struct {
	cfg        Config
	logger     *slog.Logger
	td         spiffeid.TrustDomain
	operatorID spiffeid.ID
	lc         *lifecycle
	registry   *prometheus.Registry
	hooks      faultHooks

	store     auditStore
	authority *ca.Authority
	// issuerAudit is the workload audit log: the store, through the rotation
	// manager's dependents tracker when local CAs rotate.
	issuerAudit ca.AuditLog
	rotation    admin.Rotation
	authn       authn.Chain
	nodes       ca.NodeAuthorizer
	kube        *kubeParts   // nil when Kubernetes is off
	ready       []readyCheck // what /readyz checks beyond signer, store and serving certificate
	issuer      *ca.Issuer
	serving     *ca.ServingCert
	health      *healthService

	grpcAddr, monitoringAddr string
}

func newServer(ctx context.Context, cfg Config, logger *slog.Logger) *server {
	td := spiffeid.RequireTrustDomainFromString(cfg.TrustDomain)
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return &server{cfg: cfg, logger: logger, td: td, operatorID: spiffeid.RequireFromPath(td, operatorPath),
		lc: newLifecycle(ctx, logger), registry: reg, authority: ca.NewAuthority()}
}

// start starts the components in order: the audit store first (it closes
// last, after every writer), the listeners last (they stop first).
func (s *server) start(ctx context.Context) error {
	for _, step := range []func(context.Context) error{
		s.startStore, s.startSigner, s.startAuthn, s.startIssuer, s.startKubeSigners, s.startPublish, s.startTrustFiles,
		s.startBundleEndpoint, s.startAdmission, s.startGRPC, s.startMonitoring, s.startHealth,
	} {
		if err := step(ctx); err != nil {
			return err
		}
	}
	return nil
}

// startStore opens the audit store.
func (s *server) startStore(ctx context.Context) error {
	store, err := openAuditStore(ctx, s.cfg, s.logger)
	if err != nil {
		return fmt.Errorf("open audit store: %w", err)
	}
	s.lc.start("audit store").onStop(func() {
		if err := store.Close(); err != nil {
			s.logger.Error("audit store close", "error", err)
		}
	})
	s.store, s.issuerAudit = store, store
	return nil
}

// startSigner puts the configured backend to use. The local backends
// (selfsigned, intermediate) run through the CA rotation manager, which
// tracks what each CA issued; the remote ones (Vault, CAS, AWS PCA, a
// Kubernetes signer) rotate their own keys and only report bundle changes.
func (s *server) startSigner(ctx context.Context) error {
	c := s.lc.start("signer")
	audit := &ca.Auditor{Log: s.store, Timeout: s.cfg.AuditTimeout, Logger: s.logger}
	switch s.cfg.Signer {
	case vault.Backend:
		return startVault(ctx, c, s.cfg, s.authority, audit, s.logger)
	case googlecas.Backend:
		return startGoogleCAS(ctx, c, s.cfg, s.authority, audit, s.logger)
	case awspca.Backend:
		return startAWSPCA(ctx, c, s.cfg, s.authority, audit, s.logger)
	case kubernetes.Backend:
		return startKubernetesSigner(c, s.cfg, s.authority, audit, s.logger) //nolint:contextcheck // it blocks on nothing; the signer's loop runs under c's context
	}
	keys, err := openKeyProvider(ctx, s.cfg, s.logger)
	if err != nil {
		return err
	}
	if keys != nil {
		c.onStop(func() { _ = keys.Close() })
	}
	m, err := startRotation(ctx, s.cfg, s.td, s.authority, s.store, keys, s.logger)
	if err != nil {
		return err
	}
	c.Go(m.Run)
	s.issuerAudit, s.rotation = m.TrackDependents(s.store), m
	return nil
}

// startAuthn builds the authenticator chain: client certificates (the
// operator's among them), OIDC, then Kubernetes service-account tokens.
func (s *server) startAuthn(ctx context.Context) error {
	c := s.lc.start("authentication")
	s.authn = authn.Chain{
		&authn.ClientCert{TrustDomain: s.td, Roots: s.authority.Roots, Operators: []spiffeid.ID{s.operatorID}},
	}
	// OIDC goes before Kubernetes tokens: it claims only tokens whose iss is
	// one of its issuers and passes every other token on.
	if len(s.cfg.OIDC.Issuers) > 0 {
		// NewOIDC does not block: c.ctx bounds its background discovery,
		// which must run until shutdown reaches this component, not stop
		// when serve's ctx ends while later components still take requests.
		oidcAuthn, err := authn.NewOIDC(c.ctx, authn.OIDCOptions{TrustDomain: s.td, Config: s.cfg.OIDC, Logger: s.logger}) //nolint:contextcheck // c.ctx is the component's lifetime, derived from serve's ctx by lifecycle.start (WithoutCancel, then ended by shutdown)
		if err != nil {
			return err
		}
		c.onStop(oidcAuthn.Stopped)
		s.authn = append(s.authn, oidcAuthn)
	}
	// Kubernetes service-account tokens come last: they claim every bearer token left.
	kubeParts, err := startKube(ctx, c, s.cfg, s.td, s.logger)
	if err != nil || kubeParts == nil {
		return err
	}
	s.authn = append(s.authn, kubeParts.authenticator)
	s.nodes, s.kube = kubeParts.nodes, kubeParts
	s.ready = append(s.ready, kubeParts.ready)
	return nil
}

// startIssuer builds the pipeline, its serving certificate and the operator
// credential, which it keeps under the active CA.
func (s *server) startIssuer(ctx context.Context) error {
	c := s.lc.start("issuer")
	issuer, err := ca.NewIssuer(ca.Config{
		TrustDomain:    s.td,
		TTL:            ca.TTLPolicy{Default: s.cfg.DefaultTTL, Max: s.cfg.MaxTTL, Mode: ca.TTLMode(s.cfg.TTLPolicy)},
		ClockSkew:      s.cfg.ClockSkew,
		Authenticator:  s.authn,
		NodeAuthorizer: s.nodes,
		Audit:          s.issuerAudit,
		Authority:      s.authority,
		Metrics:        ca.NewMetrics(s.registry),
		Logger:         s.logger,
		MaxInFlight:    s.cfg.MaxInFlight,
		AuditTimeout:   s.cfg.AuditTimeout,
		Limits:         s.cfg.admission(),
		BeforeSign:     s.hooks.beforeSign,
	})
	if err != nil {
		return err
	}
	s.issuer = issuer
	s.serving = &ca.ServingCert{Issuer: issuer, DNSNames: s.cfg.ServingDNSNames, TTL: s.cfg.ServingCertTTL, Logger: s.logger}
	if _, err := s.serving.Current(ctx); err != nil {
		return fmt.Errorf("serving certificate: %w", err)
	}
	if err := ensureOperatorCredential(ctx, issuer, s.authority, s.cfg, s.operatorID, s.logger); err != nil {
		return err
	}
	c.Go(func(ctx context.Context) error {
		keepOperatorCredential(ctx, issuer, s.authority, s.cfg, s.operatorID, s.logger)
		return nil
	})
	return nil
}

// startTrustFiles writes the trust bundle into the data directory and keeps
// it current. It is written once before serving, so castellanctl (which
// reads it as soon as server.json exists) never finds it missing.
func (s *server) startTrustFiles(context.Context) error {
	path := filepath.Join(s.cfg.DataDir, datadir.RootCert)
	if err := atomicfile.Write(path, []byte(s.authority.Current().BundlePEM), 0o644); err != nil {
		return fmt.Errorf("write trust bundle: %w", err)
	}
	s.lc.start("trust bundle file").Go(func(ctx context.Context) error {
		publishBundle(ctx, s.authority, path, s.logger)
		return nil
	})
	return nil
}

// startBundleEndpoint serves the SPIFFE bundle endpoint when configured.
func (s *server) startBundleEndpoint(ctx context.Context) error {
	if s.cfg.BundleEndpointListen == "" {
		return nil
	}
	srv, err := bundleserver.New(ctx, bundleserver.Config{Authority: s.authority, TrustDomain: s.td, Addr: s.cfg.BundleEndpointListen,
		Auth: s.cfg.BundleEndpointAuth, Issuer: s.issuer, CertFile: s.cfg.BundleEndpointCertFile, KeyFile: s.cfg.BundleEndpointKeyFile,
		RefreshHint: s.cfg.BundleRefreshHint, Limits: s.cfg.http(), Logger: s.logger.With("component", "bundle-endpoint")})
	if err != nil {
		return err
	}
	registerListener(s.registry, "bundle-endpoint", srv.Listener())
	c := s.lc.start("bundle endpoint")
	c.Go(func(context.Context) error { return srv.Serve() })
	c.onStop(func() { closeWithin(ctx, httpStopTimeout, srv.Close) })
	return nil
}

// startAdmission summarises the calls the admission checks refused in the
// audit log. It stops after the gRPC server, so its last summary counts
// every refusal, and before the audit store closes.
func (s *server) startAdmission(context.Context) error {
	s.lc.start("admission").Go(s.issuer.Admission().Run)
	return nil
}

// startGRPC serves Istio's CA API and the admin API, and tells castellanctl
// where (server.json, removed again at shutdown: a stale one would send
// castellanctl to a dead address).
func (s *server) startGRPC(context.Context) error {
	raw, err := net.Listen("tcp", s.cfg.Listen)
	if err != nil {
		return fmt.Errorf("listen: %w", err)
	}
	lis := netlimit.NewListener(raw, s.cfg.MaxConnections)
	registerListener(s.registry, "grpc", lis)
	srv := grpc.NewServer(append(s.cfg.grpcOptions(s.issuer.Admission()),
		grpc.Creds(credentials.NewTLS(&tls.Config{
			MinVersion: tls.VersionTLS12,
			// Requested, not required: only VMs renewing with an existing certificate
			// send one; authn.ClientCert verifies it so that failures are audited.
			// A resumed session carries the certificate of its first handshake:
			// ClientCert verifies it against the current bundle on every call,
			// so a session outliving its root's retirement authenticates nothing.
			ClientAuth:     tls.RequestClientCert,
			GetCertificate: s.serving.GetCertificate,
		})),
		grpc.MaxRecvMsgSize(s.cfg.MaxRecvBytes),
		// Stop returns only once every handler has: none still writes to the audit store.
		grpc.WaitForHandlers(true),
	)...)
	authpb.RegisterIstioCertificateServiceServer(srv, &ca.Server{Issuer: s.issuer})
	adminpb.RegisterAdminServiceServer(srv, &admin.Server{Issuer: s.issuer, Audit: s.store, Rotation: s.rotation, Logger: s.logger})
	s.health = newHealthService(s.logger)
	healthpb.RegisterHealthServer(srv, s.health)
	c := s.lc.start("grpc")
	c.Go(func(context.Context) error {
		// ErrServerStopped: the shutdown came before Serve began (a signal
		// right after start); the listener is closed and nothing was served.
		if err := srv.Serve(lis); err != nil && !errors.Is(err, grpc.ErrServerStopped) {
			return fmt.Errorf("grpc server: %w", err)
		}
		return nil
	})
	c.onStop(func() { gracefulStop(srv, s.cfg.grpcDrain(s.cfg.AuditTimeout)) })
	s.grpcAddr = lis.Addr().String()
	// server.json before /readyz answers: whoever waits for readiness (the
	// e2e harness, a readiness gate) may run castellanctl at once.
	infoPath := filepath.Join(s.cfg.DataDir, datadir.ServerInfo)
	if err := writeServerInfo(infoPath, s.cfg, lis.Addr()); err != nil {
		return err
	}
	c.onStop(func() { _ = os.Remove(infoPath) })
	return nil
}

// gracefulStop lets calls in flight finish for up to timeout, then cancels
// them; their clients see Unavailable, and their handlers still finish
// their audit records before Stop returns.
func gracefulStop(srv *grpc.Server, timeout time.Duration) {
	t := time.AfterFunc(timeout, srv.Stop)
	defer t.Stop()
	srv.GracefulStop()
	srv.Stop() // waits for the handlers a timed-out graceful stop cancelled
}

// httpStopTimeout is how long an HTTP listener's requests in flight get at
// shutdown: they are small GETs.
const httpStopTimeout = time.Second

// closeWithin calls closeFn at shutdown, when ctx (serve's) may have ended:
// with ctx's values, detached from its cancellation and bounded by timeout.
func closeWithin(ctx context.Context, timeout time.Duration, closeFn func(context.Context) error) {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), timeout)
	defer cancel()
	_ = closeFn(ctx)
}

// startHealth feeds the gRPC health service from the /readyz checks. It is
// the last component started, so the first stopped: the drain begins with
// every service NOT_SERVING, before the listeners stop.
func (s *server) startHealth(ctx context.Context) error {
	checks := s.readyChecks()
	s.health.evaluate(ctx, checks) // before "castellan serving" is logged
	c := s.lc.start("health")
	c.Go(func(ctx context.Context) error { return s.health.run(ctx, checks) })
	c.onStop(s.health.drain)
	return nil
}

// readyChecks are the conditions of /readyz and of the gRPC health service:
// each component that can stop issuance added one.
func (s *server) readyChecks() []readyCheck {
	return append([]readyCheck{
		{name: "signer", check: func(ctx context.Context) error {
			st := s.authority.Current()
			if st == nil {
				return errors.New("no active signer")
			}
			// A CA key in an HSM or KMS: can its provider sign now?
			if c, ok := st.Signer.(checker); ok {
				return c.Check(ctx)
			}
			return nil
		}},
		{name: "audit store", check: s.store.Ping},
		{name: "serving certificate", check: func(ctx context.Context) error { _, err := s.serving.Current(ctx); return err }},
	}, s.ready...)
}

// startMonitoring serves /metrics, /healthz (process alive) and /readyz (can
// issue: see readyChecks).
func (s *server) startMonitoring(ctx context.Context) error {
	ready := s.readyChecks()
	raw, err := net.Listen("tcp", s.cfg.MonitoringListen)
	if err != nil {
		return fmt.Errorf("monitoring listen: %w", err)
	}
	limits := s.cfg.http()
	lis := limits.Listen(raw)
	registerListener(s.registry, "monitoring", lis)
	srv := limits.Server(monitoringHandler(s.registry, ready, s.cfg.DebugPprof))
	c := s.lc.start("monitoring")
	c.Go(func(context.Context) error {
		if err := srv.Serve(lis); !errors.Is(err, http.ErrServerClosed) {
			s.logger.Error("monitoring server", "error", err)
		}
		return nil
	})
	c.onStop(func() {
		closeWithin(ctx, httpStopTimeout, srv.Shutdown)
		_ = srv.Close() // whatever did not finish in time
	})
	s.monitoringAddr = lis.Addr().String()
	return nil
}

// registerListener exports a listener's open and refused connections.
func registerListener(reg prometheus.Registerer, name string, l *netlimit.Listener) {
	labels := prometheus.Labels{"listener": name}
	reg.MustRegister(
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "castellan_connections_open", ConstLabels: labels,
			Help: "Connections open, by listener."}, func() float64 { return float64(l.Open()) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "castellan_connections_max", ConstLabels: labels,
			Help: "Connections a listener holds at most; further ones are closed at accept."}, func() float64 { return float64(l.Max()) }),
		prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "castellan_connections_refused_total", ConstLabels: labels,
			Help: "Connections closed at accept because the listener held its maximum, by listener."}, func() float64 { return float64(l.Refused()) }),
	)
}

// checker is a signer that can tell whether it can sign now (a local CA
// whose key is in an HSM or KMS).
type checker interface {
	Check(ctx context.Context) error
}

// readyCheck is one condition of /readyz.
type readyCheck struct {
	name  string
	check func(context.Context) error
	// warnOnly checks are details: their failure is shown in the answer,
	// which stays 200 (issuance does not depend on them).
	warnOnly bool
}

// monitoringHandler serves /metrics, /healthz (process alive) and /readyz
// (every check passes; failing warnOnly checks are listed as warnings), and
// with pprof Go's profiles under /debug/pprof/ (`make profile`). The pprof
// handlers are registered on this mux only when asked for: importing
// net/http/pprof adds them to http.DefaultServeMux, which nothing serves.
func monitoringHandler(reg *prometheus.Registry, ready []readyCheck, pprof bool) http.Handler {
	mux := http.NewServeMux()
	if pprof {
		mux.HandleFunc("/debug/pprof/", httppprof.Index)
		mux.HandleFunc("/debug/pprof/cmdline", httppprof.Cmdline)
		mux.HandleFunc("/debug/pprof/profile", httppprof.Profile)
		mux.HandleFunc("/debug/pprof/symbol", httppprof.Symbol)
		mux.HandleFunc("/debug/pprof/trace", httppprof.Trace)
	}
	mux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{Registry: reg}))
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) {
		_, _ = io.WriteString(w, "ok\n") // fails only when the prober hung up: no one left to tell
	})
	mux.HandleFunc("/readyz", func(w http.ResponseWriter, r *http.Request) {
		ctx, cancel := context.WithTimeout(r.Context(), readyTimeout)
		defer cancel()
		warnings, failed, err := runReadyChecks(ctx, ready)
		if err != nil {
			http.Error(w, "not ready: "+failed+": "+err.Error(), http.StatusServiceUnavailable)
			return
		}
		_, _ = io.WriteString(w, "ok\n"+strings.Join(warnings, "")) // fails only when the prober hung up: no one left to tell
	})
	return mux
}

// runReadyChecks runs the checks in order until one that is not warnOnly
// fails, and returns its name and error, with the warnings (one line each)
// of the warnOnly checks that failed before it.
func runReadyChecks(ctx context.Context, ready []readyCheck) (warnings []string, failed string, err error) {
	for _, c := range ready {
		err := c.check(ctx)
		switch {
		case err == nil:
		case c.warnOnly:
			warnings = append(warnings, "warning: "+c.name+": "+err.Error()+"\n")
		default:
			return warnings, c.name, err
		}
	}
	return warnings, "", nil
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
