package storage_test

import (
	"encoding/json"
	"reflect"
	"strings"
	"testing"
	"unicode/utf8"

	"github.com/castellan-ca/castellan/storage"
	"github.com/castellan-ca/castellan/storage/storagetest"
)

// TestRecordJSONKeepsExactBytes puts every hostile string into every
// string field, unsanitised, as a store written before sanitising could
// hold it: the JSON form must be valid UTF-8 JSON and decode to the same
// record, hash included.
func TestRecordJSONKeepsExactBytes(t *testing.T) {
	fields := storagetest.CallerStringFields()
	for name, s := range storagetest.HostileStrings {
		for _, field := range append(fields, "Writer") {
			r := record()
			storagetest.SetField(&r, field, s)
			r.Seal(r.Writer, r.Seq, r.PrevHash)
			b, err := json.Marshal(&r)
			if err != nil {
				t.Fatalf("%s in %s: %v", name, field, err)
			}
			if !utf8.Valid(b) {
				t.Fatalf("%s in %s: JSON is not valid UTF-8", name, field)
			}
			var back storage.Record
			if err := json.Unmarshal(b, &back); err != nil {
				t.Fatalf("%s in %s: %v", name, field, err)
			}
			if !reflect.DeepEqual(back, r) || back.ComputeHash() != r.Hash {
				t.Fatalf("%s in %s: decoded record differs from the original", name, field)
			}
			wantRaw := !utf8.ValidString(s)
			if got := strings.Contains(string(b), `"invalid_utf8":`); got != wantRaw {
				t.Errorf("%s in %s: invalid_utf8 present = %v, want %v", name, field, got, wantRaw)
			}
		}
	}
}

// TestRecordJSONNames: the JSON names SplitInvalidUTF8 uses are the
// struct's own tags, for every string field.
func TestRecordJSONNames(t *testing.T) {
	var r storage.Record
	typ := reflect.TypeFor[storage.Record]()
	for i := range typ.NumField() {
		f := typ.Field(i)
		if f.Type.Kind() != reflect.String {
			continue
		}
		reflect.ValueOf(&r).Elem().Field(i).SetString("\xff" + f.Name)
		name, _, _ := strings.Cut(f.Tag.Get("json"), ",")
		_, raw := r.SplitInvalidUTF8()
		if string(raw[name]) != "\xff"+f.Name {
			t.Errorf("field %s: invalid_utf8[%q] = %q", f.Name, name, raw[name])
		}
		reflect.ValueOf(&r).Elem().Field(i).SetString("")
	}
	if err := r.JoinInvalidUTF8(map[string][]byte{"seq": []byte("1")}); err == nil {
		t.Error("JoinInvalidUTF8 accepted a field that is not a string")
	}
}
