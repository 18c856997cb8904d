package rotation

import (
	"fmt"
	"sort"
	"strings"
	"testing"

	"github.com/castellan-ca/castellan/internal/adminapi"
	"github.com/castellan-ca/castellan/storage"
	"github.com/prometheus/client_golang/prometheus"
)

// TestMetrics: the collector reports each phase's CAs and each CA's
// validity, following the steps, with retired CAs left out.
func TestMetrics(t *testing.T) {
	h := newHarness(t, nil, nil, withIntermediates)
	reg := prometheus.NewRegistry()
	reg.MustRegister(h.m)

	counts := func() map[string]float64 {
		t.Helper()
		out := map[string]float64{}
		for k, v := range gather(t, reg) {
			if strings.HasPrefix(k, "castellan_rotation_cas,") {
				out[strings.TrimPrefix(k, "castellan_rotation_cas,")] = v
			}
		}
		return out
	}
	want := func(rootPrep, rootAct, rootPrev, intPrep, intAct, intPrev float64) map[string]float64 {
		return map[string]float64{
			"phase=prepared,role=root": rootPrep, "phase=active,role=root": rootAct, "phase=previous,role=root": rootPrev,
			"phase=prepared,role=intermediate": intPrep, "phase=active,role=intermediate": intAct, "phase=previous,role=intermediate": intPrev,
		}
	}
	check := func(step string, w map[string]float64) {
		t.Helper()
		got := counts()
		if fmt.Sprint(got) != fmt.Sprint(w) {
			t.Errorf("after %s: castellan_rotation_cas = %v, want %v", step, got, w)
		}
		st := h.status(t)
		series := gather(t, reg)
		for _, c := range st.CAs {
			labels := fmt.Sprintf("key_id=%s,phase=%s,role=%s,source=%s", c.KeyID, c.Phase, c.Role, c.Source)
			na, okA := series["castellan_rotation_ca_expiry_timestamp_seconds,"+labels]
			nb, okB := series["castellan_rotation_ca_start_timestamp_seconds,"+labels]
			if c.Phase == storage.PhaseRetired {
				if okA || okB {
					t.Errorf("after %s: retired CA %s still exported", step, c.KeyID)
				}
				continue
			}
			if na != float64(c.NotAfter.Unix()) || nb != float64(c.NotBefore.Unix()) {
				t.Errorf("after %s: CA %s exported [%v, %v] (present %v %v), want [%v, %v]", step, c.KeyID, nb, na, okB, okA,
					c.NotBefore.Unix(), c.NotAfter.Unix())
			}
		}
	}

	check("bootstrap", want(0, 1, 0, 0, 1, 0))
	h.mustRotate(t, adminapi.StepPrepare, adminapi.TargetRoot, false)
	check("prepare root", want(1, 1, 0, 1, 1, 0)) // with its intermediate
	h.clock.Advance(window)
	h.mustRotate(t, adminapi.StepActivate, adminapi.TargetRoot, false)
	check("activate root", want(0, 1, 1, 0, 1, 1))
	h.mustRotate(t, adminapi.StepRetire, adminapi.TargetRoot, true)
	check("retire root", want(0, 1, 0, 0, 1, 0))
}

// gather returns every sample of reg keyed by "name,label=value,…" (labels sorted).
func gather(t *testing.T, reg *prometheus.Registry) map[string]float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]float64{}
	for _, mf := range mfs {
		for _, m := range mf.GetMetric() {
			parts := []string{}
			for _, l := range m.GetLabel() {
				parts = append(parts, l.GetName()+"="+l.GetValue())
			}
			sort.Strings(parts)
			out[strings.Join(append([]string{mf.GetName()}, parts...), ",")] = m.GetGauge().GetValue()
		}
	}
	return out
}
