package ca_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/castellan-ca/castellan/ca"
	authpb "github.com/castellan-ca/castellan/proto/istio/v1/auth"
	"github.com/castellan-ca/castellan/signer"
	"github.com/castellan-ca/castellan/signer/signertest"
	"github.com/castellan-ca/castellan/storage"
)

// gateSigner holds each Sign until the test lets one through.
type gateSigner struct {
	signer.Signer
	entered, pass chan struct{}
}

func (g *gateSigner) Sign(ctx context.Context, req signer.SignRequest) (*signer.Chain, error) {
	g.entered <- struct{}{}
	<-g.pass
	return g.Signer.Sign(ctx, req)
}

// TestIssueOverloadLatency: with TargetLatency, requests are shed while
// the ones in flight (16 or more) would take longer than it to drain at the
// last second's completion rate; a burst on a server with no recent
// completions is admitted whole, and once fewer than 16 are in flight new
// requests are admitted again.
func TestIssueOverloadLatency(t *testing.T) {
	const burst = 32
	gate := &gateSigner{entered: make(chan struct{}, burst+1), pass: make(chan struct{})}
	reg := prometheus.NewRegistry()
	h := newHarness(t, harnessOpts{
		wrapSigner: func(s signer.Signer) signer.Signer { gate.Signer = s; return gate },
		config: func(c *ca.Config) {
			c.MaxInFlight, c.Metrics = 512, ca.NewMetrics(reg)
			c.Limits.TargetLatency = 100 * time.Millisecond
		},
	})
	ctx := peerCtx(h.workloadCert(t, appID))
	req := ca.Request{CSR: ztunnelCSR(t, signertest.Key(7), appID)}
	results := make(chan error, burst+2)
	call := func() { go func() { _, err := h.issuer.Issue(ctx, req); results <- err }() }

	// A burst: nothing has completed, so the drain rate is unknown.
	for range burst {
		call()
	}
	for range burst {
		<-gate.entered
	}
	// 16 complete within the second: 16 in flight drain in 1 s, above 100 ms.
	h.clock.Advance(time.Second)
	for range burst / 2 {
		gate.pass <- struct{}{}
		if err := <-results; err != nil {
			t.Fatalf("burst call: %v", err)
		}
	}
	// 16 in flight, too slow to drain: shed before any work.
	_, err := h.issuer.Issue(ctx, req)
	if ca.Status(err).Code() != codes.ResourceExhausted || ca.ReasonOf(err) != ca.ReasonOverload || !errors.Is(err, ca.ErrOverloaded) {
		t.Fatalf("call with 16 slow ones in flight = %v, want ResourceExhausted overload", err)
	}
	// The gRPC tap sheds certificate requests before they are read; other
	// methods (the admin API) pass.
	createCert := authpb.IstioCertificateService_CreateCertificate_FullMethodName
	if _, _, err := tapMethod(h.issuer.Admission(), "10.0.0.9:1", createCert); status.Code(err) != codes.ResourceExhausted {
		t.Fatalf("tap of a certificate request while overloaded: %v, want ResourceExhausted", err)
	}
	if _, cancel, err := tapMethod(h.issuer.Admission(), "10.0.0.9:2", "/castellan.admin.v1.AdminService/ListAudit"); err != nil {
		t.Fatalf("tap of an admin call while overloaded: %v, want admitted", err)
	} else {
		cancel()
	}
	// After a second without completions the rate is unknown: a new burst
	// (a restart storm after a quiet spell) is admitted.
	h.clock.Advance(2 * time.Second)
	call()
	<-gate.entered
	// 1 in flight: admitted again, whatever the rate.
	for range burst / 2 {
		gate.pass <- struct{}{}
		if err := <-results; err != nil {
			t.Fatalf("burst call: %v", err)
		}
	}
	if _, cancel, err := tapMethod(h.issuer.Admission(), "10.0.0.9:3", createCert); err != nil {
		t.Fatalf("tap of a certificate request with 1 in flight: %v, want admitted", err)
	} else {
		cancel()
	}
	call()
	<-gate.entered
	for range 2 {
		gate.pass <- struct{}{}
		if err := <-results; err != nil {
			t.Fatalf("call after the overload: %v", err)
		}
	}

	issued := 0
	for _, r := range h.records(t) {
		switch {
		case r.Outcome == storage.OutcomeIssued:
			issued++
		case r.Reason == ca.ReasonOverload:
			t.Errorf("overload refusal audited per call: %+v", r)
		}
	}
	if issued != burst+2 {
		t.Errorf("%d issued records, want %d", issued, burst+2)
	}
	h.issuer.Admission().Summarize(context.Background())
	refused := 0
	for _, s := range summaries(t, h, ca.ReasonOverload) {
		refused += refusedIn(t, s)
	}
	if refused != 2 {
		t.Errorf("overload summaries count %d calls, want 2 (the pipeline's and the tap's)", refused)
	}
	if got := gather(t, reg)["castellan_admission_refusals_total,reason="+ca.ReasonOverload]; got != 2 {
		t.Errorf("admission refusals (overload) = %v, want 2", got)
	}
}
