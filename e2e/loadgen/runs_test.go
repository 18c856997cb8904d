package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// TestPhasePacing: a phase offers exactly rate × duration requests, due
// evenly from its start, the last one before its end.
func TestPhasePacing(t *testing.T) {
	for _, tc := range []struct {
		rate float64
		dur  time.Duration
		want int64
	}{
		{1000, time.Second, 1000},
		{2500, 8 * time.Second, 20000},
		{3, 1500 * time.Millisecond, 5}, // due at 0, 333, 667, 1000, 1333 ms
		{0.5, time.Second, 1},
	} {
		p := phase{rate: tc.rate, dur: tc.dur}
		if got := p.count(); got != tc.want {
			t.Errorf("rate %v for %v: %d requests, want %d", tc.rate, tc.dur, got, tc.want)
		}
		if p.at(0) != 0 || p.at(p.count()-1) >= tc.dur {
			t.Errorf("rate %v for %v: first due at %v, last at %v; want 0 and before the end", tc.rate, tc.dur, p.at(0), p.at(p.count()-1))
		}
		if p.count() > 1 {
			gap := p.at(1) - p.at(0)
			if want := time.Duration(float64(time.Second) / tc.rate); gap != want {
				t.Errorf("rate %v: gap %v, want %v", tc.rate, gap, want)
			}
		}
	}
}

// TestTimeline: outcomes land in the second they were due in, shed and
// other errors apart, and healthyFrom finds the first second from which
// every later one is healthy.
func TestTimeline(t *testing.T) {
	tl := newTimeline(6 * time.Second)
	shed := status.Error(codes.ResourceExhausted, "CA overloaded")
	for sec := range 6 {
		due := time.Duration(sec)*time.Second + 10*time.Millisecond
		lat := 5 * time.Millisecond
		if sec == 2 || sec == 3 {
			lat = 2 * time.Second // seconds 2 and 3 are slow
		}
		for range 100 {
			tl.observe(due, lat, nil)
		}
		if sec <= 2 {
			tl.observe(due, time.Millisecond, shed) // shedding until second 2
		}
	}
	tl.observe(4500*time.Millisecond, time.Second, status.Error(codes.DeadlineExceeded, "late"))
	tl.notSent(time.Hour) // beyond the run: the last second
	tl.sent(1100*time.Millisecond, 3*time.Millisecond)
	tl.sent(1200*time.Millisecond, 7*time.Millisecond)
	if tl.secs[1].lag != 7*time.Millisecond || tl.secs[0].lag != 0 {
		t.Errorf("lag of second 1 = %v, of second 0 = %v; want 7ms and 0", tl.secs[1].lag, tl.secs[0].lag)
	}

	s := tl.secs[1]
	if s.offered != 101 || s.ok != 100 || s.shed != 1 || s.other != 0 || s.hist.count() != 100 {
		t.Errorf("second 1 = %+v, want 101 offered, 100 ok, 1 shed", s)
	}
	if p99 := tl.secs[3].hist.quantile(0.99); p99 < 2*time.Second || p99 > 2100*time.Millisecond {
		t.Errorf("second 3 p99 = %v, want 2s", p99)
	}
	if tl.secs[4].other != 1 || tl.secs[6].unsent != 1 {
		t.Errorf("other errors in second 4 = %d, not sent in the last second = %d; want 1 and 1", tl.secs[4].other, tl.secs[6].unsent)
	}
	sum := tl.span(0, 3)
	if sum.ok != 300 || sum.shed != 3 || sum.offered != 303 {
		t.Errorf("span(0,3) = %d ok, %d shed, %d offered; want 300, 3, 303", sum.ok, sum.shed, sum.offered)
	}
	if m := tl.maxP99(0, 6); m < 2*time.Second {
		t.Errorf("maxP99 = %v, want the slow seconds' 2s", m)
	}
	for _, tc := range []struct {
		from, to int
		limit    time.Duration
		want     int
	}{
		{0, 6, 10 * time.Millisecond, 5},  // second 4 has an error, 5 is clean
		{0, 4, 10 * time.Millisecond, -1}, // second 3 is slow
		{0, 4, 3 * time.Second, 3},        // slow is fine, but 2 shed
		{5, 6, 10 * time.Millisecond, 5},
	} {
		if got := tl.healthyFrom(tc.from, tc.to, tc.limit); got != tc.want {
			t.Errorf("healthyFrom(%d, %d, %v) = %d, want %d", tc.from, tc.to, tc.limit, got, tc.want)
		}
	}
}

// TestOpenLoopIstio offers a fixed schedule to Istio's CA server in this
// process: every due request is sent and answered, whatever the timing.
func TestOpenLoopIstio(t *testing.T) {
	tgt := inProcessIstio(t)
	o := options{mode: "istio", clients: 4, timeout: 30 * time.Second, ttl: time.Hour, csrs: 2}
	ctx, cancel := context.WithTimeout(context.Background(), startTimeout)
	defer cancel()
	clients, err := newClients(ctx, tgt, o)
	if err != nil {
		t.Fatal(err)
	}
	defer closeClients(clients)
	phases := []phase{{name: "a", rate: 100, dur: time.Second}, {name: "b", rate: 50, dur: time.Second}}
	tl := openLoop(ctx, clients, phases, o)
	a, b := tl.span(0, 1), tl.span(1, 3)
	if a.offered != 100 || a.ok != 100 || b.offered != 50 || b.ok != 50 {
		t.Fatalf("phase a %d offered %d ok, phase b %d offered %d ok; want 100/100 and 50/50 (examples %v)", a.offered, a.ok, b.offered, b.ok, tl.ex)
	}
	var out bytes.Buffer
	printOverload(&out, tl, phases, 10*time.Millisecond, nil)
	if !strings.Contains(out.String(), "| 1 | b | 50 | 50 | 0 | 0 |") {
		t.Errorf("timeline lacks second 1 of phase b:\n%s", out.String())
	}
}

// TestStormLayout: every pod is its own identity, nodes get an even share,
// namespaces hold at most podsPerNamespace.
func TestStormLayout(t *testing.T) {
	pods := stormLayout(1000, 10)
	if len(pods) != 1000 {
		t.Fatalf("%d pods, want 1000", len(pods))
	}
	ids, perNode, perNS := map[string]bool{}, map[string]int{}, map[string]int{}
	for _, p := range pods {
		ids[p.id("cluster.local")] = true
		perNode[p.node]++
		perNS[p.ns]++
	}
	if len(ids) != 1000 {
		t.Errorf("%d distinct identities, want 1000", len(ids))
	}
	if len(perNode) != 10 {
		t.Errorf("%d nodes used, want 10", len(perNode))
	}
	for n, c := range perNode {
		if c != 100 {
			t.Errorf("node %s has %d pods, want 100", n, c)
		}
	}
	for ns, c := range perNS {
		if c > podsPerNamespace {
			t.Errorf("namespace %s has %d pods, more than %d", ns, c, podsPerNamespace)
		}
	}
	if got := stormLayout(7, 3); got[6].node != stormNode(0) || got[5].node != stormNode(2) {
		t.Errorf("7 pods on 3 nodes: pod 5 on %s, pod 6 on %s; want round-robin", got[5].node, got[6].node)
	}
}

// TestTreeCPU: a process's tree CPU is its own, its live descendants' and
// what each reaped of its exited children, and nothing of other processes.
func TestTreeCPU(t *testing.T) {
	root := t.TempDir()
	write := func(pid, ppid int, ut, st, cut, cst int64) {
		dir := filepath.Join(root, fmt.Sprint(pid))
		if err := os.MkdirAll(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		// pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime stime cutime cstime ...
		line := fmt.Sprintf("%d (postgres: a b) S %d 1 1 0 -1 0 0 0 0 0 %d %d %d %d 20 0 1 0\n", pid, ppid, ut, st, cut, cst)
		if err := os.WriteFile(filepath.Join(dir, "stat"), []byte(line), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	write(10, 1, 100, 50, 30, 20) // postmaster: reaped backends 30+20
	write(11, 10, 7, 3, 0, 0)     // backend
	write(12, 11, 1, 1, 0, 0)     // its child
	write(13, 1, 500, 500, 0, 0)  // unrelated
	write(14, 13, 9, 9, 0, 0)     // unrelated child
	got, err := treeCPU(root, 10)
	if want := ticksToDuration(100 + 50 + 30 + 20 + 7 + 3 + 1 + 1); err != nil || got != want {
		t.Errorf("treeCPU(10) = %v, %v; want %v", got, err, want)
	}
	if _, err := treeCPU(root, 99); err == nil {
		t.Error("treeCPU of a missing process: no error")
	}
	// Live: this process's tree holds at least its own CPU time.
	self, err := readSelfCPU()
	if err != nil {
		t.Fatal(err)
	}
	tree, err := treeCPU("/proc", os.Getpid())
	if err != nil || tree < self {
		t.Errorf("treeCPU(self) = %v, %v; want at least the process's own %v", tree, err, self)
	}
}

// TestHarness: Fatal ends only the goroutine run by do and is reported;
// cleanups run last first.
func TestHarness(t *testing.T) {
	h := newHarness(&bytes.Buffer{})
	var order []int
	h.Cleanup(func() { order = append(order, 1) })
	reached := false
	err := h.do(func() {
		h.Cleanup(func() { order = append(order, 2) })
		h.Fatalf("setup failed: %d", 42)
		reached = true
	})
	if err == nil || err.Error() != "setup failed: 42" || reached || !h.Failed() {
		t.Errorf("do = %v, reached %v, failed %v; want the Fatalf message and the rest skipped", err, reached, h.Failed())
	}
	dir := h.TempDir()
	h.close()
	if fmt.Sprint(order) != "[2 1]" {
		t.Errorf("cleanups ran in order %v, want [2 1]", order)
	}
	if _, err := os.Stat(dir); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("temp dir %s after close: %v, want removed", dir, err)
	}
}

// TestBackoff: 100 ms doubling to 1 s, jittered within [0.5, 1.5) of it.
func TestBackoff(t *testing.T) {
	for _, tc := range []struct {
		attempt int
		base    time.Duration
	}{{0, 100 * time.Millisecond}, {1, 200 * time.Millisecond}, {3, 800 * time.Millisecond}, {4, time.Second}, {60, time.Second}} {
		lo, hi := backoff(tc.attempt, 0), backoff(tc.attempt, 0.999)
		if lo != tc.base/2 || hi >= tc.base*3/2 || hi < tc.base*14/10 {
			t.Errorf("attempt %d: backoff in [%v, %v], want [%v, %v)", tc.attempt, lo, hi, tc.base/2, tc.base*3/2)
		}
	}
}

// TestIssuedDurations: the issued outcome's buckets are read from a
// metrics page, and the bucket of a quantile between two scrapes found.
func TestIssuedDurations(t *testing.T) {
	page := func(b1, b2, inf float64) []byte {
		return []byte(fmt.Sprintf(`# TYPE castellan_csr_duration_seconds histogram
castellan_csr_duration_seconds_bucket{outcome="issued",le="0.1"} %g
castellan_csr_duration_seconds_bucket{outcome="issued",le="0.25"} %g
castellan_csr_duration_seconds_bucket{outcome="issued",le="+Inf"} %g
castellan_csr_duration_seconds_bucket{outcome="refused",le="+Inf"} 1000
castellan_csr_duration_seconds_sum{outcome="issued"} 1
`, b1, b2, inf))
	}
	a, err := parseIssuedDurations(page(10, 10, 10))
	if err != nil {
		t.Fatal(err)
	}
	b, err := parseIssuedDurations(page(100, 198, 199))
	if err != nil {
		t.Fatal(err)
	}
	if len(b) != 3 || b[0.25] != 198 {
		t.Fatalf("parsed %v, want 3 issued buckets", b)
	}
	// Between the scrapes: 90 ≤ 100 ms, 98 more ≤ 250 ms, 1 beyond.
	for _, tc := range []struct {
		q    float64
		want float64
	}{{0.4, 0.1}, {0.9, 0.25}, {0.99, 0.25}, {0.999, math.Inf(1)}} {
		if got := quantileBound(a, b, tc.q); got != tc.want {
			t.Errorf("quantileBound(%v) = %v, want %v", tc.q, got, tc.want)
		}
	}
	if got := quantileBound(b, b, 0.99); got != 0 {
		t.Errorf("no observations: %v, want 0", got)
	}
	if boundString(0.25, true) != "≤ 250 ms" || boundString(0, false) != "?" {
		t.Errorf("boundString = %q, %q", boundString(0.25, true), boundString(0, false))
	}
}
