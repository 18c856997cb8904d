package storage

import (
	"errors"
	"reflect"
	"strings"
	"testing"
	"time"
	"unicode/utf8"
)

// HostileStrings are values a caller can put in an audit field that a
// database, a protobuf string or a terminal would choke on.
var hostileStrings = map[string]string{
	"nul":                  "a\x00b",
	"only nul":             "\x00",
	"invalid utf-8":        "a\xffb\xc3",
	"lone high surrogate":  "x\xed\xa0\x80y",
	"lone low surrogate":   "\xed\xbf\xbf",
	"overlong slash":       "\xc0\xaf",
	"escape sequence":      "ok\x1b[2J\x1b]0;title\x07",
	"newlines":             "line1\nforged line\r\n",
	"del and c1":           "a\x7fb\u0085c\u009bd",
	"bidi override":        "spiffe://td/ns/\u202egnp.exe\u202c/sa/x",
	"bidi isolates":        "\u2066a\u2067b\u2068c\u2069\u200e\u200f\u061c",
	"line separator":       "a\u2028b\u2029c",
	"cut mid-character":    strings.Repeat("é", 10)[:19],
	"1 MB of nul":          strings.Repeat("\x00", 1<<20),
	"1 MB multibyte":       strings.Repeat("日本", 1<<20/6),
	"multibyte at the cut": strings.Repeat("a", MaxNameLen-1) + "é",
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
			if got := Sanitize(tc.in, tc.limit); got != tc.want {
				t.Fatalf("Sanitize(%q, %d) = %q, want %q", tc.in, tc.limit, got, tc.want)
			}
		})
	}
}

func TestSanitizeHostile(t *testing.T) {
	for name, s := range hostileStrings {
		t.Run(name, func(t *testing.T) {
			for _, limit := range []int{MaxCodeLen, MaxNameLen, MaxDetailLen} {
				checkSanitized(t, s, limit)
			}
		})
	}
}

// checkSanitized asserts the sanitiser's contract for one input.
func checkSanitized(t *testing.T, in string, limit int) {
	t.Helper()
	out := Sanitize(in, limit)
	switch {
	case !utf8.ValidString(out):
		t.Fatalf("Sanitize(%.40q, %d) = %.40q: not valid UTF-8", in, limit, out)
	case len(out) > max(limit, 0):
		t.Fatalf("Sanitize(%.40q, %d) is %d bytes long", in, limit, len(out))
	case strings.IndexByte(out, 0) >= 0:
		t.Fatalf("Sanitize(%.40q, %d) = %.40q holds a NUL", in, limit, out)
	case Sanitize(out, limit) != out:
		t.Fatalf("Sanitize not idempotent on %.40q: %.40q then %.40q", in, out, Sanitize(out, limit))
	}
	for _, r := range out {
		if replacement(r, utf8.RuneLen(r)) != 0 && r != utf8.RuneError {
			t.Fatalf("Sanitize(%.40q, %d) = %.40q keeps %U", in, limit, out, r)
		}
	}
	if clean := utf8.ValidString(in) && len(in) <= limit && !strings.ContainsFunc(in, func(r rune) bool {
		return replacement(r, utf8.RuneLen(r)) != 0
	}); clean && out != in {
		t.Fatalf("Sanitize changed clean %.40q to %.40q", in, out)
	}
}

func TestSanitizeDoesNotAllocateWhenClean(t *testing.T) {
	s := "spiffe://cluster.local/ns/default/sa/José"
	if n := testing.AllocsPerRun(100, func() { _ = Sanitize(s, MaxNameLen) }); n != 0 {
		t.Fatalf("Sanitize of a clean string allocates %v times", n)
	}
	r := sampleRecord()
	if n := testing.AllocsPerRun(100, func() { r.Sanitize() }); n != 0 {
		t.Fatalf("Record.Sanitize of a clean record allocates %v times", n)
	}
}

// callerStringFields lists Record's string fields a caller sets: all but the
// chain fields the store assigns. Found by reflection, so that a field added
// later is covered by the tests that use it.
func callerStringFields() []string {
	var out []string
	typ := reflect.TypeFor[Record]()
	for i := range typ.NumField() {
		f := typ.Field(i)
		if f.Type.Kind() == reflect.String && f.Name != "Writer" && f.Name != "PrevHash" && f.Name != "Hash" {
			out = append(out, f.Name)
		}
	}
	return out
}

// TestRecordSanitizeCoversEveryField puts every hostile string in every
// caller-set string field and checks that Record.Sanitize leaves each field
// a fixed point of Sanitize within the field's bound, and touches neither
// the chain fields nor the times.
func TestRecordSanitizeCoversEveryField(t *testing.T) {
	bound := map[string]int{"Peer": MaxNameLen, "Caller": MaxNameLen, "ClusterID": MaxNameLen,
		"RequestedIdentity": MaxNameLen, "GrantedIdentity": MaxNameLen, "Detail": MaxDetailLen}
	for _, field := range callerStringFields() {
		for name, s := range hostileStrings {
			r := sampleRecord()
			r.Hash = "chain-hash"
			reflect.ValueOf(&r).Elem().FieldByName(field).SetString(s)
			r.Sanitize()
			got := reflect.ValueOf(r).FieldByName(field).String()
			limit := bound[field]
			if limit == 0 {
				limit = MaxCodeLen
			}
			if got != Sanitize(s, limit) || Sanitize(got, limit) != got {
				t.Errorf("%s = %s: sanitised to %.40q, want %.40q", field, name, got, Sanitize(s, limit))
			}
			want := sampleRecord()
			want.Hash = "chain-hash"
			reflect.ValueOf(&want).Elem().FieldByName(field).SetString(got)
			if !reflect.DeepEqual(r, want) {
				t.Errorf("%s = %s: Record.Sanitize changed other fields", field, name)
			}
		}
	}
}

func TestQuerySanitize(t *testing.T) {
	q := Query{Identity: "a\x00", Serial: "ab", Limit: 7, Since: time.Unix(1, 0)}
	q.Sanitize()
	if q.Identity != "a␀" || q.Serial != "ab" || q.Limit != 7 || !q.Since.Equal(time.Unix(1, 0)) {
		t.Fatalf("Query.Sanitize = %+v", q)
	}
}

func TestValidateWriter(t *testing.T) {
	for _, w := range []string{"", "a\x00", "a\nb", "\xff", strings.Repeat("w", MaxWriterLen+1)} {
		if err := ValidateWriter(w); !errors.Is(err, ErrInvalidWriter) {
			t.Errorf("ValidateWriter(%.20q) = %v, want ErrInvalidWriter", w, err)
		}
	}
	for _, w := range []string{"embedded-0123abcd", "castellan-7d9f-x2-0a1b2c3d4e5f", strings.Repeat("w", MaxWriterLen)} {
		if err := ValidateWriter(w); err != nil {
			t.Errorf("ValidateWriter(%.20q) = %v", w, err)
		}
	}
}

// FuzzSanitize checks the sanitiser's contract on any input and bound:
// valid UTF-8, bounded, no NUL or other replaced character, idempotent, and
// a clean short input unchanged.
func FuzzSanitize(f *testing.F) {
	for _, s := range hostileStrings {
		if len(s) < 4096 {
			f.Add(s, 16)
			f.Add(s, MaxCodeLen)
		}
	}
	f.Add("abc", 2)
	f.Add("日本語", 4)
	f.Fuzz(func(t *testing.T, s string, limit int) {
		limit %= 2 * MaxDetailLen
		checkSanitized(t, s, limit)
	})
}
