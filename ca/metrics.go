package ca

import (
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// Metrics are the issuer's Prometheus series: Istio's citadel_* names, which
// operators already have dashboards for, plus Castellan's own.
type Metrics struct {
	csrCount        prometheus.Counter
	authnFailures   prometheus.Counter
	signErrors      *prometheus.CounterVec
	issued          prometheus.Counter
	rootExpiry      prometheus.Gauge
	chainExpiry     prometheus.Gauge
	outcomes        *prometheus.CounterVec
	duration        *prometheus.HistogramVec
	auditFailures   prometheus.Counter
	inFlight        prometheus.Gauge
	overloadRefused prometheus.Counter
	// Admission (admission.go) and recovered panics.
	admissionRefused *prometheus.CounterVec
	streamsOpen      prometheus.Gauge
	bucketKeys       *prometheus.GaugeVec
	panics           prometheus.Counter
}

// NewMetrics creates the series and registers them with reg (nil: unregistered).
func NewMetrics(reg prometheus.Registerer) *Metrics {
	m := &Metrics{
		csrCount: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "citadel_server_csr_count", Help: "The number of CSRs received by the CA server."}),
		authnFailures: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "citadel_server_authentication_failure_count", Help: "The number of authentication failures."}),
		signErrors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "citadel_server_csr_sign_err_count", Help: "The number of errors occurred when signing the CSR."}, []string{"error"}),
		issued: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "citadel_server_success_cert_issuance_count", Help: "The number of certificates issuances that have succeeded."}),
		rootExpiry: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "citadel_server_root_cert_expiry_timestamp", Help: "The unix timestamp, in seconds, when the earliest-expiring root of the trust bundle expires."}),
		chainExpiry: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "citadel_server_cert_chain_expiry_timestamp", Help: "The unix timestamp, in seconds, when the issuing CA certificate expires."}),
		outcomes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "castellan_csr_outcomes_total", Help: "CreateCertificate outcomes by outcome, gRPC code and reason."}, []string{"outcome", "code", "reason"}),
		duration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "castellan_csr_duration_seconds",
			Help:    "Time to answer a CreateCertificate call, audit included.",
			Buckets: []float64{.0005, .001, .002, .005, .01, .02, .05, .1, .25, .5, 1, 2.5},
		}, []string{"outcome"}),
		auditFailures: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "castellan_audit_append_failures_total", Help: "Audit appends that failed; each one withheld a certificate."}),
		inFlight: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "castellan_csr_in_flight", Help: "CreateCertificate calls being processed."}),
		overloadRefused: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "castellan_csr_overload_refusals_total", Help: "Calls refused with ResourceExhausted because too many were in flight."}),
		admissionRefused: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "castellan_admission_refusals_total",
			Help: "Calls refused by a rate limit, the open-call bound or the request read timeout, by reason."}, []string{"reason"}),
		streamsOpen: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "castellan_grpc_calls_open", Help: "gRPC calls open, counted from their headers to their end."}),
		bucketKeys: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "castellan_rate_limit_keys", Help: "Token buckets held, by table (caller, peer), as of the last summary."}, []string{"table"}),
		panics: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "castellan_panics_total", Help: "Panics recovered while serving a call; each failed its call with Internal."}),
	}
	// Each admission reason reads 0 rather than nothing before its first
	// refusal, so that rates and alerts over them have a series.
	for _, r := range []string{ReasonRateCaller, ReasonRatePeer, ReasonStreams, ReasonReadTimeout} {
		m.admissionRefused.WithLabelValues(r)
	}
	if reg != nil {
		reg.MustRegister(m.csrCount, m.authnFailures, m.signErrors, m.issued, m.rootExpiry, m.chainExpiry,
			m.outcomes, m.duration, m.auditFailures, m.inFlight, m.overloadRefused,
			m.admissionRefused, m.streamsOpen, m.bucketKeys, m.panics)
	}
	return m
}

// observeState records the expiry gauges of a CA state.
func (m *Metrics) observeState(st *State, issuer time.Time) {
	m.rootExpiry.Set(float64(st.EarliestRootExpiry().Unix()))
	if !issuer.IsZero() {
		m.chainExpiry.Set(float64(issuer.Unix()))
	}
}
