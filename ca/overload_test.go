package ca_test

import (
	"context"
	"errors"
	"fmt"
	"net"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
	"google.golang.org/grpc/tap"

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

// TestIssueOverloadLatency: with TargetLatency, once 16 or more requests
// have been in flight for 250 ms, new ones are shed while those would
// take longer than it to drain at the last second's completion rate, or
// nothing completes (a stall); a burst on a quiet server is admitted whole.
func TestIssueOverloadLatency(t *testing.T) {
	const burst = 32
	gate := &gateSigner{entered: make(chan struct{}, burst), pass: make(chan struct{})}
	reg := prometheus.NewRegistry()
	h := newHarness(t, harnessOpts{
		wrapSigner: func(s signer.Signer) signer.Signer { gate.Signer = s; return gate },
		config: func(c *ca.Config) {
			c.MaxInFlight, c.Metrics = 512, ca.NewMetrics(reg)
			c.Limits.TargetLatency, c.Limits.MaxStreams = 100*time.Millisecond, 1000
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
	// Busy for 2 s; 16 complete within the last second: 16 in flight
	// drain in 1 s, above 100 ms.
	h.clock.Advance(2 * time.Second)
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
	// A second later, 16 still in flight and none completed: a stall
	// (an audit store that stopped committing) is shed too.
	h.clock.Advance(2 * time.Second)
	if _, err := h.issuer.Issue(ctx, req); ca.ReasonOf(err) != ca.ReasonOverload {
		t.Fatalf("call with 16 in flight and no completion for 2s = %v, want ResourceExhausted overload", err)
	}
	for range burst / 2 {
		gate.pass <- struct{}{}
		if err := <-results; err != nil {
			t.Fatalf("burst call: %v", err)
		}
	}
	// After a quiet spell the rate is unknown: a new burst (a restart
	// storm) is admitted whole, 16 and more in flight.
	h.clock.Advance(2 * time.Second)
	if _, cancel, err := tapMethod(h.issuer.Admission(), "10.0.0.9:3", createCert); err != nil {
		t.Fatalf("tap of a certificate request on a quiet server: %v, want admitted", err)
	} else {
		cancel()
	}
	const storm = 20
	for range storm {
		call()
	}
	for range storm {
		<-gate.entered
	}
	for range storm {
		gate.pass <- struct{}{}
		if err := <-results; err != nil {
			t.Fatalf("storm call: %v", err)
		}
	}

	// The tap counts the calls it let through that have not reached the
	// pipeline yet (MaxStreams keeps that count): 16 such calls open for
	// over a second, none completing, are a stall like 16 in flight.
	waitCallsClosed(t, reg)
	var opened []context.CancelFunc
	for i := range 16 {
		_, cancel, err := tapMethod(h.issuer.Admission(), fmt.Sprintf("10.0.1.%d:1", i), createCert)
		if err != nil {
			t.Fatalf("tap call %d of 16 with the pipeline empty: %v, want admitted", i, err)
		}
		opened = append(opened, cancel)
	}
	h.clock.Advance(1500 * time.Millisecond)
	// gRPC never ends the context of a call its tap refused: the refusal
	// must not count it open.
	never := peer.NewContext(context.Background(), &peer.Peer{Addr: &net.TCPAddr{IP: net.IPv4(10, 0, 1, 99), Port: 1}})
	if _, err := h.issuer.Admission().Tap(never, &tap.Info{FullMethodName: createCert}); status.Code(err) != codes.ResourceExhausted {
		t.Errorf("tap call with 16 opened before it: %v, want ResourceExhausted", err)
	}
	for _, cancel := range opened {
		cancel()
	}
	waitCallsClosed(t, reg) // and the refused one was never counted open

	issued := 0
	for _, r := range h.records(t) {
		switch {
		case r.Outcome == storage.OutcomeIssued:
			issued++
		case r.Reason == ca.ReasonOverload:
			t.Errorf("overload refusal audited per call: %+v", r)
		}
	}
	if issued != burst+storm {
		t.Errorf("%d issued records, want %d", issued, burst+storm)
	}
	h.issuer.Admission().Summarize(context.Background())
	refused := 0
	for _, s := range summaries(t, h, ca.ReasonOverload) {
		refused += refusedIn(t, s)
	}
	if refused != 4 {
		t.Errorf("overload summaries count %d calls, want 4 (pipeline, tap, stall, opened calls)", refused)
	}
	if got := gather(t, reg)["castellan_admission_refusals_total,reason="+ca.ReasonOverload]; got != 4 {
		t.Errorf("admission refusals (overload) = %v, want 4", got)
	}
}

// waitCallsClosed waits until the tap's count of open calls is back to 0:
// a call's end is counted by context.AfterFunc, on its own goroutine.
func waitCallsClosed(t *testing.T, reg *prometheus.Registry) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for gather(t, reg)["castellan_grpc_calls_open"] != 0 {
		if time.Now().After(deadline) {
			t.Fatalf("calls still counted open 10s after they ended: %v", gather(t, reg)["castellan_grpc_calls_open"])
		}
		time.Sleep(5 * time.Millisecond)
	}
}
