package ca_test

import (
	"crypto/rand"
	"crypto/x509"
	"fmt"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/castellan-ca/castellan/ca"
	"github.com/castellan-ca/castellan/signer"
	"github.com/castellan-ca/castellan/signer/signertest"
)

// TestIssuerPathCache runs sequences of result checks through one cache and
// checks every outcome and the hit/miss counts: a leaf accepted through a
// remembered path must be one that a full verification at that moment accepts.
func TestIssuerPathCache(t *testing.T) {
	key := signertest.Key(10)
	opts := func(from, to time.Duration, modify func(*x509.Certificate)) signertest.CertOptions {
		return signertest.CertOptions{NotBefore: testNow.Add(from), NotAfter: testNow.Add(to), Modify: modify}
	}
	root := newRoot(t, "Path Root", time.Time{})
	inter1 := root.NewIntermediate(t, "Path Inter 1", opts(-time.Hour, 48*time.Hour, nil))
	inter2 := inter1.NewIntermediate(t, "Path Inter 2", opts(-time.Hour, 48*time.Hour, nil))
	other := root.NewIntermediate(t, "Path Other", opts(-time.Hour, 48*time.Hour, nil))
	// Same name and key ID as inter2 but another key, and not in any chain.
	impostor := signertest.NewRoot(t, "Path Inter 2", opts(-time.Hour, 48*time.Hour, func(c *x509.Certificate) {
		c.Subject = inter2.Cert.Subject
		c.SubjectKeyId = inter2.Cert.SubjectKeyId
	}))
	constrained := root.NewIntermediate(t, "Path Constrained", opts(-time.Hour, 48*time.Hour, func(c *x509.Certificate) {
		c.PermittedURIDomains = []string{"cluster.local"}
	}))
	main, swapped, foreignOnly := x509.NewCertPool(), x509.NewCertPool(), x509.NewCertPool()
	main.AddCert(root.Cert)
	swapped.AddCert(root.Cert)
	foreignOnly.AddCert(newRoot(t, "Path Foreign", time.Time{}).Cert)

	// leaf is a certificate for id signed by `by`, valid from-to around testNow,
	// with the template CheckIssued compares it to.
	type leaf struct {
		cert *x509.Certificate
		tmpl *x509.Certificate
	}
	newLeaf := func(by *signertest.CA, id string, from, to time.Duration) leaf {
		serial, err := signer.NewSerial(rand.Reader)
		if err != nil {
			t.Fatal(err)
		}
		u, err := url.Parse(id)
		if err != nil {
			t.Fatal(err)
		}
		tmpl := ca.LeafTemplate(appID, key.Public(), serial, testNow.Add(from), testNow.Add(to))
		tmpl.URIs = []*url.URL{u}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, by.Cert, key.Public(), by.Key)
		if err != nil {
			t.Fatal(err)
		}
		c, err := x509.ParseCertificate(der)
		if err != nil {
			t.Fatal(err)
		}
		return leaf{cert: c, tmpl: tmpl}
	}
	app := appID.String()
	day := func(by *signertest.CA) leaf { return newLeaf(by, app, -time.Minute, 24*time.Hour) }

	type step struct {
		leaf    leaf
		inter   []*x509.Certificate
		pool    *x509.CertPool // nil: main
		at      time.Duration  // clock offset from testNow
		checked bool           // the backend says it verified the signature
		wantErr string
	}
	chain2 := []*x509.Certificate{inter2.Cert, inter1.Cert}
	tests := []struct {
		name                 string
		steps                []step
		wantHits, wantMisses uint64
		wantEntries          int
	}{
		{name: "second leaf of the root hits",
			steps:    []step{{leaf: day(root)}, {leaf: day(root)}},
			wantHits: 1, wantMisses: 1, wantEntries: 1},
		{name: "second leaf through two intermediates hits",
			steps:    []step{{leaf: day(inter2), inter: chain2}, {leaf: day(inter2), inter: chain2, at: time.Hour}},
			wantHits: 1, wantMisses: 1, wantEntries: 1},
		{name: "another issuer misses",
			steps:      []step{{leaf: day(root)}, {leaf: day(other), inter: []*x509.Certificate{other.Cert}}},
			wantMisses: 2, wantEntries: 2},
		{name: "same issuer with other intermediates presented misses",
			steps:      []step{{leaf: day(inter2), inter: chain2}, {leaf: day(inter2), inter: append(chain2, other.Cert)}},
			wantMisses: 2, wantEntries: 2},
		{name: "new pool misses, then hits",
			steps:    []step{{leaf: day(root)}, {leaf: day(root), pool: swapped}, {leaf: day(root), pool: swapped}},
			wantHits: 1, wantMisses: 2, wantEntries: 1},
		{name: "pool without the root refuses a path remembered for the old pool",
			steps:      []step{{leaf: day(root)}, {leaf: day(root), pool: foreignOnly, wantErr: "does not chain"}},
			wantMisses: 2, wantEntries: 0},
		{name: "leaf of an impostor with the issuer's name and key ID is refused",
			steps:    []step{{leaf: day(inter2), inter: chain2}, {leaf: day(impostor), inter: chain2, wantErr: "does not chain"}},
			wantHits: 1, wantMisses: 1, wantEntries: 1},
		{name: "remembered path expires with its intermediates",
			steps: []step{{leaf: day(inter2), inter: chain2},
				{leaf: newLeaf(inter2, app, 47*time.Hour, 50*time.Hour), inter: chain2, at: 49 * time.Hour, wantErr: "expired"}},
			wantMisses: 2, wantEntries: 0},
		{name: "clock before the path's NotBefore is refused although remembered",
			steps: []step{{leaf: day(inter2), inter: chain2},
				{leaf: newLeaf(inter2, app, -3*time.Hour, time.Hour), inter: chain2, at: -2 * time.Hour, wantErr: "not yet valid"}},
			wantMisses: 2, wantEntries: 0},
		{name: "a backend's checked flag never spares the first leaf of an issuer the full check",
			steps:      []step{{leaf: day(impostor), inter: chain2, checked: true, wantErr: "does not chain"}},
			wantMisses: 1, wantEntries: 0},
		{name: "a checked leaf of a remembered issuer hits",
			steps:    []step{{leaf: day(inter2), inter: chain2}, {leaf: day(inter2), inter: chain2, checked: true}},
			wantHits: 1, wantMisses: 1, wantEntries: 1},
		{name: "name-constrained path is never remembered and still applies",
			steps: []step{{leaf: day(constrained), inter: []*x509.Certificate{constrained.Cert}},
				{leaf: newLeaf(constrained, "spiffe://evil.example/ns/default/sa/app", -time.Minute, time.Hour),
					inter: []*x509.Certificate{constrained.Cert}, wantErr: "not permitted"}},
			wantMisses: 2, wantEntries: 0},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var paths ca.IssuerPathCache
			for i, s := range tc.steps {
				pool := s.pool
				if pool == nil {
					pool = main
				}
				err := paths.CheckIssued(&signer.Chain{Leaf: s.leaf.cert, Intermediates: s.inter, SignatureChecked: s.checked}, s.leaf.tmpl, key.Public(), pool, testNow.Add(s.at))
				if s.wantErr == "" && err != nil {
					t.Fatalf("step %d: CheckIssued: %v", i, err)
				}
				if s.wantErr != "" && (err == nil || !strings.Contains(err.Error(), s.wantErr)) {
					t.Fatalf("step %d: CheckIssued error = %v, want one mentioning %q", i, err, s.wantErr)
				}
			}
			hits, misses, entries := paths.Stats()
			if hits != tc.wantHits || misses != tc.wantMisses || entries != tc.wantEntries {
				t.Errorf("hits %d misses %d entries %d, want %d %d %d", hits, misses, entries, tc.wantHits, tc.wantMisses, tc.wantEntries)
			}
		})
	}

	t.Run("bounded", func(t *testing.T) {
		var paths ca.IssuerPathCache
		for i := range ca.IssuerPathCacheSize + 1 {
			iss := root.NewIntermediate(t, fmt.Sprintf("Path Bound %d", i), opts(-time.Hour, 48*time.Hour, nil))
			l := day(iss)
			if err := paths.CheckIssued(&signer.Chain{Leaf: l.cert, Intermediates: []*x509.Certificate{iss.Cert}}, l.tmpl, key.Public(), main, testNow); err != nil {
				t.Fatalf("issuer %d: CheckIssued: %v", i, err)
			}
		}
		if _, misses, entries := paths.Stats(); entries != ca.IssuerPathCacheSize || misses != ca.IssuerPathCacheSize+1 {
			t.Errorf("after %d issuers: %d misses, %d entries; want %d, %d", ca.IssuerPathCacheSize+1, misses, entries, ca.IssuerPathCacheSize+1, ca.IssuerPathCacheSize)
		}
	})
}
