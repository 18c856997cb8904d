package kube

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"

	"github.com/castellan-ca/castellan/authn"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc/metadata"
)

// verifierFunc adapts a function to verifier.
type verifierFunc func(ctx context.Context, token string) (*TokenInfo, error)

func (f verifierFunc) verify(ctx context.Context, token string) (*TokenInfo, error) {
	return f(ctx, token)
}

// stubCluster answers every token as ns/sa bound to a pod, naming itself in the pod name.
func stubCluster(id string) *Cluster {
	return &Cluster{id: id, verifier: verifierFunc(func(_ context.Context, token string) (*TokenInfo, error) {
		switch token {
		case "down":
			return nil, fmt.Errorf("%w: connection refused", authn.ErrUnavailable)
		case "bad":
			return nil, errors.New("token review: not authenticated")
		case "BadName":
			return &TokenInfo{Namespace: "Default", ServiceAccount: "sa"}, nil
		}
		return &TokenInfo{Namespace: "ns", ServiceAccount: "sa", Pod: &authn.Pod{Namespace: "ns", Name: "pod-of-" + id, UID: "u"}}, nil
	})}
}

func TestNewClustersRefusesDuplicates(t *testing.T) {
	for _, tc := range []struct {
		name    string
		aliases []string
		remote  []string
	}{
		{"alias equals the local id", []string{"Kubernetes"}, nil},
		{"remote equals an alias", []string{"east"}, []string{"east"}},
		{"remote named empty", nil, []string{""}},
		{"two remotes with one id", nil, []string{"west", "west"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var remotes []*Cluster
			for _, id := range tc.remote {
				remotes = append(remotes, stubCluster(id))
			}
			if _, err := NewClusters(stubCluster("Kubernetes"), tc.aliases, remotes...); err == nil {
				t.Error("NewClusters accepted a duplicate cluster id")
			}
		})
	}
}

func TestAuthenticator(t *testing.T) {
	td := spiffeid.RequireTrustDomainFromString("cluster.local")
	clusters, err := NewClusters(stubCluster("Kubernetes"), []string{"primary"}, stubCluster("east"))
	if err != nil {
		t.Fatal(err)
	}
	a := &Authenticator{TrustDomain: td, Clusters: clusters}
	for _, tc := range []struct {
		name        string
		md          metadata.MD
		wantCluster string // canonical id of the cluster that verified
		wantErr     error  // sentinel, or nil with wantMsg
		wantMsg     string
	}{
		{name: "no authorization header", md: metadata.Pairs("clusterid", "Kubernetes"), wantErr: authn.ErrNoCredentials},
		{name: "not a bearer token", md: metadata.Pairs("authorization", "Basic eA=="), wantErr: authn.ErrNoCredentials},
		{name: "local cluster id", md: metadata.Pairs("authorization", "Bearer t", "clusterid", "Kubernetes"), wantCluster: "Kubernetes"},
		{name: "empty cluster id is local", md: metadata.Pairs("authorization", "Bearer t", "clusterid", ""), wantCluster: "Kubernetes"},
		{name: "no cluster id header is local", md: metadata.Pairs("authorization", "Bearer t"), wantCluster: "Kubernetes"},
		{name: "alias is local", md: metadata.Pairs("authorization", "Bearer t", "clusterid", "primary"), wantCluster: "Kubernetes"},
		{name: "remote cluster", md: metadata.Pairs("authorization", "Bearer t", "clusterid", "east"), wantCluster: "east"},
		{name: "unknown cluster", md: metadata.Pairs("authorization", "Bearer t", "clusterid", "west"), wantMsg: `cluster id "west" is not configured`},
		{name: "cluster ids are case-sensitive", md: metadata.Pairs("authorization", "Bearer t", "clusterid", "kubernetes"), wantMsg: "not configured"},
		{name: "apiserver down", md: metadata.Pairs("authorization", "Bearer down"), wantErr: authn.ErrUnavailable},
		{name: "token refused", md: metadata.Pairs("authorization", "Bearer bad"), wantMsg: "not authenticated"},
		{name: "names that build no identity", md: metadata.Pairs("authorization", "Bearer BadName"), wantMsg: "DNS-1123"},
		{name: "oversized token", md: metadata.Pairs("authorization", "Bearer "+strings.Repeat("a", maxTokenBytes+1)), wantMsg: "limit"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			caller, err := a.Authenticate(metadata.NewIncomingContext(context.Background(), tc.md))
			switch {
			case tc.wantErr != nil:
				if !errors.Is(err, tc.wantErr) {
					t.Fatalf("error = %v, want %v", err, tc.wantErr)
				}
				return
			case tc.wantMsg != "":
				if err == nil || !strings.Contains(err.Error(), tc.wantMsg) || errors.Is(err, authn.ErrUnavailable) || errors.Is(err, authn.ErrNoCredentials) {
					t.Fatalf("error = %v, want a refusal containing %q", err, tc.wantMsg)
				}
				return
			case err != nil:
				t.Fatal(err)
			}
			wantID := "spiffe://cluster.local/ns/ns/sa/sa"
			if caller.Method != authn.MethodKubernetes || caller.Identity.String() != wantID || caller.Name != wantID ||
				caller.ClusterID != tc.wantCluster || caller.Pod == nil || caller.Pod.Name != "pod-of-"+tc.wantCluster {
				t.Errorf("caller = %+v (pod %+v), want %s from cluster %s", caller, caller.Pod, wantID, tc.wantCluster)
			}
		})
	}
}
