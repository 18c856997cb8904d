package postgres

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/castellan-ca/castellan/storage"
	"github.com/castellan-ca/castellan/storage/postgres/pgtest"
	"github.com/jackc/pgx/v5"
)

// TestInventoryQueriesUseIndexes loads 200,000 records (20 writers, 5,000
// identities, 3 issuing keys, a few percent refusals) with COPY, ANALYZEs,
// and checks with EXPLAIN that every inventory query is an index scan, never
// a sequential scan of audit_log. Each plan reads only the matching index
// entries (serial, fingerprint: one row; identity: its few hundred rows; a
// paged issuer/outcome query: one ordered index range stopped at LIMIT), so
// its cost does not grow with the table: the plans stay the same at 10
// million rows, where a sequential scan would read gigabytes.
func TestInventoryQueriesUseIndexes(t *testing.T) {
	if testing.Short() {
		t.Skip("loads 200k rows")
	}
	const (
		writers = 20
		perW    = 10000
	)
	dsn := pgtest.DSN(t)
	s := openStore(t, dsn, Options{Writer: "w00"})
	ctx := t.Context()
	conn, err := pgx.Connect(ctx, dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)

	t0 := time.Date(2025, 1, 1, 0, 0, 0, 0, time.UTC)
	var rows [][]any
	for w := range writers {
		for i := 1; i <= perW; i++ {
			n := w*perW + i
			r := storage.Record{Writer: fmt.Sprintf("w%02d", w), Seq: uint64(i), Time: t0.Add(time.Duration(n) * time.Second),
				Kind: storage.KindCSR, Outcome: storage.OutcomeIssued, Caller: "c", GrantedIdentity: fmt.Sprintf("spiffe://td/ns/n/sa/%d", n%5000),
				Serial: fmt.Sprintf("%032x", n), CertSHA256: fmt.Sprintf("%064x", n), IssuerKeyID: fmt.Sprintf("key%d", n%3),
				NotBefore: t0, NotAfter: t0.Add(24 * time.Hour), PrevHash: "p", Hash: "h"}
			r.RequestedIdentity = r.GrantedIdentity
			if n%25 == 0 {
				r.Outcome, r.Serial, r.CertSHA256, r.IssuerKeyID, r.GrantedIdentity = storage.OutcomeRefused, "", "", "", ""
			}
			rows = append(rows, rowValues(&r))
		}
	}
	if _, err := conn.CopyFrom(ctx, pgx.Identifier{"audit_log"}, columns, pgx.CopyFromRows(rows)); err != nil {
		t.Fatal(err)
	}
	if _, err := conn.Exec(ctx, "ANALYZE audit_log"); err != nil {
		t.Fatal(err)
	}

	last := t0.Add(writers * perW * time.Second)
	tests := []struct {
		name    string
		q       storage.Query
		indexes []string // any of these may serve the query
	}{
		{"identity", storage.Query{Identity: "spiffe://td/ns/n/sa/42"}, []string{"audit_log_granted", "audit_log_requested"}},
		{"identity paged", storage.Query{Identity: "spiffe://td/ns/n/sa/42", AfterWriter: "w03", AfterSeq: 17}, []string{"audit_log_granted"}},
		{"serial", storage.Query{Serial: fmt.Sprintf("%032x", 123456)}, []string{"audit_log_serial"}},
		{"fingerprint", storage.Query{CertSHA256: fmt.Sprintf("%064x", 123456)}, []string{"audit_log_cert"}},
		{"issuer", storage.Query{IssuerKeyID: "key1", Limit: storage.MaxLimit}, []string{"audit_log_issuer", "audit_log_pkey"}},
		{"outcome refused", storage.Query{Outcome: storage.OutcomeRefused}, []string{"audit_log_outcome", "audit_log_pkey"}},
		{"outcome issued paged", storage.Query{Outcome: storage.OutcomeIssued, AfterWriter: "w10", AfterSeq: 500}, []string{"audit_log_outcome", "audit_log_pkey"}},
		{"last hour", storage.Query{Since: last.Add(-time.Hour), Until: last}, []string{"audit_log_time"}},
		{"time range and outcome", storage.Query{Since: last.Add(-time.Hour), Outcome: storage.OutcomeRefused}, []string{"audit_log_time", "audit_log_outcome"}},
		{"one writer's chain paged", storage.Query{Writer: "w07", AfterSeq: 5000}, []string{"audit_log_pkey"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			sql, args := listSQL(tc.q)
			plan := explain(t, conn, sql, args...)
			t.Logf("%s:\n%s", tc.name, plan)
			if strings.Contains(plan, "Seq Scan") || !containsAny(plan, tc.indexes) {
				t.Fatalf("plan for %+v does not use %v:\n%s", tc.q, tc.indexes, plan)
			}
			// A statement the server has prepared may run on a generic
			// plan, blind to the values: it must use the indexes too.
			generic := explainGeneric(t, conn, sql, args...)
			if strings.Contains(generic, "Seq Scan") || !containsAny(generic, tc.indexes) {
				t.Fatalf("generic plan for %+v does not use %v:\n%s", tc.q, tc.indexes, generic)
			}
			if _, err := s.List(t.Context(), tc.q); err != nil {
				t.Fatal(err)
			}
		})
	}
	t.Run("prune span", func(t *testing.T) {
		for _, cutoff := range []time.Time{t0.Add(55000 * time.Second), last} {
			plan := explain(t, conn, `SELECT seq FROM audit_log WHERE writer = $1 AND time_ns >= $2 ORDER BY seq LIMIT 1`, "w05", cutoff.UnixNano())
			if strings.Contains(plan, "Seq Scan") || !containsAny(plan, []string{"audit_log_pkey", "audit_log_time"}) {
				t.Fatalf("prune span plan:\n%s", plan)
			}
		}
	})
}

func explain(t *testing.T, conn *pgx.Conn, sql string, args ...any) string {
	t.Helper()
	rows, err := conn.Query(t.Context(), "EXPLAIN "+sql, args...)
	if err != nil {
		t.Fatal(err)
	}
	lines, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		t.Fatal(err)
	}
	return strings.Join(lines, "\n")
}

// explainGeneric is the plan of sql prepared on the server and forced to
// a generic plan (plan_cache_mode = force_generic_plan).
func explainGeneric(t *testing.T, conn *pgx.Conn, sql string, args ...any) string {
	t.Helper()
	ctx := t.Context()
	if _, err := conn.Exec(ctx, "SET plan_cache_mode = force_generic_plan"); err != nil {
		t.Fatal(err)
	}
	defer func() {
		if _, err := conn.Exec(ctx, "RESET plan_cache_mode"); err != nil {
			t.Error(err)
		}
	}()
	if _, err := conn.Exec(ctx, "PREPARE inventory AS "+sql); err != nil {
		t.Fatal(err)
	}
	defer func() {
		if _, err := conn.Exec(ctx, "DEALLOCATE inventory"); err != nil {
			t.Error(err)
		}
	}()
	// EXPLAIN takes no parameters: the values go in as literals.
	params := make([]string, len(args))
	for i, a := range args {
		switch v := a.(type) {
		case string:
			params[i] = "'" + strings.ReplaceAll(v, "'", "''") + "'"
		case int, int64:
			params[i] = fmt.Sprint(v)
		default:
			t.Fatalf("argument %d: %T has no literal here", i+1, a)
		}
	}
	return explain(t, conn, "EXECUTE inventory("+strings.Join(params, ", ")+")")
}

func containsAny(s string, subs []string) bool {
	for _, sub := range subs {
		if strings.Contains(s, sub) {
			return true
		}
	}
	return false
}
