package rotation

import (
	"github.com/castellan-ca/castellan/storage"
	"github.com/prometheus/client_golang/prometheus"
)

// Descriptors of the rotation state's series, which the Manager exports as
// a prometheus.Collector from the last state it applied: the dashboard shows
// each phase from them, and the expiry alert fires on an active CA whose
// successor is not prepared in time.
var (
	casDesc = prometheus.NewDesc("castellan_rotation_cas",
		"CAs in the shared rotation state, by role (root, intermediate) and phase (prepared, active, previous); retired ones are not counted.",
		[]string{"role", "phase"}, nil)
	notAfterDesc = prometheus.NewDesc("castellan_rotation_ca_expiry_timestamp_seconds",
		"NotAfter (unix seconds) of each CA of the rotation state that is not retired, by key id, role, phase and source (managed, external).",
		[]string{"key_id", "role", "phase", "source"}, nil)
	notBeforeDesc = prometheus.NewDesc("castellan_rotation_ca_start_timestamp_seconds",
		"NotBefore (unix seconds) of each CA of the rotation state that is not retired, by key id, role, phase and source.",
		[]string{"key_id", "role", "phase", "source"}, nil)
)

// Describe implements prometheus.Collector.
func (m *Manager) Describe(ch chan<- *prometheus.Desc) {
	ch <- casDesc
	ch <- notAfterDesc
	ch <- notBeforeDesc
}

// Collect implements prometheus.Collector: nothing until a state was applied.
func (m *Manager) Collect(ch chan<- prometheus.Metric) {
	m.mu.Lock()
	v := m.seen
	m.mu.Unlock()
	if v == nil {
		return
	}
	count := map[[2]string]int{}
	for _, role := range []string{storage.RoleRoot, storage.RoleIntermediate} {
		for _, phase := range []string{storage.PhasePrepared, storage.PhaseActive, storage.PhasePrevious} {
			count[[2]string{role, phase}] = 0 // a phase with no CA reads 0, not absent
		}
	}
	for _, e := range v.cas {
		if e.Phase == storage.PhaseRetired {
			continue
		}
		count[[2]string{e.Role, e.Phase}]++
		ch <- prometheus.MustNewConstMetric(notAfterDesc, prometheus.GaugeValue, float64(e.cert.NotAfter.Unix()), e.KeyID, e.Role, e.Phase, e.Source)
		ch <- prometheus.MustNewConstMetric(notBeforeDesc, prometheus.GaugeValue, float64(e.cert.NotBefore.Unix()), e.KeyID, e.Role, e.Phase, e.Source)
	}
	for k, n := range count {
		ch <- prometheus.MustNewConstMetric(casDesc, prometheus.GaugeValue, float64(n), k[0], k[1])
	}
}
