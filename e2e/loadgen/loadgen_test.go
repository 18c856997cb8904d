package main

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

func TestHistogramBuckets(t *testing.T) {
	tests := []time.Duration{0, time.Microsecond, 255 * time.Microsecond, 256 * time.Microsecond, 257 * time.Microsecond,
		999 * time.Microsecond, 3 * time.Millisecond, 9999 * time.Microsecond, 250 * time.Millisecond, 10 * time.Second, time.Hour}
	for _, d := range tests {
		t.Run(d.String(), func(t *testing.T) {
			i := bucketOf(d)
			up := bucketUpper(i)
			if up < d.Truncate(time.Microsecond) {
				t.Fatalf("bucket %d upper bound %v below %v", i, up, d)
			}
			if i > 0 && bucketUpper(i-1) >= d.Truncate(time.Microsecond) {
				t.Fatalf("bucket %d is not the first to hold %v (bucket %d ends at %v)", i, d, i-1, bucketUpper(i-1))
			}
			if d >= 256*time.Microsecond && float64(up-d) > float64(d)/subBuckets {
				t.Fatalf("upper bound %v is more than 1/%d above %v", up, subBuckets, d)
			}
		})
	}
}

func TestHistogramQuantiles(t *testing.T) {
	r := newRecorder()
	r.start()
	for us := 1; us <= 10000; us++ { // uniform 1 µs .. 10 ms
		r.observe(time.Duration(us)*time.Microsecond, nil)
	}
	r.observe(time.Millisecond, status.Error(codes.Unavailable, "audit down"))
	r.observe(time.Millisecond, errBadResponse)
	h := r.snapshot()
	tests := []struct {
		q    float64
		want time.Duration
	}{{0.5, 5 * time.Millisecond}, {0.9, 9 * time.Millisecond}, {0.99, 9900 * time.Microsecond}, {1, 10 * time.Millisecond}}
	for _, tc := range tests {
		got := h.quantile(tc.q)
		if got < tc.want || float64(got-tc.want) > float64(tc.want)/subBuckets {
			t.Errorf("quantile(%v) = %v, want %v within 1/%d above", tc.q, got, tc.want, subBuckets)
		}
	}
	c := r.codeCounts()
	if c.ok != 10000 || c.failed() != 2 || c.max != 10*time.Millisecond {
		t.Errorf("counts = %d ok, %d failed, max %v; want 10000, 2, 10ms", c.ok, c.failed(), c.max)
	}
	names := map[string]uint64{}
	for _, e := range c.errors {
		names[e.name] = e.n
	}
	if names["Unavailable"] != 1 || names["BadResponse"] != 1 {
		t.Errorf("errors by code = %v, want Unavailable 1 and BadResponse 1", names)
	}
}

func TestParseOptions(t *testing.T) {
	tests := []struct {
		name    string
		args    []string
		wantErr string
		check   func(options) bool
	}{
		{name: "istio defaults", args: []string{"-mode", "istio"},
			check: func(o options) bool {
				return o.clients == 32 && o.duration == 30*time.Second && o.istioCAKey == "ecdsa-p256"
			}},
		{name: "count without duration", args: []string{"-mode", "istio", "-requests", "100"},
			check: func(o options) bool { return o.duration == 0 && o.requests == 100 }},
		{name: "castellan needs a server", args: []string{"-mode", "castellan"}, wantErr: "-castellan-bin"},
		{name: "compare starts its own servers", args: []string{"-mode", "compare"}, wantErr: "-castellan-bin"},
		{name: "storm needs the apiserver", args: []string{"-mode", "storm", "-castellan-bin", "c", "-kube-bin-dir", ""}, wantErr: "-kube-bin-dir"},
		{name: "storm defaults", args: []string{"-mode", "storm", "-castellan-bin", "c", "-kube-bin-dir", "k"},
			check: func(o options) bool { return o.stormPods == 1000 && o.stormNodes == 10 && o.stormRounds == 2 }},
		{name: "overload defaults", args: []string{"-mode", "overload", "-castellan-bin", "c"},
			check: func(o options) bool { return o.overloadFactor == 4 && o.overloadDuration == 15*time.Second }},
		{name: "fewer pods than nodes", args: []string{"-mode", "storm", "-castellan-bin", "c", "-kube-bin-dir", "k", "-storm-pods", "5"}, wantErr: "-storm-pods"},
		{name: "no overload", args: []string{"-mode", "overload", "-castellan-bin", "c", "-overload-factor", "0"}, wantErr: "-overload-factor"},
		{name: "unknown mode", args: []string{"-mode", "vault"}, wantErr: "-mode"},
		{name: "no clients", args: []string{"-mode", "istio", "-clients", "0"}, wantErr: "-clients"},
		{name: "unbounded duration", args: []string{"-mode", "istio", "-duration", "100h"}, wantErr: "-duration"},
		{name: "unknown Istio key", args: []string{"-mode", "istio", "-istio-ca-key", "ed25519"}, wantErr: "-istio-ca-key"},
		{name: "stray argument", args: []string{"-mode", "istio", "extra"}, wantErr: "unexpected"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			o, err := parseOptions(tc.args)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("parseOptions error = %v, want one mentioning %q", err, tc.wantErr)
				}
				return
			}
			if err != nil || !tc.check(o) {
				t.Fatalf("parseOptions = %+v, %v", o, err)
			}
		})
	}
}

// TestDriveIstio runs the client code against Istio's CA server in this
// process for a fixed number of requests: every one must succeed.
func TestDriveIstio(t *testing.T) {
	tgt := inProcessIstio(t)
	o := options{mode: "istio", clients: 4, requests: 64, timeout: 10 * time.Second, ttl: time.Hour, csrs: 2}
	checkDrive(t, tgt, o)
}

// TestDriveCastellan starts the real castellan binary (CASTELLAN_BIN, or
// built from the parent module) through the load generator's own launcher,
// bootstraps the clients through the admin API and runs a fixed number of requests.
func TestDriveCastellan(t *testing.T) {
	bin := os.Getenv("CASTELLAN_BIN")
	if bin == "" {
		bin = filepath.Join(t.TempDir(), "castellan")
		cmd := exec.Command("go", "build", "-o", bin, "./cmd/castellan")
		cmd.Dir = filepath.Join("..", "..")
		cmd.Env = append(os.Environ(), "GOWORK=off")
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("build castellan (or set CASTELLAN_BIN): %v\n%s", err, out)
		}
	}
	o := options{mode: "castellan", clients: 4, requests: 64, timeout: 10 * time.Second, ttl: time.Hour, csrs: 2, castellanBin: bin}
	ctx, cancel := context.WithTimeout(context.Background(), startTimeout)
	defer cancel()
	tgt, err := castellanTarget(ctx, o)
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		if err := tgt.stop(); err != nil {
			t.Errorf("stop castellan: %v", err)
		}
	}()
	if len(tgt.creds) != 4 || tgt.pid == 0 {
		t.Fatalf("target has %d credentials and pid %d, want 4 and the child's", len(tgt.creds), tgt.pid)
	}
	res := checkDrive(t, tgt, o)
	if len(res.memory.samples) == 0 || res.memory.samples[0].rssKiB == 0 {
		t.Errorf("no memory sample of the castellan process")
	}
}

func checkDrive(t *testing.T, tgt *target, o options) *result {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), startTimeout)
	defer cancel()
	clients, err := newClients(ctx, tgt, o)
	if err != nil {
		t.Fatal(err)
	}
	defer closeClients(clients)
	var out bytes.Buffer
	res, err := drive(ctx, clients, tgt, o, &out)
	if err != nil {
		t.Fatalf("drive: %v", err)
	}
	if res.codes.ok != uint64(o.requests) || res.codes.failed() != 0 || res.hist.count() != uint64(o.requests) {
		t.Fatalf("%d ok, %d failed, %d timed; want %d, 0, %d (errors %+v)", res.codes.ok, res.codes.failed(), res.hist.count(), o.requests, o.requests, res.codes.errors)
	}
	res.print(&out, o)
	if !strings.Contains(out.String(), "throughput:") {
		t.Errorf("summary lacks throughput:\n%s", out.String())
	}
	return res
}

// inProcessIstio starts Istio's CA server (P-256 root) in this process for the
// test's lifetime and returns the target the client code dials.
func inProcessIstio(t *testing.T) *target {
	t.Helper()
	dir := t.TempDir()
	stop, err := startIstioServer(dir, 4, "ecdsa-p256", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(stop)
	tgt, err := readIstioDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	return tgt
}
