package storage

import (
	"crypto/ed25519"
	"errors"
	"strings"
	"testing"
	"time"
)

var (
	cpKey    = ed25519.NewKeyFromSeed(make([]byte, ed25519.SeedSize))
	otherKey = ed25519.NewKeyFromSeed([]byte(strings.Repeat("k", ed25519.SeedSize)))
)

func signedCheckpoint(id uint64, entries ...CheckpointEntry) *Checkpoint {
	cp := &Checkpoint{ID: id, Time: time.Unix(100, 5), Before: time.Unix(50, 7), Writers: entries}
	cp.Sign(cpKey)
	return cp
}

// TestCheckpointSignatureCoversEveryField edits each signed field in turn:
// the signature must no longer verify.
func TestCheckpointSignatureCoversEveryField(t *testing.T) {
	pub := cpKey.Public().(ed25519.PublicKey)
	edits := map[string]func(c *Checkpoint){
		"id":              func(c *Checkpoint) { c.ID++ },
		"time":            func(c *Checkpoint) { c.Time = c.Time.Add(time.Nanosecond) },
		"before":          func(c *Checkpoint) { c.Before = c.Before.Add(time.Nanosecond) },
		"writer":          func(c *Checkpoint) { c.Writers[0].Writer = "x" },
		"seq":             func(c *Checkpoint) { c.Writers[0].Seq++ },
		"hash":            func(c *Checkpoint) { c.Writers[0].Hash = "00" },
		"removed":         func(c *Checkpoint) { c.Writers[0].Removed++ },
		"entry dropped":   func(c *Checkpoint) { c.Writers = c.Writers[:1] },
		"signature bytes": func(c *Checkpoint) { c.Signature = strings.Repeat("0", len(c.Signature)) },
	}
	if err := signedCheckpoint(1, CheckpointEntry{"a", 3, "h3", 3}, CheckpointEntry{"b", 1, "h1", 1}).VerifySignature(pub); err != nil {
		t.Fatalf("untouched checkpoint: %v", err)
	}
	for name, edit := range edits {
		cp := signedCheckpoint(1, CheckpointEntry{"a", 3, "h3", 3}, CheckpointEntry{"b", 1, "h1", 1})
		edit(cp)
		if err := cp.VerifySignature(pub); err == nil {
			t.Errorf("%s edited: signature still verifies", name)
		}
	}
}

func TestChainVerifierAnchors(t *testing.T) {
	pub := cpKey.Public().(ed25519.PublicKey)
	c := chain("a", 6)
	tests := []struct {
		name      string
		cps       []*Checkpoint
		key       ed25519.PublicKey
		rows      []*Record
		wantOK    bool
		wantSeq   uint64
		wantWords string
	}{
		{name: "resumes after checkpoint", cps: []*Checkpoint{signedCheckpoint(1, CheckpointEntry{"a", 3, c[2].Hash, 3})},
			key: pub, rows: c[3:], wantOK: true},
		{name: "later checkpoint supersedes", cps: []*Checkpoint{signedCheckpoint(1, CheckpointEntry{"a", 2, c[1].Hash, 2}),
			signedCheckpoint(2, CheckpointEntry{"a", 4, c[3].Hash, 2})}, key: pub, rows: c[4:], wantOK: true},
		{name: "no key configured", cps: []*Checkpoint{signedCheckpoint(1, CheckpointEntry{"a", 3, c[2].Hash, 3})},
			rows: c[3:], wantWords: "no checkpoint key"},
		{name: "signed by another key", cps: []*Checkpoint{signedCheckpoint(1, CheckpointEntry{"a", 3, c[2].Hash, 3})},
			key: otherKey.Public().(ed25519.PublicKey), rows: c[3:], wantWords: "not by the checkpoint key it is checked against"},
		{name: "hash does not link", cps: []*Checkpoint{signedCheckpoint(1, CheckpointEntry{"a", 3, "bogus", 3})},
			key: pub, rows: c[3:], wantSeq: 4, wantWords: "prev_hash"},
		{name: "rows before the resume point", cps: []*Checkpoint{signedCheckpoint(1, CheckpointEntry{"a", 3, c[2].Hash, 3})},
			key: pub, rows: c, wantSeq: 4, wantWords: "duplicated or reordered"},
		{name: "checkpoint moves back", cps: []*Checkpoint{signedCheckpoint(1, CheckpointEntry{"a", 4, c[3].Hash, 4}),
			signedCheckpoint(2, CheckpointEntry{"a", 2, c[1].Hash, 2})}, key: pub, rows: c[4:], wantSeq: 2, wantWords: "before seq"},
		{name: "writer emptied after checkpoint", cps: []*Checkpoint{signedCheckpoint(1, CheckpointEntry{"a", 3, c[2].Hash, 3})},
			key: pub, rows: nil, wantSeq: 4, wantWords: "no record after checkpoint"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var v ChainVerifier
			for _, cp := range tc.cps {
				if err := v.AddCheckpoint(cp, tc.key); err != nil {
					break
				}
			}
			for _, r := range tc.rows {
				if err := v.Add(r); err != nil {
					break
				}
			}
			err := v.Finish()
			res := v.Result()
			if res.OK != tc.wantOK || (err == nil) != tc.wantOK || (!tc.wantOK && !errors.Is(err, ErrChainBroken)) {
				t.Fatalf("result %+v, err %v; want OK=%v", res, err, tc.wantOK)
			}
			if !tc.wantOK && (res.Seq != tc.wantSeq || !strings.Contains(res.Problem, tc.wantWords)) {
				t.Fatalf("result %+v; want seq %d and %q", res, tc.wantSeq, tc.wantWords)
			}
		})
	}
}
