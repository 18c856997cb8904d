package main

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"io"
	"runtime"
	"time"
)

// compareRun is one target of -mode compare and what it measured.
type compareRun struct {
	name string
	res  *result
}

// runCompare runs castellan with the embedded store, castellan with
// PostgreSQL and Istio's CA back to back with the same options, measures
// the crypto floor in this process, and prints one table of the three with
// the ratios the performance goals are stated in (DESIGN §8).
func runCompare(ctx context.Context, o options, out io.Writer) error {
	var runs []compareRun
	for _, c := range []struct{ mode, name string }{
		{"castellan", "Castellan, embedded audit"},
		{"postgres", "Castellan, PostgreSQL audit (its CPU counted)"},
		{"istio", "Istio's CA (no audit)"},
	} {
		oc := o
		oc.mode = c.mode
		fmt.Fprintf(out, "\n### %s\n", c.name)
		res, err := runClosedLoop(ctx, oc, out)
		if err != nil {
			return fmt.Errorf("%s: %w", c.name, err)
		}
		runs = append(runs, compareRun{name: c.name, res: res})
	}
	floor, err := cryptoFloor(2 * time.Second)
	if err != nil {
		return err
	}
	fmt.Fprintf(out, "\ncrypto floor (this process, one goroutine): %.0f µs CPU per certificate (P-256 CSR parse + signature check, one P-256 signature)\n", us(floor))
	printComparison(out, runs, floor)
	return nil
}

// printComparison prints the side-by-side table (markdown) and the goals:
// CPU per certificate at most half of Istio's, throughput at least 1.3x,
// p99 no higher, and CPU within 1.3x of the crypto floor. The last run is Istio's.
func printComparison(out io.Writer, runs []compareRun, floor time.Duration) {
	istio := runs[len(runs)-1].res
	istioCPU := istio.perCert(istio.serverCPU + istio.storeCPU)
	fmt.Fprintln(out, "\n| | server CPU per cert (store's included) | of which the store | certs/s | p50 | p99 | errors | CPU vs Istio | certs/s vs Istio | CPU vs crypto floor |")
	fmt.Fprintln(out, "|---|---|---|---|---|---|---|---|---|---|")
	for _, r := range runs {
		cpu := r.res.perCert(r.res.serverCPU + r.res.storeCPU)
		fmt.Fprintf(out, "| %s | %.0f µs | %.0f µs | %.0f | %s | %s | %d | %.2fx | %.2fx | %.2fx |\n",
			r.name, cpu, r.res.perCert(r.res.storeCPU), r.res.throughput(), ms(r.res.hist.quantile(0.5)), ms(r.res.hist.quantile(0.99)),
			r.res.codes.failed(), cpu/istioCPU, r.res.throughput()/istio.throughput(), cpu/us(floor))
	}
	fmt.Fprintf(out, "\nload avg: %s\n", loadSpan(runs))
	fmt.Fprintln(out, "goals (DESIGN §8): CPU ≤ 0.50x Istio's, throughput ≥ 1.30x, p99 ≤ Istio's, CPU ≤ 1.30x the crypto floor")
	for _, r := range runs[:len(runs)-1] {
		cpu := r.res.perCert(r.res.serverCPU + r.res.storeCPU)
		fmt.Fprintf(out, "%s: CPU %s, throughput %s, p99 %s, floor %s\n", r.name,
			verdict(cpu/istioCPU <= 0.5), verdict(r.res.throughput()/istio.throughput() >= 1.3),
			verdict(r.res.hist.quantile(0.99) <= istio.hist.quantile(0.99)), verdict(cpu/us(floor) <= 1.3))
	}
}

func verdict(met bool) string {
	if met {
		return "met"
	}
	return "NOT met"
}

func us(d time.Duration) float64 { return float64(d) / float64(time.Microsecond) }

// loadSpan is the load average at the start of the first run and the end of the last.
func loadSpan(runs []compareRun) string {
	return fmt.Sprintf("%s at the start, %s at the end (1, 5, 15 min; %d CPUs)", runs[0].res.load[0], runs[len(runs)-1].res.load[1], runtime.NumCPU())
}

// cryptoFloor measures, on one goroutine for about d, the CPU time per
// certificate of the work no CA can skip: parse a ztunnel-style P-256 CSR
// and check its signature, then make one P-256 signature (of a digest, as
// over a leaf's TBSCertificate). It returns this process's CPU time per
// iteration, so that other processes' load does not count.
func cryptoFloor(d time.Duration) (time.Duration, error) {
	csrPEM, _, err := newCSR("spiffe://cluster.local/ns/loadgen/sa/floor")
	if err != nil {
		return 0, err
	}
	block, _ := pem.Decode([]byte(csrPEM))
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return 0, err
	}
	tbs := make([]byte, 400) // about a workload leaf's TBSCertificate
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	cpu0, err := readSelfCPU()
	if err != nil {
		return 0, err
	}
	n := 0
	for start := time.Now(); time.Since(start) < d; n++ {
		csr, err := x509.ParseCertificateRequest(block.Bytes)
		if err != nil {
			return 0, err
		}
		if err := csr.CheckSignature(); err != nil {
			return 0, err
		}
		digest := sha256.Sum256(tbs)
		if _, err := ecdsa.SignASN1(rand.Reader, caKey, digest[:]); err != nil {
			return 0, err
		}
		tbs[0]++ // a different message each time
	}
	cpu1, err := readSelfCPU()
	if err != nil {
		return 0, err
	}
	return (cpu1 - cpu0) / time.Duration(n), nil
}
