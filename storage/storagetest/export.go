package storagetest

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"encoding/json"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/castellan-ca/castellan/storage"
)

// Exporter is the offline-verification contract: stores that implement it
// (with a checkpoint key configured by Env.Open) get the export subtests.
type Exporter interface {
	// Export sends the whole log, from one snapshot, to sink.
	Export(ctx context.Context, sink storage.ExportSink) error
	// CheckpointPublicKey checks checkpoints and export heads.
	CheckpointPublicKey() ed25519.PublicKey
}

// exportOf exports s into JSON lines.
func exportOf(t *testing.T, s Store) []byte {
	t.Helper()
	x, ok := s.(Exporter)
	if !ok {
		t.Skip("store does not implement Exporter")
	}
	var b bytes.Buffer
	if err := x.Export(context.Background(), storage.NewExportWriter(&b)); err != nil {
		t.Fatalf("Export: %v", err)
	}
	return b.Bytes()
}

// verifyExport runs storage.VerifyExport with s's key.
func verifyExport(t *testing.T, s Store, export []byte, opts storage.VerifyOptions) storage.ExportResult {
	t.Helper()
	res, err := storage.VerifyExport(bytes.NewReader(export), s.(Exporter).CheckpointPublicKey(), opts)
	if err != nil {
		t.Fatalf("VerifyExport: %v", err)
	}
	return res
}

// exportedStore fills a store as testExport and testExportTamper use it:
// 8 records, a prune leaving seq 5..8 under checkpoint 1, then a record
// holding every hostile string (one per field). It returns the store and
// its export.
func exportedStore(t *testing.T, env Env) (Store, []byte) {
	t.Helper()
	s, p, _ := openPruner(t, env, 8)
	if _, ok := s.(Exporter); !ok {
		t.Skip("store does not implement Exporter")
	}
	if _, err := p.Prune(context.Background(), t0.Add(5*time.Minute)); err != nil {
		t.Fatal(err)
	}
	names := slices.Sorted(func(yield func(string) bool) {
		for n := range HostileStrings {
			if !yield(n) {
				return
			}
		}
	})
	r := csr("hostile", t0.Add(time.Hour))
	for i, field := range CallerStringFields() {
		if field != "Kind" && field != "Outcome" {
			SetField(r, field, HostileStrings[names[i%len(names)]])
		}
	}
	mustAppend(t, s, r)
	return s, exportOf(t, s)
}

// testExport: an export verifies offline with the store's key, holds every
// record exactly as List gives it and the checkpoint, and ends in a signed
// head naming the chain's newest record; with the previous export's head it
// still verifies after more appends.
func testExport(t *testing.T, env Env) {
	s, export := exportedStore(t, env)
	res := verifyExport(t, s, export, storage.VerifyOptions{})
	if !res.OK || !res.Signed || res.Records != 5 || res.Writers != 1 || res.Checkpoints != 1 || res.Lines != 7 {
		t.Fatalf("VerifyExport = %+v; want a signed export of 5 records, 1 writer, 1 checkpoint in 7 lines", res)
	}
	listed := listAll(t, s, func(r *storage.Record) storage.Record { return normalize(*r) })
	lines := strings.Split(strings.TrimSuffix(string(export), "\n"), "\n")
	for i, line := range lines[1 : len(lines)-1] {
		var r storage.Record
		if err := json.Unmarshal([]byte(line), &r); err != nil {
			t.Fatalf("record line %d: %v", i, err)
		}
		assertSameRecord(t, r, listed[i])
	}
	last := listed[len(listed)-1]
	if h := res.Head; h == nil || len(h.Writers) != 1 || h.Writers[0] != (storage.HeadEntry{Writer: last.Writer, Seq: last.Seq, Hash: last.Hash}) ||
		h.Checkpoints != 1 {
		t.Fatalf("head %+v; want checkpoint 1 and %s/%d", res.Head, last.Writer, last.Seq)
	}

	mustAppend(t, s, csr("later", t0.Add(2*time.Hour)))
	next := exportOf(t, s)
	if res := verifyExport(t, s, next, storage.VerifyOptions{Previous: res.Head}); !res.OK || !res.Signed || res.Records != 6 {
		t.Fatalf("VerifyExport after an append, against the previous head = %+v", res)
	}
	var other bytes.Buffer
	other.Write(export)
	if res, _ := storage.VerifyExport(&other, ed25519.NewKeyFromSeed(bytes.Repeat([]byte{7}, ed25519.SeedSize)).Public().(ed25519.PublicKey),
		storage.VerifyOptions{}); res.OK || !strings.Contains(res.Problem, "not by the checkpoint key") {
		t.Fatalf("VerifyExport with another key = %+v; want a refusal naming the key", res)
	}
}

// exportTamperCases edit the export of exportedStore (lines: checkpoint 1,
// records seq 5..9, head); VerifyExport must fail, naming wantWords. Each
// edit is what someone holding the file could do.
var exportTamperCases = []struct {
	name      string
	edit      func(t *testing.T, lines []string) []string
	wantWords string
}{
	{"RecordEdited", editRecord(2, func(r *storage.Record) { r.GrantedIdentity = "spiffe://td/ns/evil/sa/x" }), "hash mismatch"},
	{"RecordEditedAndRehashed", rehashFrom(2, func(r *storage.Record) { r.GrantedIdentity = "spiffe://td/ns/evil/sa/x" }), "hash the head names"},
	{"RecordDeleted", func(_ *testing.T, l []string) []string { return slices.Delete(l, 3, 4) }, "missing"},
	{"RecordsReordered", func(_ *testing.T, l []string) []string { l[2], l[3] = l[3], l[2]; return l }, "missing"},
	{"RecordDuplicated", func(_ *testing.T, l []string) []string { return slices.Insert(l, 3, l[2]) }, "duplicated"},
	{"FirstRecordDeleted", func(_ *testing.T, l []string) []string { return slices.Delete(l, 1, 2) }, "missing"},
	{"LastRecordDeleted", func(_ *testing.T, l []string) []string { return slices.Delete(l, 5, 6) }, "cut from the end"},
	{"RecordAdded", rehashFrom(6, nil), "records added"},
	{"ChainAdded", addChain, "not in the head"},
	{"ChainRemoved", func(_ *testing.T, l []string) []string { return []string{l[0], l[6]} }, "chain removed"},
	{"CheckpointDeleted", func(_ *testing.T, l []string) []string { return l[1:] }, "missing"},
	{"CheckpointEdited", func(_ *testing.T, l []string) []string {
		l[0] = strings.Replace(l[0], `"removed":4`, `"removed":3`, 1)
		return l
	}, "signature"},
	{"CheckpointAfterRecords", func(_ *testing.T, l []string) []string { return slices.Insert(l, 2, l[0]) }, "after records"},
	{"HeadEdited", func(_ *testing.T, l []string) []string {
		l[6] = strings.Replace(l[6], `"checkpoints":1`, `"checkpoints":0`, 1)
		return l
	}, "signature"},
	{"DataAfterHead", func(_ *testing.T, l []string) []string { return append(l, l[1]) }, "after the head"},
	{"SpacingChanged", func(_ *testing.T, l []string) []string { l[2] = strings.Replace(l[2], `,"`, `, "`, 1); return l }, "canonical"},
	{"KeyAdded", func(_ *testing.T, l []string) []string { l[2] = `{"approved":true,` + l[2][1:]; return l }, "not an export line"},
	{"KeyDuplicated", func(_ *testing.T, l []string) []string {
		l[2] = strings.Replace(l[2], `"kind":"csr",`, `"kind":"csr","kind":"csr",`, 1)
		return l
	}, "canonical"},
}

// editRecord returns an edit that decodes line i, applies f and writes it
// back in canonical form, hash unchanged.
func editRecord(i int, f func(*storage.Record)) func(*testing.T, []string) []string {
	return func(t *testing.T, l []string) []string {
		r := decodeLine(t, l[i])
		f(&r)
		l[i] = encodeLine(t, &r)
		return l
	}
}

// rehashFrom applies f (if any) to record line i and re-seals it and every
// record after it, as a forger without the key can; with f nil it inserts a
// new record after line i-1 instead.
func rehashFrom(i int, f func(*storage.Record)) func(*testing.T, []string) []string {
	return func(t *testing.T, l []string) []string {
		prev := decodeLine(t, l[i-1])
		if f == nil {
			added := prev
			added.RequestID = "forged"
			l = slices.Insert(l, i, encodeLine(t, &added))
		} else {
			r := decodeLine(t, l[i])
			f(&r)
			l[i] = encodeLine(t, &r)
		}
		for j := i; j < len(l)-1; j++ {
			r := decodeLine(t, l[j])
			r.Seal(prev.Writer, prev.Seq+1, prev.Hash)
			l[j] = encodeLine(t, &r)
			prev = r
		}
		return l
	}
}

// addChain inserts a well-formed chain of another writer before the head.
func addChain(t *testing.T, l []string) []string {
	r := decodeLine(t, l[1])
	r.Seal("forged-writer", 1, "")
	return slices.Insert(l, len(l)-1, encodeLine(t, &r))
}

func decodeLine(t *testing.T, line string) storage.Record {
	t.Helper()
	var r storage.Record
	if err := json.Unmarshal([]byte(line), &r); err != nil {
		t.Fatalf("not a record line: %v\n%s", err, line)
	}
	return r
}

func encodeLine(t *testing.T, r *storage.Record) string {
	t.Helper()
	b, err := json.Marshal(r)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func testExportTamper(t *testing.T, env Env) {
	s, export := exportedStore(t, env)
	for _, tc := range exportTamperCases {
		t.Run(tc.name, func(t *testing.T) {
			lines := strings.Split(strings.TrimSuffix(string(export), "\n"), "\n")
			edited := tc.edit(t, lines)
			res := verifyExport(t, s, []byte(strings.Join(edited, "\n")+"\n"), storage.VerifyOptions{})
			if res.OK || res.Signed || !strings.Contains(res.Problem, tc.wantWords) {
				t.Fatalf("VerifyExport = %+v; want a break mentioning %q", res, tc.wantWords)
			}
		})
	}
	t.Run("HeadCutOff", func(t *testing.T) {
		lines := strings.Split(strings.TrimSuffix(string(export), "\n"), "\n")
		cut := strings.Join(lines[:len(lines)-2], "\n") + "\n" // the last record and the head
		res := verifyExport(t, s, []byte(cut), storage.VerifyOptions{})
		if !res.OK || res.Signed || res.Head != nil || res.Records != 4 {
			t.Fatalf("VerifyExport of a cut export = %+v; want intact chains (the limit of a hash chain) but not signed", res)
		}
	})
}

// testExportPrevious: records removed from the end of a chain in the
// database go unnoticed by the chain and by a head signed after it; the
// head of an earlier export shows them.
func testExportPrevious(t *testing.T, env Env) {
	if env.Tamper == nil {
		t.Skip("store provides no Tamper hook")
	}
	s, export := exportedStore(t, env)
	first := verifyExport(t, s, export, storage.VerifyOptions{})
	if !first.Signed {
		t.Fatalf("VerifyExport = %+v", first)
	}
	h := first.Head.Writers[0]
	if err := env.Tamper.Exec(context.Background(), fmt.Sprintf(`DELETE FROM audit_log WHERE writer = '%s' AND seq = %d`, h.Writer, h.Seq)); err != nil {
		t.Fatal(err)
	}
	later := exportOf(t, s)
	if res := verifyExport(t, s, later, storage.VerifyOptions{}); !res.OK || !res.Signed {
		t.Fatalf("VerifyExport of the shortened log alone = %+v; want it to verify (a chain's end is not anchored)", res)
	}
	res := verifyExport(t, s, later, storage.VerifyOptions{Previous: first.Head})
	if res.OK || res.Seq != h.Seq || !strings.Contains(res.Problem, "removed since") {
		t.Fatalf("VerifyExport against the previous head = %+v; want seq %d removed since", res, h.Seq)
	}
}
