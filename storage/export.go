package storage

import (
	"bytes"
	"crypto/ed25519"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"sort"
	"time"
)

// An export is the whole audit log as one file an auditor can verify
// without the database (VerifyExport), given the checkpoint public key. It
// is JSON lines, each the canonical encoding (encoding/json, one object, no
// spaces) of one item, in this order:
//
//	{"checkpoint":{...}}   every prune checkpoint, by ascending ID
//	{"seq":1,...}          every record, grouped by writer, ascending seq
//	{"head":{...}}         the Head, signed with the checkpoint key, last
//
// Record lines are exactly what `castellanctl audit list --output json`
// prints, so tools that ingest records read them unchanged and skip the
// two other kinds by their single key.

// Head ends an export: the newest record of every chain and the newest
// prune checkpoint at the moment of the export, signed with the checkpoint
// key. Through the hash links it binds every record of the export: no
// record can be edited, removed, reordered or added, at either end of a
// chain, without the key. It vouches for what the server read, not for how
// the database got there: comparing it with an earlier export's head
// (VerifyOptions.Previous) shows a log that shrank in between.
type Head struct {
	Time        time.Time   `json:"time"`
	Checkpoints uint64      `json:"checkpoints"` // ID of the newest prune checkpoint; 0: none
	Writers     []HeadEntry `json:"writers"`     // sorted by Writer
	KeyID       string      `json:"key_id"`      // CheckpointKeyID of the signing key
	Signature   string      `json:"signature"`
}

// HeadEntry is one chain's newest record in a Head.
type HeadEntry struct {
	Writer string `json:"writer"`
	Seq    uint64 `json:"seq"`
	Hash   string `json:"hash"`
}

// headDomain separates and versions the signed encoding: a head can never
// pass for a checkpoint (which would vouch for removed records) or the
// reverse.
const headDomain = "castellan.audit.head.v1\x00"

// digest is SHA-256 over the canonical encoding of every field but
// Signature, built like Checkpoint's.
func (h *Head) digest() []byte {
	b := []byte(headDomain)
	b = appendTime(b, h.Time)
	b = appendUint64(b, h.Checkpoints)
	b = appendUint64(b, uint64(len(h.Writers)))
	for _, w := range h.Writers {
		b = appendString(b, w.Writer)
		b = appendUint64(b, w.Seq)
		b = appendString(b, w.Hash)
	}
	b = appendString(b, h.KeyID)
	sum := sha256.Sum256(b)
	return sum[:]
}

// Sign sorts the entries, sets KeyID and Signature.
func (h *Head) Sign(key ed25519.PrivateKey) {
	sort.Slice(h.Writers, func(i, j int) bool { return h.Writers[i].Writer < h.Writers[j].Writer })
	h.KeyID = CheckpointKeyID(key.Public().(ed25519.PublicKey))
	h.Signature = hex.EncodeToString(ed25519.Sign(key, h.digest()))
}

// VerifySignature checks that pub signed h as it is now.
func (h *Head) VerifySignature(pub ed25519.PublicKey) error {
	return checkSignature(pub, h.KeyID, h.Signature, h.digest, "export head")
}

// ExportSink receives an export item by item, in the order of the format.
type ExportSink interface {
	// Checkpoint receives each checkpoint, before any record.
	Checkpoint(cp *Checkpoint) error
	// Record receives each record; r may be reused once it returns.
	Record(r *Record) error
	// Head receives the signed head, last.
	Head(h *Head) error
}

// ExportSnapshot sends snap to sink as an export: its checkpoints, its
// records, and a head signed with key at now naming each chain's last
// record. Stores call it inside the transaction that reads snap, so the
// export is one consistent moment of the log.
func ExportSnapshot(snap Snapshot, key ed25519.PrivateKey, now time.Time, sink ExportSink) error {
	if key == nil {
		return ErrNoCheckpointKey
	}
	h := &Head{Time: now.UTC()}
	for i := range snap.Checkpoints {
		if err := sink.Checkpoint(&snap.Checkpoints[i]); err != nil {
			return err
		}
		h.Checkpoints = snap.Checkpoints[i].ID
	}
	for r, err := range snap.Records {
		if err != nil {
			return fmt.Errorf("storage: export: reading records: %w", err)
		}
		if n := len(h.Writers); n == 0 || h.Writers[n-1].Writer != r.Writer {
			h.Writers = append(h.Writers, HeadEntry{Writer: r.Writer})
		}
		last := &h.Writers[len(h.Writers)-1]
		last.Seq, last.Hash = r.Seq, r.Hash
		if err := sink.Record(r); err != nil {
			return err
		}
	}
	h.Sign(key)
	return sink.Head(h)
}

// Lines of an export other than records: one key each.
type (
	checkpointLine struct {
		Checkpoint *Checkpoint `json:"checkpoint"`
	}
	headLine struct {
		Head *Head `json:"head"`
	}
)

// errExportOrder is returned by an ExportWriter fed out of order.
var errExportOrder = errors.New("storage: export items out of order: checkpoints, then records, then the head")

// ExportWriter writes an export as JSON lines. It implements ExportSink
// and refuses items out of order.
type ExportWriter struct {
	w     io.Writer
	buf   bytes.Buffer
	phase int // 0 checkpoints, 1 records, 2 done
	// Checkpoints, Records and Writers count what was written.
	Checkpoints, Records, Writers int
	lastWriter                    string
}

// NewExportWriter returns a writer of an export to w.
func NewExportWriter(w io.Writer) *ExportWriter { return &ExportWriter{w: w} }

// Checkpoint writes a checkpoint line.
func (e *ExportWriter) Checkpoint(cp *Checkpoint) error {
	if e.phase > 0 {
		return errExportOrder
	}
	e.Checkpoints++
	return e.line(checkpointLine{cp})
}

// Record writes a record line.
func (e *ExportWriter) Record(r *Record) error {
	if e.phase > 1 {
		return errExportOrder
	}
	e.phase = 1
	if e.Records == 0 || r.Writer != e.lastWriter {
		e.Writers++
		e.lastWriter = r.Writer
	}
	e.Records++
	return e.line(r)
}

// Head writes the head line; nothing may follow it.
func (e *ExportWriter) Head(h *Head) error {
	if e.phase > 1 {
		return errExportOrder
	}
	e.phase = 2
	return e.line(headLine{h})
}

func (e *ExportWriter) line(v any) error {
	e.buf.Reset()
	if err := encodeLine(&e.buf, v); err != nil {
		return fmt.Errorf("storage: export: %w", err)
	}
	if _, err := e.w.Write(e.buf.Bytes()); err != nil {
		return fmt.Errorf("storage: export: %w", err)
	}
	return nil
}

// encodeLine appends v's canonical line to buf: what ExportWriter writes
// and VerifyExport requires.
func encodeLine(buf *bytes.Buffer, v any) error {
	return json.NewEncoder(buf).Encode(v)
}
