package kube

import "github.com/prometheus/client_golang/prometheus"

// Results of a TokenReview as the metrics count them.
const (
	reviewAuthenticated = "authenticated" // the apiserver accepted the token and the checks passed
	reviewRejected      = "rejected"      // the apiserver or the checks refused the token
	reviewError         = "error"         // no answer: the call failed, or no call slot was free in time
)

// Metrics count what token verification costs the apiserver: the
// TokenReview cache's lookups and the TokenReviews sent, per cluster.
type Metrics struct {
	lookups *prometheus.CounterVec
	reviews *prometheus.CounterVec
}

// NewMetrics creates the series and registers them with reg (nil: unregistered).
func NewMetrics(reg prometheus.Registerer) *Metrics {
	m := &Metrics{
		lookups: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "castellan_tokenreview_cache_lookups_total",
			Help: "TokenReview cache lookups by cluster and result (hit: a cached review answered, miss: the apiserver is asked).",
		}, []string{"cluster", "result"}),
		reviews: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "castellan_tokenreviews_total",
			Help: "TokenReviews sent to the apiserver, by cluster and result (authenticated, rejected, error).",
		}, []string{"cluster", "result"}),
	}
	if reg != nil {
		reg.MustRegister(m.lookups, m.reviews)
	}
	return m
}

// reviewCounters are one cluster's counters; the zero value counts nothing.
type reviewCounters struct {
	hit, miss                          prometheus.Counter
	authenticated, rejected, callError prometheus.Counter
}

// forCluster returns the counters of cluster, each series created at zero so
// that rates read 0 rather than nothing before the first review.
func (m *Metrics) forCluster(cluster string) reviewCounters {
	if m == nil {
		return reviewCounters{}
	}
	return reviewCounters{
		hit: m.lookups.WithLabelValues(cluster, "hit"), miss: m.lookups.WithLabelValues(cluster, "miss"),
		authenticated: m.reviews.WithLabelValues(cluster, reviewAuthenticated),
		rejected:      m.reviews.WithLabelValues(cluster, reviewRejected),
		callError:     m.reviews.WithLabelValues(cluster, reviewError),
	}
}

// inc adds one to c when it is counted.
func inc(c prometheus.Counter) {
	if c != nil {
		c.Inc()
	}
}
