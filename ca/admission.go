package ca

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"runtime/debug"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/castellan-ca/castellan/authn"
	authpb "github.com/castellan-ca/castellan/proto/istio/v1/auth"
	"github.com/castellan-ca/castellan/storage"
	"golang.org/x/time/rate"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/tap"
)

// Reason codes of the admission checks and of a recovered panic.
const (
	// ReasonRateCaller: the authenticated caller's token bucket was empty.
	ReasonRateCaller = "ratelimit.caller"
	// ReasonRatePeer: the peer address's bucket, charged by failed
	// authentications and requests never sent, was empty.
	ReasonRatePeer = "ratelimit.peer"
	// ReasonStreams: AdmissionConfig.MaxStreams calls were open already.
	ReasonStreams = "overload.streams"
	// ReasonReadTimeout: a call's request message did not arrive within
	// AdmissionConfig.ReadTimeout of its headers.
	ReasonReadTimeout = "request.read_timeout"
	// ReasonPanic: the request hit a bug (a recovered panic).
	ReasonPanic = "internal.panic"
)

// Default rate limits (cmd/castellan's defaults). Agents renew twice a day
// and every bucket is one pod, or one identity a node proxy renews, so these
// only stop floods: TestNodeRestartStorm shows that restart storms never
// meet them.
const (
	// DefaultCallerRate and DefaultCallerBurst size each caller's bucket.
	DefaultCallerRate  rate.Limit = 10
	DefaultCallerBurst int        = 100
	// DefaultPeerRate and DefaultPeerBurst size each peer address's bucket,
	// charged only by failed authentications.
	DefaultPeerRate  rate.Limit = 2
	DefaultPeerBurst int        = 100
)

// DefaultSummaryInterval is how often refusals are summarised in the audit
// log when no interval is configured.
const DefaultSummaryInterval = 30 * time.Second

// AdmissionConfig bounds what one caller or peer can make the CA do (README,
// "Threat model and limits"). Zero values switch a check off, so that an
// Issuer built without one limits nothing; cmd/castellan sets the defaults.
type AdmissionConfig struct {
	// CallerRate and CallerBurst size the token bucket of each authenticated
	// caller (see callerKey), checked after authentication and before the
	// CSR is parsed or signed. Operators are not limited.
	CallerRate  rate.Limit
	CallerBurst int
	// PeerRate and PeerBurst size the bucket of each peer address (an IPv4
	// address, an IPv6 /64). Only calls that fail authentication or never
	// send their request are charged to it, so that the callers sharing an
	// address (a ztunnel's node, a NAT) pay nothing for calls that prove
	// who they are; while it is empty, Tap refuses the address's calls before
	// anything is read or verified.
	PeerRate  rate.Limit
	PeerBurst int
	// MaxKeys bounds each table of buckets (the least recently used key is
	// dropped first); 0 means DefaultRateLimitKeys.
	MaxKeys int
	// MaxStreams bounds the calls open at once on the whole server, from
	// their headers to their end, health calls excepted; 0: no bound.
	MaxStreams int
	// ReadTimeout bounds the time from a call's headers to its request
	// message; the call is cancelled and its peer charged after it. 0: none.
	ReadTimeout time.Duration
	// TargetLatency sheds load by latency: when the requests in flight
	// would take longer than this to drain at the rate requests completed
	// over the last second (Little's law: in flight / completions per
	// second), and at least minShedInFlight are in flight, new requests are
	// refused (ResourceExhausted, ReasonOverload) before any work, so that
	// the admitted ones wait a bounded time whatever the offered rate. 0:
	// only Config.MaxInFlight bounds them.
	TargetLatency time.Duration
	// SummaryInterval is how often the refusals of these checks are written
	// to the audit log, one record per refused key; 0 means DefaultSummaryInterval.
	SummaryInterval time.Duration
}

// Admission holds the checks a call passes before the CA works for it: a
// gRPC tap handle (Tap) for what is known from the connection, the caller's
// bucket in the pipeline (Issuer.Issue), and interceptors (Unary, Stream)
// that end the read timeout and turn a panic outside the pipeline into
// Internal. Refusals are ResourceExhausted, which Istio's clients retry; they
// are counted in the metrics and summarised in the audit log (Run), so a flood
// costs a bounded number of records.
type Admission struct {
	cfg     AdmissionConfig
	is      *Issuer
	callers *buckets
	peers   *buckets
	refused refusals
	streams atomic.Int64
	// done counts the requests that left the pipeline, per rateSlot.
	done completions
	// calm is when a request last arrived or left with fewer than
	// minShedInFlight in flight (Unix nanoseconds).
	calm atomic.Int64
}

// Latency shedding. It starts once minShedInFlight or more requests have
// been in flight for burstGrace: a burst on a calm server (a restart storm,
// whose requests all arrive within milliseconds) is admitted up to
// MaxInFlight, since its clients wait for it and every refusal costs a
// retry, while a sustained overload is held to TargetLatency after at most
// burstGrace of arrivals. From then on the drain rate is what
// completed over the last second (rateSlots of rateSlot each), so the
// estimate follows a change of load within a second and costs one short
// lock per request; fewer than minShedInFlight completions in that second
// while so many are in flight is a stall (an audit store that stopped
// committing), and sheds too. Below minShedInFlight requests in flight
// nothing is shed by latency.
const (
	burstGrace      = 250 * time.Millisecond
	rateSlot        = 100 * time.Millisecond
	rateSlots       = 10
	minShedInFlight = 16
)

// completions counts events in a sliding window of rateSlots slots.
type completions struct {
	mu    sync.Mutex
	slots [rateSlots]struct{ at, n int64 } // at: the slot's index since the epoch
}

// add counts one completion at now.
func (c *completions) add(now time.Time) {
	idx := now.UnixNano() / int64(rateSlot)
	c.mu.Lock()
	defer c.mu.Unlock()
	s := &c.slots[idx%rateSlots]
	if s.at != idx {
		s.at, s.n = idx, 0
	}
	s.n++
}

// lastSecond returns the completions in the window that ends at now.
func (c *completions) lastSecond(now time.Time) int64 {
	idx := now.UnixNano() / int64(rateSlot)
	c.mu.Lock()
	defer c.mu.Unlock()
	var n int64
	for _, s := range c.slots {
		if age := idx - s.at; age >= 0 && age < rateSlots { // not a slot of a later time (the clock stepped back)
			n += s.n
		}
	}
	return n
}

// completed records that a request left the pipeline.
func (a *Admission) completed() {
	if a.cfg.TargetLatency > 0 {
		now := a.is.cfg.Now()
		a.done.add(now)
		if a.inFlight() < minShedInFlight {
			a.calm.Store(now.UnixNano())
		}
	}
}

// inFlight is how many certificate requests the server holds: those in the
// pipeline, or, when the tap counts them (MaxStreams), the calls open past
// it, which under load include many still waiting for a goroutine or their
// request before they take a slot.
func (a *Admission) inFlight() int {
	n := len(a.is.slots)
	if a.cfg.MaxStreams > 0 {
		n = max(n, int(a.streams.Load()))
	}
	return n
}

// overloaded reports whether a new request must be shed by latency: the
// requests in flight would take longer than TargetLatency to drain at the
// last second's rate.
func (a *Admission) overloaded() bool {
	if a.cfg.TargetLatency <= 0 {
		return false
	}
	now := a.is.cfg.Now()
	inFlight := a.inFlight()
	if inFlight < minShedInFlight {
		a.calm.Store(now.UnixNano())
		return false
	}
	if now.UnixNano()-a.calm.Load() <= int64(burstGrace) {
		return false // a burst on a calm server (a restart storm): up to MaxInFlight
	}
	rate := a.done.lastSecond(now) // per rateSlots×rateSlot = 1 s
	if rate < minShedInFlight {
		return true // busy and (almost) nothing completing: a stall
	}
	return time.Duration(float64(inFlight)/float64(rate)*float64(time.Second)) > a.cfg.TargetLatency
}

// shedding reports whether a certificate request arriving now must be
// refused for overload: every slot taken, or the pipeline slow (overloaded).
func (a *Admission) shedding() bool {
	return len(a.is.slots) >= cap(a.is.slots) || a.overloaded()
}

// refuseOverload counts a request shed for overload (MaxInFlight or
// TargetLatency) for the metrics and the next summary, by peer address: a
// flood of them costs a bounded number of audit records, not one each.
func (a *Admission) refuseOverload(peer string) {
	key, addr := peerKey(peer)
	a.refuse(ReasonOverload, key, refusal{peer: addr}, a.is.cfg.Now())
}

func newAdmission(cfg AdmissionConfig, is *Issuer) *Admission {
	if cfg.SummaryInterval <= 0 {
		cfg.SummaryInterval = DefaultSummaryInterval
	}
	a := &Admission{cfg: cfg, is: is,
		callers: newBuckets(cfg.CallerRate, cfg.CallerBurst, cfg.MaxKeys),
		peers:   newBuckets(cfg.PeerRate, cfg.PeerBurst, cfg.MaxKeys)}
	a.calm.Store(is.cfg.Now().UnixNano()) // a new server is calm, not stalled
	return a
}

// healthMethodPrefix starts the method names of the gRPC health service.
const healthMethodPrefix = "/grpc.health.v1.Health/"

// errReadTimeout is the cause of a call cancelled by ReadTimeout.
var errReadTimeout = errors.New("request not received in time")

// readTimerKey holds a call's read timer in its context, for Unary to stop.
type readTimerKey struct{}

// Tap is the grpc.InTapHandle: it runs for each new call on the
// connection's reader goroutine, after the headers and before a handler
// goroutine or any read of the request, so it only looks things up.
func (a *Admission) Tap(ctx context.Context, info *tap.Info) (context.Context, error) {
	now := a.is.cfg.Now()
	key, addr := peerKey(peerAddr(ctx))
	if !a.peers.hasToken(key, now) {
		a.refuse(ReasonRatePeer, key, refusal{peer: addr}, now)
		return nil, Status(Refuse(ErrRateLimited, ReasonRatePeer, errors.New("peer address rate limit"))).Err()
	}
	// An overloaded pipeline sheds certificate requests here, before the
	// request is read or a handler runs: a refusal must cost far less than
	// the work it spares (run checks again for the calls that pass).
	if info.FullMethodName == authpb.IstioCertificateService_CreateCertificate_FullMethodName && a.shedding() {
		a.is.cfg.Metrics.overloadRefused.Inc()
		a.refuseOverload(peerAddr(ctx))
		return nil, Status(Refuse(ErrOverloaded, ReasonOverload, errors.New("overloaded"))).Err()
	}
	// Health calls (grpc.health.v1) skip the stream bound: a health Check is
	// answered from memory, and Watch streams, which stay open, must not
	// crowd out certificate requests (cmd/castellan bounds them itself).
	if a.cfg.MaxStreams > 0 && !strings.HasPrefix(info.FullMethodName, healthMethodPrefix) {
		if a.streams.Add(1) > int64(a.cfg.MaxStreams) {
			a.streams.Add(-1)
			a.refuse(ReasonStreams, key, refusal{peer: addr}, now)
			return nil, Status(Refuse(ErrOverloaded, ReasonStreams, errors.New("too many open calls"))).Err()
		}
		a.is.cfg.Metrics.streamsOpen.Inc()
		// The call's context ends when the call does, whatever ended it.
		context.AfterFunc(ctx, func() {
			a.streams.Add(-1)
			a.is.cfg.Metrics.streamsOpen.Dec()
		})
	}
	if a.cfg.ReadTimeout <= 0 {
		return ctx, nil
	}
	rctx, cancel := context.WithCancelCause(ctx)
	timer := time.AfterFunc(a.cfg.ReadTimeout, func() {
		if ctx.Err() != nil {
			return // the call ended first
		}
		now := a.is.cfg.Now()
		a.peers.charge(key, now)
		a.refuse(ReasonReadTimeout, key, refusal{peer: addr}, now)
		cancel(errReadTimeout)
	})
	context.AfterFunc(ctx, func() { timer.Stop() })
	return context.WithValue(rctx, readTimerKey{}, timer), nil
}

// Unary is the unary server interceptor: the request has been read when it
// runs, so the read timeout ends; a panic of the handler becomes Internal
// instead of ending the process (the pipeline recovers its own panics first,
// so that they are audited).
func (a *Admission) Unary(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (resp any, err error) {
	if t, ok := ctx.Value(readTimerKey{}).(*time.Timer); ok {
		t.Stop()
	}
	defer func() {
		if r := recover(); r != nil {
			err = Status(a.is.recovered(r, "method", info.FullMethod)).Err()
			resp = nil
		}
	}()
	return handler(ctx, req)
}

// Stream is the stream server interceptor: the read timeout ends with the
// call's first received message (a server-streaming call's request), and a
// panic of the handler becomes Internal, as in Unary.
func (a *Admission) Stream(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) (err error) {
	defer func() {
		if r := recover(); r != nil {
			err = Status(a.is.recovered(r, "method", info.FullMethod)).Err()
		}
	}()
	return handler(srv, &firstRecv{ServerStream: ss})
}

// firstRecv stops the read timer once a message has been received.
type firstRecv struct {
	grpc.ServerStream
	once sync.Once
}

// RecvMsg receives a message and, the first time, stops the read timer.
func (s *firstRecv) RecvMsg(m any) error {
	err := s.ServerStream.RecvMsg(m)
	s.once.Do(func() {
		if t, ok := s.Context().Value(readTimerKey{}).(*time.Timer); ok && err == nil {
			t.Stop()
		}
	})
	return err
}

// recovered logs and counts a recovered panic and returns it as a
// classified error (ErrInternal, ReasonPanic). what, value name where it
// happened.
func (is *Issuer) recovered(r any, what, value string) error {
	is.cfg.Metrics.panics.Inc()
	msg := storage.Sanitize(fmt.Sprint(r), storage.MaxDetailLen)
	is.cfg.Logger.Error("panic recovered; the call fails with Internal", what, value, "panic", msg, "stack", string(debug.Stack()))
	return Refuse(ErrInternal, ReasonPanic, fmt.Errorf("panic: %s", msg))
}

// allowCaller takes a token from the caller's bucket, or refuses (ErrRateLimited).
func (a *Admission) allowCaller(c *authn.Caller, requested, peerAddr string) error {
	if c.Operator || !a.callers.enabled() {
		return nil
	}
	now := a.is.cfg.Now()
	key := callerKey(c, requested)
	if a.callers.allow(key, now) {
		return nil
	}
	a.refuse(ReasonRateCaller, key, refusal{method: c.Method, caller: c.Name, requested: requested, peer: peerAddr}, now)
	return Refuse(ErrRateLimited, ReasonRateCaller, fmt.Errorf("rate limit of %s exceeded (%g/s, burst %d)", c.Name, float64(a.cfg.CallerRate), a.cfg.CallerBurst))
}

// chargePeer charges a failed authentication to the peer of ctx.
func (a *Admission) chargePeer(ctx context.Context) {
	if a.peers.enabled() {
		key, _ := peerKey(peerAddr(ctx))
		a.peers.charge(key, a.is.cfg.Now())
	}
}

// refuse counts a refusal for the metrics and the next summary.
func (a *Admission) refuse(reason string, key bucketKey, sample refusal, now time.Time) {
	a.is.cfg.Metrics.admissionRefused.WithLabelValues(reason).Inc()
	a.refused.add(reason, key, sample, now)
}

// callerKey names the bucket of an authenticated caller: its method, name,
// cluster and pod (each pod instance of a workload is its own caller), and
// the identity it asks for when that is not its own. A node proxy (ztunnel)
// thus has one bucket per workload identity it renews, so that a whole
// node restarting at once costs each bucket one token, while a caller asking
// for one identity over and over is limited.
func callerKey(c *authn.Caller, requested string) bucketKey {
	var uid string
	if c.Pod != nil {
		uid = c.Pod.UID
	}
	if requested == c.Identity.String() {
		requested = ""
	}
	return keyOf(c.Method, c.Name, c.ClusterID, uid, requested)
}

// peerAddr returns the remote address of the call in ctx ("" if none).
func peerAddr(ctx context.Context) string {
	if p, ok := peer.FromContext(ctx); ok && p.Addr != nil {
		return p.Addr.String()
	}
	return ""
}

// peerKey names the bucket of a remote address and says which addresses
// share it: the IP of an IPv4 peer, the /64 of an IPv6 one (a single host
// commonly holds a whole /64).
func peerKey(addr string) (bucketKey, string) {
	ap, err := netip.ParseAddrPort(addr)
	if err != nil {
		return keyOf("addr", addr), addr
	}
	ip := ap.Addr().Unmap()
	if ip.Is6() {
		p, _ := ip.Prefix(64)
		return keyOf("ip", p.String()), p.String()
	}
	return keyOf("ip", ip.String()), ip.String()
}

// Run writes a summary of the refusals every SummaryInterval until ctx ends,
// then a last one; it drops refilled buckets at each summary. It returns nil.
func (a *Admission) Run(ctx context.Context) error {
	t := time.NewTicker(a.cfg.SummaryInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			a.Summarize(context.WithoutCancel(ctx))
			return nil
		case <-t.C:
			a.Summarize(ctx)
		}
	}
}

// Summarize writes one audit record per key refused since the last summary
// (at most maxRefusalRecords, then one per reason for the further keys),
// each with the number of calls and the period in its detail, and drops the
// buckets that have refilled. An append that fails is logged; its calls
// stay counted in the metrics.
func (a *Admission) Summarize(ctx context.Context) {
	now := a.is.cfg.Now()
	a.callers.sweep(now)
	a.peers.sweep(now)
	m := a.is.cfg.Metrics
	m.bucketKeys.WithLabelValues("caller").Set(float64(a.callers.size()))
	m.bucketKeys.WithLabelValues("peer").Set(float64(a.peers.size()))
	perKey, further := a.refused.take()
	for _, r := range perKey {
		a.appendSummary(ctx, r, now, fmt.Sprintf("%d calls refused from %s to %s%s", r.count,
			r.first.UTC().Format(time.RFC3339Nano), r.last.UTC().Format(time.RFC3339Nano), a.limitOf(r.reason)))
	}
	for _, r := range further {
		a.appendSummary(ctx, r, now, fmt.Sprintf("%d calls of further callers refused from %s to %s%s (a summary names at most %d callers)",
			r.count, r.first.UTC().Format(time.RFC3339Nano), r.last.UTC().Format(time.RFC3339Nano), a.limitOf(r.reason), maxRefusalRecords))
	}
}

func (a *Admission) appendSummary(ctx context.Context, r *refusal, now time.Time, detail string) {
	code := codes.ResourceExhausted
	if r.reason == ReasonReadTimeout {
		code = codes.Canceled
	}
	rec := &storage.Record{Time: now.UTC(), Kind: storage.KindCSR, RequestID: newRequestID(a.is.cfg.Rand),
		Peer: r.peer, AuthMethod: r.method, Caller: r.caller, RequestedIdentity: r.requested,
		Outcome: storage.OutcomeRefused, Reason: r.reason, Code: code.String(), Detail: detail}
	if err := a.is.audit.Append(ctx, rec); err != nil {
		a.is.cfg.Logger.Error("audit of refused calls failed", "reason", r.reason, "calls", r.count, "error", err)
	}
}

// limitOf describes the limit behind reason, for a summary's detail.
func (a *Admission) limitOf(reason string) string {
	switch reason {
	case ReasonRateCaller:
		return fmt.Sprintf(" (caller rate limit %g/s, burst %d)", float64(a.cfg.CallerRate), a.cfg.CallerBurst)
	case ReasonRatePeer:
		return fmt.Sprintf(" (peer address rate limit %g/s, burst %d, charged by failed authentications)", float64(a.cfg.PeerRate), a.cfg.PeerBurst)
	case ReasonStreams:
		return fmt.Sprintf(" (%d calls open on the server)", a.cfg.MaxStreams)
	case ReasonOverload:
		return fmt.Sprintf(" (%d requests in flight, or more than drain in %s at the last second's rate)", a.is.cfg.MaxInFlight, a.cfg.TargetLatency)
	case ReasonReadTimeout:
		return fmt.Sprintf(" (request not received within %s of its headers)", a.cfg.ReadTimeout)
	}
	return ""
}
