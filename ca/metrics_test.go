package ca_test

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc/codes"

	"github.com/castellan-ca/castellan/ca"
	"github.com/castellan-ca/castellan/signer"
	"github.com/castellan-ca/castellan/signer/signertest"
)

func TestIssueMetrics(t *testing.T) {
	reg := prometheus.NewRegistry()
	h := newHarness(t, harnessOpts{config: func(c *ca.Config) { c.Metrics = ca.NewMetrics(reg) }})
	ctx := peerCtx(h.workloadCert(t, appID))
	csr := ztunnelCSR(t, signertest.Key(7), appID)
	for range 2 {
		if _, err := h.issuer.Issue(ctx, ca.Request{CSR: csr}); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := h.issuer.Issue(peerCtx(), ca.Request{CSR: csr}); err == nil {
		t.Fatal("anonymous call issued")
	}
	if _, err := h.issuer.Issue(ctx, ca.Request{CSR: "x"}); err == nil {
		t.Fatal("bad CSR issued")
	}
	got := gather(t, reg)
	for key, want := range map[string]float64{
		"citadel_server_csr_count":                                    4,
		"citadel_server_success_cert_issuance_count":                  2,
		"citadel_server_authentication_failure_count":                 1,
		"citadel_server_csr_sign_err_count,error=csr.not_pem":         1,
		"citadel_server_root_cert_expiry_timestamp":                   float64(h.root.Cert.NotAfter.Unix()),
		"castellan_csr_outcomes_total,code=OK,outcome=issued,reason=": 2,
		"castellan_csr_in_flight":                                     0,
	} {
		if got[key] != want {
			t.Errorf("%s = %v, want %v", key, got[key], want)
		}
	}
	// Admission reasons are exported at 0 before any refusal.
	for _, r := range []string{ca.ReasonRateCaller, ca.ReasonRatePeer, ca.ReasonStreams, ca.ReasonReadTimeout} {
		if v, ok := got["castellan_admission_refusals_total,reason="+r]; !ok || v != 0 {
			t.Errorf("castellan_admission_refusals_total{reason=%q} = %v (exported %v), want 0", r, v, ok)
		}
	}
}

// TestIssueCallerGone: a caller that hangs up while its certificate is being
// signed is answered Canceled and audited with a reason of its own; it is
// not a signing error, however the backend reports the cancellation.
func TestIssueCallerGone(t *testing.T) {
	reg := prometheus.NewRegistry()
	ctx, hangUp := context.WithCancel(context.Background())
	defer hangUp()
	backendSaw := make(chan error, 1)
	h := newHarness(t, harnessOpts{
		config: func(c *ca.Config) { c.Metrics = ca.NewMetrics(reg) },
		wrapSigner: func(inner signer.Signer) signer.Signer {
			return signerFunc{Signer: inner, sign: func(ctx context.Context, req signer.SignRequest) (*signer.Chain, error) {
				hangUp() // the client goes away while the backend works
				<-ctx.Done()
				backendSaw <- ctx.Err()
				return nil, fmt.Errorf("remote CA: %w: %w", signer.ErrSignerUnavailable, ctx.Err())
			}}
		},
	})
	_, err := h.issuer.Issue(peerCtxFrom(ctx, h.workloadCert(t, appID)), ca.Request{CSR: ztunnelCSR(t, signertest.Key(7), appID)})
	if got := <-backendSaw; !errors.Is(got, context.Canceled) {
		t.Fatalf("the backend saw %v, want the caller's cancellation", got)
	}
	if code := ca.Status(err).Code(); code != codes.Canceled || !errors.Is(err, context.Canceled) || ca.ReasonOf(err) != ca.ReasonCallerGone {
		t.Fatalf("Issue = %v (code %s, reason %q), want Canceled with reason %s", err, code, ca.ReasonOf(err), ca.ReasonCallerGone)
	}
	rec := h.onlyRecord(t)
	if rec.Reason != ca.ReasonCallerGone || rec.Code != codes.Canceled.String() {
		t.Errorf("audit record reason %q code %q, want %s Canceled", rec.Reason, rec.Code, ca.ReasonCallerGone)
	}
	got := gather(t, reg)
	for key, value := range got {
		if strings.HasPrefix(key, "citadel_server_csr_sign_err_count") && value != 0 {
			t.Errorf("%s = %v: a caller that hung up counted as a signing error", key, value)
		}
	}
	if key := "castellan_csr_outcomes_total,code=Canceled,outcome=failed,reason=" + ca.ReasonCallerGone; got[key] != 1 {
		t.Errorf("%s = %v, want 1", key, got[key])
	}
}

// gather returns every counter and gauge of reg, keyed by name and labels.
func gather(t *testing.T, reg *prometheus.Registry) map[string]float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]float64{}
	for _, mf := range mfs {
		for _, m := range mf.GetMetric() {
			key := mf.GetName()
			for _, l := range m.GetLabel() {
				key += "," + l.GetName() + "=" + l.GetValue()
			}
			switch {
			case m.GetCounter() != nil:
				got[key] = m.GetCounter().GetValue()
			case m.GetGauge() != nil:
				got[key] = m.GetGauge().GetValue()
			}
		}
	}
	return got
}
