package e2e

import (
	"fmt"
	"sync"
	"testing"

	"github.com/castellan-ca/castellan/e2e/internal/kubeenv"
)

// Shape of the TokenReview count test: callers, each reusing its token.
const (
	reviewCallers       = 50
	reviewCSRsPerCaller = 10
)

// testReviewCount sends 500 CSRs from 50 sidecars (Istio's client, one
// pod-bound token each) and counts the TokenReviews the apiserver itself
// served (its apiserver_request_total metric): at most one per token with
// tokenreview verification, none with jwks.
func testReviewCount(t *testing.T, env *kubeenv.Env, kubeconfig string) {
	ns := "review-count"
	env.CreateNamespace(t, ns, nil)
	tokens := make([]string, reviewCallers)
	for i := range tokens {
		sa, pod := fmt.Sprintf("sa-%d", i%5), fmt.Sprintf("caller-%d", i)
		if i < 5 {
			env.CreateServiceAccount(t, ns, sa)
		}
		p := env.CreatePod(t, ns, pod, sa, "review-node")
		tokens[i] = env.Token(t, ns, sa, kubeenv.TokenOptions{Audiences: []string{"istio-ca"}, Pod: p})
	}
	for _, tc := range []struct {
		mode       string
		maxReviews float64
	}{
		{"tokenreview", reviewCallers},
		{"jwks", 0},
	} {
		t.Run(tc.mode, func(t *testing.T) {
			srv := startServer(t, serverConfig{signer: "selfsigned", extraArgs: kubeArgs(kubeconfig, tc.mode, "--root-configmaps=false")})
			n := len(srv.auditList(t))
			before := env.RequestCount(t, "tokenreviews")
			var wg sync.WaitGroup
			errs := make(chan error, reviewCallers*reviewCSRsPerCaller)
			for i, tok := range tokens {
				wg.Add(1)
				go func() {
					defer wg.Done()
					id := fmt.Sprintf("spiffe://%s/ns/%s/sa/sa-%d", trustDomain, ns, i%5)
					for range reviewCSRsPerCaller {
						if code, _ := sidecarSign(t, srv, tok, clusterID, id); code != codeOK {
							errs <- fmt.Errorf("caller %d: code %s", i, code)
						}
					}
				}()
			}
			wg.Wait()
			close(errs)
			for err := range errs {
				t.Error(err)
			}
			reviews := env.RequestCount(t, "tokenreviews") - before
			t.Logf("%d CSRs from %d callers: %v TokenReviews", reviewCallers*reviewCSRsPerCaller, reviewCallers, reviews)
			if reviews > tc.maxReviews {
				t.Errorf("TokenReviews = %v, want at most %v", reviews, tc.maxReviews)
			}
			if tc.maxReviews > 0 && reviews == 0 {
				t.Errorf("no TokenReview at all in tokenreview mode: the counter does not see them")
			}
			issued := 0
			for _, r := range csrRecords(srv.auditList(t)[n:]) {
				if r.Outcome == "issued" && r.AuthMethod == "kubernetes" {
					issued++
				}
			}
			if issued != reviewCallers*reviewCSRsPerCaller {
				t.Errorf("issued kubernetes-authenticated records = %d, want %d", issued, reviewCallers*reviewCSRsPerCaller)
			}
		})
	}
}
