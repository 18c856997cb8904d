// Package admin serves Castellan's AdminService: operator issuance, the trust
// bundle, the audit log (list, get, verify, prune, export and the checkpoint
// key), CA rotation and the rotation of the key-encryption key. Every call
// passes the issuer's operator gate (ca.Issuer.Operator); operator actions are
// audited through the issuer's ca.Auditor; errors leave through ca.Status.
package admin

import (
	"context"
	"crypto/ed25519"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/castellan-ca/castellan/ca"
	"github.com/castellan-ca/castellan/internal/adminapi"
	adminpb "github.com/castellan-ca/castellan/proto/castellan/admin/v1"
	"github.com/castellan-ca/castellan/storage"
	"google.golang.org/protobuf/types/known/timestamppb"
)

// ReasonAuditPrune is the audit reason of a prune of the audit log.
const ReasonAuditPrune = "audit.prune"

// AuditReader is the read side of the audit store used by the admin API.
type AuditReader interface {
	List(ctx context.Context, q storage.Query) ([]storage.Record, error)
	Verify(ctx context.Context) (storage.VerifyResult, error)
	// Get returns one record or an error wrapping storage.ErrNotFound.
	Get(ctx context.Context, writer string, seq uint64) (*storage.Record, error)
	// Prune removes records older than before, leaving a signed checkpoint
	// (nil when nothing was old enough).
	Prune(ctx context.Context, before time.Time) (*storage.Checkpoint, error)
	// Export sends the whole log, from one snapshot, to sink, ending in a
	// head signed with the checkpoint key (storage.ExportSnapshot).
	Export(ctx context.Context, sink storage.ExportSink) error
	// CheckpointPublicKey checks checkpoints and export heads; nil without
	// a checkpoint key.
	CheckpointPublicKey() ed25519.PublicKey
}

// Rotation is the CA rotation workflow the admin API drives (package
// ca/rotation). Refusals wrap ca.ErrPrecondition and say why; other errors
// are storage failures.
type Rotation interface {
	// Status reports every CA of the shared rotation state.
	Status(ctx context.Context) (*adminapi.RotationStatus, error)
	// Rotate runs one step and returns the state after it.
	Rotate(ctx context.Context, req adminapi.RotateRequest) (*adminapi.RotationStatus, error)
	// Rekey runs one step of a key-encryption key rotation and returns the
	// state after it.
	Rekey(ctx context.Context, req adminapi.RekeyRequest) (*adminapi.RotationStatus, error)
}

// Server implements the AdminService on an Issuer.
type Server struct {
	adminpb.UnimplementedAdminServiceServer

	Issuer *ca.Issuer
	// Audit answers the audit queries.
	Audit AuditReader
	// Rotation runs the CA rotation workflow; nil refuses its RPCs.
	Rotation Rotation
	// Logger reports prunes; nil discards.
	Logger *slog.Logger
	// Now is the clock GetTrustBundle reports as the server's time; nil
	// means time.Now.
	Now func() time.Time
}

// IssueCertificate implements operator issuance: a certificate for a named identity.
func (s *Server) IssueCertificate(ctx context.Context, in *adminpb.IssueCertificateRequest) (*adminpb.IssueCertificateResponse, error) {
	req := ca.Request{CSR: in.GetCsr(), ValiditySeconds: in.GetValiditySeconds(), Identity: in.GetIdentity(), OperatorOnly: true}
	if req.Identity == "" {
		req.Identity = "-" // an operator must name an identity; "-" fails parsing and is audited
	}
	elements, err := s.Issuer.Answer(ctx, req)
	if err != nil {
		return nil, err
	}
	return &adminpb.IssueCertificateResponse{CertChain: elements}, nil
}

// GetTrustBundle returns the current roots to an operator.
func (s *Server) GetTrustBundle(ctx context.Context, _ *adminpb.GetTrustBundleRequest) (*adminpb.GetTrustBundleResponse, error) {
	if _, err := s.Issuer.Operator(ctx); err != nil {
		return nil, ca.Status(err).Err()
	}
	st, err := s.Issuer.State()
	if err != nil {
		return nil, ca.Status(err).Err()
	}
	now := time.Now
	if s.Now != nil {
		now = s.Now
	}
	return &adminpb.GetTrustBundleResponse{BundlePem: st.BundlePEM, TrustDomain: s.Issuer.TrustDomain().Name(),
		ServerTime: timestamppb.New(now())}, nil
}

// ListAuditRecords returns audit records to an operator.
func (s *Server) ListAuditRecords(ctx context.Context, in *adminpb.ListAuditRecordsRequest) (*adminpb.ListAuditRecordsResponse, error) {
	if _, err := s.Issuer.Operator(ctx); err != nil {
		return nil, ca.Status(err).Err()
	}
	q := storage.Query{
		Identity: in.GetIdentity(), Serial: in.GetSerial(), CertSHA256: in.GetCertSha256(), Outcome: in.GetOutcome(),
		AfterSeq: in.GetAfterSeq(), Writer: in.GetWriter(), Limit: int(in.GetLimit()),
		AfterWriter: in.GetAfterWriter(), IssuerKeyID: in.GetIssuerKeyId(),
	}
	if in.Since != nil {
		q.Since = in.GetSince().AsTime()
	}
	if in.Until != nil {
		q.Until = in.GetUntil().AsTime()
	}
	recs, err := s.Audit.List(ctx, q)
	if err != nil {
		return nil, auditDown("list audit records", err)
	}
	out := &adminpb.ListAuditRecordsResponse{Records: make([]*adminpb.AuditRecord, len(recs))}
	for i := range recs {
		out.Records[i] = adminapi.RecordToProto(&recs[i])
	}
	return out, nil
}

// GetAuditRecord returns one audit record to an operator.
func (s *Server) GetAuditRecord(ctx context.Context, in *adminpb.GetAuditRecordRequest) (*adminpb.GetAuditRecordResponse, error) {
	if _, err := s.Issuer.Operator(ctx); err != nil {
		return nil, ca.Status(err).Err()
	}
	r, err := s.Audit.Get(ctx, in.GetWriter(), in.GetSeq())
	switch {
	case errors.Is(err, storage.ErrNotFound):
		return nil, ca.Status(ca.Refuse(ca.ErrNotFound, "audit.not_found", err)).Err()
	case err != nil:
		return nil, auditDown("get audit record", err)
	}
	return &adminpb.GetAuditRecordResponse{Record: adminapi.RecordToProto(r)}, nil
}

// VerifyAuditLog checks the audit hash chains for an operator.
func (s *Server) VerifyAuditLog(ctx context.Context, _ *adminpb.VerifyAuditLogRequest) (*adminpb.VerifyAuditLogResponse, error) {
	if _, err := s.Issuer.Operator(ctx); err != nil {
		return nil, ca.Status(err).Err()
	}
	res, err := s.Audit.Verify(ctx)
	if err != nil {
		return nil, auditDown("verify audit log", err)
	}
	return &adminpb.VerifyAuditLogResponse{Ok: res.OK, Records: int64(res.Records), Writers: int32(res.Writers), //nolint:gosec // G115: one writer per server start: never 2^31 of them
		Problem: res.Problem, Writer: res.Writer, Seq: res.Seq, Checkpoints: int32(res.Checkpoints)}, nil //nolint:gosec // G115: one checkpoint per prune: never 2^31 of them
}

// PruneAuditLog removes old audit records for an operator, and audits the
// prune itself as an operator action on this server's chain.
func (s *Server) PruneAuditLog(ctx context.Context, in *adminpb.PruneAuditLogRequest) (*adminpb.PruneAuditLogResponse, error) {
	caller, err := s.Issuer.Operator(ctx)
	if err != nil {
		return nil, ca.Status(err).Err()
	}
	if in.GetBefore() == nil {
		return nil, ca.Status(ca.Refuse(ca.ErrInvalidRequest, ReasonAuditPrune, errors.New("before is required"))).Err()
	}
	before := in.GetBefore().AsTime().UTC()
	cp, err := s.Audit.Prune(ctx, before)
	act := ca.Action{Method: caller.Method, Caller: caller.Name, Reason: ReasonAuditPrune}
	switch {
	case errors.Is(err, storage.ErrBadCutoff):
		act.Err = ca.Refuse(ca.ErrInvalidRequest, ReasonAuditPrune, err)
	case errors.Is(err, storage.ErrChainBroken), errors.Is(err, storage.ErrNoCheckpointKey):
		act.Err = ca.Refuse(ca.ErrPrecondition, ReasonAuditPrune, err)
	case err != nil:
		act.Err = ca.Refuse(ca.ErrUnavailable, ca.ReasonAuditDown, fmt.Errorf("prune audit log: %w", err))
	}
	out := adminapi.PruneToProto(before, cp)
	switch {
	case act.Err != nil:
		act.Detail = fmt.Sprintf("prune before %s: %v", before, err)
	case cp == nil:
		act.Detail = fmt.Sprintf("prune before %s: nothing to remove", before)
	default:
		act.Detail = fmt.Sprintf("prune before %s: %d records of %d writers removed, checkpoint %d",
			before, out.Removed, len(cp.Writers), cp.ID)
	}
	// A failed record does not undo the prune: its signed checkpoint is in the log.
	_, _ = s.Issuer.Auditor().Record(ctx, act)
	logger := s.Logger
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	if act.Err != nil {
		logger.Warn("audit prune refused", "caller", caller.Name, "before", before, "error", err)
		return nil, ca.Status(act.Err).Err()
	}
	logger.Info("audit log pruned", "caller", caller.Name, "before", before, "removed", out.Removed, "checkpoint", out.CheckpointId)
	return out, nil
}

// GetCAStatus returns the rotation state to an operator.
func (s *Server) GetCAStatus(ctx context.Context, _ *adminpb.GetCAStatusRequest) (*adminpb.GetCAStatusResponse, error) {
	if _, err := s.rotationOperator(ctx); err != nil {
		return nil, ca.Status(err).Err()
	}
	st, err := s.Rotation.Status(ctx)
	if err != nil {
		return nil, ca.Status(rotationError(err)).Err()
	}
	return &adminpb.GetCAStatusResponse{Status: adminapi.StatusToProto(st)}, nil
}

// RotateCA runs one rotation step for an operator; the rotation workflow
// audits it.
func (s *Server) RotateCA(ctx context.Context, in *adminpb.RotateCARequest) (*adminpb.RotateCAResponse, error) {
	caller, err := s.rotationOperator(ctx)
	if err != nil {
		return nil, ca.Status(err).Err()
	}
	req := adminapi.RotateRequest{Step: in.GetStep(), Target: in.GetTarget(), Force: in.GetForce(), Caller: caller}
	st, err := s.Rotation.Rotate(ctx, req)
	if err != nil {
		return nil, ca.Status(rotationError(err)).Err()
	}
	return &adminpb.RotateCAResponse{Status: adminapi.StatusToProto(st)}, nil
}

// RekeyCA runs one step of a key-encryption key rotation for an operator;
// the rotation workflow audits it. The new KEK is read from a file on this
// server, never sent.
func (s *Server) RekeyCA(ctx context.Context, in *adminpb.RekeyCARequest) (*adminpb.RekeyCAResponse, error) {
	caller, err := s.rotationOperator(ctx)
	if err != nil {
		return nil, ca.Status(err).Err()
	}
	st, err := s.Rotation.Rekey(ctx, adminapi.RekeyRequest{NewKEKFile: in.GetNewKekFile(), Finish: in.GetFinish(), Caller: caller})
	if err != nil {
		return nil, ca.Status(rotationError(err)).Err()
	}
	return &adminpb.RekeyCAResponse{Status: adminapi.StatusToProto(st)}, nil
}

// rotationOperator passes the operator gate, then refuses when no rotation
// workflow is configured.
func (s *Server) rotationOperator(ctx context.Context) (string, error) {
	caller, err := s.Issuer.Operator(ctx)
	if err != nil {
		return "", err
	}
	if s.Rotation == nil {
		return "", ca.Refuse(ca.ErrPrecondition, adminapi.ReasonRotationRefused, errors.New("CA rotation is not configured on this server"))
	}
	return caller.Name, nil
}

// rotationError classifies a Rotation error: refusals keep their message
// for the operator, anything else is a storage failure worth a retry.
func rotationError(err error) error {
	if errors.Is(err, ca.ErrPrecondition) {
		return ca.Refuse(ca.ErrPrecondition, adminapi.ReasonRotationRefused, err)
	}
	return ca.Refuse(ca.ErrUnavailable, adminapi.ReasonCAStateDown, err)
}

// auditDown is the status of a failed audit store query.
func auditDown(what string, err error) error {
	return ca.Status(ca.Refuse(ca.ErrUnavailable, ca.ReasonAuditDown, fmt.Errorf("%s: %w", what, err))).Err()
}
