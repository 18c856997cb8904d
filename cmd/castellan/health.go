package main

import (
	"context"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	adminpb "github.com/castellan-ca/castellan/proto/castellan/admin/v1"
	authpb "github.com/castellan-ca/castellan/proto/istio/v1/auth"
	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"
)

// healthInterval is how often the readiness checks are re-evaluated for the
// gRPC health service: Check answers from memory, so a flood of probes costs
// no store or signer call.
const healthInterval = 2 * time.Second

// readyTimeout bounds one evaluation of the readiness checks (/readyz and the
// gRPC health service alike).
const readyTimeout = 2 * time.Second

// maxHealthWatchers bounds the Watch streams open at once. Health calls do
// not count against the admission stream bound (ca.Admission.Tap), so that
// watchers never crowd out certificate requests; this bounds them instead.
const maxHealthWatchers = 256

// healthServices are the names the health service reports: "" (the whole
// server) and each service the gRPC port serves. All share one status, since
// each needs the same signer, audit store and serving certificate.
var healthServices = []string{
	"",
	authpb.IstioCertificateService_ServiceDesc.ServiceName,
	adminpb.AdminService_ServiceDesc.ServiceName,
}

// healthService is grpc.health.v1 on the gRPC port: the library's server,
// fed by the /readyz checks (set), NOT_SERVING for good once the drain begins
// (drain). Watch streams end once they have told their client NOT_SERVING in
// the drain, so that they do not hold up the graceful stop.
type healthService struct {
	*health.Server
	// draining ends when the drain begins.
	draining context.Context
	drained  context.CancelFunc
	watchers chan struct{} // a token per open Watch stream
	logger   *slog.Logger
	// up, when set, gets each check's outcome.
	up *prometheus.GaugeVec
	// serving is the last evaluation's outcome, to log changes only; it
	// starts true, so that a failing first evaluation is logged.
	serving atomic.Bool
}

func newHealthService(logger *slog.Logger) *healthService {
	h := &healthService{Server: health.NewServer(), watchers: make(chan struct{}, maxHealthWatchers), logger: logger}
	h.draining, h.drained = context.WithCancel(context.Background())
	h.serving.Store(true)
	h.set(healthpb.HealthCheckResponse_NOT_SERVING) // until the first evaluation
	return h
}

// set gives every reported service st; after drain it changes nothing.
func (h *healthService) set(st healthpb.HealthCheckResponse_ServingStatus) {
	for _, svc := range healthServices {
		h.SetServingStatus(svc, st)
	}
}

// evaluate runs the checks once, as /readyz does: warnOnly failures leave
// the server SERVING. Unlike /readyz it runs every check, so that each one's
// outcome is exported (castellan_component_up) whatever the others do.
func (h *healthService) evaluate(ctx context.Context, checks []readyCheck) {
	errs := runEachCheck(ctx, checks)
	var (
		failed string
		err    error
	)
	for i, c := range checks {
		if h.up != nil {
			up := 0.0
			if errs[i] == nil {
				up = 1
			}
			h.up.WithLabelValues(c.name).Set(up)
		}
		if errs[i] != nil && !c.warnOnly && err == nil {
			failed, err = c.name, errs[i]
		}
	}
	if err != nil {
		if h.serving.Swap(false) {
			h.logger.Warn("grpc health: NOT_SERVING", "check", failed, "error", err)
		}
		h.set(healthpb.HealthCheckResponse_NOT_SERVING)
		return
	}
	if !h.serving.Swap(true) {
		h.logger.Info("grpc health: SERVING")
	}
	h.set(healthpb.HealthCheckResponse_SERVING)
}

// runEachCheck runs every check at once, each bounded by readyTimeout, so
// that one that hangs neither delays nor hides the others' outcomes.
func runEachCheck(ctx context.Context, checks []readyCheck) []error {
	errs := make([]error, len(checks))
	var wg sync.WaitGroup
	for i, c := range checks {
		wg.Go(func() {
			ctx, cancel := context.WithTimeout(ctx, readyTimeout)
			defer cancel()
			errs[i] = c.check(ctx)
		})
	}
	wg.Wait()
	return errs
}

// newComponentUp is castellan_component_up, registered with reg.
func newComponentUp(reg prometheus.Registerer) *prometheus.GaugeVec {
	up := prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "castellan_component_up",
		Help: "1 when a component's readiness check (the /readyz checks: signer, audit store, serving certificate, kubernetes, root configmaps) passed at its last evaluation, every " + healthInterval.String() + "; 0 when it failed."},
		[]string{"component"})
	reg.MustRegister(up)
	return up
}

// run re-evaluates the checks every healthInterval until ctx ends.
func (h *healthService) run(ctx context.Context, checks []readyCheck) error {
	t := time.NewTicker(healthInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
			h.evaluate(ctx, checks)
		}
	}
}

// drain makes every service NOT_SERVING for good, before the graceful stop,
// so that load balancers stop sending while calls in flight finish.
func (h *healthService) drain() {
	h.drained() // first: a Send after Shutdown's update sees the drain
	h.Shutdown()
}

func (h *healthService) isDraining() bool { return h.draining.Err() != nil }

// Watch is the library's Watch, bounded to maxHealthWatchers streams, and
// ended with Unavailable once it has sent a non-SERVING status during the
// drain (the client reconnects elsewhere).
func (h *healthService) Watch(req *healthpb.HealthCheckRequest, stream healthpb.Health_WatchServer) error {
	select {
	case h.watchers <- struct{}{}:
		defer func() { <-h.watchers }()
	default:
		return status.Error(codes.ResourceExhausted, "too many health watchers")
	}
	ctx, cancel := context.WithCancel(stream.Context())
	defer cancel()
	w := &drainWatch{Health_WatchServer: stream, ctx: ctx, cancel: cancel, h: h}
	stop := context.AfterFunc(h.draining, w.endIfNotServing)
	defer stop()
	err := h.Server.Watch(req, w)
	if h.isDraining() && stream.Context().Err() == nil {
		return status.Error(codes.Unavailable, "server is shutting down")
	}
	return err
}

// drainWatch is a Watch stream that the drain ends once its client has been
// told a non-SERVING status.
type drainWatch struct {
	healthpb.Health_WatchServer
	ctx    context.Context
	cancel context.CancelFunc
	h      *healthService

	mu         sync.Mutex
	notServing bool // the last status sent is not SERVING
}

func (w *drainWatch) Context() context.Context { return w.ctx }

// Send sends m and ends the stream if the drain has begun and m is not SERVING.
func (w *drainWatch) Send(m *healthpb.HealthCheckResponse) error {
	w.mu.Lock()
	err := w.Health_WatchServer.Send(m)
	w.notServing = err == nil && m.GetStatus() != healthpb.HealthCheckResponse_SERVING
	end := w.notServing && w.h.isDraining()
	w.mu.Unlock()
	if end {
		w.cancel()
	}
	return err
}

// endIfNotServing ends the stream at the drain's start when its client
// already knows the server is not serving (no further update would come).
func (w *drainWatch) endIfNotServing() {
	w.mu.Lock()
	end := w.notServing
	w.mu.Unlock()
	if end {
		w.cancel()
	}
}
