package storage

import (
	"crypto/ed25519"
	"testing"
	"time"
)

// TestEncodingGolden pins the canonical encodings: a stored chain or
// checkpoint must verify with every later build, so the hash of a fixed
// record and the signature of a fixed checkpoint never change.
func TestEncodingGolden(t *testing.T) {
	r := sampleRecord()
	r.Detail = "détail ␀ 日本"
	if got, want := r.ComputeHash(), "48ac48f4f232ae7b65dcc85715196c8530158d8bd002856fc777f770223168e8"; got != want {
		t.Errorf("record hash %s, want %s", got, want)
	}
	var empty Record
	if got, want := empty.ComputeHash(), "705a3f6dc9f71a438d0463fb25e6989fc2c8f88548444a647a652a6a95ba45fb"; got != want {
		t.Errorf("empty record hash %s, want %s", got, want)
	}
	cp := Checkpoint{ID: 3, Time: time.Date(2025, 1, 2, 3, 4, 5, 6, time.UTC), Before: time.Date(2024, 1, 1, 0, 0, 0, 0, time.UTC),
		Writers: []CheckpointEntry{{Writer: "b", Seq: 9, Hash: "ab", Removed: 9}, {Writer: "a", Seq: 1, Hash: "cd", Removed: 1}}}
	cp.Sign(ed25519.NewKeyFromSeed(make([]byte, ed25519.SeedSize)))
	if got, want := cp.Signature, "72215c9137d9ce3d1590174edcc90949ac711ea4dbebe842b6d02d92d2968ed25469beefecb05634f37109c34926fc61a7ef6edc4de0d8f32e412989f5ac7f0b"; got != want {
		t.Errorf("checkpoint signature %s, want %s", got, want)
	}
}
