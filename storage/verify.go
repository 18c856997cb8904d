package storage

import (
	"crypto/ed25519"
	"errors"
	"fmt"
	"iter"
)

// ErrChainBroken is wrapped by the *ChainError a ChainVerifier returns when
// the records it is fed do not form intact hash chains.
var ErrChainBroken = errors.New("storage: audit chain broken")

// errUngrouped reports a caller bug: records were not grouped by writer.
var errUngrouped = errors.New("storage: verifier input not grouped by writer")

// VerifyResult summarises a chain verification.
type VerifyResult struct {
	Records     int    // records consumed, including the first bad one
	Writers     int    // distinct writers seen
	Checkpoints int    // prune checkpoints whose signature was checked
	OK          bool   // every chain intact
	Problem     string // human-readable description of the first break; "" when OK
	Writer      string // writer of the first break
	Seq         uint64 // first seq at which that writer's chain is not intact: rows before it are trustworthy
}

// ChainError describes the first break found by a ChainVerifier. It wraps
// ErrChainBroken.
type ChainError struct {
	Writer  string
	Seq     uint64
	Problem string
}

// Error implements error.
func (e *ChainError) Error() string { return e.Problem }

// Unwrap lets errors.Is(err, ErrChainBroken) match.
func (e *ChainError) Unwrap() error { return ErrChainBroken }

// ChainVerifier checks hash chains incrementally, in constant memory per
// writer, so a store can stream millions of rows through it.
//
// Feed it every record, grouped by Writer and in ascending Seq order within
// a writer (the order of "ORDER BY writer, seq"). It detects an edited row
// (hash mismatch), deleted rows (seq gap or prev-hash mismatch), duplicated
// or reordered rows (seq out of order, hash mismatch) and rows whose Writer
// field disagrees with their chain. Like any hash chain it cannot detect the
// removal of a writer's newest rows (truncation) or a wholesale rewrite of a
// chain's tail; anchoring chain heads elsewhere is a separate concern.
//
// The zero value is ready to use.
type ChainVerifier struct {
	res      VerifyResult
	err      error
	writer   string
	started  bool
	nextSeq  uint64
	prevHash string
	seen     map[string]struct{}
	anchors  map[string]CheckpointEntry // where pruned chains resume; see AddCheckpoint
	// lastCheckpoint is the ID of the last checkpoint added.
	lastCheckpoint uint64
	// tail: see NewTailVerifier.
	tail bool
}

// NewChainVerifier returns an empty verifier.
func NewChainVerifier() *ChainVerifier { return &ChainVerifier{} }

// NewTailVerifier returns a verifier of chain tails: the first record fed of
// each writer is taken where it stands (its seq and prev hash trusted, as a
// checkpoint's would be), and every later one must follow it unbroken. It
// checks the newest records of a long log quickly; only a verification
// from the start (NewChainVerifier) vouches for the records before the tail.
func NewTailVerifier() *ChainVerifier { return &ChainVerifier{tail: true} }

// Add feeds the next record. It returns a *ChainError (wrapping
// ErrChainBroken) at the first break and the same error for every later
// call, so callers can stop reading; it returns a different, non-chain error
// if the input is not grouped by writer, which is a bug in the caller.
func (v *ChainVerifier) Add(r *Record) error {
	if v.err != nil {
		return v.err
	}
	if !v.started || r.Writer != v.writer {
		if v.seen == nil {
			v.seen = make(map[string]struct{})
		}
		if _, dup := v.seen[r.Writer]; dup {
			return fmt.Errorf("%w: writer %q seen again after another writer", errUngrouped, r.Writer)
		}
		v.seen[r.Writer] = struct{}{}
		v.started = true
		v.writer = r.Writer
		v.nextSeq = 1
		v.prevHash = ""
		if a, ok := v.anchors[r.Writer]; ok {
			v.nextSeq, v.prevHash = a.Seq+1, a.Hash
		} else if v.tail {
			v.nextSeq, v.prevHash = r.Seq, r.PrevHash
		}
		v.res.Writers++
	}
	v.res.Records++

	switch {
	case r.Seq > v.nextSeq:
		// Checked before the hash so that a deletion is reported as the
		// first missing seq, not as a problem with the row after it.
		return v.fail(v.nextSeq, "writer %q: seq %d..%d missing (next row has seq %d): rows deleted",
			r.Writer, v.nextSeq, r.Seq-1, r.Seq)
	case r.Seq < v.nextSeq:
		return v.fail(v.nextSeq, "writer %q: row with seq %d found where seq %d was expected: rows duplicated or reordered",
			r.Writer, r.Seq, v.nextSeq)
	case r.ComputeHash() != r.Hash:
		return v.fail(r.Seq, "writer %q seq %d: hash mismatch: row edited or reordered", r.Writer, r.Seq)
	case r.PrevHash != v.prevHash:
		return v.fail(r.Seq, "writer %q seq %d: prev_hash does not match the hash of seq %d: rows deleted, replaced or reordered",
			r.Writer, r.Seq, r.Seq-1)
	}
	v.nextSeq++
	v.prevHash = r.Hash
	return nil
}

func (v *ChainVerifier) fail(seq uint64, format string, args ...any) error {
	v.err = &ChainError{Writer: v.writer, Seq: seq, Problem: fmt.Sprintf(format, args...)}
	return v.err
}

// Result returns the verification summary for the records added so far.
func (v *ChainVerifier) Result() VerifyResult {
	res := v.res
	res.OK = v.err == nil
	var ce *ChainError
	if errors.As(v.err, &ce) {
		res.Problem, res.Writer, res.Seq = ce.Problem, ce.Writer, ce.Seq
	}
	return res
}

// VerifyRecords runs every record of records through a ChainVerifier,
// stopping at the first break. The error is non-nil only when records yields
// one (a read failure) or the input is not grouped by writer; a broken chain
// is reported in the result with OK false.
func VerifyRecords(records iter.Seq2[*Record, error]) (VerifyResult, error) {
	return VerifySnapshot(Snapshot{Records: records}, nil)
}

// Snapshot is one consistent read of an audit store, as its Verify and
// Export see it: the prune checkpoints by ascending ID, and every record
// grouped by writer in ascending seq order.
type Snapshot struct {
	Checkpoints []Checkpoint
	// Records may reuse the *Record it yields; it yields an
	// *UnreadableRowError for a row that cannot be decoded.
	Records iter.Seq2[*Record, error]
}

// UnreadableRowError reports a stored row that cannot be decoded (a value
// no store writes): verification reports it as a break, not a read failure.
type UnreadableRowError struct {
	Writer string // the row's writer, as far as it could be read
	Seq    uint64 // the row's seq, or the one before it
	Err    error
}

// Error implements error.
func (e *UnreadableRowError) Error() string {
	return fmt.Sprintf("writer %q: unreadable row near seq %d: %v", e.Writer, e.Seq, e.Err)
}

// Unwrap returns the decoding error.
func (e *UnreadableRowError) Unwrap() error { return e.Err }

// VerifySnapshot checks snap: every checkpoint's signature with pub, then
// every chain from seq 1 or from where a checkpoint says it resumes (see
// ChainVerifier), stopping at the first break. A broken chain, a bad
// checkpoint or an unreadable row is reported in the result with OK false;
// the error is for read failures and input not grouped by writer.
func VerifySnapshot(snap Snapshot, pub ed25519.PublicKey) (VerifyResult, error) {
	var v ChainVerifier
	for i := range snap.Checkpoints {
		if err := v.AddCheckpoint(&snap.Checkpoints[i], pub); err != nil {
			return v.Result(), nil
		}
	}
	for r, err := range snap.Records {
		var unreadable *UnreadableRowError
		switch {
		case errors.As(err, &unreadable):
			res := v.Result()
			res.Records++
			res.OK, res.Writer, res.Seq, res.Problem = false, unreadable.Writer, unreadable.Seq, unreadable.Error()
			return res, nil
		case err != nil:
			return v.Result(), fmt.Errorf("storage: verify: reading records: %w", err)
		}
		if err := v.Add(r); err != nil {
			if errors.Is(err, ErrChainBroken) {
				break
			}
			return v.Result(), err
		}
	}
	_ = v.Finish() // a break is reported in the result
	return v.Result(), nil
}
