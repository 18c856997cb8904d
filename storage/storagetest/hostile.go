package storagetest

import (
	"context"
	"fmt"
	"reflect"
	"sort"
	"strings"
	"sync"
	"testing"
	"unicode/utf8"

	"github.com/castellan-ca/castellan/storage"
)

// HostileStrings are values a caller can get into an audit field that a
// database, a protobuf string or a terminal would choke on, by name.
var HostileStrings = map[string]string{
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
	"multibyte at the cut": strings.Repeat("a", storage.MaxCodeLen-1) + "é" + strings.Repeat("b", storage.MaxNameLen-storage.MaxCodeLen-1) + "é",
}

// CallerStringFields lists the string fields of storage.Record that a
// caller sets: all but the chain fields the store assigns (Writer,
// PrevHash, Hash). Found by reflection, so a field added later is covered.
func CallerStringFields() []string {
	var out []string
	typ := reflect.TypeFor[storage.Record]()
	for i := range typ.NumField() {
		f := typ.Field(i)
		if f.Type.Kind() == reflect.String && f.Name != "Writer" && f.Name != "PrevHash" && f.Name != "Hash" {
			out = append(out, f.Name)
		}
	}
	return out
}

// SetField sets r's string field named field to v.
func SetField(r *storage.Record, field, v string) {
	reflect.ValueOf(r).Elem().FieldByName(field).SetString(v)
}

// Sanitized returns what a store must give back for in: in sanitised
// (storage.Record.Sanitize), times in UTC, with stored's chain fields (and
// stored's Time when in's was zero, since the store fills it).
func Sanitized(in storage.Record, stored *storage.Record) storage.Record {
	want := in
	want.Sanitize()
	want.Writer, want.Seq, want.PrevHash, want.Hash = stored.Writer, stored.Seq, stored.PrevHash, stored.Hash
	if want.Time.IsZero() {
		want.Time = stored.Time
	}
	return normalize(want)
}

// checkStoredStrings fails t if a string field of r is not what Sanitize
// leaves unchanged: invalid UTF-8, a control character, over its bound.
func checkStoredStrings(t *testing.T, r *storage.Record) {
	t.Helper()
	v := reflect.ValueOf(r).Elem()
	for i := range v.NumField() {
		s, ok := v.Field(i).Interface().(string)
		if !ok {
			continue
		}
		if !utf8.ValidString(s) || strings.IndexByte(s, 0) >= 0 || len(s) > storage.MaxDetailLen ||
			storage.Sanitize(s, storage.MaxDetailLen) != s {
			t.Errorf("seq %d: stored %s = %.60q is not sanitised", r.Seq, v.Type().Field(i).Name, s)
		}
	}
}

// testHostileStrings puts every hostile string into every caller-set string
// field, one record each, queued behind a held batch together with
// well-behaved records, so that they share one transaction. Every Append
// must succeed and every record come back as its sanitised form (the
// well-behaved ones unchanged) through Append's result, List and Get; the
// chain verifies.
func testHostileStrings(t *testing.T, env Env) {
	// One batch (and queue) big enough for every record: they share one
	// transaction.
	s, gate, queued, first := held(t, env, func(tune *Tuning) { tune.MaxBatch = 1024 })
	names := make([]string, 0, len(HostileStrings))
	for name := range HostileStrings {
		names = append(names, name)
	}
	sort.Strings(names)
	var inputs []storage.Record
	for _, field := range CallerStringFields() {
		for i, name := range names {
			r := *csr(fmt.Sprintf("spiffe://td/ns/good/sa/%s-%d", field, i), t0)
			SetField(&r, field, HostileStrings[name])
			inputs = append(inputs, r)
			if i%4 == 0 { // well-behaved records in between
				inputs = append(inputs, *csr(fmt.Sprintf("spiffe://td/ns/good/sa/plain-%d", len(inputs)), t0))
			}
		}
	}
	got := make([]*storage.Record, len(inputs))
	errs := make([]error, len(inputs))
	var wg sync.WaitGroup
	for i := range inputs {
		got[i] = new(storage.Record)
		*got[i] = inputs[i]
		wg.Go(func() { errs[i] = s.Append(context.Background(), got[i]) })
	}
	for range inputs {
		<-queued
	}
	gate.Release()
	wg.Wait()
	if err := <-first; err != nil {
		t.Fatalf("held Append: %v", err)
	}
	ctx := context.Background()
	for i, in := range inputs {
		if errs[i] != nil {
			t.Fatalf("Append of record %d (%.60q...): %v", i, in.GrantedIdentity, errs[i])
		}
		want := Sanitized(in, got[i])
		if !reflect.DeepEqual(normalize(*got[i]), want) {
			t.Fatalf("record %d after Append:\n got %.400q\nwant %.400q", i, fmt.Sprint(*got[i]), fmt.Sprint(want))
		}
		stored, err := s.Get(ctx, got[i].Writer, got[i].Seq)
		if err != nil {
			t.Fatalf("Get %s/%d: %v", got[i].Writer, got[i].Seq, err)
		}
		assertSameRecord(t, *stored, *got[i])
		checkStoredStrings(t, stored)
	}
	all, err := s.List(ctx, storage.Query{Limit: storage.MaxLimit})
	if err != nil || len(all) != len(inputs)+1 {
		t.Fatalf("List = %d records, %v; want %d", len(all), err, len(inputs)+1)
	}
	bySeq := map[uint64]*storage.Record{}
	for _, r := range got {
		bySeq[r.Seq] = r
	}
	for _, r := range all[1:] {
		assertSameRecord(t, r, *bySeq[r.Seq])
	}
	mustVerify(t, s, len(inputs)+1)
}
