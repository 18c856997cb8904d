package kubesign

import (
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// APIs as the metrics name them.
const (
	apiPCR = "podcertificaterequest"
	apiCSR = "certificatesigningrequest"
)

// Outcomes of a request as the metrics count them.
const (
	outcomeIssued      = "issued"
	outcomeDenied      = "denied"
	outcomeFailed      = "failed"
	outcomeRetried     = "retried"
	outcomeUndelivered = "undelivered"
)

// Metrics count what the controllers answer, beside the pipeline's own
// series (which count these requests too): per API, signer name and outcome,
// and how long after its creation each request was answered.
type Metrics struct {
	requests *prometheus.CounterVec
	latency  *prometheus.HistogramVec
}

// NewMetrics creates the series and registers them with reg (nil: unregistered).
func NewMetrics(reg prometheus.Registerer) *Metrics {
	m := &Metrics{
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "castellan_kubernetes_requests_total",
			Help: "Kubernetes certificate requests handled, by API (podcertificaterequest, certificatesigningrequest), signer name and outcome (issued, denied, failed, retried, undelivered).",
		}, []string{"api", "signer", "outcome"}),
		latency: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "castellan_kubernetes_answer_seconds",
			Help:    "Time from a Kubernetes certificate request's creation (or approval) to its answer in its status.",
			Buckets: []float64{.05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 300, 900},
		}, []string{"api"}),
	}
	if reg != nil {
		reg.MustRegister(m.requests, m.latency)
	}
	return m
}

// count records one outcome; since is when the request became answerable
// (zero: no answer was written).
func (m *Metrics) count(api, signer, outcome string, since, now time.Time) {
	if m == nil {
		return
	}
	m.requests.WithLabelValues(api, signer, outcome).Inc()
	if !since.IsZero() {
		m.latency.WithLabelValues(api).Observe(max(now.Sub(since), 0).Seconds())
	}
}
