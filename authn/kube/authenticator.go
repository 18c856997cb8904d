// Package kube authenticates Kubernetes service-account tokens (TokenReview,
// or local JWKS verification) and authorizes ztunnel-style node accounts to
// obtain the identities of pods on their node (DESIGN.md §3).
package kube

import (
	"context"
	"fmt"

	"github.com/castellan-ca/castellan/authn"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc/metadata"
)

// clusterIDHeader is the gRPC metadata key Istio's clients send the cluster in.
const clusterIDHeader = "clusterid"

// Authenticator accepts `authorization: Bearer <service-account token>`: the
// clusterid header selects the cluster that verifies it. It should come last in
// an authn.Chain, since it claims every bearer token left by those before it.
type Authenticator struct {
	TrustDomain spiffeid.TrustDomain
	Clusters    *Clusters
}

// Method names this authenticator in audit records.
func (a *Authenticator) Method() string { return authn.MethodKubernetes }

// Authenticate implements authn.Authenticator.
func (a *Authenticator) Authenticate(ctx context.Context) (*authn.Caller, error) {
	md, _ := metadata.FromIncomingContext(ctx)
	token := bearerToken(md)
	if token == "" {
		return nil, authn.ErrNoCredentials
	}
	if len(token) > maxTokenBytes {
		return nil, fmt.Errorf("bearer token of %d bytes is over the %d-byte limit", len(token), maxTokenBytes)
	}
	var clusterID string
	if v := md.Get(clusterIDHeader); len(v) > 0 {
		clusterID = v[0]
	}
	cluster, ok := a.Clusters.Select(clusterID)
	if !ok {
		return nil, fmt.Errorf("cluster id %.64q is not configured", clusterID)
	}
	info, err := cluster.Verify(ctx, token)
	if err != nil {
		return nil, fmt.Errorf("cluster %s: service-account token: %w", cluster.ID(), err)
	}
	id, err := authn.WorkloadID(a.TrustDomain, info.Namespace, info.ServiceAccount)
	if err != nil {
		return nil, fmt.Errorf("cluster %s: %w", cluster.ID(), err)
	}
	var pod *authn.Pod
	if info.Pod != nil {
		p := *info.Pod // the cached TokenInfo is shared: hand out a copy
		pod = &p
	}
	return &authn.Caller{Method: authn.MethodKubernetes, Identity: id, Name: id.String(), ClusterID: cluster.ID(), Pod: pod}, nil
}
