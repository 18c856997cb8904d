package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// maxOutstanding bounds the open loop's requests in flight, so that a
// server that stops answering cannot make this process grow without end;
// requests due beyond it are counted as not sent.
const maxOutstanding = 50000

// phase is one stretch of an open loop: requests offered at rate per second
// for dur, whatever the answers.
type phase struct {
	name string
	rate float64
	dur  time.Duration
}

// count is how many requests the phase offers: request i is due at i/rate,
// for every i/rate < dur.
func (p phase) count() int64 {
	return int64(math.Ceil(p.dur.Seconds() * p.rate))
}

// at is when request i of the phase is due, from the phase's start.
func (p phase) at(i int64) time.Duration {
	return time.Duration(float64(i) / p.rate * float64(time.Second))
}

// second is what the requests due in one second of the open loop got.
type second struct {
	offered, ok, shed, other, unsent uint64
	hist                             histogram     // latencies of the admitted (OK) requests
	lag                              time.Duration // the most a request was sent after it was due (this program falling behind)
}

// timeline collects the open loop's outcomes by the second each request was
// due in (not sent in: latency counts from when a request was due, so a
// client that falls behind is no excuse).
type timeline struct {
	mu   sync.Mutex
	secs []second
	ex   map[codes.Code]string // one message per failing code
}

func newTimeline(d time.Duration) *timeline {
	n := int(math.Ceil(d.Seconds())) + 1
	tl := &timeline{secs: make([]second, n), ex: map[codes.Code]string{}}
	for i := range tl.secs {
		tl.secs[i].hist = make(histogram, histBuckets)
	}
	return tl
}

func (tl *timeline) slot(due time.Duration) *second {
	return &tl.secs[min(int(due/time.Second), len(tl.secs)-1)]
}

// observe records a request due at due that ended after latency with err:
// ResourceExhausted counts as shed, any other error as other.
func (tl *timeline) observe(due, latency time.Duration, err error) {
	tl.mu.Lock()
	defer tl.mu.Unlock()
	s := tl.slot(due)
	s.offered++
	switch c := status.Code(err); {
	case err == nil:
		s.ok++
		s.hist[bucketOf(latency)]++
	case c == codes.ResourceExhausted:
		s.shed++
	default:
		if errors.Is(err, errBadResponse) {
			c = codeBadResponse
		}
		s.other++
		if _, ok := tl.ex[c]; !ok {
			tl.ex[c] = err.Error()
		}
	}
}

// sent records that a request due at due was sent lag after it.
func (tl *timeline) sent(due, lag time.Duration) {
	tl.mu.Lock()
	defer tl.mu.Unlock()
	s := tl.slot(due)
	s.lag = max(s.lag, lag)
}

// notSent records a request due at due that maxOutstanding held back.
func (tl *timeline) notSent(due time.Duration) {
	tl.mu.Lock()
	defer tl.mu.Unlock()
	s := tl.slot(due)
	s.offered++
	s.unsent++
}

// span sums seconds [from, to).
func (tl *timeline) span(from, to int) second {
	sum := second{hist: make(histogram, histBuckets)}
	for _, s := range tl.secs[max(from, 0):min(to, len(tl.secs))] {
		sum.offered += s.offered
		sum.ok += s.ok
		sum.shed += s.shed
		sum.other += s.other
		sum.unsent += s.unsent
		for i, c := range s.hist {
			sum.hist[i] += c
		}
	}
	return sum
}

// maxP99 is the highest per-second p99 of admitted requests in [from, to).
func (tl *timeline) maxP99(from, to int) time.Duration {
	var m time.Duration
	for _, s := range tl.secs[max(from, 0):min(to, len(tl.secs))] {
		m = max(m, s.hist.quantile(0.99))
	}
	return m
}

// healthyFrom returns the first second in [from, to) from which every
// second to `to` is healthy: requests were offered, none was shed or
// failed, and the p99 of the admitted ones is at most limit. It returns -1
// when not even the last second is.
func (tl *timeline) healthyFrom(from, to int, limit time.Duration) int {
	to = min(to, len(tl.secs))
	first := -1
	for i := to - 1; i >= max(from, 0); i-- {
		s := tl.secs[i]
		if s.offered == 0 || s.shed+s.other+s.unsent > 0 || s.hist.quantile(0.99) > limit {
			break
		}
		first = i
	}
	return first
}

// openLoop offers each phase's requests in turn, spread over the clients,
// each at its due time whether or not earlier ones were answered, and
// returns the outcomes by second.
func openLoop(ctx context.Context, clients []*client, phases []phase, o options) *timeline {
	var total time.Duration
	for _, p := range phases {
		total += p.dur
	}
	tl := newTimeline(total)
	var wg sync.WaitGroup
	var outstanding atomic.Int64
	start := time.Now()
	var n int64 // requests so far, all phases
	var phaseStart time.Duration
	for _, p := range phases {
		for i := range p.count() {
			due := phaseStart + p.at(i)
			if wait := time.Until(start.Add(due)); wait > 0 {
				select {
				case <-time.After(wait):
				case <-ctx.Done():
				}
			}
			if ctx.Err() != nil {
				wg.Wait()
				return tl
			}
			if outstanding.Load() >= maxOutstanding {
				tl.notSent(due)
				continue
			}
			outstanding.Add(1)
			tl.sent(due, time.Since(start.Add(due)))
			c, k := clients[n%int64(len(clients))], int(n/int64(len(clients)))
			n++
			wg.Go(func() {
				defer outstanding.Add(-1)
				err := c.call(ctx, k, o.ttl, o.timeout, false)
				tl.observe(due, time.Since(start.Add(due)), err)
			})
		}
		phaseStart += p.dur
	}
	wg.Wait()
	return tl
}

// runOverload measures the sustainable rate of castellan (embedded store)
// with a closed loop, then offers -overload-factor times that rate in an
// open loop, then half of it, and prints the per-second timeline: what was
// admitted, what was shed with ResourceExhausted, the p99 of the admitted
// requests, and how soon after the overload the server was healthy again.
func runOverload(ctx context.Context, o options, out io.Writer) error {
	startCtx, cancel := context.WithTimeout(ctx, startTimeout)
	defer cancel()
	t, err := startTarget(startCtx, o)
	if err != nil {
		return err
	}
	defer stopTarget(t)
	fmt.Fprintf(out, "target: %s at %s (server pid %s)\n", t.describe, t.addr, pidString(t.pid))
	clients, err := newClients(startCtx, t, o)
	if err != nil {
		return err
	}
	defer closeClients(clients)

	probe := o
	probe.duration, probe.requests, probe.report = o.overloadProbe, 0, 0
	fmt.Fprintf(out, "closed loop, %d clients, %v: the sustainable rate\n", o.clients, probe.duration)
	res, err := drive(ctx, clients, t, probe, out)
	if err != nil {
		return err
	}
	res.print(out, probe)
	rate := res.throughput()
	if rate <= 0 {
		return errors.New("the closed loop issued nothing: no sustainable rate to multiply")
	}
	phases := []phase{
		{name: "overload", rate: o.overloadFactor * rate, dur: o.overloadDuration},
		{name: "after", rate: rate / 2, dur: o.recoveryDuration},
	}
	fmt.Fprintf(out, "\nopen loop: %.0f/s (%.1fx) for %v, then %.0f/s (0.5x) for %v; latency counted from when each request was due\n",
		phases[0].rate, o.overloadFactor, phases[0].dur, phases[1].rate, phases[1].dur)
	cpu0, _ := readCPU(t.pid)
	load0 := loadAverage()
	var server []cumBuckets
	scrapeCtx, stopScrape := context.WithCancel(ctx)
	scraped := make(chan struct{})
	if t.monitor != "" {
		go func() { defer close(scraped); server = scrapeIssuedDurations(scrapeCtx, t.monitor, time.Second) }()
	} else {
		close(scraped)
	}
	tl := openLoop(ctx, clients, phases, o)
	stopScrape()
	<-scraped
	cpu1, _ := readCPU(t.pid)
	if ctx.Err() != nil {
		return fmt.Errorf("interrupted: %w", ctx.Err())
	}
	printOverload(out, tl, phases, res.hist.quantile(0.99), server)
	fmt.Fprintf(out, "server CPU over the open loop: %.2f cores\n", (cpu1-cpu0).Seconds()/(phases[0].dur+phases[1].dur).Seconds())
	fmt.Fprintf(out, "load avg: %s at the probe's start, %s before the open loop, %s at the end\n", res.load[0], load0, loadAverage())
	return nil
}

// printOverload prints the timeline (markdown) and its summary. healthy
// p99 is twice the closed loop's p99 (at least 10 ms). server holds
// castellan's pipeline-time histogram scraped each second (nil: unknown),
// whose p99 shows how much of the latency the server's own queue is.
func printOverload(out io.Writer, tl *timeline, phases []phase, closedP99 time.Duration, server []cumBuckets) {
	fmt.Fprintln(out, "\n| second | phase | offered/s | admitted/s | shed/s (ResourceExhausted) | other errors | p50 admitted | p99 admitted | p99 in the server's pipeline | generator lag (max) |")
	fmt.Fprintln(out, "|---|---|---|---|---|---|---|---|---|---|")
	var at time.Duration
	bounds := make([]int, 0, len(phases)+1)
	bounds = append(bounds, 0)
	for _, p := range phases {
		from, to := int(at/time.Second), int((at+p.dur)/time.Second)
		for i := from; i < to && i < len(tl.secs); i++ {
			s := tl.secs[i]
			known := i+1 < len(server) && server[i] != nil && server[i+1] != nil
			var pipe float64
			if known {
				pipe = quantileBound(server[i], server[i+1], 0.99)
			}
			fmt.Fprintf(out, "| %d | %s | %d | %d | %d | %d | %s | %s | %s | %s |\n", i, p.name, s.offered, s.ok, s.shed, s.other+s.unsent,
				ms(s.hist.quantile(0.5)), ms(s.hist.quantile(0.99)), boundString(pipe, known), ms(s.lag))
		}
		at += p.dur
		bounds = append(bounds, to)
	}
	for k, p := range phases {
		s := tl.span(bounds[k], bounds[k+1])
		secs := float64(bounds[k+1] - bounds[k])
		fmt.Fprintf(out, "%s: offered %.0f/s, admitted %.0f/s, shed %.0f/s, other errors %d, not sent %d; admitted p50 %s, p99 %s, worst second's p99 %s\n",
			p.name, float64(s.offered)/secs, float64(s.ok)/secs, float64(s.shed)/secs, s.other, s.unsent,
			ms(s.hist.quantile(0.5)), ms(s.hist.quantile(0.99)), ms(tl.maxP99(bounds[k], bounds[k+1])))
	}
	for c, e := range tl.ex {
		fmt.Fprintf(out, "error %s: e.g. %s\n", c, truncate(e, 160))
	}
	if len(phases) < 2 {
		return
	}
	limit := max(2*closedP99, 10*time.Millisecond)
	switch h := tl.healthyFrom(bounds[1], bounds[2], limit); h {
	case -1:
		fmt.Fprintf(out, "recovery: NOT healthy (no shedding, no errors, p99 ≤ %s) by the end of the run\n", ms(limit))
	default:
		fmt.Fprintf(out, "recovery: healthy (no shedding, no errors, p99 ≤ %s every second) from second %d, %d s after the overload stopped\n",
			ms(limit), h, h-bounds[1])
	}
}
