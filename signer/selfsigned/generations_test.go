package selfsigned_test

import (
	"context"
	"crypto"
	"crypto/rand"
	"crypto/x509"
	"fmt"
	"testing"
	"time"

	"github.com/castellan-ca/castellan/internal/keyfile"
	"github.com/castellan-ca/castellan/signer"
	"github.com/castellan-ca/castellan/signer/selfsigned"
	"github.com/castellan-ca/castellan/signer/signertest"
)

// generations is more CA generations than Go's chain building has
// signature checks (100) before it gives up.
const generations = 120

// TestUniqueCASubjects makes many generations of roots and of intermediates
// under one root, as years of rotation would, and checks that each has a
// subject of its own: then a relying party that cannot narrow the candidates
// by key id (a leaf without an authority key id, as some backends and
// clients produce) still finds the issuer with one signature check, where
// generations sharing a subject make Go give up after 100.
func TestUniqueCASubjects(t *testing.T) {
	g, err := selfsigned.NewGenerator(selfsigned.Options{TrustDomain: td, KeyType: keyfile.KeyTypeECDSAP256})
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	notBefore, notAfter := now.Add(-time.Hour), now.Add(24*time.Hour)
	newKey := func() crypto.Signer {
		k, err := g.NewKey(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		return k
	}
	type ca struct {
		cert *x509.Certificate
		key  crypto.Signer
	}
	var roots, inters []ca
	subjects := map[string]string{}
	unique := func(what string, c *x509.Certificate) {
		t.Helper()
		want := fmt.Sprintf("%x", c.SubjectKeyId[:8])
		if cn := c.Subject.CommonName; len(cn) < len(want) || cn[len(cn)-len(want):] != want {
			t.Errorf("%s CN %q does not end in its key id %s", what, cn, want)
		}
		if prev, dup := subjects[string(c.RawSubject)]; dup {
			t.Fatalf("%s has the subject of %s: %s", what, prev, c.Subject)
		}
		subjects[string(c.RawSubject)] = what
	}
	for i := range generations {
		key := newKey()
		root, err := g.NewRoot(key, notBefore, notAfter)
		if err != nil {
			t.Fatal(err)
		}
		unique(fmt.Sprintf("root %d", i), root)
		roots = append(roots, ca{root, key})
	}
	for i := range generations {
		key := newKey()
		inter, err := g.NewIntermediate(key, roots[0].cert, roots[0].key, notBefore, notAfter)
		if err != nil {
			t.Fatal(err)
		}
		unique(fmt.Sprintf("intermediate %d", i), inter)
		inters = append(inters, ca{inter, key})
	}

	// A leaf of the first generation without an authority key id: the pool
	// holds every generation, the right one added last.
	leafKey := signertest.Key(1)
	withoutAKI := func(issuer ca) *x509.Certificate {
		parent := *issuer.cert
		parent.SubjectKeyId = nil
		serial, err := signer.NewSerial(rand.Reader)
		if err != nil {
			t.Fatal(err)
		}
		tmpl := &x509.Certificate{SerialNumber: serial, NotBefore: notBefore, NotAfter: notAfter,
			DNSNames: []string{"leaf.example"}, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, &parent, leafKey.Public(), issuer.key)
		if err != nil {
			t.Fatal(err)
		}
		leaf, err := x509.ParseCertificate(der)
		if err != nil {
			t.Fatal(err)
		}
		if len(leaf.AuthorityKeyId) != 0 {
			t.Fatal("the test leaf has an authority key id")
		}
		return leaf
	}
	lastFirst := func(cas []ca) []ca { return append(append([]ca(nil), cas[1:]...), cas[0]) }

	rootPool := x509.NewCertPool()
	for _, r := range lastFirst(roots) {
		rootPool.AddCert(r.cert)
	}
	if _, err := withoutAKI(roots[0]).Verify(x509.VerifyOptions{Roots: rootPool, CurrentTime: now}); err != nil {
		t.Errorf("a leaf of the first root generation does not verify among %d roots: %v", generations, err)
	}
	onlyFirstRoot, interPool := x509.NewCertPool(), x509.NewCertPool()
	onlyFirstRoot.AddCert(roots[0].cert)
	for _, i := range lastFirst(inters) {
		interPool.AddCert(i.cert)
	}
	if _, err := withoutAKI(inters[0]).Verify(x509.VerifyOptions{Roots: onlyFirstRoot, Intermediates: interPool, CurrentTime: now}); err != nil {
		t.Errorf("a leaf of the first intermediate generation does not verify among %d intermediates: %v", generations, err)
	}
}
