package ca

import (
	"context"
	"errors"
	"fmt"

	adminpb "github.com/castellan-ca/castellan/proto/castellan/admin/v1"
	"github.com/castellan-ca/castellan/storage"
)

// Reason codes of audit operator actions.
const (
	ReasonAuditPrune = "audit.prune"
)

// undeliverable returns the status to send instead of out when the client
// has already gone (cancelled, deadline passed, connection closed): the
// response cannot reach it, so the issuance is marked undelivered in the
// audit log rather than counted as a certificate somebody holds.
func (s *Server) undeliverable(ctx context.Context, out *Issued) error {
	cerr := ctx.Err()
	if cerr == nil {
		return nil
	}
	s.Issuer.Undelivered(ctx, out, cerr)
	return Status(cerr).Err()
}

// Undelivered appends a follow-up record (storage.Undelivered) saying that
// out's certificate was issued and audited but never reached the client.
// A failure to append it is logged and counted: the issuance record stands.
func (is *Issuer) Undelivered(ctx context.Context, out *Issued, cause error) {
	m := storage.Undelivered(&out.Record, is.cfg.Now(), storage.ReasonResponseLost, "response not sent: "+cause.Error())
	actx, cancel := context.WithTimeout(context.WithoutCancel(ctx), is.cfg.AuditTimeout)
	defer cancel()
	if err := is.cfg.Audit.Append(actx, m); err != nil {
		is.cfg.Metrics.auditFailures.Inc()
		is.cfg.Logger.Error("audit of an undelivered certificate failed", "request_id", out.Record.RequestID,
			"serial", out.Record.Serial, "error", err)
		return
	}
	is.cfg.Logger.Warn("certificate not delivered: client gone", "request_id", out.Record.RequestID,
		"serial", out.Record.Serial, "cause", cause)
}

// GetAuditRecord returns one audit record to an operator.
func (s *Server) GetAuditRecord(ctx context.Context, in *adminpb.GetAuditRecordRequest) (*adminpb.GetAuditRecordResponse, error) {
	if err := s.Issuer.AuthorizeOperator(ctx); err != nil {
		return nil, Status(err).Err()
	}
	r, err := s.Audit.Get(ctx, in.GetWriter(), in.GetSeq())
	switch {
	case errors.Is(err, storage.ErrNotFound):
		return nil, Status(refuse(ErrNotFound, "audit.not_found", err)).Err()
	case err != nil:
		return nil, Status(refuse(ErrUnavailable, ReasonAuditDown, fmt.Errorf("get audit record: %w", err))).Err()
	}
	return &adminpb.GetAuditRecordResponse{Record: RecordToProto(r)}, nil
}

// PruneAuditLog removes old audit records for an operator, and audits the
// prune itself as an operator action on this server's chain.
func (s *Server) PruneAuditLog(ctx context.Context, in *adminpb.PruneAuditLogRequest) (*adminpb.PruneAuditLogResponse, error) {
	is := s.Issuer
	caller, err := is.cfg.Authenticator.Authenticate(ctx)
	if err != nil {
		return nil, Status(refuse(ErrUnauthenticated, ReasonAuthnFailed, err)).Err()
	}
	if !caller.Operator {
		return nil, Status(refuse(ErrPermissionDenied, ReasonNotOperator, fmt.Errorf("%s is not an operator", caller.Name))).Err()
	}
	if in.GetBefore() == nil {
		return nil, Status(refuse(ErrInvalidRequest, ReasonAuditPrune, errors.New("before is required"))).Err()
	}
	before := in.GetBefore().AsTime()
	rec := &storage.Record{Time: is.cfg.Now().UTC(), Kind: storage.KindOperator, RequestID: newRequestID(is.cfg.Rand),
		AuthMethod: caller.Method, Caller: caller.Name, Outcome: storage.OutcomeOK, Reason: ReasonAuditPrune}
	req := withConn(ctx, Request{})
	rec.Peer, rec.ClusterID = req.Peer, clip(req.ClusterID, 253)

	cp, err := s.Audit.Prune(ctx, before)
	var perr error
	switch {
	case errors.Is(err, storage.ErrBadCutoff):
		perr = refuse(ErrInvalidRequest, ReasonAuditPrune, err)
	case errors.Is(err, storage.ErrChainBroken), errors.Is(err, storage.ErrNoCheckpointKey):
		perr = refuse(ErrPrecondition, ReasonAuditPrune, err)
	case err != nil:
		perr = refuse(ErrUnavailable, ReasonAuditDown, fmt.Errorf("prune audit log: %w", err))
	}
	out := &adminpb.PruneAuditLogResponse{Before: ts(before.UTC())}
	switch {
	case perr != nil:
		rec.Outcome, rec.Detail = storage.OutcomeFailed, clip(fmt.Sprintf("prune before %s: %v", before.UTC(), err), 1024)
	case cp == nil:
		rec.Detail = fmt.Sprintf("prune before %s: nothing to remove", before.UTC())
	default:
		out.CheckpointId, out.Time, out.KeyId, out.Signature = cp.ID, ts(cp.Time), cp.KeyID, cp.Signature
		for _, e := range cp.Writers {
			out.Writers = append(out.Writers, &adminpb.AuditCheckpointEntry{Writer: e.Writer, Seq: e.Seq, Hash: e.Hash, Removed: e.Removed})
			out.Removed += e.Removed
		}
		rec.Detail = fmt.Sprintf("prune before %s: %d records of %d writers removed, checkpoint %d",
			before.UTC(), out.Removed, len(cp.Writers), cp.ID)
	}
	rec.Code = Status(perr).Code().String()
	actx, cancel := context.WithTimeout(context.WithoutCancel(ctx), is.cfg.AuditTimeout)
	defer cancel()
	if aerr := is.cfg.Audit.Append(actx, rec); aerr != nil {
		// The prune itself stands: its signed checkpoint is in the log.
		is.cfg.Metrics.auditFailures.Inc()
		is.cfg.Logger.Error("audit of a prune failed", "request_id", rec.RequestID, "error", aerr)
	}
	if perr != nil {
		is.cfg.Logger.Warn("audit prune refused", "caller", caller.Name, "before", before, "error", err)
		return nil, Status(perr).Err()
	}
	is.cfg.Logger.Info("audit log pruned", "caller", caller.Name, "before", before, "removed", out.Removed,
		"checkpoint", out.CheckpointId)
	return out, nil
}
