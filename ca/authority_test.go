package ca_test

import (
	"crypto/x509"
	"testing"
	"time"

	"github.com/castellan-ca/castellan/ca"
	"github.com/castellan-ca/castellan/signer"
)

func TestAuthorityUse(t *testing.T) {
	a := ca.NewAuthority()
	if a.Current() != nil {
		t.Fatal("new authority has a state")
	}
	rootA, rootB := newRoot(t, "A", time.Time{}), newRoot(t, "B", testNow.Add(time.Hour))
	sA := newLocalSigner(t, rootA, []*x509.Certificate{rootA.Cert}, nil, nil)
	changed := a.Changed()
	st, err := a.Use("selfsigned", sA, rootA.Cert, rootB.Cert, rootB.Cert)
	if err != nil {
		t.Fatal(err)
	}
	select {
	case <-changed:
	default:
		t.Error("Changed not closed by Use")
	}
	if st.Generation != 1 || len(st.Roots) != 2 || st.BundlePEM != signer.EncodePEM(rootA.Cert, rootB.Cert) || a.Current() != st {
		t.Errorf("state gen %d roots %d", st.Generation, len(st.Roots))
	}
	if !st.EarliestRootExpiry().Equal(rootB.Cert.NotAfter) {
		t.Errorf("earliest expiry %s, want %s", st.EarliestRootExpiry(), rootB.Cert.NotAfter)
	}
	if _, err := a.Use("x", emptyBundle{}); err == nil {
		t.Error("Use accepted a signer with an empty bundle")
	}
	if a.Current() != st {
		t.Error("failed Use replaced the state")
	}
}

type emptyBundle struct{ signer.Signer }

func (emptyBundle) TrustBundle() []*x509.Certificate { return nil }
