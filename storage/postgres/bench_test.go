package postgres_test

import (
	"context"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/castellan-ca/castellan/ca"
	"github.com/castellan-ca/castellan/storage"
	"github.com/castellan-ca/castellan/storage/postgres"
	"github.com/castellan-ca/castellan/storage/postgres/pgtest"
)

// Benchmarks run against a throwaway cluster with fsync and
// synchronous_commit ON: every commit waits for the WAL flush, as in
// production. Numbers and the command are in BENCHMARKS.md.

func benchRecord() *storage.Record {
	return &storage.Record{Kind: storage.KindCSR, Outcome: storage.OutcomeIssued, RequestID: "0123456789abcdef01234567",
		Peer: "10.1.2.3:45678", AuthMethod: "kubernetes", Caller: "spiffe://cluster.local/ns/bench/sa/default",
		GrantedIdentity: "spiffe://cluster.local/ns/bench/sa/default", Code: "OK", Serial: "0123456789abcdef0123456789abcdef",
		NotBefore: time.Now(), NotAfter: time.Now().Add(24 * time.Hour), CertSHA256: strings.Repeat("ab", 32),
		Signer: "selfsigned", IssuerKeyID: strings.Repeat("cd", 20)}
}

// BenchmarkAppend measures durable audit throughput with 32 concurrent
// callers per CPU: group commit (one transaction per batch) against one
// transaction per record (MaxBatch 1).
func BenchmarkAppend(b *testing.B) {
	pg := pgtest.Start(b, pgtest.Options{Durable: true})
	for _, bc := range []struct {
		name     string
		maxBatch int
	}{{"GroupCommit", 256}, {"TxPerRecord", 1}} {
		b.Run(bc.name, func(b *testing.B) {
			s, err := postgres.Open(context.Background(), pg.CreateDB(b), postgres.Options{Writer: "bench", MaxBatch: bc.maxBatch})
			if err != nil {
				b.Fatal(err)
			}
			defer s.Close()
			b.SetParallelism(32)
			b.ResetTimer()
			b.RunParallel(func(pb *testing.PB) {
				for pb.Next() {
					if err := s.Append(context.Background(), benchRecord()); err != nil {
						b.Error(err)
						return
					}
				}
			})
			b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "records/s")
			if st := s.Stats(); st.Batches > 0 {
				b.ReportMetric(float64(st.Records)/float64(st.Batches), "records/batch")
			}
		})
	}
}

// discard is an audit log that records nothing: the baseline that shows
// what the durable audit costs. Never used outside benchmarks.
type discard struct{}

func (discard) Append(context.Context, *storage.Record) error { return nil }

// BenchmarkIssuePostgres is the whole issuance pipeline without gRPC: CSR
// parse and verify, profile, signing with the self-signed ECDSA P-256 root,
// result checks, and the durable audit append to PostgreSQL (group commit);
// NoAudit is the same pipeline with the audit append discarded.
func BenchmarkIssuePostgres(b *testing.B) {
	pg := pgtest.Start(b, pgtest.Options{Durable: true})
	b.Run("P256", func(b *testing.B) {
		s, err := postgres.Open(context.Background(), pg.CreateDB(b), postgres.Options{Writer: "bench"})
		if err != nil {
			b.Fatal(err)
		}
		defer s.Close()
		benchIssue(b, newIssuer(b, s, 5*time.Second))
		if st := s.Stats(); st.Batches > 0 {
			b.ReportMetric(float64(st.Records)/float64(st.Batches), "records/batch")
		}
	})
	b.Run("P256-NoAudit", func(b *testing.B) { benchIssue(b, newIssuer(b, discard{}, 5*time.Second)) })
}

// benchIssue issues in parallel with 16 goroutines per CPU, so that group
// commit has company, and reports certificates per second.
func benchIssue(b *testing.B, is *ca.Issuer) {
	csrs := make([]string, 16)
	for i := range csrs {
		csrs[i] = csrPEM(b, i)
	}
	var next atomic.Int64
	b.SetParallelism(16)
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		i := int(next.Add(1))
		for pb.Next() {
			if _, err := is.Issue(context.Background(), ca.Request{CSR: csrs[i%len(csrs)], Peer: "10.1.2.3:4567"}); err != nil {
				b.Error(err)
				return
			}
		}
	})
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "certs/s")
}
