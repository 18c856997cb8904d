package ca_test

import (
	"testing"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/castellan-ca/castellan/ca"
	"github.com/castellan-ca/castellan/signer/signertest"
)

func TestIssueMetrics(t *testing.T) {
	reg := prometheus.NewRegistry()
	h := newHarness(t, harnessOpts{config: func(c *ca.Config) { c.Metrics = ca.NewMetrics(reg) }})
	ctx := peerCtx(h.workloadCert(t, appID))
	csr := ztunnelCSR(t, signertest.Key(7), appID)
	for range 2 {
		if _, err := h.issuer.Issue(ctx, ca.Request{CSR: csr}); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := h.issuer.Issue(peerCtx(), ca.Request{CSR: csr}); err == nil {
		t.Fatal("anonymous call issued")
	}
	if _, err := h.issuer.Issue(ctx, ca.Request{CSR: "x"}); err == nil {
		t.Fatal("bad CSR issued")
	}
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]float64{}
	for _, mf := range mfs {
		for _, m := range mf.GetMetric() {
			key := mf.GetName()
			for _, l := range m.GetLabel() {
				key += "," + l.GetName() + "=" + l.GetValue()
			}
			switch {
			case m.GetCounter() != nil:
				got[key] = m.GetCounter().GetValue()
			case m.GetGauge() != nil:
				got[key] = m.GetGauge().GetValue()
			}
		}
	}
	for key, want := range map[string]float64{
		"citadel_server_csr_count":                                    4,
		"citadel_server_success_cert_issuance_count":                  2,
		"citadel_server_authentication_failure_count":                 1,
		"citadel_server_csr_sign_err_count,error=csr.not_pem":         1,
		"citadel_server_root_cert_expiry_timestamp":                   float64(h.root.Cert.NotAfter.Unix()),
		"castellan_csr_outcomes_total,code=OK,outcome=issued,reason=": 2,
		"castellan_csr_in_flight":                                     0,
	} {
		if got[key] != want {
			t.Errorf("%s = %v, want %v", key, got[key], want)
		}
	}
}
