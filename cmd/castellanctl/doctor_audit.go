package main

import (
	"context"
	"errors"
	"fmt"
	"math"

	"github.com/castellan-ca/castellan/internal/adminapi"
	adminpb "github.com/castellan-ca/castellan/proto/castellan/admin/v1"
	"github.com/castellan-ca/castellan/storage"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// eachChain calls fn with the bounds of every writer's chain, in writer
// order: its first stored seq (after any prune) and its head. It finds the
// first with one listing and the head by exponential then binary search
// with GetAuditRecord: a few dozen calls however long the chain.
func eachChain(ctx context.Context, client adminpb.AdminServiceClient, fn func(writer string, first, head uint64) error) error {
	afterWriter, afterSeq := "", uint64(0)
	for {
		resp, err := client.ListAuditRecords(ctx, &adminpb.ListAuditRecordsRequest{AfterWriter: afterWriter, AfterSeq: afterSeq, Limit: 1})
		if err != nil {
			return fmt.Errorf("list audit records: %w", err)
		}
		if len(resp.GetRecords()) == 0 {
			return nil
		}
		first := resp.GetRecords()[0]
		writer := first.GetWriter()
		head, err := chainHead(ctx, client, writer, first.GetSeq())
		if err != nil {
			return err
		}
		if err := fn(writer, first.GetSeq(), head); err != nil {
			return err
		}
		// Past every record of this writer, even ones appended meanwhile
		// (stores keep seq in a signed 64-bit column).
		afterWriter, afterSeq = writer, math.MaxInt64
	}
}

// errStop ends eachChain early without an error to report.
var errStop = errors.New("stop")

// verifyAuditTail verifies the newest n records of every writer's chain
// (storage.NewTailVerifier) through the admin API. It stops at the first
// break.
func verifyAuditTail(ctx context.Context, client adminpb.AdminServiceClient, n uint64) (storage.VerifyResult, error) {
	v := storage.NewTailVerifier()
	n = max(n, 1)
	err := eachChain(ctx, client, func(writer string, first, head uint64) error {
		start := max(first, head-min(head, n)+1)
		want := int(head - start + 1) //nolint:gosec // G115: at most n, a flag value the operator chose
		req := &adminpb.ListAuditRecordsRequest{Writer: writer, AfterSeq: start - 1}
		for p, err := range auditPages(ctx, client, req, func(seen int) int { return min(exportPage, want-seen) }) {
			if err != nil {
				return fmt.Errorf("list audit records: %w", err)
			}
			r, err := adminapi.RecordFromProto(p)
			if err != nil {
				return err
			}
			if err := v.Add(&r); err != nil {
				if errors.Is(err, storage.ErrChainBroken) {
					return errStop
				}
				return err
			}
		}
		return nil
	})
	if err != nil && !errors.Is(err, errStop) {
		return v.Result(), err
	}
	return v.Result(), nil
}

// auditSize counts the stored records of every chain (for the progress of
// a whole-log export): each chain is contiguous from its first stored seq
// to its head.
func auditSize(ctx context.Context, client adminpb.AdminServiceClient) (int64, error) {
	var n uint64
	err := eachChain(ctx, client, func(_ string, first, head uint64) error {
		n += head - first + 1
		return nil
	})
	return int64(min(n, math.MaxInt64)), err
}

// chainHead returns the highest seq of writer's chain, given a seq known to
// exist: records are contiguous from there to the head.
func chainHead(ctx context.Context, client adminpb.AdminServiceClient, writer string, known uint64) (uint64, error) {
	exists := func(seq uint64) (bool, error) {
		_, err := client.GetAuditRecord(ctx, &adminpb.GetAuditRecordRequest{Writer: writer, Seq: seq})
		switch status.Code(err) {
		case codes.OK:
			return true, nil
		case codes.NotFound:
			return false, nil
		}
		return false, fmt.Errorf("get audit record %s/%d: %w", writer, seq, err)
	}
	lo, step := known, uint64(1)
	var hi uint64 // the first seq found missing
	for {
		ok, err := exists(lo + step)
		if err != nil {
			return 0, err
		}
		if !ok {
			hi = lo + step
			break
		}
		lo += step
		step *= 2
	}
	for hi-lo > 1 {
		mid := lo + (hi-lo)/2
		ok, err := exists(mid)
		if err != nil {
			return 0, err
		}
		if ok {
			lo = mid
		} else {
			hi = mid
		}
	}
	return lo, nil
}
