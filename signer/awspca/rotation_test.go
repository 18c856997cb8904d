package awspca_test

import (
	"crypto/x509"
	"errors"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/castellan-ca/castellan/ca/catest"
	"github.com/castellan-ca/castellan/signer"
	"github.com/castellan-ca/castellan/signer/awspca"
	"github.com/castellan-ca/castellan/signer/awspca/pcatest"
	"github.com/castellan-ca/castellan/signer/signertest"
)

// clock is the signer's injected clock, which ages retained roots.
type clock struct {
	mu  sync.Mutex
	now time.Time
}

func (c *clock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *clock) advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = c.now.Add(d)
}

// waitChange waits for OnChange and returns the trust bundle after it.
func waitChange(t *testing.T, changed <-chan struct{}, s *awspca.Signer) []*x509.Certificate {
	t.Helper()
	select {
	case <-changed:
	case <-time.After(30 * time.Second):
		t.Fatal("OnChange not called after the CA's chain changed")
	}
	return s.TrustBundle()
}

func verifies(leaf *x509.Certificate, inter, bundle []*x509.Certificate) error {
	roots, pool := x509.NewCertPool(), x509.NewCertPool()
	for _, r := range bundle {
		roots.AddCert(r)
	}
	for _, c := range inter {
		pool.AddCert(c)
	}
	_, err := leaf.Verify(x509.VerifyOptions{Roots: roots, Intermediates: pool, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}})
	return err
}

// TestRotation changes the fake CA's chain: a subordinate re-certified under
// a new root, and a root CA's certificate renewed (ztunnel#1679's setup).
// The new root reaches the trust bundle, new leaves chain to it, the old root
// stays while a leaf issued under it lives and leaves the bundle after, and a
// restart that is handed the retained roots keeps them.
func TestRotation(t *testing.T) {
	for _, tc := range []struct {
		name string
		opts pcatest.Options
	}{
		{"subordinate re-certified under a new root", pcatest.Options{}},
		{"root CA renewed", pcatest.Options{RootIssues: true}},
	} {
		t.Run(tc.name, func(t *testing.T) { testRotation(t, tc.opts) })
	}
}

func testRotation(t *testing.T, opts pcatest.Options) {
	fake := pcatest.Start(t, opts)
	clk := &clock{now: time.Now()}
	changed := make(chan struct{}, 8)
	cfg := awspca.Config{RefreshInterval: 20 * time.Millisecond, MaxLeafLifetime: 2 * time.Hour, Now: clk.Now,
		OnChange: func() { changed <- struct{}{} }}
	s := newSigner(t, fake, cfg)
	oldRoot, oldCA := fake.Root(), fake.CACertificate()

	before := catest.IssueThrough(t, awspca.Backend, s, workload, signertest.Key(8), catest.CSROptions{})
	if before.Err != nil {
		t.Fatalf("issue before the rotation: %v", before.Err)
	}
	fake.Rotate(t)
	newRoot := fake.Root()

	bundle := waitChange(t, changed, s)
	if !signer.SameCertificates(bundle, []*x509.Certificate{newRoot, oldRoot}) {
		t.Fatalf("trust bundle after the rotation = %d certificates, want the new root, then the old one", len(bundle))
	}
	after := catest.IssueThrough(t, awspca.Backend, s, workload, signertest.Key(9), catest.CSROptions{})
	if after.Err != nil {
		t.Fatalf("issue after the rotation: %v", after.Err)
	}
	inter := after.Result.Chain.Intermediates
	switch {
	case opts.RootIssues && (len(inter) != 0 || after.Result.Chain.Leaf.CheckSignatureFrom(newRoot) != nil):
		t.Errorf("new leaf is not signed by the renewed root directly")
	case !opts.RootIssues && (len(inter) != 1 || inter[0].Equal(oldCA) || inter[0].CheckSignatureFrom(newRoot) != nil):
		t.Errorf("new leaf's chain does not run through the re-certified CA to the new root")
	}
	if got := after.Result.Elements[len(after.Result.Elements)-1]; got != signer.EncodePEM(newRoot, oldRoot) {
		t.Errorf("response's last element is not the bundle with both roots")
	}
	old := before.Result.Chain
	if err := verifies(old.Leaf, old.Intermediates, bundle); err != nil {
		t.Errorf("the leaf issued before the rotation no longer verifies against the bundle: %v", err)
	}
	retained := s.Retained()
	if len(retained) != 1 || !retained[0].Cert.Equal(oldRoot) || !retained[0].Until.Equal(old.Leaf.NotAfter) {
		t.Fatalf("retained = %+v, want the old root until the old leaf's NotAfter %s", retained, old.Leaf.NotAfter)
	}

	t.Run("restart keeps the retained root", func(t *testing.T) {
		c := cfg
		c.OnChange, c.Retained = nil, retained
		again := newSigner(t, fake, c)
		if !signer.SameCertificates(again.TrustBundle(), []*x509.Certificate{newRoot, oldRoot}) {
			t.Errorf("trust bundle after a restart with the retained roots lacks the old root")
		}
	})

	clk.advance(old.Leaf.NotAfter.Sub(clk.Now()) + time.Second)
	bundle = waitChange(t, changed, s)
	if !signer.SameCertificates(bundle, []*x509.Certificate{newRoot}) || len(s.Retained()) != 0 {
		t.Errorf("trust bundle after the old leaves expired = %d certificates, retained %d; want only the new root", len(bundle), len(s.Retained()))
	}
}

// TestLeafFromUnknownRoot: PCA rotated and the signer has not re-read the
// chain yet. The leaf would not verify against the bundle clients have, so
// Sign reports the signer unavailable (a retry is cured) and re-reads the
// chain at once; the next request is issued.
func TestLeafFromUnknownRoot(t *testing.T) {
	fake := pcatest.Start(t, pcatest.Options{})
	changed := make(chan struct{}, 8)
	s := newSigner(t, fake, awspca.Config{RefreshInterval: time.Hour, OnChange: func() { changed <- struct{}{} }})
	fake.Rotate(t)

	_, err := s.Sign(t.Context(), request(t, s, signertest.Key(10)))
	if !errors.Is(err, signer.ErrSignerUnavailable) || !strings.Contains(err.Error(), "not in the trust bundle yet") {
		t.Fatalf("Sign right after the rotation: %v, want unavailable until the chain is re-read", err)
	}
	bundle := waitChange(t, changed, s)
	if !signer.ContainsCertificate(bundle, fake.Root()) {
		t.Fatal("the new root did not reach the bundle")
	}
	if res := catest.IssueThrough(t, awspca.Backend, s, workload, signertest.Key(11), catest.CSROptions{}); res.Err != nil {
		t.Fatalf("issue after the refresh: %v", res.Err)
	}
}
