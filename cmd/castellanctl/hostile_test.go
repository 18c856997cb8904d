package main

import (
	"database/sql"
	"encoding/csv"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/castellan-ca/castellan/cmd/internal/datadir"
	"github.com/castellan-ca/castellan/storage"
	"github.com/castellan-ca/castellan/storage/storagetest"
)

// hostileFields are the record fields the old-store test fills, one hostile
// string each, chosen to reach every human-readable column of list and show.
var hostileFields = []string{"Caller", "GrantedIdentity", "Reason", "Code", "Detail", "ClusterID", "Kind", "Outcome"}

// writeOldRecords appends, straight into the embedded store's file, one
// record per hostile string (short ones), its strings unsanitised and its
// hash over their exact bytes, continuing the chain: what a Castellan
// written before audit fields were sanitised left in its store.
func writeOldRecords(t *testing.T, data string) []storage.Record {
	t.Helper()
	db, err := sql.Open("sqlite", filepath.Join(data, datadir.AuditDB))
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	var (
		writer, prev string
		seq          uint64
	)
	if err := db.QueryRow(`SELECT writer, seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1`).Scan(&writer, &seq, &prev); err != nil {
		t.Fatal(err)
	}
	names := slices.Sorted(func(yield func(string) bool) {
		for n, s := range storagetest.HostileStrings {
			if len(s) < 4096 && !yield(n) {
				return
			}
		}
	})
	var out []storage.Record
	at := time.Now().UTC().Truncate(time.Second)
	for i := range names {
		r := storage.Record{Time: at, Kind: storage.KindCSR, Outcome: storage.OutcomeRefused, RequestID: fmt.Sprintf("old-%d", i)}
		for j, f := range hostileFields {
			storagetest.SetField(&r, f, storagetest.HostileStrings[names[(i+j)%len(names)]])
		}
		seq++
		r.Seal(writer, seq, prev)
		prev = r.Hash
		_, err := db.Exec(`INSERT INTO audit_log (writer, seq, time_ns, kind, request_id, peer, auth_method, caller, cluster_id,
			requested_identity, granted_identity, outcome, reason, code, serial, not_before, not_after, cert_sha256, signer,
			issuer_key_id, detail, prev_hash, hash) VALUES (?, ?, ?, ?, ?, '', '', ?, ?, '', ?, ?, ?, ?, '', NULL, NULL, '', '', '', ?, ?, ?)`,
			r.Writer, int64(r.Seq), r.Time.UnixNano(), r.Kind, r.RequestID, r.Caller, r.ClusterID, r.GrantedIdentity, r.Outcome,
			r.Reason, r.Code, r.Detail, r.PrevHash, r.Hash)
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, r)
	}
	return out
}

// terminalSafe fails t if out holds anything but printable characters,
// spaces and line feeds.
func terminalSafe(t *testing.T, what, out string) {
	t.Helper()
	for _, line := range strings.Split(out, "\n") {
		if !safeForTerminal(line) {
			t.Errorf("%s prints a character a terminal acts on: %q", what, line)
		}
	}
}

// TestOldStoreHostileStrings runs the CLI over a store holding records an
// older Castellan wrote unsanitised: escape sequences, line feeds, bidi
// overrides, C1 controls, invalid UTF-8 in every column. The human-readable
// output shows them escaped, one line per record or field, so none can
// forge a line; the machine formats (json, jsonl, csv) carry their exact
// bytes, so the records still verify, online and offline.
func TestOldStoreHostileStrings(t *testing.T) {
	data := filepath.Join(t.TempDir(), "data")
	s := startServer(t, data)
	issue(t, data, "spiffe://cluster.local/ns/old/sa/app")
	if err := s.stop(); err != nil {
		t.Fatal(err)
	}
	old := writeOldRecords(t, data)
	startServer(t, data)
	all := auditRecords(t, data) // --output json
	bySeq := map[uint64]storage.Record{}
	for _, r := range all {
		bySeq[r.Seq] = r
	}
	for _, want := range old {
		if got := bySeq[want.Seq]; !reflect.DeepEqual(got, want) {
			t.Fatalf("audit list --output json, seq %d:\n got %.300q\nwant %.300q", want.Seq, fmt.Sprint(got), fmt.Sprint(want))
		}
	}

	table := mustCtl(t, data, "audit", "list")
	terminalSafe(t, "audit list", table)
	if n := strings.Count(table, "\n"); n != len(all)+1 {
		t.Errorf("audit list printed %d lines for %d records and a header", n, len(all))
	}
	if !strings.Contains(table, `ok\x1b[2J\x1b]0;title\a`) || !strings.Contains(table, `a\xffb\xc3`) {
		t.Errorf("audit list does not show the escape sequence and the invalid UTF-8 escaped:\n%s", table)
	}
	fieldNames := csvHeader()
	for _, r := range old {
		out := mustCtl(t, data, "audit", "show", r.Writer+"/"+strconv.FormatUint(r.Seq, 10))
		terminalSafe(t, "audit show", out)
		for _, line := range strings.Split(strings.TrimSuffix(out, "\n"), "\n") {
			name, _, _ := strings.Cut(line, ":")
			if !slices.Contains(fieldNames, name) {
				t.Errorf("audit show %s/%d printed a line that is no field: %q", r.Writer, r.Seq, line)
			}
		}
		if want := "caller:             " + escape(r.Caller) + "\n"; !strings.Contains(out, want) {
			t.Errorf("audit show %s/%d lacks %q:\n%s", r.Writer, r.Seq, want, out)
		}
	}
	if out := mustCtl(t, data, "audit", "verify"); !strings.Contains(out, "intact") {
		t.Errorf("audit verify: %s", out)
	}

	dir := t.TempDir()
	export, csvFile := filepath.Join(dir, "audit.jsonl"), filepath.Join(dir, "audit.csv")
	mustCtl(t, data, "audit", "export", "--out", export)
	verified := mustCtl(t, data, "audit", "verify", "--file", export, "--checkpoint-key", filepath.Join(data, datadir.AuditCheckpointPublicKey))
	if !strings.HasPrefix(verified, fmt.Sprintf("export intact: %d records", len(all))) {
		t.Errorf("audit verify --file: %s", verified)
	}
	mustCtl(t, data, "audit", "export", "--format", "csv", "--out", csvFile)
	f, err := os.Open(csvFile)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	rows, err := csv.NewReader(f).ReadAll()
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range old {
		row := rows[r.Seq] // after the header, seq 1 first
		for i, want := range csvRow(&r) {
			// encoding/csv's reader drops the CR of a CRLF inside a field;
			// the file holds it.
			if want = strings.ReplaceAll(want, "\r\n", "\n"); row[i] != want {
				t.Errorf("CSV row of %s/%d, %s = %.80q, want the exact %.80q", r.Writer, r.Seq, csvHeader()[i], row[i], want)
			}
		}
	}
	if raw, err := os.ReadFile(csvFile); err != nil || !strings.Contains(string(raw), "forged line\r\n") {
		t.Errorf("the CSV file does not hold a CRLF of a field (%v)", err)
	}
	var decoded []string
	for _, line := range strings.Split(strings.TrimSpace(mustCtl(t, data, "audit", "list", "--output", "json")), "\n") {
		if !json.Valid([]byte(line)) {
			t.Errorf("audit list --output json printed a line that is not JSON: %q", line)
		}
		decoded = append(decoded, line)
	}
	if len(decoded) != len(all) {
		t.Errorf("audit list --output json printed %d lines for %d records", len(decoded), len(all))
	}
}

// TestCAStatusEscapesSubject: the intermediate signer's CA comes from the
// operator's files, whose subject may hold anything; ca status shows it
// escaped on one line.
func TestCAStatusEscapesSubject(t *testing.T) {
	root := newCA(t, "root", nil)
	inter := newCA(t, "evil\x1b[2J\nintermediate  forged-key  active \u202eline", root)
	cacerts := filepath.Join(t.TempDir(), "cacerts")
	writeCACerts(t, cacerts, root, inter, nil)
	data := filepath.Join(t.TempDir(), "data")
	startServer(t, data, "--signer", "intermediate", "--cacerts-dir", cacerts)
	out := mustCtl(t, data, "ca", "status")
	terminalSafe(t, "ca status", out)
	if !strings.Contains(out, `CN=evil\x1b[2J\nintermediate  forged-key  active \u202eline`) {
		t.Errorf("ca status does not show the subject escaped:\n%s", out)
	}
	for _, line := range strings.Split(out, "\n") {
		if strings.HasPrefix(line, "intermediate  forged-key") {
			t.Errorf("ca status printed a forged line: %q", line)
		}
	}
}
