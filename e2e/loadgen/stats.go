package main

import (
	"errors"
	"fmt"
	"io"
	"math/bits"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Latency histogram: log-linear buckets over microseconds, exact below 256 µs
// and within 1/128 (0.8%) above, so memory stays fixed however long the run.
const (
	subBuckets  = 128
	histBuckets = 40 * subBuckets // up to 2^39 µs, far beyond any timeout
)

// bucketOf maps a latency to its bucket.
func bucketOf(d time.Duration) int {
	us := uint64(max(d.Microseconds(), 0))
	shift := max(bits.Len64(us)-8, 0)
	return min(shift*subBuckets+int(us>>shift), histBuckets-1)
}

// bucketUpper is the largest latency in bucket i.
func bucketUpper(i int) time.Duration {
	if i < 2*subBuckets {
		return time.Duration(i) * time.Microsecond
	}
	shift := i/subBuckets - 1
	m := uint64(i - shift*subBuckets)
	return time.Duration((m+1)<<shift-1) * time.Microsecond
}

// histogram is a snapshot of bucket counts.
type histogram []uint64

func (h histogram) count() uint64 {
	var n uint64
	for _, c := range h {
		n += c
	}
	return n
}

// quantile returns the upper bound of the bucket holding quantile q (0..1).
func (h histogram) quantile(q float64) time.Duration {
	n := h.count()
	if n == 0 {
		return 0
	}
	rank := uint64(q*float64(n) + 0.5)
	rank = min(max(rank, 1), n)
	var seen uint64
	for i, c := range h {
		seen += c
		if seen >= rank {
			return bucketUpper(i)
		}
	}
	return bucketUpper(len(h) - 1)
}

// sub returns h minus an earlier snapshot of the same histogram.
func (h histogram) sub(earlier histogram) histogram {
	out := make(histogram, len(h))
	for i := range h {
		out[i] = h[i] - earlier[i]
	}
	return out
}

// codeBadResponse counts answers the server gave with status OK but a wrong shape.
const codeBadResponse = 17

// recorder collects outcomes from all clients during the measured phase.
type recorder struct {
	phase   atomic.Int32 // 0 warm-up, 1 measuring, 2 stopped
	buckets [histBuckets]atomic.Uint64
	max     atomic.Int64
	codes   [codeBadResponse + 1]atomic.Uint64 // successes are codes.OK
	mu      sync.Mutex
	first   map[int]string // one error message per code, for the summary
}

func newRecorder() *recorder { return &recorder{first: make(map[int]string)} }

func (r *recorder) start() time.Time {
	now := time.Now()
	r.phase.Store(1)
	return now
}

func (r *recorder) stop() time.Time {
	r.phase.Store(2)
	return time.Now()
}

func (r *recorder) measuring() bool { return r.phase.Load() == 1 }

// observe records one call; successes feed the latency histogram.
func (r *recorder) observe(d time.Duration, err error) {
	if !r.measuring() {
		return
	}
	code := int(codes.OK)
	switch {
	case errors.Is(err, errBadResponse):
		code = codeBadResponse
	case err != nil:
		code = int(status.Code(err))
	}
	r.codes[code].Add(1)
	if code != int(codes.OK) {
		r.mu.Lock()
		if _, ok := r.first[code]; !ok {
			r.first[code] = err.Error()
		}
		r.mu.Unlock()
		return
	}
	r.buckets[bucketOf(d)].Add(1)
	for {
		m := r.max.Load()
		if int64(d) <= m || r.max.CompareAndSwap(m, int64(d)) {
			break
		}
	}
}

func (r *recorder) snapshot() histogram {
	h := make(histogram, histBuckets)
	for i := range h {
		h[i] = r.buckets[i].Load()
	}
	return h
}

// codeCounts returns the non-zero outcome counts by code name, and one message per failing code.
func (r *recorder) codeCounts() codeCounts {
	c := codeCounts{max: time.Duration(r.max.Load())}
	r.mu.Lock()
	defer r.mu.Unlock()
	for i := range r.codes {
		n := r.codes[i].Load()
		switch {
		case n == 0:
		case i == int(codes.OK):
			c.ok = n
		default:
			name := codes.Code(i).String()
			if i == codeBadResponse {
				name = "BadResponse"
			}
			c.errors = append(c.errors, codeCount{name: name, n: n, example: r.first[i]})
		}
	}
	return c
}

type codeCount struct {
	name    string
	n       uint64
	example string
}

type codeCounts struct {
	ok     uint64
	errors []codeCount
	max    time.Duration
}

func (c codeCounts) failed() uint64 {
	var n uint64
	for _, e := range c.errors {
		n += e.n
	}
	return n
}

// ticketCounter hands out a fixed number of measured requests.
type ticketCounter struct{ left atomic.Int64 }

func newTicketCounter(n int64) *ticketCounter {
	t := &ticketCounter{}
	t.left.Store(n)
	return t
}

func (t *ticketCounter) take() bool { return t.left.Add(-1) >= 0 }

// result is what a run measured.
type result struct {
	elapsed              time.Duration
	hist                 histogram
	codes                codeCounts
	memory               *memorySeries
	serverCPU, clientCPU time.Duration
	storeCPU             time.Duration // the audit store's processes (PostgreSQL); 0 for the embedded store
	load                 [2]string     // /proc/loadavg at the start and end of the measured phase
}

func (r *result) print(out io.Writer, o options) {
	secs := r.elapsed.Seconds()
	h := r.hist
	fmt.Fprintf(out, "\n== %s, %d clients, %.1fs measured\n", o.mode, o.clients, secs)
	fmt.Fprintf(out, "requests:   %d ok, %d failed\n", r.codes.ok, r.codes.failed())
	fmt.Fprintf(out, "throughput: %.0f certs/s\n", r.throughput())
	fmt.Fprintf(out, "latency:    p50 %s  p90 %s  p99 %s  max %s\n",
		ms(h.quantile(0.50)), ms(h.quantile(0.90)), ms(h.quantile(0.99)), ms(r.codes.max))
	for _, e := range r.codes.errors {
		fmt.Fprintf(out, "errors:     %s %d (e.g. %s)\n", e.name, e.n, truncate(e.example, 160))
	}
	if r.serverCPU > 0 {
		fmt.Fprintf(out, "server CPU: %.2f cores (%.0f µs per certificate)\n", r.serverCPU.Seconds()/secs, r.perCert(r.serverCPU))
	}
	if r.storeCPU > 0 {
		fmt.Fprintf(out, "store CPU:  %.2f cores (%.0f µs per certificate), server + store %.0f µs per certificate\n",
			r.storeCPU.Seconds()/secs, r.perCert(r.storeCPU), r.perCert(r.serverCPU+r.storeCPU))
	}
	if r.clientCPU > 0 {
		fmt.Fprintf(out, "client CPU: %.2f cores (this process: TLS, gRPC, checks)\n", r.clientCPU.Seconds()/secs)
	}
	if line := r.memory.summary(); line != "" {
		fmt.Fprintf(out, "server RSS: %s\n", line)
	}
	if r.load[0] != "" {
		fmt.Fprintf(out, "load avg:   %s at start, %s at end (1, 5, 15 min; %d CPUs)\n", r.load[0], r.load[1], runtime.NumCPU())
	}
}

// perCert is d per issued certificate, in µs.
func (r *result) perCert(d time.Duration) float64 {
	return float64(d.Microseconds()) / max(float64(r.codes.ok), 1)
}

// throughput is issued certificates per second of the measured phase.
func (r *result) throughput() float64 { return float64(r.codes.ok) / r.elapsed.Seconds() }

// intervalLine reports the last reporting interval.
func intervalLine(at time.Duration, prev, cur histogram, dt time.Duration, m memorySample) string {
	d := cur.sub(prev)
	var b strings.Builder
	fmt.Fprintf(&b, "t=%-6s %7.0f certs/s  p50 %s  p99 %s", at.Round(time.Second), float64(d.count())/dt.Seconds(),
		ms(d.quantile(0.5)), ms(d.quantile(0.99)))
	if m.rssKiB > 0 {
		fmt.Fprintf(&b, "  server RSS %.1f MiB", float64(m.rssKiB)/1024)
	}
	return b.String()
}

func ms(d time.Duration) string { return fmt.Sprintf("%.2fms", float64(d)/float64(time.Millisecond)) }

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "…"
}
