package ca

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/castellan-ca/castellan/authn"

	adminpb "github.com/castellan-ca/castellan/proto/castellan/admin/v1"
	authpb "github.com/castellan-ca/castellan/proto/istio/v1/auth"
	"github.com/castellan-ca/castellan/storage"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/peer"
	"google.golang.org/protobuf/types/known/timestamppb"
)

// Server is the gRPC edge: Istio's IstioCertificateService and Castellan's
// AdminService, both thin translations onto the Issuer. Errors leave here
// through Status only.
type Server struct {
	authpb.UnimplementedIstioCertificateServiceServer
	adminpb.UnimplementedAdminServiceServer

	Issuer *Issuer
	// Audit answers the admin API's audit queries.
	Audit AuditReader
	// Rotation runs the CA rotation workflow; nil refuses its RPCs.
	Rotation Rotation
}

// AuditReader is the read side of the audit store used by the admin API.
type AuditReader interface {
	List(ctx context.Context, q storage.Query) ([]storage.Record, error)
	Verify(ctx context.Context) (storage.VerifyResult, error)
	// Get returns one record or an error wrapping storage.ErrNotFound.
	Get(ctx context.Context, writer string, seq uint64) (*storage.Record, error)
	// Prune removes records older than before, leaving a signed checkpoint
	// (nil when nothing was old enough).
	Prune(ctx context.Context, before time.Time) (*storage.Checkpoint, error)
}

// CreateCertificate implements Istio's CA API.
func (s *Server) CreateCertificate(ctx context.Context, in *authpb.IstioCertificateRequest) (*authpb.IstioCertificateResponse, error) {
	req := Request{CSR: in.GetCsr(), ValiditySeconds: in.GetValidityDuration()}
	if md := in.GetMetadata(); md != nil {
		req.Metadata = md.AsMap()
	}
	out, err := s.Issuer.Issue(ctx, withConn(ctx, req))
	if err != nil {
		return nil, Status(err).Err()
	}
	if err := s.undeliverable(ctx, out); err != nil {
		return nil, err
	}
	return &authpb.IstioCertificateResponse{CertChain: out.Elements}, nil
}

// IssueCertificate implements the admin API's operator issuance.
func (s *Server) IssueCertificate(ctx context.Context, in *adminpb.IssueCertificateRequest) (*adminpb.IssueCertificateResponse, error) {
	req := Request{CSR: in.GetCsr(), ValiditySeconds: in.GetValiditySeconds(), Identity: in.GetIdentity(), OperatorOnly: true}
	if req.Identity == "" {
		req.Identity = "-" // an operator must name an identity; "-" fails parsing and is audited
	}
	out, err := s.Issuer.Issue(ctx, withConn(ctx, req))
	if err != nil {
		return nil, Status(err).Err()
	}
	if err := s.undeliverable(ctx, out); err != nil {
		return nil, err
	}
	return &adminpb.IssueCertificateResponse{CertChain: out.Elements}, nil
}

// GetTrustBundle returns the current roots to an operator.
func (s *Server) GetTrustBundle(ctx context.Context, _ *adminpb.GetTrustBundleRequest) (*adminpb.GetTrustBundleResponse, error) {
	if err := s.Issuer.AuthorizeOperator(ctx); err != nil {
		return nil, Status(err).Err()
	}
	st := s.Issuer.cfg.Authority.Current()
	if st == nil {
		return nil, Status(refuse(ErrUnavailable, ReasonNoSigner, errors.New("no active signer"))).Err()
	}
	return &adminpb.GetTrustBundleResponse{BundlePem: st.BundlePEM, TrustDomain: s.Issuer.cfg.TrustDomain.Name()}, nil
}

// ListAuditRecords returns audit records to an operator.
func (s *Server) ListAuditRecords(ctx context.Context, in *adminpb.ListAuditRecordsRequest) (*adminpb.ListAuditRecordsResponse, error) {
	if err := s.Issuer.AuthorizeOperator(ctx); err != nil {
		return nil, Status(err).Err()
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
		return nil, Status(refuse(ErrUnavailable, ReasonAuditDown, fmt.Errorf("list audit records: %w", err))).Err()
	}
	out := &adminpb.ListAuditRecordsResponse{Records: make([]*adminpb.AuditRecord, len(recs))}
	for i := range recs {
		out.Records[i] = RecordToProto(&recs[i])
	}
	return out, nil
}

// VerifyAuditLog checks the audit hash chains for an operator.
func (s *Server) VerifyAuditLog(ctx context.Context, _ *adminpb.VerifyAuditLogRequest) (*adminpb.VerifyAuditLogResponse, error) {
	if err := s.Issuer.AuthorizeOperator(ctx); err != nil {
		return nil, Status(err).Err()
	}
	res, err := s.Audit.Verify(ctx)
	if err != nil {
		return nil, Status(refuse(ErrUnavailable, ReasonAuditDown, fmt.Errorf("verify audit log: %w", err))).Err()
	}
	return &adminpb.VerifyAuditLogResponse{Ok: res.OK, Records: int64(res.Records), Writers: int32(res.Writers),
		Problem: res.Problem, Writer: res.Writer, Seq: res.Seq, Checkpoints: int32(res.Checkpoints)}, nil
}

// AuthorizeOperator authenticates the caller and requires an operator credential.
func (is *Issuer) AuthorizeOperator(ctx context.Context) error {
	caller, err := is.cfg.Authenticator.Authenticate(ctx)
	if err != nil {
		if errors.Is(err, authn.ErrUnavailable) {
			return refuse(ErrUnavailable, ReasonAuthnDown, err)
		}
		return refuse(ErrUnauthenticated, ReasonAuthnFailed, err)
	}
	if !caller.Operator {
		return refuse(ErrPermissionDenied, ReasonNotOperator, fmt.Errorf("%s is not an operator", caller.Name))
	}
	return nil
}

// withConn adds what the connection says about the request: peer address and
// the clusterid header.
func withConn(ctx context.Context, req Request) Request {
	if p, ok := peer.FromContext(ctx); ok && p.Addr != nil {
		req.Peer = p.Addr.String()
	}
	if md, ok := metadata.FromIncomingContext(ctx); ok {
		if v := md.Get("clusterid"); len(v) > 0 {
			req.ClusterID = v[0]
		}
	}
	return req
}

// RecordToProto converts an audit record for the admin API.
func RecordToProto(r *storage.Record) *adminpb.AuditRecord {
	return &adminpb.AuditRecord{
		Seq: r.Seq, Writer: r.Writer, Time: ts(r.Time), Kind: r.Kind, RequestId: r.RequestID, Peer: r.Peer,
		AuthMethod: r.AuthMethod, Caller: r.Caller, ClusterId: r.ClusterID, RequestedIdentity: r.RequestedIdentity,
		GrantedIdentity: r.GrantedIdentity, Outcome: r.Outcome, Reason: r.Reason, Code: r.Code, Serial: r.Serial,
		NotBefore: ts(r.NotBefore), NotAfter: ts(r.NotAfter), CertSha256: r.CertSHA256, Signer: r.Signer,
		IssuerKeyId: r.IssuerKeyID, Detail: r.Detail, PrevHash: r.PrevHash, Hash: r.Hash,
	}
}

// RecordFromProto is the inverse of RecordToProto, for castellanctl.
func RecordFromProto(p *adminpb.AuditRecord) storage.Record {
	return storage.Record{
		Seq: p.GetSeq(), Writer: p.GetWriter(), Time: fromTS(p.GetTime()), Kind: p.GetKind(), RequestID: p.GetRequestId(),
		Peer: p.GetPeer(), AuthMethod: p.GetAuthMethod(), Caller: p.GetCaller(), ClusterID: p.GetClusterId(),
		RequestedIdentity: p.GetRequestedIdentity(), GrantedIdentity: p.GetGrantedIdentity(), Outcome: p.GetOutcome(),
		Reason: p.GetReason(), Code: p.GetCode(), Serial: p.GetSerial(), NotBefore: fromTS(p.GetNotBefore()),
		NotAfter: fromTS(p.GetNotAfter()), CertSHA256: p.GetCertSha256(), Signer: p.GetSigner(),
		IssuerKeyID: p.GetIssuerKeyId(), Detail: p.GetDetail(), PrevHash: p.GetPrevHash(), Hash: p.GetHash(),
	}
}

func ts(t time.Time) *timestamppb.Timestamp {
	if t.IsZero() {
		return nil
	}
	return timestamppb.New(t)
}

func fromTS(t *timestamppb.Timestamp) time.Time {
	if t == nil {
		return time.Time{}
	}
	return t.AsTime().UTC()
}
