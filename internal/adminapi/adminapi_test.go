package adminapi_test

import (
	"crypto/ed25519"
	"reflect"
	"testing"
	"time"

	"github.com/castellan-ca/castellan/internal/adminapi"
	adminpb "github.com/castellan-ca/castellan/proto/castellan/admin/v1"
	"github.com/castellan-ca/castellan/storage"
	"github.com/castellan-ca/castellan/storage/storagetest"
	"google.golang.org/protobuf/proto"
)

// TestRecordRoundTrip sends records holding every hostile string in every
// string field, unsanitised as an older store may hold them, through the
// protobuf wire form: each comes back exactly, and still hashes to its hash.
func TestRecordRoundTrip(t *testing.T) {
	at := time.Date(2025, 1, 2, 3, 4, 5, 6, time.UTC)
	for name, s := range storagetest.HostileStrings {
		for _, field := range append(storagetest.CallerStringFields(), "Writer") {
			r := storage.Record{Time: at, Kind: storage.KindCSR, Outcome: storage.OutcomeIssued, NotAfter: at.Add(time.Hour)}
			storagetest.SetField(&r, field, s)
			r.Seal(r.Writer, 3, "prev")
			b, err := proto.Marshal(adminapi.RecordToProto(&r))
			if err != nil {
				t.Fatalf("%s in %s: %v", name, field, err)
			}
			var p adminpb.AuditRecord
			if err := proto.Unmarshal(b, &p); err != nil {
				t.Fatalf("%s in %s: %v", name, field, err)
			}
			back, err := adminapi.RecordFromProto(&p)
			if err != nil || !reflect.DeepEqual(back, r) || back.ComputeHash() != r.Hash {
				t.Fatalf("%s in %s: came back different (%v)", name, field, err)
			}
		}
	}
	if _, err := adminapi.RecordFromProto(&adminpb.AuditRecord{InvalidUtf8: map[string][]byte{"nope": []byte("\xff")}}); err == nil {
		t.Error("RecordFromProto accepted invalid_utf8 for a field records do not have")
	}
}

// TestCheckpointAndHeadRoundTrip: signatures still verify after the wire.
func TestCheckpointAndHeadRoundTrip(t *testing.T) {
	key := ed25519.NewKeyFromSeed(make([]byte, ed25519.SeedSize))
	pub := key.Public().(ed25519.PublicKey)
	at := time.Date(2025, 1, 2, 3, 4, 5, 6, time.UTC)
	cp := storage.Checkpoint{ID: 2, Time: at, Before: at.Add(-time.Hour),
		Writers: []storage.CheckpointEntry{{Writer: "a", Seq: 3, Hash: "h3", Removed: 3}, {Writer: "b", Seq: 1, Hash: "h1", Removed: 1}}}
	cp.Sign(key)
	gotCP := adminapi.CheckpointFromProto(adminapi.CheckpointToProto(&cp))
	if err := gotCP.VerifySignature(pub); err != nil || !reflect.DeepEqual(gotCP, cp) {
		t.Fatalf("checkpoint after the wire: %+v, %v", gotCP, err)
	}
	h := storage.Head{Time: at, Checkpoints: 2, Writers: []storage.HeadEntry{{Writer: "a", Seq: 9, Hash: "h9"}}}
	h.Sign(key)
	gotHead := adminapi.HeadFromProto(adminapi.HeadToProto(&h))
	if err := gotHead.VerifySignature(pub); err != nil || !reflect.DeepEqual(gotHead, h) {
		t.Fatalf("head after the wire: %+v, %v", gotHead, err)
	}
}
