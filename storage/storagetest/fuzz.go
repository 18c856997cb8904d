package storagetest

import (
	"context"
	"errors"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/castellan-ca/castellan/storage"
)

// fuzzRecord builds a record from a fuzzer's arguments: the 16 caller-set
// strings in CallerStringFields order, then Time as Unix nanoseconds and
// NotBefore, NotAfter as Unix seconds (0: zero time).
func fuzzRecord(strs []string, timeNs, notBefore, notAfter int64) storage.Record {
	var r storage.Record
	for i, field := range CallerStringFields() {
		SetField(&r, field, strs[i])
	}
	if timeNs != 0 {
		r.Time = time.Unix(0, timeNs).In(time.FixedZone("fuzz", 3600))
	}
	if notBefore != 0 {
		r.NotBefore = time.Unix(notBefore, 0)
	}
	if notAfter != 0 {
		r.NotAfter = time.Unix(notAfter, 0)
	}
	return r
}

// fuzzSeeds returns the seed corpus: a plain issuance, an operator action,
// and each hostile string in each caller-set field of the plain one.
func fuzzSeeds() [][]string {
	plain := []string{storage.KindCSR, "0123456789abcdef01234567", "10.1.2.3:4567", "kubernetes",
		"spiffe://td/ns/a/sa/b", "Kubernetes", "", "spiffe://td/ns/a/sa/b", storage.OutcomeIssued, "", "OK",
		"0a1b2c", strings.Repeat("ab", 32), "selfsigned", strings.Repeat("cd", 20), ""}
	operator := []string{storage.KindOperator, "req", "", "operator", "admin", "", "", "", storage.OutcomeOK, "",
		"", "", "", "", "", "rotated intermediate"}
	seeds := [][]string{plain, operator}
	names := make([]string, 0, len(HostileStrings))
	for name := range HostileStrings {
		names = append(names, name)
	}
	sort.Strings(names)
	for i := range plain {
		for _, name := range names {
			if s := HostileStrings[name]; len(s) < 64<<10 { // the fuzzer mutates seeds; keep them small
				seed := append([]string(nil), plain...)
				seed[i] = s
				seeds = append(seeds, seed)
			}
		}
	}
	return seeds
}

// FuzzRoundTrip is the audit round trip every store must pass: any record
// appended to s, then read back with Get and List, must come back as its
// sanitised form (Sanitized), be found by a search for its raw granted
// identity, and continue a chain that verifies, incrementally and through
// s.Verify. A record that fails Validate must be refused with
// ErrInvalidRecord. s must be empty and used by nothing else.
func FuzzRoundTrip(f *testing.F, s Store) {
	if n := len(CallerStringFields()); n != 16 {
		f.Fatalf("storage.Record has %d caller-set string fields; FuzzRoundTrip takes 16", n)
	}
	t1 := time.Date(2025, 6, 1, 12, 0, 0, 123456789, time.UTC)
	for i, seed := range fuzzSeeds() {
		nb, na := t1.Add(-time.Minute).Unix(), t1.Add(24*time.Hour).Unix()
		if i == 1 {
			nb, na = 0, 0
		}
		f.Add(seed[0], seed[1], seed[2], seed[3], seed[4], seed[5], seed[6], seed[7], seed[8], seed[9], seed[10],
			seed[11], seed[12], seed[13], seed[14], seed[15], t1.UnixNano()+int64(i), nb, na)
	}
	f.Add("k", "", "", "", "", "", "", "", "o", "", "", "", "", "", "", "", int64(0), int64(-62135596801), int64(0))

	ctx := context.Background()
	var chain storage.ChainVerifier
	f.Fuzz(func(t *testing.T, kind, requestID, peer, authMethod, caller, clusterID, requested, granted, outcome,
		reason, code, serial, certSHA256, signer, issuerKeyID, detail string, timeNs, notBefore, notAfter int64) {
		in := fuzzRecord([]string{kind, requestID, peer, authMethod, caller, clusterID, requested, granted, outcome,
			reason, code, serial, certSHA256, signer, issuerKeyID, detail}, timeNs, notBefore, notAfter)
		got := in
		err := s.Append(ctx, &got)
		if in.Validate() != nil {
			if !errors.Is(err, storage.ErrInvalidRecord) {
				t.Fatalf("Append of an invalid record = %v, want ErrInvalidRecord", err)
			}
			return
		}
		if err != nil {
			t.Fatalf("Append: %v", err)
		}
		if want := Sanitized(in, &got); !equalRecords(normalize(got), want) {
			t.Fatalf("Append gave back\n%+v\nwant the sanitised input\n%+v", got, want)
		}
		stored, err := s.Get(ctx, got.Writer, got.Seq)
		if err != nil {
			t.Fatalf("Get: %v", err)
		}
		assertSameRecord(t, *stored, got)
		checkStoredStrings(t, stored)
		listed, err := s.List(ctx, storage.Query{Writer: got.Writer, AfterSeq: got.Seq - 1, Limit: 1})
		if err != nil || len(listed) != 1 {
			t.Fatalf("List at seq %d = %d records, %v", got.Seq, len(listed), err)
		}
		assertSameRecord(t, listed[0], got)
		if in.GrantedIdentity != "" {
			found, err := s.List(ctx, storage.Query{Identity: in.GrantedIdentity, Writer: got.Writer, AfterSeq: got.Seq - 1, Limit: 1})
			if err != nil || len(found) != 1 || found[0].Seq != got.Seq {
				t.Fatalf("List by the raw granted identity = %d records, %v; want seq %d", len(found), err, got.Seq)
			}
		}
		if err := chain.Add(stored); err != nil {
			t.Fatalf("chain through seq %d: %v", got.Seq, err)
		}
		if got.Seq <= 64 || got.Seq%256 == 0 {
			if res, err := s.Verify(ctx); err != nil || !res.OK || res.Records != int(got.Seq) {
				t.Fatalf("Verify = %+v, %v; want OK with %d records", res, err, got.Seq)
			}
		}
	})
}

// equalRecords compares records field by field, times by instant.
func equalRecords(a, b storage.Record) bool {
	ta, tb := [3]time.Time{a.Time, a.NotBefore, a.NotAfter}, [3]time.Time{b.Time, b.NotBefore, b.NotAfter}
	for i := range ta {
		if !ta[i].Equal(tb[i]) {
			return false
		}
	}
	a.Time, a.NotBefore, a.NotAfter, b.Time, b.NotBefore, b.NotAfter = time.Time{}, time.Time{}, time.Time{}, time.Time{}, time.Time{}, time.Time{}
	return a == b
}
