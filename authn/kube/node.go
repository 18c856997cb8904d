package kube

import (
	"context"
	"errors"
	"fmt"
	"strings"

	"github.com/castellan-ca/castellan/authn"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"k8s.io/apimachinery/pkg/util/validation"
)

// NodeAccount is a trusted node account (e.g. istio-system/ztunnel): a
// service account whose pods may obtain the identities of pods on their node.
type NodeAccount struct{ Namespace, ServiceAccount string }

// ParseNodeAccount parses "<namespace>/<service-account>".
func ParseNodeAccount(s string) (NodeAccount, error) {
	ns, sa, ok := strings.Cut(s, "/")
	if !ok {
		return NodeAccount{}, fmt.Errorf("node account %q is not <namespace>/<service-account>", s)
	}
	if errs := validation.IsDNS1123Label(ns); len(errs) > 0 {
		return NodeAccount{}, fmt.Errorf("node account %q: namespace: %s", s, strings.Join(errs, "; "))
	}
	if errs := validation.IsDNS1123Subdomain(sa); len(errs) > 0 {
		return NodeAccount{}, fmt.Errorf("node account %q: service account: %s", s, strings.Join(errs, "; "))
	}
	return NodeAccount{Namespace: ns, ServiceAccount: sa}, nil
}

// NodeAuthorizer implements the node authorization of DESIGN.md §3: a caller
// whose service account is a trusted node account may obtain the identity of
// a running pod on its own node, and nothing else. Every refusal is an error
// for the audit record and the log; the issuer shows the client none of it.
type NodeAuthorizer struct {
	TrustDomain spiffeid.TrustDomain
	Clusters    *Clusters
	Trusted     []NodeAccount
}

// errNotSynced is returned before the pod cache has synced.
var errNotSynced = errors.New("pod cache not synced yet")

// Authorize decides whether caller may obtain id.
func (n *NodeAuthorizer) Authorize(_ context.Context, caller *authn.Caller, id spiffeid.ID) error {
	ns, sa, ok := namespaceAndAccount(caller.Identity)
	if !ok || !n.trusted(ns, sa) {
		return fmt.Errorf("node authorization: caller %s is not a trusted node account", caller.Name)
	}
	// Rule 1: a pod-bound Kubernetes token, so that the caller's node is known.
	if caller.Method != authn.MethodKubernetes || caller.Pod == nil || caller.Pod.Name == "" || caller.Pod.UID == "" {
		return fmt.Errorf("node authorization: caller %s did not authenticate with a pod-bound service-account token", caller.Name)
	}
	cluster, ok := n.Clusters.Get(caller.ClusterID)
	if !ok {
		return fmt.Errorf("node authorization: caller's cluster %q is not configured", caller.ClusterID)
	}
	pods := cluster.Pods()
	if !pods.HasSynced() {
		return fmt.Errorf("%w: node authorization: cluster %s: %w", authn.ErrUnavailable, cluster.ID(), errNotSynced)
	}
	// Rule 2: the caller's pod exists, with the token's UID and service account.
	pod, ok := pods.Get(caller.Pod.Namespace, caller.Pod.Name)
	if !ok {
		return fmt.Errorf("node authorization: caller pod %s/%s is not in the pod cache", caller.Pod.Namespace, caller.Pod.Name)
	}
	if err := checkBoundPod(pod, &TokenInfo{Namespace: ns, ServiceAccount: sa, Pod: caller.Pod}); err != nil {
		return fmt.Errorf("node authorization: caller %s: %w", caller.Name, err)
	}
	node := pod.Spec.NodeName
	if node == "" {
		return fmt.Errorf("node authorization: caller pod %s/%s is not scheduled on a node", pod.Namespace, pod.Name)
	}
	if caller.Pod.NodeName != "" && caller.Pod.NodeName != node {
		return fmt.Errorf("node authorization: caller token names node %q, its pod is on %q", caller.Pod.NodeName, node)
	}
	// Rule 3: the requested ID is a workload identity of OUR trust domain.
	if _, err := authn.CheckWorkloadID(n.TrustDomain, id); err != nil {
		return fmt.Errorf("node authorization: requested %s: %w", id, err)
	}
	tns, tsa, _ := namespaceAndAccount(id)
	// Rule 4: a running pod with that identity is on the caller's node.
	if !pods.RunningOn(node, tns, tsa) {
		return fmt.Errorf("node authorization: no running pod of %s/%s on node %q (caller %s/%s)", tns, tsa, node, pod.Namespace, pod.Name)
	}
	return nil
}

func (n *NodeAuthorizer) trusted(ns, sa string) bool {
	for _, a := range n.Trusted {
		if a.Namespace == ns && a.ServiceAccount == sa {
			return true
		}
	}
	return false
}

// namespaceAndAccount splits a workload ID's path /ns/<ns>/sa/<sa>.
func namespaceAndAccount(id spiffeid.ID) (ns, sa string, ok bool) {
	seg := strings.Split(strings.TrimPrefix(id.Path(), "/"), "/")
	if len(seg) != 4 || seg[0] != "ns" || seg[2] != "sa" {
		return "", "", false
	}
	return seg[1], seg[3], true
}
