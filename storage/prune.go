package storage

import (
	"context"
	"crypto/ed25519"
	"fmt"
	"iter"
	"time"
)

// PruneTx is one store transaction as Prune sees it. Each store implements
// it over its own SQL; Prune holds the logic, so every store prunes alike.
// The store must run Prune's calls in one transaction that excludes other
// prunes (and commit only when Prune returns no error).
type PruneTx interface {
	// Checkpoints returns every stored checkpoint by ascending ID.
	Checkpoints(ctx context.Context) ([]Checkpoint, error)
	// Writers returns every writer that has records.
	Writers(ctx context.Context) ([]string, error)
	// Span returns the first seq of writer whose Time is at or after before
	// (0 if none) and writer's newest seq.
	Span(ctx context.Context, writer string, before time.Time) (firstKept, newest uint64, err error)
	// Records yields writer's records with Seq <= upTo in ascending Seq order.
	Records(ctx context.Context, writer string, upTo uint64) iter.Seq2[*Record, error]
	// Delete removes writer's records with Seq <= upTo, returning how many.
	Delete(ctx context.Context, writer string, upTo uint64) (uint64, error)
	// InsertCheckpoint stores a signed checkpoint.
	InsertCheckpoint(ctx context.Context, cp *Checkpoint) error
}

// Prune removes, for every writer, the records older than before and
// returns the signed checkpoint it stored, or nil when nothing was old
// enough. It removes a prefix of each chain: up to, not including, the first
// record at or after before, and never a writer's newest record, which stays
// as the chain's visible head (the next append links to it). It first checks
// every record it is about to remove against the chain and the previous
// checkpoints, and refuses (wrapping ErrChainBroken) rather than erase the
// evidence of tampering under a valid signature.
func Prune(ctx context.Context, tx PruneTx, key ed25519.PrivateKey, before, now time.Time) (*Checkpoint, error) {
	if key == nil {
		return nil, ErrNoCheckpointKey
	}
	if before.IsZero() || before.Before(minRecordTime) || before.After(maxRecordTime) {
		return nil, fmt.Errorf("%w: %v", ErrBadCutoff, before)
	}
	pub := key.Public().(ed25519.PublicKey)
	cps, err := tx.Checkpoints(ctx)
	if err != nil {
		return nil, fmt.Errorf("storage: prune: read checkpoints: %w", err)
	}
	var prior ChainVerifier
	for i := range cps {
		if err := prior.AddCheckpoint(&cps[i], pub); err != nil {
			return nil, fmt.Errorf("storage: prune: %w", err)
		}
	}
	writers, err := tx.Writers(ctx)
	if err != nil {
		return nil, fmt.Errorf("storage: prune: list writers: %w", err)
	}
	cp := &Checkpoint{Time: now.UTC(), Before: before.UTC()}
	if len(cps) > 0 {
		cp.ID = cps[len(cps)-1].ID
	}
	cp.ID++
	for _, w := range writers {
		e, err := pruneWriter(ctx, tx, w, prior.anchors[w], before)
		if err != nil {
			return nil, fmt.Errorf("storage: prune writer %q: %w", w, err)
		}
		if e.Removed > 0 {
			cp.Writers = append(cp.Writers, e)
		}
	}
	if len(cp.Writers) == 0 {
		return nil, nil
	}
	cp.Sign(key)
	if err := tx.InsertCheckpoint(ctx, cp); err != nil {
		return nil, fmt.Errorf("storage: prune: store checkpoint: %w", err)
	}
	return cp, nil
}

// pruneWriter removes one writer's old records after checking them, and
// returns its checkpoint entry (Removed 0 when there was nothing to do).
func pruneWriter(ctx context.Context, tx PruneTx, w string, anchor CheckpointEntry, before time.Time) (CheckpointEntry, error) {
	firstKept, newest, err := tx.Span(ctx, w, before)
	if err != nil {
		return CheckpointEntry{}, err
	}
	cut := newest - 1
	if firstKept != 0 && firstKept-1 < cut {
		cut = firstKept - 1
	}
	if newest == 0 || cut <= anchor.Seq {
		return CheckpointEntry{}, nil
	}
	v := ChainVerifier{anchors: map[string]CheckpointEntry{w: anchor}}
	var last Record
	for r, err := range tx.Records(ctx, w, cut) {
		if err != nil {
			return CheckpointEntry{}, fmt.Errorf("read records: %w", err)
		}
		if err := v.Add(r); err != nil {
			return CheckpointEntry{}, fmt.Errorf("refusing to prune a chain that does not verify: %w", err)
		}
		last = *r
	}
	if last.Seq != cut {
		return CheckpointEntry{}, fmt.Errorf("%w: writer %q: records up to seq %d expected, last read is %d", ErrChainBroken, w, cut, last.Seq)
	}
	n, err := tx.Delete(ctx, w, cut)
	if err != nil {
		return CheckpointEntry{}, fmt.Errorf("delete: %w", err)
	}
	if n != cut-anchor.Seq {
		return CheckpointEntry{}, fmt.Errorf("delete removed %d records, want %d", n, cut-anchor.Seq)
	}
	return CheckpointEntry{Writer: w, Seq: cut, Hash: last.Hash, Removed: n}, nil
}
