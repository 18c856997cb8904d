package storage

import (
	"crypto/ed25519"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"sort"
	"time"
)

// Errors of the checkpoint machinery; match them with errors.Is.
var (
	// ErrNoCheckpointKey is returned by Prune when the store has no key to sign with.
	ErrNoCheckpointKey = errors.New("storage: no checkpoint key configured")
	// ErrBadCutoff is returned by Prune for a missing cutoff or one outside
	// the years 1678..2262 that record times can take.
	ErrBadCutoff = errors.New("storage: prune cutoff missing or out of range")
)

// Checkpoint is what a prune leaves behind: for every writer whose oldest
// records it removed, the seq and hash of the last removed record, signed so
// that `audit verify` can prove the remaining chain starts right after it.
//
// Without the signature anybody able to delete rows could also write a
// checkpoint claiming the deletion was a prune; with it, only a holder of the
// server's checkpoint key can.
type Checkpoint struct {
	ID        uint64            `json:"id"`      // 1, 2, ... in the order prunes ran; assigned by Prune
	Time      time.Time         `json:"time"`    // when the prune ran
	Before    time.Time         `json:"before"`  // records older than this were eligible
	Writers   []CheckpointEntry `json:"writers"` // sorted by Writer
	KeyID     string            `json:"key_id"`  // CheckpointKeyID of the signing key
	Signature string            `json:"signature"`
}

// CheckpointEntry is one writer's part of a Checkpoint.
type CheckpointEntry struct {
	Writer  string `json:"writer"`
	Seq     uint64 `json:"seq"`     // last removed seq: the chain resumes at Seq+1
	Hash    string `json:"hash"`    // hash of that record: the PrevHash of Seq+1
	Removed uint64 `json:"removed"` // records this prune removed from the writer
}

// checkpointDomain separates and versions the signed encoding.
const checkpointDomain = "castellan.audit.checkpoint.v1\x00"

// CheckpointKeyID names a checkpoint public key: hex SHA-256 of its bytes.
func CheckpointKeyID(pub ed25519.PublicKey) string {
	sum := sha256.Sum256(pub)
	return hex.EncodeToString(sum[:])
}

// digest is SHA-256 over the canonical encoding of every field but Signature,
// built like Record.ComputeHash (length-prefixed, fixed order).
func (c *Checkpoint) digest() []byte {
	b := []byte(checkpointDomain)
	b = appendUint64(b, c.ID)
	b = appendTime(b, c.Time)
	b = appendTime(b, c.Before)
	b = appendUint64(b, uint64(len(c.Writers)))
	for _, w := range c.Writers {
		b = appendString(b, w.Writer)
		b = appendUint64(b, w.Seq)
		b = appendString(b, w.Hash)
		b = appendUint64(b, w.Removed)
	}
	b = appendString(b, c.KeyID)
	sum := sha256.Sum256(b)
	return sum[:]
}

// Sign sorts the entries, sets KeyID and Signature.
func (c *Checkpoint) Sign(key ed25519.PrivateKey) {
	sort.Slice(c.Writers, func(i, j int) bool { return c.Writers[i].Writer < c.Writers[j].Writer })
	c.KeyID = CheckpointKeyID(key.Public().(ed25519.PublicKey))
	c.Signature = hex.EncodeToString(ed25519.Sign(key, c.digest()))
}

// VerifySignature checks that pub signed c as it is now.
func (c *Checkpoint) VerifySignature(pub ed25519.PublicKey) error {
	if pub == nil {
		return fmt.Errorf("checkpoint %d: %w to check its signature", c.ID, ErrNoCheckpointKey)
	}
	if id := CheckpointKeyID(pub); c.KeyID != id {
		return fmt.Errorf("checkpoint %d is signed by key %.16s…, not by this server's checkpoint key %.16s…", c.ID, c.KeyID, id)
	}
	sig, err := hex.DecodeString(c.Signature)
	if err != nil || !ed25519.Verify(pub, c.digest(), sig) {
		return fmt.Errorf("checkpoint %d: signature invalid: checkpoint edited or forged", c.ID)
	}
	return nil
}

// AddCheckpoint feeds a stored checkpoint, before any record: it checks the
// signature with pub and records where each writer's chain resumes, so that
// Add accepts a chain whose first rows were pruned. Feed checkpoints in
// ascending ID order; later ones supersede earlier ones. A bad checkpoint
// breaks verification like a bad row (the error wraps ErrChainBroken).
func (v *ChainVerifier) AddCheckpoint(cp *Checkpoint, pub ed25519.PublicKey) error {
	if v.err != nil {
		return v.err
	}
	if v.started {
		return fmt.Errorf("%w: checkpoint %d added after records", errUngrouped, cp.ID)
	}
	if err := cp.VerifySignature(pub); err != nil {
		v.err = &ChainError{Problem: err.Error()}
		return v.err
	}
	if v.anchors == nil {
		v.anchors = make(map[string]CheckpointEntry)
	}
	for _, e := range cp.Writers {
		if prev, ok := v.anchors[e.Writer]; ok && e.Seq < prev.Seq {
			v.err = &ChainError{Writer: e.Writer, Seq: e.Seq, Problem: fmt.Sprintf(
				"checkpoint %d: writer %q resumes at seq %d, before seq %d of an earlier checkpoint", cp.ID, e.Writer, e.Seq+1, prev.Seq+1)}
			return v.err
		}
		v.anchors[e.Writer] = e
	}
	v.res.Checkpoints++
	return nil
}

// Finish reports, after the last record, a writer that a checkpoint names
// but that has no record left: prune always keeps each writer's newest
// record, so the rest of that chain was deleted.
func (v *ChainVerifier) Finish() error {
	if v.err != nil {
		return v.err
	}
	var missing []string
	for w := range v.anchors {
		if _, ok := v.seen[w]; !ok {
			missing = append(missing, w)
		}
	}
	if len(missing) == 0 {
		return nil
	}
	sort.Strings(missing)
	a := v.anchors[missing[0]]
	v.err = &ChainError{Writer: a.Writer, Seq: a.Seq + 1, Problem: fmt.Sprintf(
		"writer %q: no record after checkpoint seq %d, but prune keeps each writer's newest record: rows deleted", a.Writer, a.Seq)}
	return v.err
}
