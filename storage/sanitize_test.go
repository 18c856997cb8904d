package storage_test

import (
	"errors"
	"reflect"
	"strings"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/castellan-ca/castellan/storage"
	"github.com/castellan-ca/castellan/storage/storagetest"
)

// record is a plausible record with every field set.
func record() storage.Record {
	t0 := time.Date(2025, 1, 2, 3, 4, 5, 6, time.UTC)
	return storage.Record{
		Seq: 7, Writer: "w1", Time: t0, Kind: storage.KindCSR, RequestID: "req", Peer: "10.0.0.1:1234",
		AuthMethod: "mtls", Caller: "spiffe://td/ns/a/sa/b", ClusterID: "c1",
		RequestedIdentity: "spiffe://td/ns/a/sa/b", GrantedIdentity: "spiffe://td/ns/a/sa/b",
		Outcome: storage.OutcomeIssued, Reason: "ok", Code: "OK", Serial: "0a0b", NotBefore: t0, NotAfter: t0.Add(time.Hour),
		CertSHA256: "ab", Signer: "selfsigned", IssuerKeyID: "cd", Detail: "d", PrevHash: "ef", Hash: "chain-hash",
	}
}

// kept reports whether Sanitize leaves the character r as it is.
func kept(r rune) bool {
	return r != utf8.RuneError && storage.Sanitize(string(r), utf8.UTFMax) == string(r)
}

func TestSanitize(t *testing.T) {
	tests := []struct {
		name, in string
		limit    int
		want     string
	}{
		{"clean ascii kept", "spiffe://td/ns/a/sa/b", 64, "spiffe://td/ns/a/sa/b"},
		{"clean unicode kept", "José 日本 🙂", 64, "José 日本 🙂"},
		{"empty", "", 8, ""},
		{"nul pictured", "a\x00b", 64, "a␀b"},
		{"controls pictured", "\t\n\r\x1b\x7f", 64, "␉␊␍␛␡"},
		{"c1 replaced", "a\u0085b", 64, "a\ufffdb"},
		{"invalid bytes replaced one by one", "a\xff\xfeb", 64, "a\ufffd\ufffdb"},
		{"surrogate replaced", "\xed\xa0\x80", 64, "\ufffd\ufffd\ufffd"},
		{"literal U+FFFD kept", "a\ufffdb", 64, "a\ufffdb"},
		{"bidi override replaced", "a\u202eb", 64, "a\ufffdb"},
		{"at the bound kept", "abcd", 4, "abcd"},
		{"over the bound cut with marker", "abcdef", 5, "ab…"},
		{"cut never splits a character", "aé", 2, "a"},
		{"cut keeps whole characters before the marker", "éé日", 6, "é…"},
		{"cut before a multibyte character", "ab日本", 7, "ab…"},
		{"bound below the marker cuts bare", "abcdef", 2, "ab"},
		{"zero bound", "abc", 0, ""},
		{"negative bound", "abc", -1, ""},
		{"expansion counted against the bound", "\x00\x00\x00", 7, "␀…"},
		{"trailing partial character", "ab\xe6\x97", 16, "ab\ufffd\ufffd"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if got := storage.Sanitize(tc.in, tc.limit); got != tc.want {
				t.Fatalf("Sanitize(%q, %d) = %q, want %q", tc.in, tc.limit, got, tc.want)
			}
		})
	}
}

func TestSanitizeHostile(t *testing.T) {
	for name, s := range storagetest.HostileStrings {
		t.Run(name, func(t *testing.T) {
			for _, limit := range []int{storage.MaxCodeLen, storage.MaxNameLen, storage.MaxDetailLen} {
				checkSanitized(t, s, limit)
			}
		})
	}
}

// checkSanitized asserts the sanitiser's contract for one input.
func checkSanitized(t *testing.T, in string, limit int) {
	t.Helper()
	out := storage.Sanitize(in, limit)
	switch {
	case !utf8.ValidString(out):
		t.Fatalf("Sanitize(%.40q, %d) = %.40q: not valid UTF-8", in, limit, out)
	case len(out) > max(limit, 0):
		t.Fatalf("Sanitize(%.40q, %d) is %d bytes long", in, limit, len(out))
	case strings.IndexByte(out, 0) >= 0:
		t.Fatalf("Sanitize(%.40q, %d) = %.40q holds a NUL", in, limit, out)
	case storage.Sanitize(out, limit) != out:
		t.Fatalf("Sanitize not idempotent on %.40q: %.40q then %.40q", in, out, storage.Sanitize(out, limit))
	}
	for _, r := range out {
		if !kept(r) && r != utf8.RuneError {
			t.Fatalf("Sanitize(%.40q, %d) = %.40q keeps %U", in, limit, out, r)
		}
	}
	if clean := utf8.ValidString(in) && len(in) <= limit && !strings.ContainsFunc(in, func(r rune) bool {
		return !kept(r) && r != utf8.RuneError
	}); clean && out != in {
		t.Fatalf("Sanitize changed clean %.40q to %.40q", in, out)
	}
}

func TestSanitizeDoesNotAllocateWhenClean(t *testing.T) {
	s := "spiffe://cluster.local/ns/default/sa/José"
	if n := testing.AllocsPerRun(100, func() { _ = storage.Sanitize(s, storage.MaxNameLen) }); n != 0 {
		t.Fatalf("Sanitize of a clean string allocates %v times", n)
	}
	r := record()
	if n := testing.AllocsPerRun(100, func() { r.Sanitize() }); n != 0 {
		t.Fatalf("Record.Sanitize of a clean record allocates %v times", n)
	}
}

// TestRecordSanitizeCoversEveryField puts every hostile string in every
// caller-set string field and checks that Record.Sanitize leaves each field
// a fixed point of Sanitize within the field's bound, and touches neither
// the chain fields nor the times.
func TestRecordSanitizeCoversEveryField(t *testing.T) {
	bound := map[string]int{"Peer": storage.MaxNameLen, "Caller": storage.MaxNameLen, "ClusterID": storage.MaxNameLen,
		"RequestedIdentity": storage.MaxNameLen, "GrantedIdentity": storage.MaxNameLen, "Detail": storage.MaxDetailLen}
	for _, field := range storagetest.CallerStringFields() {
		for name, s := range storagetest.HostileStrings {
			r := record()
			storagetest.SetField(&r, field, s)
			r.Sanitize()
			got := reflect.ValueOf(r).FieldByName(field).String()
			limit := bound[field]
			if limit == 0 {
				limit = storage.MaxCodeLen
			}
			if got != storage.Sanitize(s, limit) || storage.Sanitize(got, limit) != got {
				t.Errorf("%s = %s: sanitised to %.40q, want %.40q", field, name, got, storage.Sanitize(s, limit))
			}
			want := record()
			storagetest.SetField(&want, field, got)
			if !reflect.DeepEqual(r, want) {
				t.Errorf("%s = %s: Record.Sanitize changed other fields", field, name)
			}
		}
	}
}

func TestQuerySanitize(t *testing.T) {
	q := storage.Query{Identity: "a\x00", Serial: "ab", Limit: 7, Since: time.Unix(1, 0)}.Sanitized()
	if q.Identity != "a␀" || q.Serial != "ab" || q.Limit != 7 || !q.Since.Equal(time.Unix(1, 0)) {
		t.Fatalf("Query.Sanitize = %+v", q)
	}
}

func TestValidateWriter(t *testing.T) {
	for _, w := range []string{"", "a\x00", "a\nb", "\xff", strings.Repeat("w", storage.MaxWriterLen+1)} {
		if err := storage.ValidateWriter(w); !errors.Is(err, storage.ErrInvalidWriter) {
			t.Errorf("ValidateWriter(%.20q) = %v, want storage.ErrInvalidWriter", w, err)
		}
	}
	for _, w := range []string{"embedded-0123abcd", "castellan-7d9f-x2-0a1b2c3d4e5f", strings.Repeat("w", storage.MaxWriterLen)} {
		if err := storage.ValidateWriter(w); err != nil {
			t.Errorf("ValidateWriter(%.20q) = %v", w, err)
		}
	}
}

// FuzzSanitize checks the sanitiser's contract on any input and bound:
// valid UTF-8, bounded, no NUL or other replaced character, idempotent, and
// a clean short input unchanged.
func FuzzSanitize(f *testing.F) {
	for _, s := range storagetest.HostileStrings {
		if len(s) < 4096 {
			f.Add(s, 16)
			f.Add(s, storage.MaxCodeLen)
		}
	}
	f.Add("abc", 2)
	f.Add("日本語", 4)
	f.Fuzz(func(t *testing.T, s string, limit int) {
		limit %= 2 * storage.MaxDetailLen
		checkSanitized(t, s, limit)
	})
}

// BenchmarkSanitizeRecord is the per-record cost of sanitising on the
// append path: a typical clean record, and one with hostile fields.
func BenchmarkSanitizeRecord(b *testing.B) {
	clean := record()
	hostile := record()
	hostile.Caller, hostile.Detail = "a\x00b\xff\u202e", strings.Repeat("\x1b", 10000)
	for _, bc := range []struct {
		name string
		r    storage.Record
	}{{"Clean", clean}, {"Hostile", hostile}} {
		b.Run(bc.name, func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				r := bc.r
				r.Sanitize()
			}
		})
	}
}
