package main

import (
	"context"
	"encoding/csv"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/castellan-ca/castellan/cmd/internal/datadir"
	"github.com/castellan-ca/castellan/storage"
	"github.com/castellan-ca/castellan/storage/postgres/pgtest"
	"github.com/jackc/pgx/v5"
)

// TestAuditCommandsBothStores runs `castellan serve` on the embedded store
// and on PostgreSQL (--audit-dsn) and drives every audit command against
// each: list, show, export (JSON lines and CSV), prune and verify, then
// tampers with the prune checkpoint and expects verify to fail.
func TestAuditCommandsBothStores(t *testing.T) {
	stores := []struct {
		name  string
		setup func(t *testing.T) (extraArgs []string, tamper func(sql string) error)
	}{
		{"embedded", func(*testing.T) ([]string, func(string) error) { return nil, nil }},
		{"postgres", func(t *testing.T) ([]string, func(string) error) {
			dsn := pgtest.Start(t, pgtest.Options{}).CreateDB(t)
			return []string{"--audit-dsn", dsn, "--ca-kek-file", testKEKFile(t)}, func(sql string) error {
				conn, err := pgx.Connect(context.Background(), dsn)
				if err != nil {
					return err
				}
				defer conn.Close(context.Background())
				_, err = conn.Exec(context.Background(), sql)
				return err
			}
		}},
	}
	for _, st := range stores {
		t.Run(st.name, func(t *testing.T) {
			extra, tamper := st.setup(t)
			data := filepath.Join(t.TempDir(), "data")
			startServer(t, data, extra...)
			for i := range 3 {
				issue(t, data, fmt.Sprintf("spiffe://cluster.local/ns/audit/sa/sa%d", i))
			}
			recs := auditRecords(t, data)
			var issued storage.Record
			for _, r := range recs {
				if r.Outcome == storage.OutcomeIssued {
					issued = r
				}
			}
			if issued.Serial == "" {
				t.Fatalf("no issued record among %d", len(recs))
			}

			t.Run("show", func(t *testing.T) {
				byKey := mustCtl(t, data, "audit", "show", fmt.Sprintf("%s/%d", issued.Writer, issued.Seq))
				bySerial := mustCtl(t, data, "audit", "show", "--serial", issued.Serial)
				for _, out := range []string{byKey, bySerial} {
					if !strings.Contains(out, issued.Serial+"\n") || !strings.Contains(out, "hash:") || !strings.Contains(out, issued.Hash+"\n") {
						t.Errorf("audit show output lacks the record's serial and hash:\n%s", out)
					}
				}
				if _, _, err := ctl(data, "audit", "show", issued.Writer+"/999999"); err == nil || !strings.Contains(err.Error(), "NotFound") {
					t.Errorf("audit show of a missing record = %v, want NotFound", err)
				}
			})

			t.Run("export", func(t *testing.T) {
				out := mustCtl(t, data, "audit", "export")
				lines := strings.Split(strings.TrimSuffix(out, "\n"), "\n")
				var exported []storage.Record
				for _, line := range lines[:len(lines)-1] {
					var r storage.Record
					if err := json.Unmarshal([]byte(line), &r); err != nil {
						t.Fatal(err)
					}
					if r.ComputeHash() != r.Hash {
						t.Errorf("exported record %s/%d does not hash to its hash", r.Writer, r.Seq)
					}
					exported = append(exported, r)
				}
				if !strings.HasPrefix(lines[len(lines)-1], `{"head":`) {
					t.Errorf("export does not end in its head: %s", lines[len(lines)-1])
				}
				if len(exported) != len(recs) {
					t.Errorf("export wrote %d records, list shows %d", len(exported), len(recs))
				}
				path := filepath.Join(t.TempDir(), "audit.jsonl")
				if err := os.WriteFile(path, []byte(out), 0o600); err != nil {
					t.Fatal(err)
				}
				verified := mustCtl(t, data, "audit", "verify", "--file", path, "--checkpoint-key",
					filepath.Join(data, datadir.AuditCheckpointPublicKey))
				if !strings.HasPrefix(verified, fmt.Sprintf("export intact: %d records of 1 writer(s)", len(recs))) {
					t.Errorf("audit verify --file: %q", verified)
				}
				path = filepath.Join(t.TempDir(), "audit.csv")
				mustCtl(t, data, "audit", "export", "--format", "csv", "--out", path)
				f, err := os.Open(path)
				if err != nil {
					t.Fatal(err)
				}
				defer f.Close()
				rows, err := csv.NewReader(f).ReadAll()
				if err != nil {
					t.Fatal(err)
				}
				if len(rows) != len(recs)+1 || rows[0][0] != "writer" || rows[len(rows)-1][len(rows[0])-1] != recs[len(recs)-1].Hash {
					t.Errorf("CSV has %d rows (want header + %d) ending %v", len(rows), len(recs), rows[len(rows)-1])
				}
			})

			t.Run("prune and verify", func(t *testing.T) {
				out := mustCtl(t, data, "audit", "prune", "--before", "2200-01-01")
				if !strings.Contains(out, fmt.Sprintf("pruned %d records", len(recs)-1)) {
					t.Fatalf("audit prune: %q; want %d records pruned (the newest is kept)", out, len(recs)-1)
				}
				after := auditRecords(t, data)
				if len(after) != 2 || after[1].Kind != storage.KindOperator || !strings.Contains(after[1].Detail, "checkpoint 1") {
					t.Fatalf("after prune: %+v; want the newest record and the audited prune", after)
				}
				if out := mustCtl(t, data, "audit", "verify"); !strings.Contains(out, "intact") || !strings.Contains(out, "1 signed prune checkpoint") {
					t.Fatalf("audit verify after prune: %q", out)
				}
				export := filepath.Join(t.TempDir(), "pruned.jsonl")
				mustCtl(t, data, "audit", "export", "--out", export)
				if out := mustCtl(t, data, "audit", "verify", "--file", export, "--checkpoint-key",
					filepath.Join(data, datadir.AuditCheckpointPublicKey)); !strings.Contains(out, "export intact: 2 records of 1 writer(s), 1 prune checkpoint(s)") {
					t.Fatalf("audit verify --file after prune: %q", out)
				}
				if tamper == nil {
					return
				}
				if err := tamper(`DELETE FROM audit_checkpoint`); err != nil {
					t.Fatal(err)
				}
				out, _, err := ctl(data, "audit", "verify")
				var ee exitError
				if !errors.As(err, &ee) || ee.code != 1 || !strings.Contains(out, "seq 1") {
					t.Fatalf("audit verify without the checkpoint = %q, %v; want exit 1 naming seq 1", out, err)
				}
			})
		})
	}
}
