package main

import (
	"testing"
	"time"

	"golang.org/x/time/rate"
)

// TestLimitsConfig: every limit has a default, a YAML key and a flag, and an
// invalid value fails naming its key.
func TestLimitsConfig(t *testing.T) {
	for _, tc := range []struct {
		name    string
		file    string
		args    []string
		wantErr string
		want    func(c LimitsConfig) bool
	}{
		{name: "defaults", want: func(c LimitsConfig) bool { return c == limitsDefaults() }},
		{name: "file keys", file: "maxConnections: 10\nmaxConcurrentStreams: 5\nmaxStreams: 7\nmaxHeaderBytes: 8192\nhandshakeTimeout: 3s\n" +
			"requestReadTimeout: 4s\nmaxConnectionIdle: 1m\nhttpMaxConnections: 9\ncallerRateLimit: 0.5\ncallerBurst: 2\npeerRateLimit: 0\n" +
			"peerBurst: 3\nrateLimitKeys: 11\nrefusalAuditInterval: 1s\nshutdownGracePeriod: 30s\noverloadLatency: 50ms\n",
			want: func(c LimitsConfig) bool {
				return c == LimitsConfig{MaxConnections: 10, MaxConcurrentStreams: 5, MaxStreams: 7, MaxHeaderBytes: 8192,
					HandshakeTimeout: 3 * time.Second, RequestReadTimeout: 4 * time.Second, MaxConnectionIdle: time.Minute,
					HTTPMaxConnections: 9, CallerRateLimit: 0.5, CallerBurst: 2, PeerRateLimit: 0, PeerBurst: 3, RateLimitKeys: 11,
					RefusalAuditInterval: time.Second, ShutdownGracePeriod: 30 * time.Second, OverloadLatency: 50 * time.Millisecond}
			}},
		{name: "flags", args: []string{"--max-connections", "10", "--max-concurrent-streams", "5", "--max-streams", "7",
			"--max-header-bytes", "8192", "--handshake-timeout", "3s", "--request-read-timeout", "4s", "--max-connection-idle", "1m",
			"--http-max-connections", "9", "--caller-rate-limit", "0.5", "--caller-burst", "2", "--peer-rate-limit", "0",
			"--peer-burst", "3", "--rate-limit-keys", "11", "--refusal-audit-interval", "1s", "--shutdown-grace-period", "30s",
			"--overload-latency", "0"},
			want: func(c LimitsConfig) bool {
				a := c.admission()
				return c.MaxConnections == 10 && c.MaxConcurrentStreams == 5 && a.MaxStreams == 7 && c.MaxHeaderBytes == 8192 &&
					c.HandshakeTimeout == 3*time.Second && a.ReadTimeout == 4*time.Second && c.MaxConnectionIdle == time.Minute &&
					c.http().MaxConnections == 9 && a.CallerRate == rate.Limit(0.5) && a.CallerBurst == 2 && a.PeerRate == 0 &&
					a.PeerBurst == 3 && a.MaxKeys == 11 && a.SummaryInterval == time.Second && c.ShutdownGracePeriod == 30*time.Second &&
					a.TargetLatency == 0
			}},
		{name: "grace leaves room for the audit timeout", args: []string{"--shutdown-grace-period", "6s"}, wantErr: "shutdownGracePeriod"},
		{name: "zero connections", args: []string{"--max-connections", "0"}, wantErr: "maxConnections"},
		{name: "zero streams", file: "maxConcurrentStreams: 0\n", wantErr: "maxConcurrentStreams"},
		{name: "tiny headers", args: []string{"--max-header-bytes", "100"}, wantErr: "maxHeaderBytes"},
		{name: "no handshake time", args: []string{"--handshake-timeout", "0s"}, wantErr: "handshakeTimeout"},
		{name: "negative rate", args: []string{"--caller-rate-limit", "-1"}, wantErr: "callerRateLimit"},
		{name: "zero burst", file: "peerBurst: 0\n", wantErr: "peerBurst"},
		{name: "negative overload latency", args: []string{"--overload-latency", "-1s"}, wantErr: "overloadLatency"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if c, ok := loadCase(t, tc.file, tc.args, tc.wantErr); ok && !tc.want(c.LimitsConfig) {
				t.Errorf("limits = %+v", c.LimitsConfig)
			}
		})
	}
	if d := limitsDefaults().grpcDrain(5 * time.Second); d != 9*time.Second {
		t.Errorf("default drain %s, want 9s (15s grace less a 5s audit timeout and 1s)", d)
	}
}
