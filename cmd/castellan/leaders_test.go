package main

import (
	"context"
	"errors"
	"log/slog"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
)

// gaugeValue reads a gauge.
func gaugeValue(t *testing.T, g prometheus.Gauge) float64 {
	t.Helper()
	var m dto.Metric
	if err := g.Write(&m); err != nil {
		t.Fatal(err)
	}
	return m.GetGauge().GetValue()
}

// termsLeader leads for each term in turn, then returns.
type termsLeader struct{ terms int }

func (l termsLeader) Run(ctx context.Context, fn func(ctx context.Context)) error {
	for range l.terms {
		fn(ctx)
	}
	return nil
}

// TestLeaderGauge: castellan_leader reads 0 before and between terms and 1
// during each, per election and cluster.
func TestLeaderGauge(t *testing.T) {
	g := newLeaderGauges(prometheus.NewRegistry())
	up := g.vec.WithLabelValues(electionRootConfigMaps, "c1")
	other := g.vec.WithLabelValues(electionRotation, "")
	l := g.track(termsLeader{terms: 2}, electionRootConfigMaps, "c1")
	if v := gaugeValue(t, up); v != 0 {
		t.Fatalf("before any term: %v, want 0", v)
	}
	var during []float64
	if err := l.Run(context.Background(), func(context.Context) { during = append(during, gaugeValue(t, up)) }); err != nil {
		t.Fatal(err)
	}
	if len(during) != 2 || during[0] != 1 || during[1] != 1 {
		t.Errorf("during the terms: %v, want [1 1]", during)
	}
	if v := gaugeValue(t, up); v != 0 {
		t.Errorf("after the terms: %v, want 0", v)
	}
	if v := gaugeValue(t, other); v != 0 {
		t.Errorf("another election: %v, want 0", v)
	}
}

// TestComponentUp: every check's outcome is exported, those after a failed
// one included, and one that hangs does not fail the others.
func TestComponentUp(t *testing.T) {
	h := newHealthService(slog.New(slog.DiscardHandler))
	h.up = newComponentUp(prometheus.NewRegistry())
	down := errors.New("down")
	checks := []readyCheck{
		{name: "signer", check: func(context.Context) error { return nil }},
		{name: "audit store", check: func(context.Context) error { return down }},
		{name: "serving certificate", check: func(context.Context) error { return nil }},
		{name: "kubernetes", check: func(ctx context.Context) error { <-ctx.Done(); return ctx.Err() }},
		{name: "root configmaps", warnOnly: true, check: func(context.Context) error { return nil }},
	}
	h.evaluate(context.Background(), checks)
	for name, want := range map[string]float64{"signer": 1, "audit store": 0, "serving certificate": 1, "kubernetes": 0, "root configmaps": 1} {
		if v := gaugeValue(t, h.up.WithLabelValues(name)); v != want {
			t.Errorf("castellan_component_up{component=%q} = %v, want %v", name, v, want)
		}
	}
	resp, err := h.Check(context.Background(), &healthpb.HealthCheckRequest{})
	if err != nil || resp.GetStatus() != healthpb.HealthCheckResponse_NOT_SERVING {
		t.Errorf("health = %v, %v; want NOT_SERVING", resp.GetStatus(), err)
	}
}
