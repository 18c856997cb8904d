package e2e

import (
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
)

// TestRateLimits floods the real binary with one identity, and then with
// unauthenticated calls from one address, while a well-behaved client calls
// at the same time. Rates far below the flood (one call in 1000 s) make the
// expected counts exact: the flood gets its burst and nothing more, the
// well-behaved client is never refused, and the refusals are summarised in
// the audit log and counted in the metrics, each exactly once.
func TestRateLimits(t *testing.T) {
	const burst, floodWorkers, floodPerWorker = 5, 4, 50
	srv := startServer(t, serverConfig{signer: "selfsigned", extraArgs: []string{
		"--caller-rate-limit", "0.001", "--caller-burst", fmt.Sprint(burst),
		"--peer-rate-limit", "0.001", "--peer-burst", fmt.Sprint(burst),
		"--refusal-audit-interval", "1s",
	}})
	floodID := fmt.Sprintf("spiffe://%s/ns/e2e/sa/flood", trustDomain)
	calmID := fmt.Sprintf("spiffe://%s/ns/e2e/sa/calm", trustDomain)
	_, flood := dialCA(t, srv, caDial{cred: issueCredential(t, srv, floodID)})
	_, calm := dialCA(t, srv, caDial{cred: issueCredential(t, srv, calmID)})

	t.Run("caller", func(t *testing.T) {
		var (
			mu         sync.Mutex
			floodCodes = map[codes.Code]int{}
			calmCodes  = map[codes.Code]int{}
			progress   = make(chan int, floodWorkers*floodPerWorker)
			wg         sync.WaitGroup
		)
		for range floodWorkers {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for range floodPerWorker {
					r := sign(t, flood, floodID)
					mu.Lock()
					floodCodes[r.code]++
					n := floodCodes[codes.OK] + floodCodes[codes.ResourceExhausted]
					mu.Unlock()
					progress <- n
				}
			}()
		}
		// The well-behaved client calls after every 50th flood call, within its burst.
		for range floodWorkers * floodPerWorker {
			if n := <-progress; n%50 == 0 {
				calmCodes[sign(t, calm, calmID).code]++
			}
		}
		wg.Wait()
		refused := floodWorkers*floodPerWorker - burst
		t.Logf("flood: %v; well-behaved: %v", floodCodes, calmCodes)
		if floodCodes[codes.OK] != burst || floodCodes[codes.ResourceExhausted] != refused {
			t.Errorf("flood: %v, want %d OK and %d ResourceExhausted", floodCodes, burst, refused)
		}
		if calmCodes[codes.OK] != 4 || len(calmCodes) != 1 {
			t.Errorf("well-behaved client: %v, want 4 OK and no refusal", calmCodes)
		}
		sums := waitSummaries(t, srv, "ratelimit.caller", refused)
		for _, s := range sums {
			if s.Caller != floodID || s.Code != "ResourceExhausted" || s.Outcome != "refused" {
				t.Errorf("summary %+v, want refusals of %s", s, floodID)
			}
		}
		if v := metricSeries(t, srv, `castellan_admission_refusals_total{reason="ratelimit.caller"}`); v != float64(refused) {
			t.Errorf("castellan_admission_refusals_total{ratelimit.caller} = %v, want %d", v, refused)
		}
		t.Logf("%d refused calls in %d audit records", refused, len(sums))
	})

	t.Run("peer", func(t *testing.T) {
		const calls = 30
		_, anon := dialCA(t, srv, caDial{localIP: "127.0.0.6"})
		got := map[codes.Code]int{}
		for i := range calls {
			got[sign(t, anon, floodID).code]++
			if i == calls/2 { // the well-behaved client, from another address, meanwhile
				if r := sign(t, calm, calmID); r.code != codes.OK {
					t.Errorf("well-behaved client during the unauthenticated flood: %s", r.code)
				}
			}
		}
		t.Logf("unauthenticated flood: %v", got)
		if got[codes.Unauthenticated] != burst || got[codes.ResourceExhausted] != calls-burst {
			t.Errorf("unauthenticated flood: %v, want %d Unauthenticated (each audited) and %d ResourceExhausted", got, burst, calls-burst)
		}
		sums := waitSummaries(t, srv, "ratelimit.peer", calls-burst)
		for _, s := range sums {
			if s.Peer != "127.0.0.6" {
				t.Errorf("peer summary %+v, want address 127.0.0.6", s)
			}
		}
		audited := 0
		for _, r := range csrRecords(srv.auditList(t)) {
			if r.Reason == "authn.no_credentials" && strings.HasPrefix(r.Peer, "127.0.0.6:") {
				audited++
			}
		}
		if audited != burst {
			t.Errorf("%d refusals audited one by one, want %d (those that reached authentication)", audited, burst)
		}
	})
}

// waitSummaries polls the audit log until the summary records of reason
// count want refused calls (they are written every refusal audit interval),
// and returns them.
func waitSummaries(t *testing.T, srv *server, reason string, want int) []auditRecord {
	t.Helper()
	deadline := time.Now().Add(closeBound)
	for {
		var sums []auditRecord
		total := 0
		for _, r := range srv.auditList(t) {
			if r.Reason != reason {
				continue
			}
			var n int
			if _, err := fmt.Sscanf(r.Detail, "%d calls", &n); err != nil {
				t.Fatalf("summary detail %q: %v", r.Detail, err)
			}
			sums, total = append(sums, r), total+n
		}
		if total == want {
			return sums
		}
		if total > want || time.Now().After(deadline) {
			t.Fatalf("audit summaries of %s count %d calls, want %d", reason, total, want)
		}
		time.Sleep(pollInterval * 4)
	}
}
