package main

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"errors"
	"math/big"
	"strings"
	"testing"
	"time"

	"github.com/castellan-ca/castellan/deploy/manifests"
	"github.com/castellan-ca/castellan/internal/adminapi"
	"github.com/castellan-ca/castellan/storage"
	authzv1 "k8s.io/api/authorization/v1"
)

// servingLeaf makes a serving certificate for dns signed by ca, valid from nb to na.
func servingLeaf(t *testing.T, ca *testCA, dns []string, nb, na time.Time) *x509.Certificate {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	der, err := x509.CreateCertificate(rand.Reader, &x509.Certificate{SerialNumber: big.NewInt(time.Now().UnixNano()), DNSNames: dns,
		NotBefore: nb, NotAfter: na, KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}},
		ca.cert, key.Public(), ca.key)
	if err != nil {
		t.Fatal(err)
	}
	c, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func TestEvalServingCert(t *testing.T) {
	root := newCA(t, "root", nil)
	inter := newCA(t, "inter", root)
	other := newCA(t, "other", nil)
	now := time.Now()
	names := []string{"istiod.istio-system.svc"}
	fresh := servingLeaf(t, inter, names, now.Add(-time.Hour), now.Add(23*time.Hour))
	tests := []struct {
		name       string
		chain      []*x509.Certificate
		roots      []*x509.Certificate
		names      []string
		wantStatus string
		wantWords  string
	}{
		{"valid", []*x509.Certificate{fresh, inter.cert}, []*x509.Certificate{root.cert}, names, statusOK, "expires in 22h"},
		{"no certificate", nil, []*x509.Certificate{root.cert}, names, statusFail, "no certificate"},
		{"expired", []*x509.Certificate{servingLeaf(t, inter, names, now.Add(-3*time.Hour), now.Add(-time.Hour)), inter.cert},
			[]*x509.Certificate{root.cert}, names, statusFail, "expired"},
		{"not yet valid", []*x509.Certificate{servingLeaf(t, inter, names, now.Add(time.Hour), now.Add(3*time.Hour)), inter.cert},
			[]*x509.Certificate{root.cert}, names, statusFail, "not valid before"},
		{"other root", []*x509.Certificate{fresh, inter.cert}, []*x509.Certificate{other.cert}, names, statusFail, "does not chain"},
		{"intermediate missing", []*x509.Certificate{fresh}, []*x509.Certificate{root.cert}, names, statusFail, "does not chain"},
		{"name missing", []*x509.Certificate{fresh, inter.cert}, []*x509.Certificate{root.cert}, []string{"istiod.istio-system.svc", "ca.example.com"},
			statusFail, "lacks ca.example.com (it has istiod.istio-system.svc)"},
		{"renewal overdue", []*x509.Certificate{servingLeaf(t, inter, names, now.Add(-20*time.Hour), now.Add(time.Hour)), inter.cert},
			[]*x509.Certificate{root.cert}, names, statusWarn, "expires in 59m"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			r := evalServingCert(tc.chain, tc.roots, tc.names, now)
			if r.Status != tc.wantStatus || !strings.Contains(r.Finding, tc.wantWords) || r.Name != checkServer {
				t.Errorf("got %+v, want %s with %q", r, tc.wantStatus, tc.wantWords)
			}
			if r.Status != statusOK && r.Hint == "" {
				t.Errorf("%s without a hint", r.Status)
			}
		})
	}
}

func TestEvalBundles(t *testing.T) {
	a, b := newCA(t, "a", nil), newCA(t, "b", nil)
	pa, pb, pab := string(pemCert(a.cert)), string(pemCert(b.cert)), string(pemCert(a.cert, b.cert))
	pba := string(pemCert(b.cert, a.cert))
	srv := func(p string) bundleSource { return bundleSource{Name: "server", Kind: sourceServer, PEM: p} }
	file := func(p string) bundleSource { return bundleSource{Name: "root-cert.pem", Kind: sourceFile, PEM: p} }
	cm := func(ns, p string) bundleSource {
		return bundleSource{Name: "ConfigMap " + ns + "/istio-ca-root-cert", Kind: sourceConfigMap, PEM: p}
	}
	ctb := func(p string) bundleSource {
		return bundleSource{Name: "ClusterTrustBundle x", Kind: sourceCTB, PEM: p}
	}
	tests := []struct {
		name       string
		sources    []bundleSource
		wantStatus string
		wantWords  []string
	}{
		{"all agree", []bundleSource{srv(pab), file(pab), cm("a", pab), cm("b", pba), ctb(pab)}, statusOK,
			[]string{"2 root(s)", "the server, the trust bundle file, 2 root ConfigMaps, 1 ClusterTrustBundle"}},
		{"stale ConfigMap", []bundleSource{srv(pab), file(pab), cm("a", pab), cm("b", pa)}, statusFail,
			[]string{"stale (differ from the server's bundle): ConfigMap b/istio-ca-root-cert", "fix: the elected replica rewrites the istio-ca-root-cert"}},
		{"missing ConfigMap", []bundleSource{srv(pa), file(pa), {Name: "ConfigMap c/istio-ca-root-cert", Kind: sourceConfigMap, Err: errors.New("missing")}},
			statusFail, []string{"unreadable: ConfigMap c/istio-ca-root-cert (missing)"}},
		{"stale file", []bundleSource{srv(pab), file(pa)}, statusFail, []string{"stale (differ from the server's bundle): root-cert.pem", "DATA_DIR/root-cert.pem"}},
		{"stale ClusterTrustBundle", []bundleSource{srv(pb), file(pb), ctb(pa)}, statusFail, []string{"ClusterTrustBundle x", "Lease castellan-kube-signers"}},
		{"no server: the majority wins", []bundleSource{file(pb), cm("a", pa), cm("b", pa), ctb(pa)}, statusFail,
			[]string{"stale (differ from the roots most copies hold (the server could not be asked)): root-cert.pem"}},
		{"garbage is stale", []bundleSource{srv(pa), file("not PEM")}, statusFail, []string{"stale", "root-cert.pem"}},
		{"nothing readable", []bundleSource{{Name: "root-cert.pem", Kind: sourceFile, Err: errors.New("no such file")}}, statusFail,
			[]string{"no trust bundle could be read"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			r := evalBundles(tc.sources)
			line := r.Finding + " fix: " + r.Hint
			if r.Status != tc.wantStatus {
				t.Errorf("status %s, want %s: %s", r.Status, tc.wantStatus, line)
			}
			for _, w := range tc.wantWords {
				if !strings.Contains(line, w) {
					t.Errorf("%q lacks %q", line, w)
				}
			}
		})
	}
}

func TestEvalAudit(t *testing.T) {
	ok := evalAudit(storage.VerifyResult{OK: true, Records: 7, Writers: 2}, "whole log")
	if ok.Status != statusOK || ok.Finding != "whole log: 7 records of 2 writer(s) intact" {
		t.Errorf("intact: %+v", ok)
	}
	bad := evalAudit(storage.VerifyResult{Records: 3, Writers: 1, Writer: "w1", Seq: 3, Problem: "hash mismatch"}, "tail")
	if bad.Status != statusFail || bad.Finding != "tail: BROKEN at writer w1 seq 3: hash mismatch" || bad.Hint == "" {
		t.Errorf("broken: %+v", bad)
	}
}

func TestEvalCA(t *testing.T) {
	now := time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC)
	day := 24 * time.Hour
	root := func(phase string, notAfter time.Time) adminapi.CAStatus {
		return adminapi.CAStatus{KeyID: "aaaabbbbccccdddd0000", Role: storage.RoleRoot, Source: storage.SourceManaged, Phase: phase,
			NotBefore: now.Add(-day), NotAfter: notAfter, Issuing: phase == storage.PhaseActive}
	}
	scheduled := root(storage.PhaseActive, now.Add(10*day))
	scheduled.NextStepAt = now.Add(day)
	external := root(storage.PhaseActive, now.Add(10*day))
	external.Source = storage.SourceExternal
	tests := []struct {
		name       string
		st         adminapi.RotationStatus
		wantStatus string
		wantWords  string
	}{
		{"far from expiry", adminapi.RotationStatus{CAs: []adminapi.CAStatus{root(storage.PhaseActive, now.Add(365*day))}}, statusOK, "expires 2031-01-01 (in 365d)"},
		{"expiring, no successor", adminapi.RotationStatus{CAs: []adminapi.CAStatus{root(storage.PhaseActive, now.Add(10*day))}}, statusFail,
			"expiring without a prepared successor"},
		{"expiring, successor prepared", adminapi.RotationStatus{CAs: []adminapi.CAStatus{root(storage.PhaseActive, now.Add(10*day)),
			root(storage.PhasePrepared, now.Add(400*day))}}, statusOK, "successor aaaabbbbccccdddd prepared"},
		{"expiring, schedule prepares it", adminapi.RotationStatus{Schedule: true, CAs: []adminapi.CAStatus{scheduled}}, statusOK, "scheduled prepare from"},
		{"expiring, schedule overdue", adminapi.RotationStatus{Schedule: true, CAs: []adminapi.CAStatus{root(storage.PhaseActive, now.Add(10*day))}},
			statusFail, "without a prepared successor"},
		{"expired", adminapi.RotationStatus{CAs: []adminapi.CAStatus{root(storage.PhaseActive, now.Add(-time.Hour))}}, statusFail, "expired"},
		{"retired ones do not count", adminapi.RotationStatus{CAs: []adminapi.CAStatus{root(storage.PhaseRetired, now.Add(-day)),
			root(storage.PhaseActive, now.Add(365*day))}}, statusOK, "in 365d"},
		{"no active CA", adminapi.RotationStatus{CAs: []adminapi.CAStatus{root(storage.PhasePrepared, now.Add(365*day))}}, statusFail, "no active CA"},
		{"external CA expiring", adminapi.RotationStatus{Schedule: true, CAs: []adminapi.CAStatus{external}}, statusFail, "without a prepared successor"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			r := evalCA(&tc.st, now, 30*day)
			if r.Status != tc.wantStatus || !strings.Contains(r.Finding, tc.wantWords) {
				t.Errorf("got %+v, want %s with %q", r, tc.wantStatus, tc.wantWords)
			}
			if r.failed() && r.Hint == "" {
				t.Error("failure without a hint")
			}
		})
	}
	if r := evalCA(&adminapi.RotationStatus{CAs: []adminapi.CAStatus{external}}, now, 30*day); !strings.Contains(r.Hint, "cacerts files") {
		t.Errorf("external CA hint %q", r.Hint)
	}
}

func TestEvalSkew(t *testing.T) {
	t0 := time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC)
	tests := []struct {
		name             string
		rtt, skew        time.Duration
		zero             bool
		wantStatus, want string
	}{
		{"in sync", 10 * time.Millisecond, 2 * time.Millisecond, false, statusOK, "2ms ahead of"},
		{"behind, within the limit", 10 * time.Millisecond, -20 * time.Second, false, statusOK, "20s behind"},
		{"over the limit", 10 * time.Millisecond, 45 * time.Second, false, statusWarn, "45s ahead of"},
		{"past the backdating", 10 * time.Millisecond, -5 * time.Minute, false, statusFail, "5m behind"},
		{"a slow call is no skew", 80 * time.Second, 39 * time.Second, false, statusOK, "±40s"},
		{"no server time", time.Second, 0, true, statusSkip, "does not report"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			st := t0.Add(tc.rtt/2 + tc.skew)
			if tc.zero {
				st = time.Time{}
			}
			r := evalSkew(t0, t0.Add(tc.rtt), st, 30*time.Second)
			if r.Status != tc.wantStatus || !strings.Contains(r.Finding, tc.want) {
				t.Errorf("got %+v, want %s with %q", r, tc.wantStatus, tc.want)
			}
		})
	}
}

func TestEvalRBAC(t *testing.T) {
	if r := evalRBAC("me", 12, nil); r.Status != statusOK || !strings.Contains(r.Finding, "all 12 permissions") {
		t.Errorf("all allowed: %+v", r)
	}
	denied := []string{"a", "b", "c", "d", "e", "f", "g"}
	r := evalRBAC("sa", 12, denied)
	if r.Status != statusFail || r.Finding != "sa lacks 7 of 12 permissions: a, b, c, d, e and 2 more" || !strings.Contains(r.Hint, "castellan.yaml") {
		t.Errorf("denied: %+v", r)
	}
}

func TestRBACReviews(t *testing.T) {
	grants, err := manifests.Grants()
	if err != nil {
		t.Fatal(err)
	}
	find := func(rs []review, what string) *review {
		for i := range rs {
			if rs[i].what == what {
				return &rs[i]
			}
		}
		return nil
	}
	rs := rbacReviews(grants, "ops", false)
	for _, tc := range []struct {
		what string
		want authzv1.ResourceAttributes
	}{
		{"create tokenreviews.authentication.k8s.io", authzv1.ResourceAttributes{Verb: "create", Group: "authentication.k8s.io", Resource: "tokenreviews"}},
		{"update configmaps istio-ca-root-cert", authzv1.ResourceAttributes{Verb: "update", Resource: "configmaps", Name: "istio-ca-root-cert"}},
		{"update podcertificaterequests/status.certificates.k8s.io", authzv1.ResourceAttributes{Verb: "update", Group: "certificates.k8s.io",
			Resource: "podcertificaterequests", Subresource: "status"}},
		{"get leases.coordination.k8s.io castellan-root-configmaps in ops", authzv1.ResourceAttributes{Namespace: "ops", Verb: "get",
			Group: "coordination.k8s.io", Resource: "leases", Name: "castellan-root-configmaps"}},
	} {
		r := find(rs, tc.what)
		if r == nil || r.spec.ResourceAttributes == nil || *r.spec.ResourceAttributes != tc.want {
			t.Errorf("%s: review %+v, want %+v", tc.what, r, tc.want)
		}
	}
	if r := find(rs, "get /openid/v1/jwks"); r == nil || r.spec.NonResourceAttributes.Path != "/openid/v1/jwks" {
		t.Errorf("no non-resource review of the JWKS: %+v", r)
	}
	if r := find(rs, "get secrets.istiod-tls in istio-system"); r != nil {
		t.Error("istiod's Role checked without --istiod-cert")
	}
	withIstiod := rbacReviews(grants, "ops", true)
	if find(withIstiod, "get secrets istiod-tls in istio-system") == nil {
		t.Error("istiod's Role not checked with --istiod-cert")
	}
}
