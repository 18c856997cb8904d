package storage

import (
	"errors"
	"reflect"
	"strings"
	"testing"
	"time"
)

func sampleRecord() Record {
	t0 := time.Date(2025, 1, 2, 3, 4, 5, 6, time.UTC)
	return Record{
		Seq: 7, Writer: "w1", Time: t0, Kind: KindCSR, RequestID: "req", Peer: "10.0.0.1:1234",
		AuthMethod: "mtls", Caller: "spiffe://td/ns/a/sa/b", ClusterID: "c1",
		RequestedIdentity: "spiffe://td/ns/a/sa/b", GrantedIdentity: "spiffe://td/ns/a/sa/b",
		Outcome: OutcomeIssued, Reason: "ok", Code: "OK", Serial: "0a0b", NotBefore: t0, NotAfter: t0.Add(time.Hour),
		CertSHA256: "ab", Signer: "selfsigned", IssuerKeyID: "cd", Detail: "d", PrevHash: "ef",
	}
}

// TestComputeHashCoversEveryField mutates each field in turn (found by
// reflection, so a field added later without hashing fails here) and checks
// that the hash changes and that no two mutations collide.
func TestComputeHashCoversEveryField(t *testing.T) {
	base := sampleRecord()
	seen := map[string]string{base.ComputeHash(): "base"}
	typ := reflect.TypeOf(base)
	for i := range typ.NumField() {
		f := typ.Field(i)
		if f.Name == "Hash" {
			continue
		}
		r := base
		fv := reflect.ValueOf(&r).Elem().Field(i)
		switch v := fv.Interface().(type) {
		case string:
			fv.SetString(v + "x")
		case uint64:
			fv.SetUint(v + 1)
		case time.Time:
			fv.Set(reflect.ValueOf(v.Add(time.Nanosecond)))
		default:
			t.Fatalf("field %s: unhandled type %T", f.Name, v)
		}
		h := r.ComputeHash()
		if prev, dup := seen[h]; dup {
			t.Errorf("mutating %s gives the same hash as %s", f.Name, prev)
		}
		seen[h] = f.Name
	}
}

func TestComputeHashUnambiguous(t *testing.T) {
	t0 := time.Unix(0, 0)
	tests := []struct {
		name string
		a, b Record
	}{
		{"boundary between adjacent strings", Record{Peer: "ab"}, Record{Peer: "a", AuthMethod: "b"}},
		{"empty vs moved string", Record{Reason: "x"}, Record{Code: "x"}},
		{"zero time vs unix epoch", Record{NotBefore: time.Time{}}, Record{NotBefore: t0}},
		{"time moved between fields", Record{NotBefore: t0}, Record{NotAfter: t0}},
		{"nanoseconds count", Record{Time: t0}, Record{Time: t0.Add(1)}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if tc.a.ComputeHash() == tc.b.ComputeHash() {
				t.Fatal("different records hash the same")
			}
		})
	}
}

func TestComputeHashIgnoresLocationAndMonotonic(t *testing.T) {
	now := time.Now() // carries a monotonic reading
	a := Record{Time: now}
	b := Record{Time: now.Round(0).In(time.FixedZone("X", 3600))}
	if a.ComputeHash() != b.ComputeHash() {
		t.Fatal("hash depends on location or monotonic clock")
	}
	if h := a.ComputeHash(); len(h) != 64 || strings.ToLower(h) != h {
		t.Fatalf("hash %q is not lowercase hex SHA-256", h)
	}
}

func TestValidate(t *testing.T) {
	ok := sampleRecord()
	tests := []struct {
		name    string
		mutate  func(*Record)
		wantErr bool
	}{
		{"valid", func(*Record) {}, false},
		{"zero time is filled by the store", func(r *Record) { r.Time = time.Time{} }, false},
		{"empty kind", func(r *Record) { r.Kind = "" }, true},
		{"empty outcome", func(r *Record) { r.Outcome = "" }, true},
		{"time beyond unix nanos", func(r *Record) { r.Time = time.Date(2300, 1, 1, 0, 0, 0, 0, time.UTC) }, true},
		{"not_after year 9999 is fine", func(r *Record) { r.NotAfter = time.Date(9999, 12, 31, 23, 59, 59, 0, time.UTC) }, false},
		{"not_after year 10000", func(r *Record) { r.NotAfter = time.Date(10000, 1, 1, 0, 0, 0, 0, time.UTC) }, true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			r := ok
			tc.mutate(&r)
			err := r.Validate()
			if tc.wantErr != (err != nil) {
				t.Fatalf("Validate() = %v, wantErr %v", err, tc.wantErr)
			}
			if err != nil && !errors.Is(err, ErrInvalidRecord) {
				t.Fatalf("error %v does not wrap ErrInvalidRecord", err)
			}
		})
	}
}

func TestEffectiveLimit(t *testing.T) {
	for _, tc := range []struct{ in, want int }{{0, 100}, {-5, 100}, {1, 1}, {10000, 10000}, {10001, 10000}} {
		if got := (Query{Limit: tc.in}).EffectiveLimit(); got != tc.want {
			t.Errorf("Limit %d: got %d, want %d", tc.in, got, tc.want)
		}
	}
}
