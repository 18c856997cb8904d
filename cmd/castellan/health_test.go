package main

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"errors"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"syscall"
	"testing"

	adminpb "github.com/castellan-ca/castellan/proto/castellan/admin/v1"
	"github.com/castellan-ca/castellan/storage/postgres/pgtest"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"
)

// healthNames are the services the health service must report, by the
// names in proto/ (the overall status is "").
var healthNames = []string{"", "istio.v1.auth.IstioCertificateService", "castellan.admin.v1.AdminService"}

// probe is what grpc_health_probe does: a fresh TLS connection (no client
// certificate: health needs no authentication), one Check, the status or
// the call's error.
func probe(t *testing.T, s *testServer, service string) (healthpb.HealthCheckResponse_ServingStatus, error) {
	t.Helper()
	cfg := &tls.Config{MinVersion: tls.VersionTLS12, RootCAs: s.rootPool(t), ServerName: "istiod.istio-system.svc"}
	cc, err := grpc.NewClient(s.addr, grpc.WithTransportCredentials(credentials.NewTLS(cfg)))
	if err != nil {
		t.Fatal(err)
	}
	defer cc.Close()
	ctx, cancel := context.WithTimeout(context.Background(), callTimeout)
	defer cancel()
	resp, err := healthpb.NewHealthClient(cc).Check(ctx, &healthpb.HealthCheckRequest{Service: service})
	return resp.GetStatus(), err
}

// watchUntil opens a Watch on service and receives until want arrives.
func watchUntil(t *testing.T, hc healthpb.HealthClient, service string, want healthpb.HealthCheckResponse_ServingStatus) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), startTimeout)
	defer cancel()
	w, err := hc.Watch(ctx, &healthpb.HealthCheckRequest{Service: service})
	if err != nil {
		t.Fatalf("Watch(%q): %v", service, err)
	}
	for {
		resp, err := w.Recv()
		if err != nil {
			t.Fatalf("Watch(%q): %v before %s", service, err, want)
		}
		if resp.GetStatus() == want {
			return
		}
	}
}

// TestHealthAuditStoreDown runs serve on a real PostgreSQL audit store and
// stops the database: every reported service turns NOT_SERVING (and /readyz
// 503); once the database is back, SERVING (and /readyz 200) again.
func TestHealthAuditStoreDown(t *testing.T) {
	pg := pgtest.Start(t, pgtest.Options{})
	kek := filepath.Join(t.TempDir(), "kek")
	key := make([]byte, 32)
	_, _ = rand.Read(key) // never fails
	if err := os.WriteFile(kek, key, 0o600); err != nil {
		t.Fatal(err)
	}
	s := startServe(t, filepath.Join(t.TempDir(), "data"), "--audit-dsn", pg.CreateDB(t), "--ca-kek-file", kek)
	hc := healthpb.NewHealthClient(s.conn(t, false))
	readyz := func() int { code, _ := httpGet(t, "http://"+s.monAddr+"/readyz"); return code }

	steps := []struct {
		name      string
		act       func()
		want      healthpb.HealthCheckResponse_ServingStatus
		wantReady int
	}{
		{"started", func() {}, healthpb.HealthCheckResponse_SERVING, http.StatusOK},
		{"database stopped", func() { pg.Stop(t, syscall.SIGINT) }, healthpb.HealthCheckResponse_NOT_SERVING, http.StatusServiceUnavailable},
		{"database restarted", func() { pg.Restart(t) }, healthpb.HealthCheckResponse_SERVING, http.StatusOK},
	}
	for _, st := range steps {
		st.act()
		for _, svc := range healthNames {
			watchUntil(t, hc, svc, st.want)
			if got, err := probe(t, s, svc); err != nil || got != st.want {
				t.Errorf("%s: Check(%q) = %s, %v; want %s", st.name, svc, got, err, st.want)
			}
		}
		if got := readyz(); got != st.wantReady {
			t.Errorf("%s: /readyz %d, want %d", st.name, got, st.wantReady)
		}
	}
	if _, err := probe(t, s, "no.such.Service"); status.Code(err) != codes.NotFound {
		t.Errorf("Check of an unknown service: %v, want NotFound", err)
	}
}

// TestHealthDrain probes like grpc_health_probe around a graceful drain:
// SERVING before (for many more checks than any rate limit's burst, none of
// them audited); NOT_SERVING once the drain begins while a certificate
// request is still in flight, which then completes; a Watch stream ends with
// Unavailable after telling NOT_SERVING; after serve returned, the
// connection is refused.
func TestHealthDrain(t *testing.T) {
	entered, release := make(chan struct{}), make(chan struct{})
	hooks := faultHooks{beforeSign: func(_ context.Context, grant spiffeid.ID) {
		if grant.String() == slowID {
			close(entered)
			<-release
		}
	}}
	s := startServeWith(t, filepath.Join(t.TempDir(), "data"), hooks)
	admin := adminpb.NewAdminServiceClient(s.conn(t, true))
	hc := healthpb.NewHealthClient(s.conn(t, false))

	before := len(auditRecords(t, admin))
	ctx, cancel := context.WithTimeout(context.Background(), callTimeout)
	defer cancel()
	for i := range 300 { // thrice the default caller and peer bursts
		svc := healthNames[i%len(healthNames)]
		if resp, err := hc.Check(ctx, &healthpb.HealthCheckRequest{Service: svc}); err != nil || resp.GetStatus() != healthpb.HealthCheckResponse_SERVING {
			t.Fatalf("check %d of %q before the drain: %s, %v; want SERVING", i, svc, resp.GetStatus(), err)
		}
	}
	if after := len(auditRecords(t, admin)); after != before {
		t.Errorf("health checks added %d audit records, want none", after-before)
	}
	for _, svc := range healthNames {
		if got, err := probe(t, s, svc); err != nil || got != healthpb.HealthCheckResponse_SERVING {
			t.Errorf("probe %q before the drain: %s, %v; want SERVING", svc, got, err)
		}
	}

	watch, err := hc.Watch(ctx, &healthpb.HealthCheckRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if resp, err := watch.Recv(); err != nil || resp.GetStatus() != healthpb.HealthCheckResponse_SERVING {
		t.Fatalf("Watch before the drain: %s, %v; want SERVING", resp.GetStatus(), err)
	}

	slow := make(chan error, 1)
	go func() {
		resp, err := admin.IssueCertificate(ctx, &adminpb.IssueCertificateRequest{Csr: csrPEM(t), Identity: slowID, ValiditySeconds: 3600})
		if err == nil && len(resp.GetCertChain()) == 0 {
			err = errors.New("no certificate")
		}
		slow <- err
	}()
	<-entered // the call is in flight, inside the pipeline
	stopped := make(chan error, 1)
	go func() { stopped <- s.stop() }()

	if resp, err := watch.Recv(); err != nil || resp.GetStatus() != healthpb.HealthCheckResponse_NOT_SERVING {
		t.Fatalf("Watch once the drain began: %s, %v; want NOT_SERVING", resp.GetStatus(), err)
	}
	if _, err := watch.Recv(); status.Code(err) != codes.Unavailable {
		t.Errorf("Watch after NOT_SERVING in the drain: %v, want Unavailable", err)
	}
	for _, svc := range healthNames {
		// The listener may have closed already: refused, never SERVING.
		if got, err := probe(t, s, svc); got == healthpb.HealthCheckResponse_SERVING || (err != nil && status.Code(err) != codes.Unavailable) {
			t.Errorf("probe %q in the drain: %s, %v; want NOT_SERVING or Unavailable", svc, got, err)
		}
	}
	close(release)
	if err := <-slow; err != nil {
		t.Errorf("the call in flight when the drain began: %v, want a certificate", err)
	}
	if err := <-stopped; err != nil {
		t.Fatalf("serve returned %v, want nil", err)
	}
	for _, svc := range healthNames {
		if _, err := probe(t, s, svc); status.Code(err) != codes.Unavailable {
			t.Errorf("probe %q after serve returned: %v, want Unavailable", svc, err)
		}
	}
	if c, err := net.Dial("tcp", s.addr); !errors.Is(err, syscall.ECONNREFUSED) {
		if c != nil {
			_ = c.Close()
		}
		t.Errorf("dial after serve returned: %v, want connection refused", err)
	}
}

// TestHealthWatchDrain: when the drain begins, a Watch stream gets
// NOT_SERVING (unless its client was told so already) and then ends with
// Unavailable, whatever the status was; beyond maxHealthWatchers open
// streams a Watch is refused with ResourceExhausted.
func TestHealthWatchDrain(t *testing.T) {
	for _, tc := range []struct {
		name   string
		before healthpb.HealthCheckResponse_ServingStatus
	}{
		{"serving when the drain begins", healthpb.HealthCheckResponse_SERVING},
		{"not serving when the drain begins", healthpb.HealthCheckResponse_NOT_SERVING},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := newHealthService(slog.New(slog.DiscardHandler))
			h.set(tc.before)
			hc := healthpb.NewHealthClient(plainHealthConn(t, h))
			ctx, cancel := context.WithTimeout(context.Background(), callTimeout)
			defer cancel()
			w, err := hc.Watch(ctx, &healthpb.HealthCheckRequest{})
			if err != nil {
				t.Fatal(err)
			}
			if resp, err := w.Recv(); err != nil || resp.GetStatus() != tc.before {
				t.Fatalf("first status %s, %v; want %s", resp.GetStatus(), err, tc.before)
			}
			h.drain()
			var got []healthpb.HealthCheckResponse_ServingStatus
			for {
				resp, err := w.Recv()
				if err != nil {
					if status.Code(err) != codes.Unavailable {
						t.Errorf("stream ended with %v, want Unavailable", err)
					}
					break
				}
				got = append(got, resp.GetStatus())
			}
			if tc.before == healthpb.HealthCheckResponse_SERVING && !slices.Equal(got, []healthpb.HealthCheckResponse_ServingStatus{healthpb.HealthCheckResponse_NOT_SERVING}) {
				t.Errorf("statuses in the drain %v, want [NOT_SERVING]", got)
			}
			if tc.before != healthpb.HealthCheckResponse_SERVING && len(got) != 0 {
				t.Errorf("statuses in the drain %v, want none (NOT_SERVING was sent)", got)
			}
		})
	}

	t.Run("watchers bounded", func(t *testing.T) {
		h := newHealthService(slog.New(slog.DiscardHandler))
		hc := healthpb.NewHealthClient(plainHealthConn(t, h))
		ctx, cancel := context.WithTimeout(context.Background(), callTimeout)
		defer cancel()
		for i := range maxHealthWatchers {
			w, err := hc.Watch(ctx, &healthpb.HealthCheckRequest{})
			if err == nil {
				_, err = w.Recv()
			}
			if err != nil {
				t.Fatalf("watch %d: %v", i, err)
			}
		}
		w, err := hc.Watch(ctx, &healthpb.HealthCheckRequest{})
		if err == nil {
			_, err = w.Recv()
		}
		if status.Code(err) != codes.ResourceExhausted {
			t.Errorf("watch beyond the bound: %v, want ResourceExhausted", err)
		}
	})
}

// plainHealthConn serves h alone on a loopback listener, without TLS.
func plainHealthConn(t *testing.T, h *healthService) *grpc.ClientConn {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := grpc.NewServer()
	healthpb.RegisterHealthServer(srv, h)
	go func() { _ = srv.Serve(lis) }()
	t.Cleanup(srv.Stop)
	cc, err := grpc.NewClient(lis.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cc.Close() })
	return cc
}
