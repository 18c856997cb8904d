package local_test

import (
	"crypto/x509"
	"math/big"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/castellan-ca/castellan/ca"
	"github.com/castellan-ca/castellan/signer"
	"github.com/castellan-ca/castellan/signer/local"
	"github.com/castellan-ca/castellan/signer/signertest"
)

var benchID = spiffeid.RequireFromString("spiffe://cluster.local/ns/bench/sa/app")

// BenchmarkSign is the local signer alone: the workload leaf profile for a
// P-256 key, signed by a P-256 CA, parsed back.
func BenchmarkSign(b *testing.B) {
	root := signertest.NewRoot(b, "bench root", signertest.CertOptions{})
	s, err := local.New(local.Config{Cert: root.Cert, Key: root.Key, Roots: []*x509.Certificate{root.Cert}})
	if err != nil {
		b.Fatal(err)
	}
	pub := signertest.Key(3).Public()
	id, err := signer.KeyID(pub)
	if err != nil {
		b.Fatal(err)
	}
	now := time.Now()
	tmpl := ca.LeafTemplate(benchID, pub, new(big.Int).Lsh(big.NewInt(1), 127), now.Add(-2*time.Minute), now.Add(24*time.Hour))
	tmpl.SubjectKeyId = id
	req := signer.SignRequest{Template: tmpl, PublicKey: pub, Identity: benchID, TTL: 24 * time.Hour}
	b.ReportAllocs()
	for b.Loop() {
		if _, err := s.Sign(b.Context(), req); err != nil {
			b.Fatal(err)
		}
	}
}
