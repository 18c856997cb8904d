package ca_test

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"slices"
	"testing"
	"time"

	"github.com/castellan-ca/castellan/ca"
	"github.com/castellan-ca/castellan/storage"
)

func TestServingCert(t *testing.T) {
	audit := &switchableAudit{}
	h := newHarness(t, harnessOpts{wrapAudit: func(s ca.AuditLog) ca.AuditLog { audit.inner = s; return audit }})
	sc := &ca.ServingCert{Issuer: h.issuer, DNSNames: []string{"istiod.istio-system.svc"}, TTL: time.Hour}
	ctx := context.Background()

	c1, err := sc.Current(ctx)
	if err != nil {
		t.Fatal(err)
	}
	verifyServing := func(t *testing.T, c *tls.Certificate, root *x509.Certificate) {
		t.Helper()
		pool := x509.NewCertPool()
		pool.AddCert(root)
		if _, err := c.Leaf.Verify(x509.VerifyOptions{Roots: pool, DNSName: "istiod.istio-system.svc", CurrentTime: h.clock.Now()}); err != nil {
			t.Errorf("serving certificate does not verify for the service name: %v", err)
		}
		if !slices.Equal(c.Leaf.ExtKeyUsage, []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}) || len(c.Leaf.URIs) != 0 || c.Leaf.IsCA {
			t.Errorf("serving profile: EKU %v URIs %v CA %v", c.Leaf.ExtKeyUsage, c.Leaf.URIs, c.Leaf.IsCA)
		}
		if !bytes.Equal(c.Certificate[0], c.Leaf.Raw) {
			t.Error("tls.Certificate chain does not start with the leaf")
		}
	}
	verifyServing(t, c1, h.root.Cert)
	rec := h.onlyRecord(t)
	want := storage.Record{Kind: storage.KindOperator, AuthMethod: "internal", Caller: "castellan", Outcome: storage.OutcomeOK, Code: "OK", Signer: "selfsigned"}
	if got := auditView(rec); got != want || rec.Serial != c1.Leaf.SerialNumber.Text(16) || rec.Detail != "serving certificate" {
		t.Errorf("serving audit record %+v", rec)
	}

	if c2, err := sc.Current(ctx); err != nil || c2 != c1 {
		t.Fatalf("second Current = %p, %v; want the same certificate %p", c2, err, c1)
	}
	if c2, err := sc.GetCertificate(nil); err != nil || c2 != c1 {
		t.Fatalf("GetCertificate = %p, %v; want the same certificate", c2, err)
	}
	if n := len(h.records(t)); n != 1 {
		t.Errorf("%d audit records after cached calls, want 1", n)
	}

	// A new CA with the old root retained: clients may not know the new root
	// yet, so the certificate that still chains to the bundle is kept.
	rootB := newRoot(t, "Serving Root B", time.Time{})
	signerB := newLocalSigner(t, rootB, []*x509.Certificate{rootB.Cert}, nil, h.clock.Now)
	if _, err := h.authority.Use("selfsigned", signerB, h.root.Cert); err != nil {
		t.Fatal(err)
	}
	if c, err := sc.Current(ctx); err != nil || c != c1 {
		t.Fatalf("after Use with the old root retained: %p, %v; want the current certificate %p", c, err, c1)
	}
	// The old root retired: the certificate no longer chains, so it is reissued by the new CA.
	if _, err := h.authority.Use("selfsigned", signerB); err != nil {
		t.Fatal(err)
	}
	c3, err := sc.Current(ctx)
	if err != nil || c3 == c1 {
		t.Fatalf("after the old root retired: %p, %v; want a new certificate", c3, err)
	}
	verifyServing(t, c3, rootB.Cert)
	if c4, _ := sc.Current(ctx); c4 != c3 {
		t.Error("certificate reissued without a change")
	}

	h.clock.Advance(40*time.Minute + time.Second) // past two thirds of the hour
	c5, err := sc.Current(ctx)
	if err != nil || c5 == c3 {
		t.Fatalf("after two thirds of the TTL: %p, %v; want a renewal", c5, err)
	}

	// Renewal failing: the current certificate is kept while valid (Logger unset, as a caller may leave it).
	audit.fail.Store(true)
	h.clock.Advance(41 * time.Minute)
	var c6 *tls.Certificate
	func() {
		defer func() {
			if r := recover(); r != nil {
				t.Errorf("Current panicked when renewal failed: %v", r)
			}
		}()
		c6, err = sc.Current(ctx)
	}()
	if err != nil || c6 != c5 {
		t.Errorf("failed renewal: %p, %v; want the still-valid certificate %p", c6, err, c5)
	}
	h.clock.Advance(time.Hour)
	if c7, err := sc.Current(ctx); err == nil || c7 != nil {
		t.Errorf("failed renewal after expiry: %p, %v; want an error", c7, err)
	}
}
