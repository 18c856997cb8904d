package e2e

import (
	"context"
	"crypto"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	certv1 "k8s.io/api/certificates/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/castellan-ca/castellan/e2e/internal/kubeenv"
)

// TestPodCertificatesAtScale has 10 kubelets make 1,000 PodCertificateRequests
// at once, answered by two Castellan replicas (one CA, each its own audit
// log) that elect a leader; the leader is stopped part-way. Every request is
// answered exactly once: one Issued condition, one issuance record across
// both audit logs, nothing signed twice.
func TestPodCertificatesAtScale(t *testing.T) {
	const (
		ns, leaseNS = "scale", "scale-lease"
		nodes       = 10
		podsPerNode = 10
		perPod      = 10
		total       = nodes * podsPerNode * perPod
		// handover is how many answers the first leader gives before it stops.
		handover = total / 3
		timeout  = 5 * time.Minute // only turns a hang into a failure
	)
	env := kubeenv.Start(t)
	kc := castellanKubeconfigFor(t, env, defaultSignerRBAC, leaseNS)
	env.CreateNamespace(t, ns, nil)
	sa := env.CreateServiceAccount(t, ns, "web")
	cacerts := newTestCA(t).writeCACerts(t)
	cfg := serverConfig{signer: "intermediate", cacertsDir: cacerts, extraArgs: kubeArgs(kc, "tokenreview", "--root-configmaps=false",
		"--leader-election-namespace", leaseNS, "--kube-qps", "500", "--kube-burst", "1000")}
	replicas := []*server{startServer(t, cfg), startServer(t, cfg)}

	kubelets := make([]*kubelet, nodes)
	pods := make([][]*corev1.Pod, nodes)
	for i := range nodes {
		kubelets[i] = newKubelet(t, env, fmt.Sprintf("scale-node-%d", i))
		for j := range podsPerNode {
			pods[i] = append(pods[i], env.CreatePod(t, ns, fmt.Sprintf("web-%d-%d", i, j), "web", kubelets[i].node.Name, meshVolume(defaultPodSigner)))
		}
	}
	keys := make([]crypto.Signer, podsPerNode)
	for j := range keys {
		keys[j] = testKey(t, fmt.Sprintf("scale-%d", j))
	}

	// Each kubelet makes its requests from its own goroutine, all at once.
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	var created atomic.Int64
	var wg sync.WaitGroup
	errs := make(chan error, nodes)
	for i, k := range kubelets {
		wg.Go(func() {
			for j, pod := range pods[i] {
				for range perPod {
					if _, err := k.request(ctx, pod, sa, defaultPodSigner, keys[j], 86400); err != nil {
						errs <- fmt.Errorf("kubelet %s: %w", k.node.Name, err)
						return
					}
					created.Add(1)
				}
			}
		})
	}

	// Stop the leader (the replica answering) part-way; the other takes over.
	leader, stopped := -1, false
	answered := func() []certv1.PodCertificateRequest {
		list, err := env.Client.CertificatesV1().PodCertificateRequests(ns).List(ctx, metav1.ListOptions{})
		if err != nil {
			t.Fatalf("list requests: %v", err)
		}
		var done []certv1.PodCertificateRequest
		for _, p := range list.Items {
			if len(p.Status.Conditions) > 0 {
				done = append(done, p)
			}
		}
		return done
	}
	for {
		n := len(answered())
		if !stopped && n >= handover {
			for i, r := range replicas {
				if r.metrics(t)["castellan_kubernetes_requests_total"] > 0 {
					leader = i
				}
			}
			if leader < 0 {
				t.Fatal("requests are answered, but no replica counts any")
			}
			state, took := replicas[leader].stop(t)
			t.Logf("stopped the leader (replica %d) after %d answers: %v in %v", leader, n, state, took.Round(time.Millisecond))
			stopped = true
		}
		if n == total {
			break
		}
		select {
		case err := <-errs:
			t.Fatal(err)
		case <-ctx.Done():
			t.Fatalf("%d of %d requests answered (%d created) within %v", n, total, created.Load(), timeout)
		case <-time.After(eventualPoll):
		}
	}
	wg.Wait()
	follower := replicas[1-leader]
	if follower.metrics(t)["castellan_kubernetes_requests_total"] == 0 {
		t.Error("the second replica answered nothing after the leader stopped")
	}

	t.Run("each answered once", func(t *testing.T) {
		for _, p := range answered() {
			if c := p.Status.Conditions; len(c) != 1 || c[0].Type != "Issued" {
				t.Errorf("%s/%s: conditions %+v, want exactly one Issued", p.Namespace, p.Name, c)
			}
		}
	})
	t.Run("one issuance record each", func(t *testing.T) {
		// The stopped replica's log is read by starting it again.
		restarted, err := launch(t, cfg, replicas[leader].dataDir)
		if err != nil {
			t.Fatalf("restart the stopped replica: %v", err)
		}
		byPeer := map[string][]auditRecord{}
		for _, r := range []*server{restarted, follower} {
			for peer, recs := range pcrRecords(r.auditList(t)) {
				byPeer[peer] = append(byPeer[peer], recs...)
			}
		}
		for _, p := range answered() {
			recs := byPeer[pcrPeer(&p)]
			if len(recs) != 1 || recs[0].Outcome != "issued" {
				t.Errorf("%s: records %+v, want exactly one issuance", pcrPeer(&p), recs)
			}
			delete(byPeer, pcrPeer(&p))
		}
		for peer, recs := range byPeer {
			t.Errorf("records of an unknown request %s: %+v", peer, recs)
		}
	})
}
