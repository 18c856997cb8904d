package storage

import (
	"bufio"
	"bytes"
	"crypto/ed25519"
	"encoding/json"
	"errors"
	"fmt"
	"io"
)

// MaxExportLine bounds one line of an export that VerifyExport reads: far
// above any record a store writes now, and above the largest an older
// embedded store may hold.
const MaxExportLine = 64 << 20

// ExportResult is what VerifyExport found.
type ExportResult struct {
	VerifyResult
	// Signed reports that the export ends in a head signed with the key
	// and matching every chain: nothing was cut from either end of a chain
	// and no chain was left out or added. Without it, an OK result only
	// says that each chain present is unbroken (see VerifyExport).
	Signed bool
	// Head is the export's head once its signature checked, else nil.
	Head *Head
	// Lines is the number of lines read.
	Lines int
}

// VerifyOptions tune VerifyExport.
type VerifyOptions struct {
	// Previous is the head of an earlier export of the same log, signed by
	// the same key. Each chain it names must still hold its
	// record (writer, seq) with the same hash, or have been pruned past it
	// by a checkpoint: the log only grew in between.
	Previous *Head
}

// VerifyExport reads an export (the JSON lines ExportWriter writes) and
// checks it against the checkpoint public key pub:
//
//   - every line is the canonical encoding of one checkpoint, record or
//     head, in the format's order (no edited spacing, duplicate or unknown
//     keys, so that every reader of the file sees what was verified);
//   - the checkpoints are numbered 1, 2, ... and signed by pub;
//   - every chain is unbroken from seq 1, or from where a checkpoint says
//     it resumes: no record edited, removed, duplicated or reordered, and
//     none cut from the start (ChainVerifier);
//   - the head is signed by pub, names the last checkpoint and exactly the
//     chains of the export, each ending at the record it names: nothing cut
//     from the end, no chain left out or added;
//   - with opts.Previous, no record that head named was lost since.
//
// An export without a head (filtered, CSV, or cut short) can show only the
// third point: the hash chain is unkeyed, so whoever edits the file can
// also recompute every hash after the edit, drop a chain's newest records
// or a whole chain. Result.Signed is false then.
//
// A break is reported in the result with OK false; the error is for read
// failures only.
func VerifyExport(r io.Reader, pub ed25519.PublicKey, opts VerifyOptions) (ExportResult, error) {
	x := exportVerifier{pub: pub, opts: opts, last: map[string]HeadEntry{}}
	if opts.Previous != nil {
		if err := opts.Previous.VerifySignature(pub); err != nil {
			_ = x.fail("", 0, "previous export: %v", err)
			return x.result(), nil
		}
	}
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 0, 64<<10), MaxExportLine)
	for sc.Scan() {
		x.res.Lines++
		// A break is in the result, not the error: stop at the first.
		if _ = x.line(sc.Bytes()); x.broken() {
			return x.result(), nil
		}
	}
	if err := sc.Err(); err != nil {
		if errors.Is(err, bufio.ErrTooLong) {
			_ = x.fail("", 0, "line %d: longer than %d bytes", x.res.Lines+1, MaxExportLine)
			return x.result(), nil
		}
		return x.result(), fmt.Errorf("storage: verify export: %w", err)
	}
	x.finish()
	return x.result(), nil
}

// exportVerifier is VerifyExport's state.
type exportVerifier struct {
	pub   ed25519.PublicKey
	opts  VerifyOptions
	v     ChainVerifier
	res   ExportResult
	err   *ChainError
	phase int // 0 checkpoints, 1 records, 2 head read
	// last is each chain's newest record seen; checkpoints the last ID.
	last        map[string]HeadEntry
	checkpoints uint64
	// anchored is each writer's seq where a checkpoint says its chain resumes.
	anchored map[string]uint64
	// seenPrevious counts the chains whose record Previous names was seen.
	seenPrevious map[string]bool
	buf          bytes.Buffer
}

// broken reports whether a break was found.
func (x *exportVerifier) broken() bool { return x.err != nil }

func (x *exportVerifier) fail(writer string, seq uint64, format string, a ...any) error {
	if x.err == nil {
		x.err = &ChainError{Writer: writer, Seq: seq, Problem: fmt.Sprintf(format, a...)}
	}
	return x.err
}

// canonical decodes a line into v and requires that v encodes back to the
// same bytes.
func (x *exportVerifier) canonical(line []byte, v any, decode func() error) error {
	if err := decode(); err != nil {
		return x.fail("", 0, "line %d: not an export line: %v", x.res.Lines, err)
	}
	x.buf.Reset()
	if err := encodeLine(&x.buf, v); err != nil || !bytes.Equal(bytes.TrimSuffix(x.buf.Bytes(), []byte("\n")), line) {
		return x.fail("", 0, "line %d: not in canonical form (edited by hand?)", x.res.Lines)
	}
	return nil
}

func (x *exportVerifier) line(line []byte) error {
	strict := func(v any) func() error {
		return func() error {
			dec := json.NewDecoder(bytes.NewReader(line))
			dec.DisallowUnknownFields()
			return dec.Decode(v)
		}
	}
	if x.phase == 2 {
		return x.fail("", 0, "line %d: data after the head", x.res.Lines)
	}
	switch {
	case bytes.HasPrefix(line, []byte(`{"checkpoint":`)):
		var cl checkpointLine
		if err := x.canonical(line, &cl, strict(&cl)); err != nil {
			return err
		}
		if x.phase > 0 || cl.Checkpoint == nil {
			return x.fail("", 0, "line %d: a checkpoint after records", x.res.Lines)
		}
		return x.checkpoint(cl.Checkpoint)
	case bytes.HasPrefix(line, []byte(`{"head":`)):
		var hl headLine
		if err := x.canonical(line, &hl, strict(&hl)); err != nil {
			return err
		}
		x.phase = 2
		return x.head(hl.Head)
	}
	var r Record
	if err := x.canonical(line, &r, func() error { return r.decodeJSON(line, true) }); err != nil {
		return err
	}
	x.phase = 1
	return x.record(&r)
}

func (x *exportVerifier) checkpoint(cp *Checkpoint) error {
	if err := x.v.AddCheckpoint(cp, x.pub); err != nil {
		return x.chainError(err)
	}
	x.checkpoints = cp.ID
	if x.anchored == nil {
		x.anchored = map[string]uint64{}
	}
	for _, e := range cp.Writers {
		x.anchored[e.Writer] = e.Seq
		if p := x.previous(e.Writer); p != nil && e.Seq == p.Seq && e.Hash != p.Hash {
			return x.fail(e.Writer, e.Seq, "checkpoint %d: writer %q resumes after seq %d with a hash other than the previous export's: history rewritten",
				cp.ID, e.Writer, e.Seq)
		}
	}
	return nil
}

func (x *exportVerifier) record(r *Record) error {
	if err := x.v.Add(r); err != nil {
		return x.chainError(err)
	}
	x.last[r.Writer] = HeadEntry{Writer: r.Writer, Seq: r.Seq, Hash: r.Hash}
	if p := x.previous(r.Writer); p != nil && r.Seq == p.Seq {
		if r.Hash != p.Hash {
			return x.fail(r.Writer, r.Seq, "writer %q seq %d differs from the record the previous export's head names: history rewritten",
				r.Writer, r.Seq)
		}
		if x.seenPrevious == nil {
			x.seenPrevious = map[string]bool{}
		}
		x.seenPrevious[r.Writer] = true
	}
	return nil
}

// chainError turns the chain verifier's error into the result's.
func (x *exportVerifier) chainError(err error) error {
	var ce *ChainError
	if errors.As(err, &ce) {
		return x.fail(ce.Writer, ce.Seq, "%s", ce.Problem)
	}
	return x.fail("", 0, "line %d: %v", x.res.Lines, err) // records not grouped by writer: reordered
}

func (x *exportVerifier) head(h *Head) error {
	if h == nil {
		return x.fail("", 0, "line %d: empty head", x.res.Lines)
	}
	if err := h.VerifySignature(x.pub); err != nil {
		return x.fail("", 0, "%v", err)
	}
	if h.Checkpoints != x.checkpoints {
		return x.fail("", 0, "the head names checkpoint %d, the export holds checkpoints up to %d: checkpoints removed", h.Checkpoints, x.checkpoints)
	}
	named := map[string]bool{}
	for _, e := range h.Writers {
		if named[e.Writer] {
			return x.fail(e.Writer, 0, "the head names writer %q twice", e.Writer)
		}
		named[e.Writer] = true
		got, ok := x.last[e.Writer]
		switch {
		case !ok:
			return x.fail(e.Writer, e.Seq, "writer %q, which the head names up to seq %d, has no record in the export: chain removed", e.Writer, e.Seq)
		case got.Seq < e.Seq:
			return x.fail(e.Writer, got.Seq+1, "writer %q ends at seq %d, the head names seq %d: records cut from the end", e.Writer, got.Seq, e.Seq)
		case got.Seq > e.Seq:
			return x.fail(e.Writer, e.Seq+1, "writer %q goes on to seq %d past seq %d, which the head names: records added", e.Writer, got.Seq, e.Seq)
		case got.Hash != e.Hash:
			return x.fail(e.Writer, e.Seq, "writer %q seq %d does not have the hash the head names: chain rewritten", e.Writer, e.Seq)
		}
	}
	for w, got := range x.last {
		if !named[w] {
			return x.fail(w, got.Seq, "writer %q is not in the head: chain added", w)
		}
	}
	x.res.Head = h
	return nil
}

// previous returns Previous's entry for writer, or nil.
func (x *exportVerifier) previous(writer string) *HeadEntry {
	if x.opts.Previous == nil {
		return nil
	}
	for i := range x.opts.Previous.Writers {
		if e := &x.opts.Previous.Writers[i]; e.Writer == writer {
			return e
		}
	}
	return nil
}

// finish runs the checks that need the whole export.
func (x *exportVerifier) finish() {
	if err := x.v.Finish(); err != nil {
		_ = x.chainError(err)
		return
	}
	if p := x.opts.Previous; p != nil {
		if p.Checkpoints > x.checkpoints {
			_ = x.fail("", 0, "the previous export's head names checkpoint %d, this export holds checkpoints up to %d: checkpoints removed",
				p.Checkpoints, x.checkpoints)
			return
		}
		for _, e := range p.Writers {
			if x.seenPrevious[e.Writer] || x.anchored[e.Writer] >= e.Seq {
				continue // the record is here, or was pruned under a signed checkpoint
			}
			last, ok := x.last[e.Writer]
			if !ok {
				_ = x.fail(e.Writer, e.Seq, "writer %q, which the previous export's head names up to seq %d, is gone: chain removed", e.Writer, e.Seq)
			} else {
				_ = x.fail(e.Writer, last.Seq+1, "writer %q ends at seq %d, the previous export's head names seq %d: records removed since", e.Writer, last.Seq, e.Seq)
			}
			return
		}
	}
	x.res.Signed = x.res.Head != nil
}

func (x *exportVerifier) result() ExportResult {
	res := x.res
	res.VerifyResult = x.v.Result()
	res.OK = x.err == nil
	if x.err != nil {
		res.Problem, res.Writer, res.Seq = x.err.Problem, x.err.Writer, x.err.Seq
		res.Signed, res.Head = false, nil
	}
	return res
}
