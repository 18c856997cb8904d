package storage

import (
	"crypto/ed25519"
	"encoding/json"
	"fmt"
	"math"
	"time"
)

// This file holds what the SQL stores (embedded, postgres) share when
// reading results: the dialects differ in their statements, not in how a
// result set becomes records and checkpoints.

// RowScanner is one result row as database/sql (*sql.Row, *sql.Rows) and pgx
// (pgx.Row, pgx.Rows) present it.
type RowScanner interface {
	Scan(dest ...any) error
}

// Rows is a result set as database/sql (*sql.Rows) and pgx (pgx.Rows)
// present it; the caller closes it.
type Rows interface {
	RowScanner
	Next() bool
	Err() error
}

// ScanRecordFunc reads one row, selected with a store's record columns, into r.
type ScanRecordFunc func(row RowScanner, r *Record) error

// CollectRecords reads every remaining row of rows with scan.
func CollectRecords(rows Rows, scan ScanRecordFunc) ([]Record, error) {
	var out []Record
	for rows.Next() {
		var r Record
		if err := scan(rows, &r); err != nil {
			return nil, err
		}
		out = append(out, r)
	}
	if err := rows.Err(); err != nil {
		return nil, err
	}
	return out, nil
}

// YieldRecords reads every remaining row of rows with scan into one reused
// Record and yields it until yield returns false; an error is yielded last.
func YieldRecords(rows Rows, scan ScanRecordFunc, yield func(*Record, error) bool) {
	var r Record
	for rows.Next() {
		if err := scan(rows, &r); err != nil {
			yield(nil, err)
			return
		}
		if !yield(&r, nil) {
			return
		}
	}
	if err := rows.Err(); err != nil {
		yield(nil, err)
	}
}

// CheckpointColumns lists audit_checkpoint's columns in the order
// CollectCheckpoints reads them and CheckpointValues returns them.
const CheckpointColumns = "id, time_ns, before_ns, writers, key_id, signature"

// CollectCheckpoints reads every remaining row of rows, selected with
// CheckpointColumns. A writers value that does not decode is kept as an
// entry naming the error, so that the checkpoint's signature check fails.
func CollectCheckpoints(rows Rows) ([]Checkpoint, error) {
	var out []Checkpoint
	for rows.Next() {
		var (
			cp               Checkpoint
			id, tNs, beforeN int64
			writers          string
		)
		if err := rows.Scan(&id, &tNs, &beforeN, &writers, &cp.KeyID, &cp.Signature); err != nil {
			return nil, fmt.Errorf("read checkpoints: %w", err)
		}
		cp.ID, cp.Time, cp.Before = uint64(id), time.Unix(0, tNs).UTC(), time.Unix(0, beforeN).UTC() //nolint:gosec // G115: ids are written from [1, MaxInt64]; a tampered one stays bit-exact, so the signature check reports it
		if err := json.Unmarshal([]byte(writers), &cp.Writers); err != nil {
			// Not written by a store: let the signature check fail on it.
			cp.Writers = []CheckpointEntry{{Writer: "undecodable: " + err.Error()}}
		}
		out = append(out, cp)
	}
	return out, rows.Err()
}

// CheckpointValues returns cp's column values in CheckpointColumns order.
func CheckpointValues(cp *Checkpoint) ([]any, error) {
	writers, err := json.Marshal(cp.Writers)
	if err != nil {
		return nil, err
	}
	return []any{int64(cp.ID), cp.Time.UnixNano(), ClampUnixNano(cp.Before), string(writers), cp.KeyID, cp.Signature}, nil //nolint:gosec // G115: a checkpoint id is the last one plus one per prune
}

// CheckpointPublicKey returns the public half of a store's checkpoint key,
// or nil without one.
func CheckpointPublicKey(key ed25519.PrivateKey) ed25519.PublicKey {
	if key == nil {
		return nil
	}
	return key.Public().(ed25519.PublicKey)
}

// ClampUnixNano converts t to Unix nanoseconds, saturating instead of
// overflowing for times outside 1678..2262.
func ClampUnixNano(t time.Time) int64 {
	switch {
	case t.Before(time.Unix(0, -1<<63)):
		return -1 << 63
	case t.After(time.Unix(0, 1<<63-1)):
		return 1<<63 - 1
	}
	return t.UnixNano()
}

// ClampSeq converts a sequence number to the stores' signed 64-bit seq
// column, saturating at MaxInt64: no stored seq is larger, so a bound beyond
// it still means "after every record" instead of turning negative and
// matching them all.
func ClampSeq(seq uint64) int64 {
	if seq > math.MaxInt64 {
		return math.MaxInt64
	}
	return int64(seq)
}
