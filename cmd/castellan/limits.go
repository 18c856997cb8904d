package main

import (
	"flag"
	"math"
	"time"

	"github.com/castellan-ca/castellan/ca"
	"github.com/castellan-ca/castellan/internal/netlimit"
	"golang.org/x/time/rate"
	"google.golang.org/grpc"
	"google.golang.org/grpc/keepalive"
)

// LimitsConfig holds what bounds a hostile peer (README, "Threat model and
// limits"), at the top level of the file.
type LimitsConfig struct {
	MaxConnections       int           `yaml:"maxConnections"`
	MaxConcurrentStreams int           `yaml:"maxConcurrentStreams"`
	MaxStreams           int           `yaml:"maxStreams"`
	MaxHeaderBytes       int           `yaml:"maxHeaderBytes"`
	HandshakeTimeout     time.Duration `yaml:"handshakeTimeout"`
	RequestReadTimeout   time.Duration `yaml:"requestReadTimeout"`
	MaxConnectionIdle    time.Duration `yaml:"maxConnectionIdle"`
	HTTPMaxConnections   int           `yaml:"httpMaxConnections"`
	CallerRateLimit      float64       `yaml:"callerRateLimit"`
	CallerBurst          int           `yaml:"callerBurst"`
	PeerRateLimit        float64       `yaml:"peerRateLimit"`
	PeerBurst            int           `yaml:"peerBurst"`
	RateLimitKeys        int           `yaml:"rateLimitKeys"`
	RefusalAuditInterval time.Duration `yaml:"refusalAuditInterval"`
	ShutdownGracePeriod  time.Duration `yaml:"shutdownGracePeriod"`
	OverloadLatency      time.Duration `yaml:"overloadLatency"`
}

func limitsDefaults() LimitsConfig {
	return LimitsConfig{
		MaxConnections: 1024,
		// A ztunnel multiplexes a whole node's renewals on one connection;
		// a client beyond the bound waits for a stream (HTTP/2 flow), it is
		// not refused.
		MaxConcurrentStreams: 100,
		MaxStreams:           2048,
		// A projected token is ~1 KiB and an OIDC token a few; Istio's other
		// headers are small.
		MaxHeaderBytes:       16 << 10,
		HandshakeTimeout:     10 * time.Second,
		RequestReadTimeout:   10 * time.Second,
		MaxConnectionIdle:    2 * time.Minute,
		HTTPMaxConnections:   64,
		CallerRateLimit:      float64(ca.DefaultCallerRate),
		CallerBurst:          ca.DefaultCallerBurst,
		PeerRateLimit:        float64(ca.DefaultPeerRate),
		PeerBurst:            ca.DefaultPeerBurst,
		RateLimitKeys:        ca.DefaultRateLimitKeys,
		RefusalAuditInterval: ca.DefaultSummaryInterval,
		ShutdownGracePeriod:  15 * time.Second,
		// Well above an unloaded request's wait (milliseconds), well
		// below the second where clients give up.
		OverloadLatency: 200 * time.Millisecond,
	}
}

func bindLimitFlags(fs *flag.FlagSet, c *LimitsConfig) {
	fs.IntVar(&c.MaxConnections, "max-connections", c.MaxConnections, "open gRPC connections; further ones are closed at accept")
	fs.IntVar(&c.MaxConcurrentStreams, "max-concurrent-streams", c.MaxConcurrentStreams, "concurrent gRPC calls per connection (HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS)")
	fs.IntVar(&c.MaxStreams, "max-streams", c.MaxStreams, "gRPC calls open at once on the server; further ones get ResourceExhausted")
	fs.IntVar(&c.MaxHeaderBytes, "max-header-bytes", c.MaxHeaderBytes, "largest request header block on every listener (HTTP/2: decoded header list)")
	fs.DurationVar(&c.HandshakeTimeout, "handshake-timeout", c.HandshakeTimeout, "TLS and HTTP/2 handshake deadline of a new connection, on every listener")
	fs.DurationVar(&c.RequestReadTimeout, "request-read-timeout", c.RequestReadTimeout, "time from a gRPC call's headers to its request message")
	fs.DurationVar(&c.MaxConnectionIdle, "max-connection-idle", c.MaxConnectionIdle, "a gRPC connection without calls for this long is closed (GOAWAY)")
	fs.IntVar(&c.HTTPMaxConnections, "http-max-connections", c.HTTPMaxConnections, "open connections per HTTP listener (monitoring, bundle endpoint)")
	fs.Float64Var(&c.CallerRateLimit, "caller-rate-limit", c.CallerRateLimit, "calls per second per authenticated caller (0: no limit)")
	fs.IntVar(&c.CallerBurst, "caller-burst", c.CallerBurst, "calls an authenticated caller may make at once")
	fs.Float64Var(&c.PeerRateLimit, "peer-rate-limit", c.PeerRateLimit, "failed authentications per second per peer address before its calls are refused (0: no limit)")
	fs.IntVar(&c.PeerBurst, "peer-burst", c.PeerBurst, "failed authentications a peer address may have at once")
	fs.IntVar(&c.RateLimitKeys, "rate-limit-keys", c.RateLimitKeys, "token buckets kept per table (callers, peers)")
	fs.DurationVar(&c.RefusalAuditInterval, "refusal-audit-interval", c.RefusalAuditInterval, "how often rate-limit refusals are summarised in the audit log")
	fs.DurationVar(&c.ShutdownGracePeriod, "shutdown-grace-period", c.ShutdownGracePeriod, "longest time from SIGTERM to exit")
	fs.DurationVar(&c.OverloadLatency, "overload-latency", c.OverloadLatency, "new CSRs get ResourceExhausted while those in flight would take longer than this to drain at the last second's rate (0: only maxInFlight sheds)")
}

// validate checks the limit keys; cfg gives the audit timeout the grace
// period must leave room for.
func (c LimitsConfig) validate(bad func(key, format string, a ...any), cfg Config) {
	for key, v := range map[string]int{"maxConnections": c.MaxConnections, "maxConcurrentStreams": c.MaxConcurrentStreams,
		"maxStreams": c.MaxStreams, "httpMaxConnections": c.HTTPMaxConnections, "callerBurst": c.CallerBurst,
		"peerBurst": c.PeerBurst, "rateLimitKeys": c.RateLimitKeys} {
		if v <= 0 {
			bad(key, "must be positive")
		}
	}
	if c.MaxConcurrentStreams > math.MaxUint32 {
		bad("maxConcurrentStreams", "must fit in 32 bits")
	}
	if c.MaxHeaderBytes < 4<<10 || c.MaxHeaderBytes > 1<<20 {
		bad("maxHeaderBytes", "must be between 4096 and 1048576")
	}
	for key, d := range map[string]time.Duration{"handshakeTimeout": c.HandshakeTimeout, "requestReadTimeout": c.RequestReadTimeout,
		"maxConnectionIdle": c.MaxConnectionIdle, "refusalAuditInterval": c.RefusalAuditInterval} {
		if d < 100*time.Millisecond {
			bad(key, "must be at least 100ms")
		}
	}
	for key, r := range map[string]float64{"callerRateLimit": c.CallerRateLimit, "peerRateLimit": c.PeerRateLimit} {
		if r < 0 || math.IsNaN(r) || math.IsInf(r, 0) {
			bad(key, "must be 0 (no limit) or a positive number of calls per second")
		}
	}
	if c.OverloadLatency < 0 || c.OverloadLatency > time.Minute {
		bad("overloadLatency", "must be between 0 (off) and 1m")
	}
	if c.ShutdownGracePeriod < cfg.AuditTimeout+2*time.Second {
		bad("shutdownGracePeriod", "must exceed auditTimeout (%s) by at least 2s: calls still writing their audit record are waited for", cfg.AuditTimeout)
	}
}

// admission is the issuer's admission configuration.
func (c LimitsConfig) admission() ca.AdmissionConfig {
	return ca.AdmissionConfig{
		CallerRate: rate.Limit(c.CallerRateLimit), CallerBurst: c.CallerBurst,
		PeerRate: rate.Limit(c.PeerRateLimit), PeerBurst: c.PeerBurst,
		MaxKeys: c.RateLimitKeys, MaxStreams: c.MaxStreams, ReadTimeout: c.RequestReadTimeout,
		SummaryInterval: c.RefusalAuditInterval, TargetLatency: c.OverloadLatency,
	}
}

// grpcFlowWindow is the HTTP/2 flow-control window of each stream and of each
// connection. Requests are a few KiB; a fixed window (instead of gRPC's
// BDP-driven one, which grows to 16 MiB) bounds the request bytes a
// connection can make the server buffer before a handler reads them.
const grpcFlowWindow = 64 << 10

// grpcStreamWorkers is how many goroutines serve gRPC streams in turn. A
// handler's stack grows to what ECDSA, x509 and the audit wait need; a fresh
// goroutine per call grows (copies) it again each time, ~4% of the server's
// CPU under load (BENCHMARKS.md, "Hot path profile"). A handler mostly waits
// for the audit commit, so the pool is sized for concurrency, not cores; a
// call finding every worker busy gets its own goroutine, as without the pool.
// gRPC marks the option experimental; dropping it only costs that CPU back.
const grpcStreamWorkers = 64

// grpcOptions are the gRPC server options that bound what a peer can make
// the server hold, with adm's checks before any handler runs.
func (c LimitsConfig) grpcOptions(adm *ca.Admission) []grpc.ServerOption {
	return []grpc.ServerOption{
		grpc.MaxHeaderListSize(uint32(c.MaxHeaderBytes)),          //nolint:gosec // validated to at most 1 MiB
		grpc.MaxConcurrentStreams(uint32(c.MaxConcurrentStreams)), //nolint:gosec // validated to fit
		grpc.ConnectionTimeout(c.HandshakeTimeout),
		grpc.InitialWindowSize(grpcFlowWindow),
		grpc.InitialConnWindowSize(grpcFlowWindow),
		grpc.NumStreamWorkers(grpcStreamWorkers),
		// Istio's clients ping after 30 s idle; allow down to 10 s so they are never cut off.
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: 10 * time.Second, PermitWithoutStream: true}),
		grpc.KeepaliveParams(keepalive.ServerParameters{Time: 2 * time.Minute, Timeout: 20 * time.Second, MaxConnectionIdle: c.MaxConnectionIdle}),
		grpc.InTapHandle(adm.Tap),
		grpc.ChainUnaryInterceptor(adm.Unary),
		grpc.ChainStreamInterceptor(adm.Stream),
	}
}

// http returns the limits of an HTTP listener.
func (c LimitsConfig) http() netlimit.HTTP {
	return netlimit.HTTP{MaxConnections: c.HTTPMaxConnections, MaxHeaderBytes: c.MaxHeaderBytes,
		ReadHeaderTimeout: c.HandshakeTimeout, IdleTimeout: c.MaxConnectionIdle}
}

// grpcDrain is how long in-flight calls get to finish at shutdown before
// they are cancelled: the grace period less what a cancelled call may still
// take to write its audit record, and a second for the rest.
func (c LimitsConfig) grpcDrain(auditTimeout time.Duration) time.Duration {
	return max(c.ShutdownGracePeriod-auditTimeout-time.Second, time.Second)
}
