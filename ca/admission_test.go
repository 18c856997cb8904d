package ca_test

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"golang.org/x/time/rate"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
	"google.golang.org/grpc/tap"

	"github.com/castellan-ca/castellan/authn"
	"github.com/castellan-ca/castellan/ca"
	"github.com/castellan-ca/castellan/signer/signertest"
	"github.com/castellan-ca/castellan/storage"
)

// callerKey carries the caller ctxAuthn returns.
type callerKey struct{}

// ctxAuthn authenticates the caller the test put in the context, or finds
// no credentials.
type ctxAuthn struct{}

func (ctxAuthn) Authenticate(ctx context.Context) (*authn.Caller, error) {
	c, ok := ctx.Value(callerKey{}).(*authn.Caller)
	if !ok {
		return nil, authn.ErrNoCredentials
	}
	cp := *c
	return &cp, nil
}

// allowAll is a node authorizer that lets every impersonation through.
type allowAll struct{}

func (allowAll) Authorize(context.Context, *authn.Caller, spiffeid.ID) error { return nil }

// from is a call's context: peer address addr, authenticated as c (nil: no credentials).
func from(addr string, c *authn.Caller) context.Context {
	ap, err := net.ResolveTCPAddr("tcp", addr)
	if err != nil {
		panic(err)
	}
	ctx := peer.NewContext(context.Background(), &peer.Peer{Addr: ap})
	if c != nil {
		ctx = context.WithValue(ctx, callerKey{}, c)
	}
	return ctx
}

func workload(id spiffeid.ID) *authn.Caller {
	return &authn.Caller{Method: authn.MethodKubernetes, Identity: id, Name: id.String()}
}

// admissionHarness is the pipeline with admission limits, the test
// authenticator, an allow-all node authorizer and its own metrics registry.
func admissionHarness(t *testing.T, limits ca.AdmissionConfig) (*harness, *prometheus.Registry) {
	t.Helper()
	reg := prometheus.NewRegistry()
	h := newHarness(t, harnessOpts{config: func(c *ca.Config) {
		c.Authenticator, c.NodeAuthorizer, c.Limits, c.Metrics = ctxAuthn{}, allowAll{}, limits, ca.NewMetrics(reg)
	}})
	return h, reg
}

// issue asks, from addr as caller c (nil: no credentials), for a
// certificate for id (its own when impersonate is zero).
func issue(t *testing.T, h *harness, addr string, c *authn.Caller, id, impersonate spiffeid.ID) error {
	t.Helper()
	ctx := from(addr, c)
	req := ca.Request{CSR: ztunnelCSR(t, signertest.Key(7), id), Peer: addr}
	if !impersonate.IsZero() {
		req.Metadata = metadata(t, map[string]any{ca.MetaImpersonatedIdentity: impersonate.String()})
	}
	_, err := h.issuer.Issue(ctx, req)
	return err
}

// summaries returns the audit records Summarize wrote (reason given, no serial).
func summaries(t *testing.T, h *harness, reason string) []storage.Record {
	t.Helper()
	var out []storage.Record
	for _, r := range h.records(t) {
		if r.Reason == reason {
			out = append(out, r)
		}
	}
	return out
}

// refusedIn reads the call count a summary record states.
func refusedIn(t *testing.T, r storage.Record) int {
	t.Helper()
	var n int
	if _, err := fmt.Sscanf(r.Detail, "%d calls", &n); err != nil {
		t.Fatalf("summary detail %q: %v", r.Detail, err)
	}
	return n
}

// TestCallerRateLimit: a flooding caller is limited to its burst (the
// injected clock stands still) while a well-behaved caller at the same time
// is never refused; refusals are one summary record, not one per call, and
// a second of clock gives the flooder exactly one more token.
func TestCallerRateLimit(t *testing.T) {
	const burst, flood = 3, 40
	h, reg := admissionHarness(t, ca.AdmissionConfig{CallerRate: 1, CallerBurst: burst})
	flooder, calm := workload(appID), workload(otherID)

	var issued, refused, calmRefused int
	for i := range flood {
		switch err := issue(t, h, "10.0.0.1:1000", flooder, appID, spiffeid.ID{}); {
		case err == nil:
			issued++
		case errors.Is(err, ca.ErrRateLimited) && status.Code(ca.Status(err).Err()) == codes.ResourceExhausted:
			refused++
		default:
			t.Fatalf("flood call %d: %v", i, err)
		}
		if i%15 == 0 { // the calm caller, within its burst, in the middle of the flood
			if err := issue(t, h, "10.0.0.2:1000", calm, otherID, spiffeid.ID{}); err != nil {
				calmRefused++
				t.Errorf("well-behaved caller refused: %v", err)
			}
		}
	}
	if issued != burst || refused != flood-burst {
		t.Errorf("flooder: %d issued, %d refused; want %d and %d", issued, refused, burst, flood-burst)
	}
	t.Logf("flooder %d issued / %d refused, well-behaved caller %d refused", issued, refused, calmRefused)

	// Per-call records: only the issuances (3 + 3); the refusals wait for the summary.
	if n := len(h.records(t)); n != 2*burst {
		t.Errorf("%d audit records before the summary, want %d issuances", n, 2*burst)
	}
	h.issuer.Admission().Summarize(context.Background())
	sums := summaries(t, h, ca.ReasonRateCaller)
	if len(sums) != 1 {
		t.Fatalf("%d summary records, want 1", len(sums))
	}
	s := sums[0]
	if refusedIn(t, s) != refused || s.Caller != appID.String() || s.Outcome != storage.OutcomeRefused ||
		s.Code != codes.ResourceExhausted.String() || s.Peer != "10.0.0.1:1000" || s.Kind != storage.KindCSR {
		t.Errorf("summary %+v, want %d refused calls of %s from 10.0.0.1:1000", s, refused, appID)
	}
	got := gather(t, reg)
	if k := "castellan_admission_refusals_total,reason=" + ca.ReasonRateCaller; got[k] != float64(refused) {
		t.Errorf("%s = %v, want %d", k, got[k], refused)
	}

	// Refilled by the clock: exactly one token per second.
	h.clock.Advance(time.Second)
	if err := issue(t, h, "10.0.0.1:1000", flooder, appID, spiffeid.ID{}); err != nil {
		t.Errorf("after one second: %v, want one more issuance", err)
	}
	if err := issue(t, h, "10.0.0.1:1000", flooder, appID, spiffeid.ID{}); !errors.Is(err, ca.ErrRateLimited) {
		t.Errorf("second call after one second: %v, want rate limited", err)
	}
}

// TestCallerKeys: how callers share buckets (burst 1, the clock standing still).
func TestCallerKeys(t *testing.T) {
	node := func(uid string) *authn.Caller {
		id := spiffeid.RequireFromPath(td, "/ns/istio-system/sa/ztunnel")
		return &authn.Caller{Method: authn.MethodKubernetes, Identity: id, Name: id.String(),
			Pod: &authn.Pod{Namespace: "istio-system", Name: "ztunnel-" + uid, UID: uid, NodeName: "node-" + uid}}
	}
	pod := func(id spiffeid.ID, uid string) *authn.Caller {
		c := workload(id)
		c.Pod = &authn.Pod{Namespace: "default", Name: "app-" + uid, UID: uid}
		return c
	}
	operator := &authn.Caller{Method: authn.MethodOperator, Name: operatorID.String(), Operator: true}
	type call struct {
		caller *authn.Caller
		id     spiffeid.ID // requested (zero: the caller's own)
	}
	for _, tc := range []struct {
		name        string
		first, then call
		wantLimited bool
	}{
		{"same workload twice", call{workload(appID), spiffeid.ID{}}, call{workload(appID), spiffeid.ID{}}, true},
		{"two workloads", call{workload(appID), spiffeid.ID{}}, call{workload(otherID), spiffeid.ID{}}, false},
		{"two pods of one service account", call{pod(appID, "u1"), spiffeid.ID{}}, call{pod(appID, "u2"), spiffeid.ID{}}, false},
		{"one pod twice", call{pod(appID, "u1"), spiffeid.ID{}}, call{pod(appID, "u1"), spiffeid.ID{}}, true},
		{"node proxy: two workloads on its node", call{node("n1"), appID}, call{node("n1"), otherID}, false},
		{"node proxy: one workload twice", call{node("n1"), appID}, call{node("n1"), appID}, true},
		{"two node proxies: one workload each", call{node("n1"), appID}, call{node("n2"), appID}, false},
		{"operator", call{operator, appID}, call{operator, appID}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h, _ := admissionHarness(t, ca.AdmissionConfig{CallerRate: rate.Every(time.Hour), CallerBurst: 1})
			do := func(c call) error {
				id, imp := c.id, c.id
				if id.IsZero() {
					id, imp = c.caller.Identity, spiffeid.ID{}
				}
				return issue(t, h, "10.0.0.1:1000", c.caller, id, imp)
			}
			if err := do(tc.first); err != nil {
				t.Fatalf("first call: %v", err)
			}
			err := do(tc.then)
			if limited := errors.Is(err, ca.ErrRateLimited); limited != tc.wantLimited || (!limited && err != nil) {
				t.Errorf("second call: %v, want limited %v", err, tc.wantLimited)
			}
		})
	}
}

// TestNodeRestartStorm: with the default limits (ca.Default*, which
// cmd/castellan uses) and the clock standing still, so that no token comes
// back during the storm, legitimate restart storms are never limited: a
// ztunnel renewing every workload of a 250-pod node twice over (the node and
// then its pods restart), a 250-replica Deployment of one service account
// rolled out at once behind one node address, and VMs sharing one identity
// (one mTLS caller) up to the caller burst.
func TestNodeRestartStorm(t *testing.T) {
	const pods = 250
	zt := spiffeid.RequireFromPath(td, "/ns/istio-system/sa/ztunnel")
	ztunnel := &authn.Caller{Method: authn.MethodKubernetes, Identity: zt, Name: zt.String(),
		Pod: &authn.Pod{Namespace: "istio-system", Name: "ztunnel-x", UID: "u", NodeName: "n"}}
	replica := func(i int) *authn.Caller {
		c := workload(appID)
		c.Pod = &authn.Pod{Namespace: "default", Name: fmt.Sprintf("app-%d", i), UID: fmt.Sprintf("uid-%d", i), NodeName: "n"}
		return c
	}
	vm := &authn.Caller{Method: authn.MethodMTLS, Identity: otherID, Name: otherID.String()}
	for _, tc := range []struct {
		name  string
		calls int
		call  func(i int) (*authn.Caller, spiffeid.ID, spiffeid.ID) // caller, identity, impersonated
	}{
		{"ztunnel renews its node twice", 2 * pods, func(i int) (*authn.Caller, spiffeid.ID, spiffeid.ID) {
			id := spiffeid.RequireFromPath(td, fmt.Sprintf("/ns/ns%d/sa/sa%d", i%17, i%pods))
			return ztunnel, id, id
		}},
		{"rollout of one service account", pods, func(i int) (*authn.Caller, spiffeid.ID, spiffeid.ID) {
			return replica(i), appID, spiffeid.ID{}
		}},
		{"VMs of one identity", ca.DefaultCallerBurst, func(int) (*authn.Caller, spiffeid.ID, spiffeid.ID) {
			return vm, otherID, spiffeid.ID{}
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h, reg := admissionHarness(t, ca.AdmissionConfig{CallerRate: ca.DefaultCallerRate, CallerBurst: ca.DefaultCallerBurst,
				PeerRate: ca.DefaultPeerRate, PeerBurst: ca.DefaultPeerBurst})
			refused := 0
			for i := range tc.calls {
				c, id, imp := tc.call(i)
				if err := issue(t, h, "10.0.0.9:1000", c, id, imp); err != nil {
					refused++
					t.Errorf("call %d of the storm: %v", i, err)
				}
			}
			for k, v := range gather(t, reg) {
				if strings.HasPrefix(k, "castellan_admission_refusals_total") && v != 0 {
					t.Errorf("%s = %v during the storm, want 0", k, v)
				}
			}
			t.Logf("%d calls, %d refused", tc.calls, refused)
		})
	}
}

// tapCall runs the tap for a new call from addr and returns the call's context.
func tapCall(a *ca.Admission, addr string) (context.Context, context.CancelFunc, error) {
	return tapMethod(a, addr, "/istio.v1.auth.IstioCertificateService/CreateCertificate")
}

// tapMethod runs the tap for a call of method from addr.
func tapMethod(a *ca.Admission, addr, method string) (context.Context, context.CancelFunc, error) {
	ap, err := net.ResolveTCPAddr("tcp", addr)
	if err != nil {
		panic(err)
	}
	ctx, cancel := context.WithCancel(peer.NewContext(context.Background(), &peer.Peer{Addr: ap}))
	tctx, err := a.Tap(ctx, &tap.Info{FullMethodName: method})
	if err != nil {
		cancel()
		return nil, nil, err
	}
	return tctx, cancel, nil
}

// admit runs the tap for a call from addr that must be admitted. The call
// ends when cancel is called, or at the end of the test.
func admit(t *testing.T, a *ca.Admission, addr string) (context.Context, context.CancelFunc) {
	t.Helper()
	ctx, cancel, err := tapCall(a, addr)
	if err != nil {
		t.Fatalf("call from %s refused: %v", addr, err)
	}
	t.Cleanup(cancel)
	return ctx, cancel
}

// TestPeerRateLimit: failed authentications are charged to the peer
// address (an IPv6 peer by its /64); once its bucket is empty the tap
// refuses the address's calls before anything is read, other addresses are
// untouched, authenticated calls are never charged, and the clock refills it.
func TestPeerRateLimit(t *testing.T) {
	const burst = 3
	h, reg := admissionHarness(t, ca.AdmissionConfig{PeerRate: 1, PeerBurst: burst})
	a := h.issuer.Admission()
	for _, tc := range []struct{ name, attacker, sameBucket, other string }{
		{"IPv4", "10.0.0.1:1000", "10.0.0.1:2000", "10.0.0.2:1000"},
		{"IPv6", "[2001:db8:1:2::1]:1000", "[2001:db8:1:2:ffff::9]:1000", "[2001:db8:1:3::1]:1000"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			// Authenticated calls from the address cost its bucket nothing.
			for range 2 * burst {
				if err := issue(t, h, tc.attacker, workload(appID), appID, spiffeid.ID{}); err != nil {
					t.Fatal(err)
				}
			}
			for range burst {
				_, cancel := admit(t, a, tc.attacker)
				cancel()
				if err := issue(t, h, tc.attacker, nil, appID, spiffeid.ID{}); !errors.Is(err, ca.ErrUnauthenticated) {
					t.Fatalf("call without credentials: %v", err)
				}
			}
			for _, addr := range []string{tc.attacker, tc.sameBucket} {
				if _, _, err := tapCall(a, addr); status.Code(err) != codes.ResourceExhausted {
					t.Errorf("tap from %s after %d failures: %v, want ResourceExhausted", addr, burst, err)
				}
			}
			admit(t, a, tc.other)
		})
	}
	got := gather(t, reg)
	if k := "castellan_admission_refusals_total,reason=" + ca.ReasonRatePeer; got[k] != 4 {
		t.Errorf("%s = %v, want 4", k, got[k])
	}
	h.clock.Advance(time.Second)
	admit(t, a, "10.0.0.1:3000") // a second later: one call
	a.Summarize(context.Background())
	sums := summaries(t, h, ca.ReasonRatePeer)
	if len(sums) != 2 || sums[0].Peer != "10.0.0.1" || sums[1].Peer != "2001:db8:1:2::/64" || refusedIn(t, sums[0])+refusedIn(t, sums[1]) != 4 {
		t.Errorf("peer summaries %+v, want 2 records for 10.0.0.1 and 2001:db8:1:2::/64 totalling 4 calls", sums)
	}
}

// TestSummaryBounded: refusals of many keys cost a bounded number of
// records, and every refusal is counted in one of them.
func TestSummaryBounded(t *testing.T) {
	h, _ := admissionHarness(t, ca.AdmissionConfig{CallerRate: rate.Every(time.Hour), CallerBurst: 1})
	const callers, calls = 200, 3
	for i := range callers {
		id := spiffeid.RequireFromPath(td, fmt.Sprintf("/ns/flood/sa/s%d", i))
		for range calls {
			_ = issue(t, h, "10.0.0.1:1000", workload(id), id, spiffeid.ID{})
		}
	}
	h.issuer.Admission().Summarize(context.Background())
	sums := summaries(t, h, ca.ReasonRateCaller)
	total := 0
	for _, s := range sums {
		total += refusedIn(t, s)
	}
	if len(sums) != 65 || total != callers*(calls-1) {
		t.Errorf("%d summary records counting %d calls, want 65 (64 callers and the rest) counting %d", len(sums), total, callers*(calls-1))
	}
	if last := sums[len(sums)-1]; last.Caller != "" || !strings.Contains(last.Detail, "further callers") {
		t.Errorf("last summary %+v, want the further callers together", last)
	}
	h.issuer.Admission().Summarize(context.Background())
	if n := len(summaries(t, h, ca.ReasonRateCaller)); n != len(sums) {
		t.Errorf("a second summary with no new refusals wrote %d records", n-len(sums))
	}
}

// TestTapMaxStreams: beyond MaxStreams open calls the tap refuses; a call
// that ends frees its place.
func TestTapMaxStreams(t *testing.T) {
	h, _ := admissionHarness(t, ca.AdmissionConfig{MaxStreams: 2})
	a := h.issuer.Admission()
	_, cancel1 := admit(t, a, "10.0.0.1:1")
	admit(t, a, "10.0.0.1:2")
	if _, _, err := tapCall(a, "10.0.0.2:1"); status.Code(err) != codes.ResourceExhausted {
		t.Fatalf("third open call: %v, want ResourceExhausted", err)
	}
	cancel1()
	deadline := time.Now().Add(10 * time.Second) // AfterFunc runs on its own goroutine
	for {
		_, cancel3, err := tapCall(a, "10.0.0.2:1")
		if err == nil {
			cancel3()
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("a call ended but a new one is still refused: %v", err)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// TestTapHealthOutsideStreamBound: health calls, Watch streams included, do
// not take places of MaxStreams, so that they never crowd out certificate
// requests; every other call does.
func TestTapHealthOutsideStreamBound(t *testing.T) {
	h, _ := admissionHarness(t, ca.AdmissionConfig{MaxStreams: 1})
	a := h.issuer.Admission()
	for i, method := range []string{"/grpc.health.v1.Health/Watch", "/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"} {
		_, cancel, err := tapMethod(a, "10.0.0.1:1", method)
		if err != nil {
			t.Fatalf("health call %d (%s) with no place taken: %v", i, method, err)
		}
		t.Cleanup(cancel)
	}
	admit(t, a, "10.0.0.2:1") // the one place, still free
	for _, method := range []string{"/istio.v1.auth.IstioCertificateService/CreateCertificate", "/castellan.admin.v1.AdminService/GetTrustBundle"} {
		if _, _, err := tapMethod(a, "10.0.0.3:1", method); status.Code(err) != codes.ResourceExhausted {
			t.Errorf("%s beyond MaxStreams: %v, want ResourceExhausted", method, err)
		}
	}
	if _, cancel, err := tapMethod(a, "10.0.0.3:1", "/grpc.health.v1.Health/Check"); err != nil {
		t.Errorf("health check with every place taken: %v, want admitted", err)
	} else {
		cancel()
	}
}

// TestTapReadTimeout: a call whose request does not arrive in time is
// cancelled and charged to its peer; one whose request arrived (Unary ran)
// is not.
func TestTapReadTimeout(t *testing.T) {
	const timeout = 300 * time.Millisecond
	h, _ := admissionHarness(t, ca.AdmissionConfig{ReadTimeout: timeout, PeerRate: rate.Every(time.Hour), PeerBurst: 1})
	a := h.issuer.Admission()

	served, _ := admit(t, a, "10.0.0.2:1")
	_, err := a.Unary(served, nil, &grpc.UnaryServerInfo{FullMethod: "/x/Y"}, func(context.Context, any) (any, error) { return nil, nil })
	if err != nil {
		t.Fatal(err)
	}
	streamed, _ := admit(t, a, "10.0.0.2:2") // a streaming call that received its request
	err = a.Stream(nil, fakeStream{ctx: streamed}, &grpc.StreamServerInfo{FullMethod: "/x/Z"},
		func(_ any, ss grpc.ServerStream) error { return ss.RecvMsg(nil) })
	if err != nil {
		t.Fatal(err)
	}

	stalled, _ := admit(t, a, "10.0.0.1:1")
	select {
	case <-stalled.Done():
	case <-time.After(10 * time.Second):
		t.Fatal("a call that sent no request was not cancelled")
	}
	if cause := context.Cause(stalled); cause == nil || !strings.Contains(cause.Error(), "not received") {
		t.Errorf("cancelled with %v, want the read timeout", cause)
	}
	if _, _, err := tapCall(a, "10.0.0.1:2"); status.Code(err) != codes.ResourceExhausted {
		t.Errorf("next call of the stalled peer: %v, want ResourceExhausted (charged)", err)
	}
	time.Sleep(2 * timeout) // would have fired for the served calls by now
	for _, ctx := range []context.Context{served, streamed} {
		if ctx.Err() != nil {
			t.Errorf("a call whose request arrived was cancelled: %v", context.Cause(ctx))
		}
	}
}

// fakeStream is a server stream whose messages arrive at once.
type fakeStream struct {
	grpc.ServerStream
	ctx context.Context
}

func (f fakeStream) Context() context.Context { return f.ctx }
func (fakeStream) RecvMsg(any) error          { return nil }

// TestPanicRecovered: a panic in the pipeline fails only its call, with
// Internal and an audit record; the next call is served. A panic of a
// handler outside the pipeline becomes Internal in the interceptors.
func TestPanicRecovered(t *testing.T) {
	reg := prometheus.NewRegistry()
	h := newHarness(t, harnessOpts{config: func(c *ca.Config) {
		c.Metrics = ca.NewMetrics(reg)
		c.BeforeSign = func(_ context.Context, grant spiffeid.ID) {
			if grant == otherID {
				panic("injected fault for " + grant.String())
			}
		}
	}})
	_, err := h.issuer.Issue(peerCtx(h.operatorCert(t)), ca.Request{CSR: ztunnelCSR(t, signertest.Key(7), otherID), Identity: otherID.String()})
	if st := ca.Status(err); st.Code() != codes.Internal || ca.ReasonOf(err) != ca.ReasonPanic {
		t.Fatalf("panicking call: %v (%s), want Internal with reason %s", err, st.Code(), ca.ReasonPanic)
	}
	rec := h.onlyRecord(t)
	if rec.Outcome != storage.OutcomeFailed || rec.Reason != ca.ReasonPanic || rec.Code != codes.Internal.String() ||
		rec.RequestedIdentity != otherID.String() || rec.Serial != "" || !strings.Contains(rec.Detail, "injected fault") {
		t.Errorf("audit record %+v, want a failed Internal record of the panic", rec)
	}
	if _, err := h.issuer.Issue(peerCtx(h.workloadCert(t, appID)), ca.Request{CSR: ztunnelCSR(t, signertest.Key(7), appID)}); err != nil {
		t.Errorf("call after the panic: %v", err)
	}

	_, err = h.issuer.Admission().Unary(context.Background(), nil, &grpc.UnaryServerInfo{FullMethod: "/x/Y"},
		func(context.Context, any) (any, error) { panic("handler bug") })
	if status.Code(err) != codes.Internal {
		t.Errorf("handler panic: %v, want Internal", err)
	}
	err = h.issuer.Admission().Stream(nil, fakeStream{ctx: context.Background()}, &grpc.StreamServerInfo{FullMethod: "/x/Z"},
		func(any, grpc.ServerStream) error { panic("stream handler bug") })
	if status.Code(err) != codes.Internal {
		t.Errorf("stream handler panic: %v, want Internal", err)
	}
	if got := gather(t, reg)["castellan_panics_total"]; got != 3 {
		t.Errorf("castellan_panics_total = %v, want 3", got)
	}
}
