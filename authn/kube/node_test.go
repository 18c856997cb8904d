package kube

import (
	"context"
	"errors"
	"strings"
	"testing"

	"github.com/castellan-ca/castellan/authn"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	corev1 "k8s.io/api/core/v1"
)

func TestParseNodeAccount(t *testing.T) {
	for _, tc := range []struct {
		in string
		ok bool
	}{
		{"istio-system/ztunnel", true},
		{"kube-system/ztunnel.v2", true},
		{"istio-system", false},
		{"/ztunnel", false},
		{"istio-system/", false},
		{"Istio/ztunnel", false},
		{"a/b/c", false},
	} {
		if _, err := ParseNodeAccount(tc.in); (err == nil) != tc.ok {
			t.Errorf("ParseNodeAccount(%q) error = %v, want ok=%v", tc.in, err, tc.ok)
		}
	}
}

// TestNodeAuthorizer walks the rules of DESIGN.md §3 one refusal at a time.
func TestNodeAuthorizer(t *testing.T) {
	td := spiffeid.RequireTrustDomainFromString("cluster.local")
	pods := testPods(t,
		pod("istio-system", "ztunnel-a", "zt-uid", "ztunnel", "node-a", corev1.PodRunning),
		pod("istio-system", "ztunnel-unscheduled", "zu-uid", "ztunnel", "", corev1.PodPending),
		pod("istio-system", "imposter", "im1", "other", "node-a", corev1.PodRunning),
		pod("app", "sleep-a", "s1", "sleep", "node-a", corev1.PodRunning),
		pod("app", "other-b", "o1", "other", "node-b", corev1.PodRunning),
		pod("app", "done-a", "d1", "done", "node-a", corev1.PodSucceeded),
		pod("app", "failed-a", "f1", "failed", "node-a", corev1.PodFailed),
		pod("app", "pending-a", "p1", "pending", "node-a", corev1.PodPending),
		pod("app", "default-a", "df1", "", "node-a", corev1.PodRunning),
	)
	local := &Cluster{id: "Kubernetes", pods: pods}
	clusters, err := NewClusters(local, nil)
	if err != nil {
		t.Fatal(err)
	}
	n := &NodeAuthorizer{TrustDomain: td, Clusters: clusters, Trusted: []NodeAccount{{"istio-system", "ztunnel"}}}

	ztID := spiffeid.RequireFromString("spiffe://cluster.local/ns/istio-system/sa/ztunnel")
	ztunnel := func(edit func(*authn.Caller)) *authn.Caller {
		c := &authn.Caller{Method: authn.MethodKubernetes, Identity: ztID, Name: ztID.String(), ClusterID: "Kubernetes",
			Pod: &authn.Pod{Namespace: "istio-system", Name: "ztunnel-a", UID: "zt-uid", NodeName: "node-a"}}
		if edit != nil {
			edit(c)
		}
		return c
	}
	want := func(ns, sa string) spiffeid.ID {
		return spiffeid.RequireFromSegments(td, "ns", ns, "sa", sa)
	}
	for _, tc := range []struct {
		name    string
		caller  *authn.Caller
		id      spiffeid.ID
		wantErr string // "" = allowed
	}{
		{"pod on the caller's node", ztunnel(nil), want("app", "sleep"), ""},
		{"pending pod on the node counts", ztunnel(nil), want("app", "pending"), ""},
		{"empty service account means default", ztunnel(nil), want("app", "default"), ""},
		{"token without node name", ztunnel(func(c *authn.Caller) { c.Pod.NodeName = "" }), want("app", "sleep"), ""},
		{"untrusted account", ztunnel(func(c *authn.Caller) {
			c.Identity = want("app", "sleep")
			c.Pod = &authn.Pod{Namespace: "app", Name: "sleep-a", UID: "s1"}
		}), want("app", "other"), "not a trusted node account"},
		{"rule 1: not a kubernetes token", ztunnel(func(c *authn.Caller) { c.Method = authn.MethodOIDC }), want("app", "sleep"), "pod-bound"},
		{"rule 1: token not bound to a pod", ztunnel(func(c *authn.Caller) { c.Pod = nil }), want("app", "sleep"), "pod-bound"},
		{"rule 2: caller pod gone", ztunnel(func(c *authn.Caller) { c.Pod.Name = "ztunnel-gone" }), want("app", "sleep"), "not in the pod cache"},
		{"rule 2: caller pod UID differs", ztunnel(func(c *authn.Caller) { c.Pod.UID = "old-uid" }), want("app", "sleep"), "UID"},
		{"rule 2: caller pod of another account", ztunnel(func(c *authn.Caller) {
			c.Pod = &authn.Pod{Namespace: "istio-system", Name: "ztunnel-a", UID: "zt-uid"}
			c.Identity = spiffeid.RequireFromString("spiffe://cluster.local/ns/istio-system/sa/ztunnel-v2")
		}), want("app", "sleep"), "not a trusted node account"},
		{"rule 2: caller pod in another namespace", ztunnel(func(c *authn.Caller) {
			c.Pod = &authn.Pod{Namespace: "app", Name: "sleep-a", UID: "s1"}
		}), want("app", "sleep"), "not in the token's namespace"},
		{"rule 2: caller pod runs as another account", ztunnel(func(c *authn.Caller) {
			c.Pod = &authn.Pod{Namespace: "istio-system", Name: "imposter", UID: "im1"}
		}), want("app", "sleep"), `runs as service account "other"`},
		{"rule 2: caller pod unscheduled", ztunnel(func(c *authn.Caller) {
			c.Pod = &authn.Pod{Namespace: "istio-system", Name: "ztunnel-unscheduled", UID: "zu-uid"}
		}), want("app", "sleep"), "not scheduled"},
		{"rule 2: token names another node", ztunnel(func(c *authn.Caller) { c.Pod.NodeName = "node-b" }), want("app", "sleep"), "names node"},
		{"rule 3: other trust domain", ztunnel(nil), spiffeid.RequireFromString("spiffe://evil.example/ns/app/sa/sleep"), "trust domain"},
		{"rule 3: not a workload path", ztunnel(nil), spiffeid.RequireFromString("spiffe://cluster.local/castellan/operator"), "not a workload identity"},
		{"rule 4: pod on another node", ztunnel(nil), want("app", "other"), "no running pod"},
		{"rule 4: succeeded pod", ztunnel(nil), want("app", "done"), "no running pod"},
		{"rule 4: failed pod", ztunnel(nil), want("app", "failed"), "no running pod"},
		{"rule 4: no pod at all", ztunnel(nil), want("app", "nobody"), "no running pod"},
		{"unknown cluster", ztunnel(func(c *authn.Caller) { c.ClusterID = "east" }), want("app", "sleep"), "not configured"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := n.Authorize(context.Background(), tc.caller, tc.id)
			switch {
			case tc.wantErr == "" && err != nil:
				t.Fatalf("Authorize = %v, want allowed", err)
			case tc.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tc.wantErr)):
				t.Fatalf("Authorize = %v, want an error containing %q", err, tc.wantErr)
			case err != nil && errors.Is(err, authn.ErrUnavailable):
				t.Fatalf("Authorize = %v: a refusal must not be ErrUnavailable", err)
			}
		})
	}

	t.Run("cache not synced", func(t *testing.T) {
		pods.synced = func() bool { return false }
		defer func() { pods.synced = func() bool { return true } }()
		if err := n.Authorize(context.Background(), ztunnel(nil), want("app", "sleep")); !errors.Is(err, authn.ErrUnavailable) {
			t.Errorf("Authorize before sync = %v, want ErrUnavailable", err)
		}
	})
}
