package storage

import (
	"errors"
	"iter"
	"strings"
	"testing"
	"time"
)

// chain builds n sealed records for writer w.
func chain(w string, n int) []*Record {
	out := make([]*Record, 0, n)
	prev := ""
	for i := 1; i <= n; i++ {
		r := &Record{Time: time.Unix(int64(i), 0), Kind: KindCSR, Outcome: OutcomeIssued, GrantedIdentity: "id"}
		r.Seal(w, uint64(i), prev)
		prev = r.Hash
		out = append(out, r)
	}
	return out
}

func recordsOf(rs []*Record) iter.Seq2[*Record, error] {
	return func(yield func(*Record, error) bool) {
		for _, r := range rs {
			if !yield(r, nil) {
				return
			}
		}
	}
}

func TestVerifyRecords(t *testing.T) {
	tests := []struct {
		name       string
		build      func() []*Record
		wantOK     bool
		wantWriter string
		wantSeq    uint64
		wantWords  string
		wantCount  int
	}{
		{name: "empty", build: func() []*Record { return nil }, wantOK: true},
		{name: "clean two writers", build: func() []*Record { return append(chain("a", 3), chain("b", 4)...) }, wantOK: true, wantCount: 7},
		{name: "edited field", build: func() []*Record {
			c := chain("a", 5)
			c[2].GrantedIdentity = "evil"
			return c
		}, wantWriter: "a", wantSeq: 3, wantWords: "hash mismatch", wantCount: 3},
		{name: "deleted middle row", build: func() []*Record {
			c := chain("a", 5)
			return append(c[:2:2], c[3:]...)
		}, wantWriter: "a", wantSeq: 3, wantWords: "missing", wantCount: 3},
		{name: "deleted first row", build: func() []*Record { return chain("a", 5)[1:] }, wantWriter: "a", wantSeq: 1, wantWords: "missing", wantCount: 1},
		{name: "swapped seqs", build: func() []*Record {
			c := chain("a", 5)
			c[2].Seq, c[3].Seq = c[3].Seq, c[2].Seq
			c[2], c[3] = c[3], c[2]
			return c
		}, wantWriter: "a", wantSeq: 3, wantWords: "hash mismatch", wantCount: 3},
		{name: "reordered rows", build: func() []*Record {
			c := chain("a", 5)
			c[2], c[3] = c[3], c[2]
			return c
		}, wantWriter: "a", wantSeq: 3, wantWords: "missing", wantCount: 3},
		{name: "duplicated row", build: func() []*Record {
			c := chain("a", 3)
			return append(c, c[2])
		}, wantWriter: "a", wantSeq: 4, wantWords: "duplicated", wantCount: 4},
		{name: "row replaced by a re-hashed forgery", build: func() []*Record {
			c := chain("a", 4)
			forged := *c[1]
			forged.GrantedIdentity = "evil"
			forged.Seal("a", 2, c[0].Hash)
			c[1] = &forged
			return c
		}, wantWriter: "a", wantSeq: 3, wantWords: "prev_hash", wantCount: 3},
		{name: "second writer broken", build: func() []*Record {
			b := chain("b", 3)
			b[1].Outcome = OutcomeRefused
			return append(chain("a", 2), b...)
		}, wantWriter: "b", wantSeq: 2, wantWords: "hash mismatch", wantCount: 4},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			res, err := VerifyRecords(recordsOf(tc.build()))
			if err != nil {
				t.Fatalf("VerifyRecords: %v", err)
			}
			if res.OK != tc.wantOK || res.Writer != tc.wantWriter || res.Seq != tc.wantSeq || res.Records != tc.wantCount {
				t.Fatalf("got %+v, want OK=%v writer=%q seq=%d records=%d", res, tc.wantOK, tc.wantWriter, tc.wantSeq, tc.wantCount)
			}
			if !strings.Contains(res.Problem, tc.wantWords) {
				t.Fatalf("problem %q does not mention %q", res.Problem, tc.wantWords)
			}
		})
	}
}

func TestChainVerifierErrors(t *testing.T) {
	var v ChainVerifier
	c := chain("a", 2)
	c[1].Detail = "edited"
	if err := v.Add(c[0]); err != nil {
		t.Fatal(err)
	}
	err := v.Add(c[1])
	var ce *ChainError
	if !errors.Is(err, ErrChainBroken) || !errors.As(err, &ce) || ce.Seq != 2 {
		t.Fatalf("Add = %v, want ChainError at seq 2", err)
	}
	if again := v.Add(chain("a", 3)[2]); !errors.Is(again, err) {
		t.Fatalf("Add after break = %v, want the first error", again)
	}

	var u ChainVerifier
	for _, r := range append(append(chain("a", 1), chain("b", 1)...), chain("a", 1)...) {
		err = u.Add(r)
	}
	if err == nil || errors.Is(err, ErrChainBroken) {
		t.Fatalf("ungrouped input: got %v, want a non-chain error", err)
	}
}

func TestVerifyRecordsReadError(t *testing.T) {
	boom := errors.New("boom")
	seq := func(yield func(*Record, error) bool) { yield(nil, boom) }
	if _, err := VerifyRecords(seq); !errors.Is(err, boom) {
		t.Fatalf("got %v, want wrapped boom", err)
	}
}

func TestTailVerifier(t *testing.T) {
	tests := []struct {
		name      string
		build     func() []*Record
		wantOK    bool
		wantSeq   uint64
		wantWords string
	}{
		{name: "tails of two writers", build: func() []*Record { return append(chain("a", 9)[5:], chain("b", 4)[1:]...) }, wantOK: true},
		{name: "whole chain", build: func() []*Record { return chain("a", 4) }, wantOK: true},
		{name: "edited row in the tail", build: func() []*Record {
			c := chain("a", 9)[5:]
			c[1].Detail = "evil"
			return c
		}, wantSeq: 7, wantWords: "hash mismatch"},
		{name: "deleted row in the tail", build: func() []*Record {
			c := chain("a", 9)[5:]
			return append(c[:1:1], c[2:]...)
		}, wantSeq: 7, wantWords: "missing"},
		{name: "replaced row keeps its hash but not the link", build: func() []*Record {
			c := chain("a", 9)[5:]
			c[2].Seal("a", c[2].Seq, "forged")
			return c
		}, wantSeq: 8, wantWords: "prev_hash"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			v := NewTailVerifier()
			for _, r := range tc.build() {
				if err := v.Add(r); err != nil {
					if !errors.Is(err, ErrChainBroken) {
						t.Fatalf("Add: %v", err)
					}
					break
				}
			}
			res := v.Result()
			if res.OK != tc.wantOK || res.Seq != tc.wantSeq || !strings.Contains(res.Problem, tc.wantWords) {
				t.Errorf("result %+v, want ok %v seq %d problem with %q", res, tc.wantOK, tc.wantSeq, tc.wantWords)
			}
		})
	}
	// The same tail through a verifier from the start is a deletion of seq 1.
	v := NewChainVerifier()
	if err := v.Add(chain("a", 9)[5]); !errors.Is(err, ErrChainBroken) {
		t.Errorf("full verifier on a tail: %v, want ErrChainBroken", err)
	}
}
