package ca_test

import (
	"context"
	"crypto/rand"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"github.com/castellan-ca/castellan/authn"
	"github.com/castellan-ca/castellan/ca"
	"github.com/castellan-ca/castellan/internal/keyfile"
	"github.com/castellan-ca/castellan/signer"
	"github.com/castellan-ca/castellan/signer/local"
	"github.com/castellan-ca/castellan/signer/selfsigned"
	"github.com/castellan-ca/castellan/signer/signertest"
	"github.com/castellan-ca/castellan/storage"
	"github.com/castellan-ca/castellan/storage/embedded"
)

// benchCSRs are ztunnel-style P-256 CSRs for appID, made before the timer starts.
func benchCSRs(b *testing.B) []string {
	b.Helper()
	csrs := make([]string, 16)
	for i := range csrs {
		csrs[i] = ztunnelCSR(b, signertest.Key(i), appID)
	}
	return csrs
}

func benchSigner(b *testing.B) *local.Signer {
	b.Helper()
	s, err := selfsigned.Load(selfsigned.Options{Dir: filepath.Join(b.TempDir(), "ca"), TrustDomain: td, KeyType: keyfile.KeyTypeECDSAP256})
	if err != nil {
		b.Fatal(err)
	}
	return s
}

// BenchmarkIssue is the whole issuance pipeline without gRPC: client-certificate
// authentication, CSR parse and verify, signing with the self-signed P-256 root,
// result checks and a durable audit append to the embedded store (group commit).
// Parallelism is 16 goroutines per CPU so that group commit has company.
func BenchmarkIssue(b *testing.B) {
	ctx := context.Background()
	authority := ca.NewAuthority()
	if _, err := authority.Use(selfsigned.Backend, benchSigner(b)); err != nil {
		b.Fatal(err)
	}
	store, err := embedded.Open(ctx, filepath.Join(b.TempDir(), "audit.db"), embedded.Options{})
	if err != nil {
		b.Fatal(err)
	}
	defer store.Close()
	issuer, err := ca.NewIssuer(ca.Config{
		TrustDomain:   td,
		Authenticator: &authn.ClientCert{TrustDomain: td, Roots: authority.Roots},
		Audit:         store,
		Authority:     authority,
		MaxInFlight:   4096,
	})
	if err != nil {
		b.Fatal(err)
	}
	// The caller's own certificate, issued by the CA under test.
	clientKey := signertest.Key(15)
	chain, _, err := issuer.IssueInternal(ctx, "benchmark client", ca.ClientTemplate(appID.URL()), clientKey, time.Hour)
	if err != nil {
		b.Fatal(err)
	}
	callerCtx := peerCtx(chain.Leaf)
	csrs := benchCSRs(b)
	var next atomic.Int64

	b.SetParallelism(16)
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		i := int(next.Add(1))
		for pb.Next() {
			out, err := issuer.Issue(callerCtx, ca.Request{CSR: csrs[i%len(csrs)], Peer: testPeer})
			if err != nil || out == nil {
				b.Errorf("Issue: %v", err)
				return
			}
			i++
		}
	})
	b.StopTimer()
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "certs/s")
	st := store.Stats()
	if st.Batches > 0 {
		b.ReportMetric(float64(st.Records)/float64(st.Batches), "records/commit")
	}
	if recs, err := store.List(ctx, storage.Query{Outcome: storage.OutcomeIssued, Limit: 1}); err != nil || len(recs) == 0 {
		b.Fatalf("no issuance audited: %v", err)
	}
}

// BenchmarkSignOnly is the crypto ceiling the pipeline is compared with: CSR
// parse and signature check, profile, and the ECDSA P-256 leaf signature. No
// authentication, no result re-check, no audit.
func BenchmarkSignOnly(b *testing.B) {
	ctx := context.Background()
	s := benchSigner(b)
	csrs := benchCSRs(b)
	var next atomic.Int64

	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		i := int(next.Add(1))
		for pb.Next() {
			csr, err := ca.ParseCSR(csrs[i%len(csrs)], appID)
			if err != nil {
				b.Errorf("ParseCSR: %v", err)
				return
			}
			serial, err := signer.NewSerial(rand.Reader)
			if err != nil {
				b.Errorf("NewSerial: %v", err)
				return
			}
			now := time.Now()
			tmpl := ca.LeafTemplate(appID, csr.PublicKey, serial, now.Add(-signer.DefaultClockSkew), now.Add(ca.DefaultTTL))
			if _, err := s.Sign(ctx, signer.SignRequest{Template: tmpl, PublicKey: csr.PublicKey, CSR: csr.Raw, Identity: appID, TTL: ca.DefaultTTL}); err != nil {
				b.Errorf("Sign: %v", err)
				return
			}
			i++
		}
	})
	b.StopTimer()
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "certs/s")
}
