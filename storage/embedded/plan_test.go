package embedded

import (
	"fmt"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/castellan-ca/castellan/storage"
)

// TestInventoryQueriesUseIndexes loads 9,000 records (3 writers, 2,000
// identities, 3 issuing keys, 4% refusals), ANALYZEs, and checks with
// EXPLAIN QUERY PLAN that every inventory filter of List is answered from
// its index, never by scanning audit_log: each index on the insert path
// must earn its cost by serving a query (BENCHMARKS.md, "Hot path profile").
func TestInventoryQueriesUseIndexes(t *testing.T) {
	if testing.Short() {
		t.Skip("loads 9k rows")
	}
	path := filepath.Join(t.TempDir(), "audit.db")
	openStore(t, path, Options{}) // creates the schema
	raw := openRaw(t, path)
	ctx := t.Context()
	tx, err := raw.db.BeginTx(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	ins, err := tx.PrepareContext(ctx, `INSERT INTO audit_log (writer, seq, time_ns, kind, requested_identity, granted_identity,
		outcome, serial, cert_sha256, issuer_key_id, prev_hash, hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'p', 'h')`)
	if err != nil {
		t.Fatal(err)
	}
	t0 := time.Date(2025, 1, 1, 0, 0, 0, 0, time.UTC)
	const writers, perW = 3, 3000
	for w := range writers {
		for i := 1; i <= perW; i++ {
			n := w*perW + i
			granted, outcome := fmt.Sprintf("spiffe://td/ns/n/sa/%d", n%2000), storage.OutcomeIssued
			serial, cert, issuer, requested := fmt.Sprintf("%032x", n), fmt.Sprintf("%064x", n), fmt.Sprintf("key%d", n%3), ""
			if n%7 == 0 {
				requested = granted // impersonation (a node agent for a pod)
			}
			if n%25 == 0 {
				outcome, serial, cert, issuer, granted = storage.OutcomeRefused, "", "", "", ""
			}
			if _, err := ins.ExecContext(ctx, fmt.Sprintf("w%d", w), i, t0.Add(time.Duration(n)*time.Second).UnixNano(), storage.KindCSR,
				requested, granted, outcome, serial, cert, issuer); err != nil {
				t.Fatal(err)
			}
		}
	}
	if err := tx.Commit(); err != nil {
		t.Fatal(err)
	}
	if err := raw.Exec(ctx, "ANALYZE"); err != nil {
		t.Fatal(err)
	}

	for _, tc := range []struct {
		name  string
		q     storage.Query
		index []string // every one must appear in the plan
	}{
		{"identity (granted or requested)", storage.Query{Identity: "spiffe://td/ns/n/sa/7"}, []string{"audit_log_granted", "audit_log_requested"}},
		{"serial", storage.Query{Serial: fmt.Sprintf("%032x", 4242)}, []string{"audit_log_serial"}},
		{"certificate fingerprint", storage.Query{CertSHA256: fmt.Sprintf("%064x", 4242)}, []string{"audit_log_cert"}},
		{"refusals", storage.Query{Outcome: storage.OutcomeRefused}, []string{"audit_log_outcome"}},
		{"time window", storage.Query{Since: t0.Add(time.Hour), Until: t0.Add(time.Hour + 5*time.Minute)}, []string{"audit_log_time"}},
		{"issuing key", storage.Query{IssuerKeyID: "key1"}, []string{"audit_log_issuer"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			query, args := listQuery(tc.q)
			rows, err := raw.db.QueryContext(ctx, "EXPLAIN QUERY PLAN "+query, args...)
			if err != nil {
				t.Fatal(err)
			}
			defer rows.Close()
			var plan []string
			for rows.Next() {
				var id, parent, unused int
				var detail string
				if err := rows.Scan(&id, &parent, &unused, &detail); err != nil {
					t.Fatal(err)
				}
				plan = append(plan, detail)
			}
			if err := rows.Err(); err != nil {
				t.Fatal(err)
			}
			text := strings.Join(plan, "\n")
			t.Logf("plan:\n%s", text)
			for _, line := range plan {
				if strings.HasPrefix(line, "SCAN audit_log") {
					t.Errorf("scans audit_log: %q", line)
				}
			}
			for _, idx := range tc.index {
				if !strings.Contains(text, "INDEX "+idx+" ") {
					t.Errorf("plan does not use %s", idx)
				}
			}
		})
	}
}
