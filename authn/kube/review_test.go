package kube

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/castellan-ca/castellan/authn"
	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	authnv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"
)

// testPods returns a synced pod cache holding pods (the informer is not
// started: its store is filled directly).
func testPods(t *testing.T, pods ...*corev1.Pod) *Pods {
	t.Helper()
	p, err := newPods(informers.NewSharedInformerFactory(fake.NewClientset(), 0))
	if err != nil {
		t.Fatal(err)
	}
	p.synced = func() bool { return true }
	for _, pod := range pods {
		slim, _ := slimPod(pod)
		if err := p.informer.GetIndexer().Add(slim); err != nil {
			t.Fatal(err)
		}
	}
	return p
}

func pod(ns, name, uid, sa, node string, phase corev1.PodPhase) *corev1.Pod {
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name, UID: types.UID(uid)},
		Spec:       corev1.PodSpec{ServiceAccountName: sa, NodeName: node},
		Status:     corev1.PodStatus{Phase: phase},
	}
}

// okStatus is the review of a token of ns/sa bound to pod name/uid.
func okStatus(ns, sa, name, uid string) authnv1.TokenReviewStatus {
	st := authnv1.TokenReviewStatus{
		Authenticated: true, Audiences: []string{"istio-ca"},
		User: authnv1.UserInfo{Username: saUserPrefix + ns + ":" + sa, Groups: []string{saGroup, "system:authenticated"}},
	}
	if name != "" {
		st.User.Extra = map[string]authnv1.ExtraValue{extraPodName: {name}, extraPodUID: {uid}, extraNodeName: {"node-a"}}
	}
	return st
}

func TestCheckReview(t *testing.T) {
	aud := []string{"istio-ca"}
	for _, tc := range []struct {
		name    string
		status  func(*authnv1.TokenReviewStatus)
		wantErr string
		wantPod *authn.Pod
	}{
		{name: "pod-bound", wantPod: &authn.Pod{Namespace: "ns", Name: "p", UID: "u1", NodeName: "node-a"}},
		{name: "unbound", status: func(s *authnv1.TokenReviewStatus) { s.User.Extra = nil }},
		{name: "not authenticated", status: func(s *authnv1.TokenReviewStatus) { s.Authenticated, s.Error = false, "token expired" },
			wantErr: "not authenticated: token expired"},
		{name: "audience-unaware authenticator", status: func(s *authnv1.TokenReviewStatus) { s.Audiences = nil },
			wantErr: "include none of"},
		{name: "other audience", status: func(s *authnv1.TokenReviewStatus) { s.Audiences = []string{"api"} },
			wantErr: "include none of"},
		{name: "not a service account group", status: func(s *authnv1.TokenReviewStatus) { s.User.Groups = []string{"system:authenticated"} },
			wantErr: "not in group"},
		{name: "not a service account user", status: func(s *authnv1.TokenReviewStatus) { s.User.Username = "system:node:n1" },
			wantErr: "not a service account"},
		{name: "pod name without UID", status: func(s *authnv1.TokenReviewStatus) { delete(s.User.Extra, extraPodUID) },
			wantErr: "not both"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			st := okStatus("ns", "sa", "p", "u1")
			if tc.status != nil {
				tc.status(&st)
			}
			info, err := checkReview(st, aud)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("checkReview error = %v, want %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if info.Namespace != "ns" || info.ServiceAccount != "sa" || (info.Pod == nil) != (tc.wantPod == nil) ||
				(info.Pod != nil && *info.Pod != *tc.wantPod) {
				t.Errorf("checkReview = %+v (pod %+v), want pod %+v", info, info.Pod, tc.wantPod)
			}
		})
	}
}

// reviewer builds a tokenReviewer over a fake clientset whose TokenReview
// reactor is review, counting calls.
func reviewer(t *testing.T, slots int, pods *Pods, now func() time.Time, review func(token string) (authnv1.TokenReviewStatus, error)) (*tokenReviewer, *atomic.Int64) {
	t.Helper()
	var calls atomic.Int64
	cs := fake.NewClientset()
	cs.PrependReactor("create", "tokenreviews", func(a k8stesting.Action) (bool, runtime.Object, error) {
		calls.Add(1)
		tr := a.(k8stesting.CreateAction).GetObject().(*authnv1.TokenReview)
		st, err := review(tr.Spec.Token)
		if err != nil {
			return true, nil, err
		}
		return true, &authnv1.TokenReview{Status: st}, nil
	})
	return &tokenReviewer{client: cs, audiences: []string{"istio-ca"}, cache: newTokenCache(100, time.Hour),
		calls: &apiCalls{slots: make(chan struct{}, slots), timeout: 200 * time.Millisecond}, pods: pods, now: now}, &calls
}

func TestReviewCaching(t *testing.T) {
	now := time.Now()
	exp := fmt.Sprintf(`{"exp":%d}`, now.Add(time.Hour).Unix())
	good, unbound, bad, noExp := jwtWith(exp+" "), jwtWith(exp), jwtWith(exp+"  "), jwtWith(`{}`)
	live := testPods(t, pod("ns", "p", "u1", "sa", "node-a", corev1.PodRunning))
	r, calls := reviewer(t, 4, live, func() time.Time { return now }, func(tok string) (authnv1.TokenReviewStatus, error) {
		switch tok {
		case good, noExp:
			return okStatus("ns", "sa", "p", "u1"), nil
		case unbound:
			return okStatus("ns", "sa", "", ""), nil
		}
		return authnv1.TokenReviewStatus{Error: "invalid"}, nil
	})
	r.counters = NewMetrics(prometheus.NewRegistry()).forCluster("c1")
	for _, tc := range []struct {
		name      string
		token     string
		uses      int
		wantCalls int64
		wantErr   bool
		// The counted cache hits and misses, and reviews authenticated and rejected.
		wantHits, wantMisses, wantOK, wantRejected float64
	}{
		{"positive result cached", good, 5, 1, false, 4, 1, 1, 0},
		{"unbound token cached", unbound, 5, 1, false, 4, 1, 1, 0},
		{"negative result not cached", bad, 3, 3, true, 0, 3, 0, 3},
		{"token without exp not cached", noExp, 3, 3, false, 0, 3, 3, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := calls.Load()
			c := r.counters
			hits, misses, ok, rejected := value(c.hit), value(c.miss), value(c.authenticated), value(c.rejected)
			for range tc.uses {
				if _, err := r.verify(context.Background(), tc.token); (err != nil) != tc.wantErr {
					t.Fatalf("verify error = %v, want error %v", err, tc.wantErr)
				}
			}
			if got := calls.Load() - before; got != tc.wantCalls {
				t.Errorf("TokenReviews = %d for %d uses, want %d", got, tc.uses, tc.wantCalls)
			}
			got := [4]float64{value(c.hit) - hits, value(c.miss) - misses, value(c.authenticated) - ok, value(c.rejected) - rejected}
			if want := [4]float64{tc.wantHits, tc.wantMisses, tc.wantOK, tc.wantRejected}; got != want {
				t.Errorf("counted [hits misses authenticated rejected] = %v, want %v", got, want)
			}
			if v := value(c.callError); v != 0 {
				t.Errorf("counted %v failed reviews, want none", v)
			}
		})
	}
}

// value reads a counter.
func value(c prometheus.Counter) float64 {
	var m dto.Metric
	if err := c.Write(&m); err != nil {
		panic(err)
	}
	return m.GetCounter().GetValue()
}

// A cached answer for a pod-bound token holds only while the pod, with the
// token's UID, is in the pod cache; otherwise the apiserver is asked again.
func TestReviewPodBoundInvalidation(t *testing.T) {
	now := time.Now()
	tok := jwtWith(fmt.Sprintf(`{"exp":%d}`, now.Add(time.Hour).Unix()))
	for _, tc := range []struct {
		name      string
		cached    []*corev1.Pod
		wantCalls int64
	}{
		{"pod present", []*corev1.Pod{pod("ns", "p", "u1", "sa", "n", corev1.PodRunning)}, 1},
		{"pod deleted", nil, 2},
		{"pod replaced (new UID)", []*corev1.Pod{pod("ns", "p", "u2", "sa", "n", corev1.PodRunning)}, 2},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r, calls := reviewer(t, 4, testPods(t, tc.cached...), func() time.Time { return now },
				func(string) (authnv1.TokenReviewStatus, error) { return okStatus("ns", "sa", "p", "u1"), nil })
			for range 2 {
				if _, err := r.verify(context.Background(), tok); err != nil {
					t.Fatal(err)
				}
			}
			if got := calls.Load(); got != tc.wantCalls {
				t.Errorf("TokenReviews = %d, want %d", got, tc.wantCalls)
			}
		})
	}
}

// Concurrent requests with one token share one review; a full set of slots
// fails fast with ErrUnavailable; an apiserver error is ErrUnavailable.
func TestReviewConcurrency(t *testing.T) {
	now := time.Now()
	exp := fmt.Sprintf(`{"exp":%d,"n":`, now.Add(time.Hour).Unix())
	release := make(chan struct{})
	var inFlight, peak atomic.Int64
	r, calls := reviewer(t, 2, testPods(t, pod("ns", "p", "u1", "sa", "n", corev1.PodRunning)), func() time.Time { return now },
		func(tok string) (authnv1.TokenReviewStatus, error) {
			n := inFlight.Add(1)
			defer inFlight.Add(-1)
			for p := peak.Load(); n > p && !peak.CompareAndSwap(p, n); p = peak.Load() {
			}
			<-release
			return okStatus("ns", "sa", "p", "u1"), nil
		})

	t.Run("one review per token", func(t *testing.T) {
		var wg sync.WaitGroup
		tok := jwtWith(exp + `1}`)
		for range 20 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				if _, err := r.verify(context.Background(), tok); err != nil {
					t.Error(err)
				}
			}()
		}
		for calls.Load() == 0 { // the shared review has started
			time.Sleep(time.Millisecond)
		}
		release <- struct{}{}
		wg.Wait()
		if got := calls.Load(); got != 1 {
			t.Errorf("TokenReviews = %d for 20 concurrent uses of one token, want 1", got)
		}
	})

	t.Run("cap fails fast", func(t *testing.T) {
		errs := make(chan error, 3)
		for i := range 3 {
			go func() {
				_, err := r.verify(context.Background(), jwtWith(fmt.Sprintf("%s%d}", exp, 10+i)))
				errs <- err
			}()
		}
		// Two hold the slots; the third finds none within the timeout.
		err := <-errs
		if !errors.Is(err, authn.ErrUnavailable) {
			t.Errorf("third concurrent review: error = %v, want ErrUnavailable", err)
		}
		close(release)
		for range 2 {
			if err := <-errs; err != nil {
				t.Error(err)
			}
		}
		if peak.Load() > 2 {
			t.Errorf("peak concurrent TokenReviews = %d, want at most the cap 2", peak.Load())
		}
	})

	t.Run("apiserver down", func(t *testing.T) {
		down, _ := reviewer(t, 2, testPods(t), time.Now, func(string) (authnv1.TokenReviewStatus, error) {
			return authnv1.TokenReviewStatus{}, errors.New("connection refused")
		})
		down.counters = NewMetrics(nil).forCluster("c1")
		if _, err := down.verify(context.Background(), jwtWith(exp+`99}`)); !errors.Is(err, authn.ErrUnavailable) {
			t.Errorf("error = %v, want ErrUnavailable", err)
		}
		if got := [3]float64{value(down.counters.callError), value(down.counters.authenticated), value(down.counters.rejected)}; got != [3]float64{1, 0, 0} {
			t.Errorf("counted [error authenticated rejected] = %v, want [1 0 0]", got)
		}
	})
}
