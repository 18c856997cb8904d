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

// verifyAuditTail verifies the newest n records of every writer's chain
// (storage.NewTailVerifier) through the admin API: it finds each writer's
// first record, its head by exponential then binary search with
// GetAuditRecord (a few dozen calls however long the chain), and lists the
// last n records from there. It stops at the first break.
func verifyAuditTail(ctx context.Context, client adminpb.AdminServiceClient, n uint64) (storage.VerifyResult, error) {
	v := storage.NewTailVerifier()
	n = max(n, 1)
	afterWriter, afterSeq := "", uint64(0)
	for {
		resp, err := client.ListAuditRecords(ctx, &adminpb.ListAuditRecordsRequest{AfterWriter: afterWriter, AfterSeq: afterSeq, Limit: 1})
		if err != nil {
			return v.Result(), fmt.Errorf("list audit records: %w", err)
		}
		if len(resp.GetRecords()) == 0 {
			return v.Result(), nil
		}
		first := resp.GetRecords()[0]
		writer := first.GetWriter()
		head, err := chainHead(ctx, client, writer, first.GetSeq())
		if err != nil {
			return v.Result(), err
		}
		start := first.GetSeq()
		if head-start+1 > n {
			start = head - n + 1
		}
		want := int(head - start + 1) //nolint:gosec // G115: at most n, a flag value the operator chose
		req := &adminpb.ListAuditRecordsRequest{Writer: writer, AfterSeq: start - 1}
		for p, err := range auditPages(ctx, client, req, func(seen int) int { return min(exportPage, want-seen) }) {
			if err != nil {
				return v.Result(), fmt.Errorf("list audit records: %w", err)
			}
			r, err := adminapi.RecordFromProto(p)
			if err != nil {
				return v.Result(), err
			}
			if err := v.Add(&r); err != nil {
				if errors.Is(err, storage.ErrChainBroken) {
					return v.Result(), nil
				}
				return v.Result(), err
			}
		}
		// Past every record of this writer, even ones appended meanwhile
		// (stores keep seq in a signed 64-bit column).
		afterWriter, afterSeq = writer, math.MaxInt64
	}
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
