package ca_test

import (
	"crypto/rand"
	"crypto/x509"
	"strings"
	"testing"
	"time"

	"github.com/castellan-ca/castellan/ca"
	"github.com/castellan-ca/castellan/signer"
	"github.com/castellan-ca/castellan/signer/signertest"
)

// TestCheckIssued drives the result checks directly with chains a real local
// signer would never produce (it clamps and orders correctly).
func TestCheckIssued(t *testing.T) {
	root := newRoot(t, "Verify Root", time.Time{})
	opts := signertest.CertOptions{NotBefore: testNow.Add(-time.Hour), NotAfter: testNow.Add(48 * time.Hour)}
	inter1 := root.NewIntermediate(t, "Inter 1", opts)
	inter2 := inter1.NewIntermediate(t, "Inter 2", opts)
	roots := x509.NewCertPool()
	roots.AddCert(root.Cert)
	key := signertest.Key(10)
	now := testNow

	tmplFor := func(ttl time.Duration) *x509.Certificate {
		serial, err := signer.NewSerial(rand.Reader)
		if err != nil {
			t.Fatal(err)
		}
		return ca.LeafTemplate(appID, key.Public(), serial, now.Add(-signer.DefaultClockSkew), now.Add(ttl))
	}
	sign := func(tmpl *x509.Certificate, by *signertest.CA) *x509.Certificate {
		return by.Sign(t, tmpl, key.Public())
	}

	good := tmplFor(24 * time.Hour)
	tooLong := tmplFor(72 * time.Hour) // beyond the intermediates' 48 h
	tests := []struct {
		name    string
		chain   *signer.Chain
		tmpl    *x509.Certificate
		now     time.Time
		wantErr string
	}{
		{name: "two intermediates in order", chain: &signer.Chain{Leaf: sign(good, inter2), Intermediates: []*x509.Certificate{inter2.Cert, inter1.Cert}}, tmpl: good, now: now},
		{name: "signed by the root", chain: &signer.Chain{Leaf: sign(good, root)}, tmpl: good, now: now},
		{name: "nil chain", chain: nil, tmpl: good, now: now, wantErr: "no certificate"},
		{name: "no leaf", chain: &signer.Chain{}, tmpl: good, now: now, wantErr: "no certificate"},
		{name: "intermediates out of order", chain: &signer.Chain{Leaf: sign(good, inter2), Intermediates: []*x509.Certificate{inter1.Cert, inter2.Cert}},
			tmpl: good, now: now, wantErr: "first intermediate is not the leaf's issuer"},
		{name: "intermediate missing", chain: &signer.Chain{Leaf: sign(good, inter2), Intermediates: []*x509.Certificate{inter1.Cert}},
			tmpl: good, now: now, wantErr: "does not chain"},
		{name: "leaf outlives its issuer", chain: &signer.Chain{Leaf: sign(tooLong, inter2), Intermediates: []*x509.Certificate{inter2.Cert, inter1.Cert}},
			tmpl: tooLong, now: now, wantErr: "outlives its issuer"},
		{name: "leaf not yet valid", chain: &signer.Chain{Leaf: sign(good, root)}, tmpl: good, now: now.Add(-time.Hour), wantErr: "outside the granted"},
		{name: "leaf already expired", chain: &signer.Chain{Leaf: sign(good, root)}, tmpl: good, now: now.Add(25 * time.Hour), wantErr: "outside the granted"},
		{name: "leaf longer than granted", chain: &signer.Chain{Leaf: sign(good, root)}, tmpl: tmplFor(time.Hour), now: now, wantErr: "outside the granted"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			err := ca.CheckIssued(tc.chain, tc.tmpl, key.Public(), roots, tc.now)
			if tc.wantErr == "" {
				if err != nil {
					t.Fatalf("CheckIssued: %v", err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Fatalf("CheckIssued error = %v, want one mentioning %q", err, tc.wantErr)
			}
		})
	}
}
