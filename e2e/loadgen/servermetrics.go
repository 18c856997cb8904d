package main

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"math"
	"net/http"
	"sort"
	"strconv"
	"strings"
	"time"
)

// durationMetric is castellan's histogram of the time a CSR spends in the
// issuance pipeline (from its in-flight slot, or its refusal, to its answer).
const durationMetric = "castellan_csr_duration_seconds_bucket"

// cumBuckets is one scrape of the histogram for issued certificates:
// cumulative counts by upper bound (seconds, +Inf included).
type cumBuckets map[float64]float64

// parseIssuedDurations reads the buckets of outcome="issued" from a
// Prometheus text page.
func parseIssuedDurations(page []byte) (cumBuckets, error) {
	out := cumBuckets{}
	sc := bufio.NewScanner(bytes.NewReader(page))
	sc.Buffer(make([]byte, 0, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if !strings.HasPrefix(line, durationMetric+"{") || !strings.Contains(line, `outcome="issued"`) {
			continue
		}
		_, rest, ok := strings.Cut(line, `le="`)
		if !ok {
			continue
		}
		le, rest, _ := strings.Cut(rest, `"`)
		bound := math.Inf(1)
		if le != "+Inf" {
			b, err := strconv.ParseFloat(le, 64)
			if err != nil {
				return nil, fmt.Errorf("%s le %q: %w", durationMetric, le, err)
			}
			bound = b
		}
		v, err := strconv.ParseFloat(strings.TrimSpace(rest[strings.LastIndexByte(rest, ' ')+1:]), 64)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", durationMetric, err)
		}
		out[bound] += v
	}
	return out, sc.Err()
}

// quantileBound is the upper bound of the bucket holding quantile q of the
// observations between two scrapes (later minus earlier); 0 with none.
func quantileBound(earlier, later cumBuckets, q float64) float64 {
	bounds := make([]float64, 0, len(later))
	for b := range later {
		bounds = append(bounds, b)
	}
	sort.Float64s(bounds)
	if len(bounds) == 0 {
		return 0
	}
	total := later[bounds[len(bounds)-1]] - earlier[bounds[len(bounds)-1]]
	if total <= 0 {
		return 0
	}
	for _, b := range bounds {
		if later[b]-earlier[b] >= q*total {
			return b
		}
	}
	return math.Inf(1)
}

// scrapeIssuedDurations polls monitor's /metrics every interval until ctx
// ends and returns the scrapes, the first taken at once.
func scrapeIssuedDurations(ctx context.Context, monitor string, interval time.Duration) []cumBuckets {
	hc := &http.Client{Timeout: interval}
	var out []cumBuckets
	tick := time.NewTicker(interval)
	defer tick.Stop()
	for {
		if b, err := scrape(hc, monitor+"/metrics"); err == nil {
			out = append(out, b)
		} else {
			out = append(out, nil) // keeps the seconds aligned; shown as unknown
		}
		select {
		case <-ctx.Done():
			return out
		case <-tick.C:
		}
	}
}

func scrape(hc *http.Client, url string) (cumBuckets, error) {
	resp, err := hc.Get(url) //nolint:gosec // the monitoring listener of the castellan this program started, on loopback
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	page, err := io.ReadAll(io.LimitReader(resp.Body, 16<<20))
	if err != nil {
		return nil, err
	}
	return parseIssuedDurations(page)
}

// boundString prints a bucket bound in ms ("≤ 250 ms"), "?" when unknown.
func boundString(b float64, known bool) string {
	switch {
	case !known:
		return "?"
	case b == 0:
		return "–"
	case math.IsInf(b, 1):
		return "> 2.5 s"
	}
	return fmt.Sprintf("≤ %g ms", b*1000)
}
