package main

import (
	"context"

	"github.com/castellan-ca/castellan/ca/rotation"
	"github.com/prometheus/client_golang/prometheus"
)

// Elections as castellan_leader names them.
const (
	electionRotation       = "ca-rotation"        // runs the CA rotation schedule (PostgreSQL lock, or the only replica)
	electionRootConfigMaps = "root-configmaps"    // writes the root ConfigMaps (and istiod's Secret), per cluster
	electionKubeSigners    = "kubernetes-signers" // answers PodCertificateRequests and CSRs, publishes ClusterTrustBundles
)

// leaderGauges is castellan_leader: 1 while this replica leads an election.
// Summed over the replicas it should be 1; 0 for long means a job nobody
// runs (the CastellanLeaderMissing alert).
type leaderGauges struct{ vec *prometheus.GaugeVec }

func newLeaderGauges(reg prometheus.Registerer) leaderGauges {
	vec := prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "castellan_leader",
		Help: "1 while this replica leads the election (ca-rotation, root-configmaps, kubernetes-signers) in the cluster, else 0."},
		[]string{"election", "cluster"})
	reg.MustRegister(vec)
	return leaderGauges{vec: vec}
}

// track returns l reporting its leadership as election in cluster; the
// series reads 0 from now until this replica leads.
func (g leaderGauges) track(l rotation.Leader, election, cluster string) rotation.Leader {
	up := g.vec.WithLabelValues(election, cluster)
	up.Set(0)
	return trackedLeader{inner: l, up: up}
}

// trackedLeader is a Leader whose terms set a gauge.
type trackedLeader struct {
	inner rotation.Leader
	up    prometheus.Gauge
}

// Run runs fn as the inner Leader does, with the gauge at 1 during each term.
func (t trackedLeader) Run(ctx context.Context, fn func(ctx context.Context)) error {
	return t.inner.Run(ctx, func(ctx context.Context) {
		t.up.Set(1)
		defer t.up.Set(0)
		fn(ctx)
	})
}
