package admin

import (
	"context"
	"errors"

	"github.com/castellan-ca/castellan/ca"
	"github.com/castellan-ca/castellan/internal/adminapi"
	"github.com/castellan-ca/castellan/internal/keyfile"
	adminpb "github.com/castellan-ca/castellan/proto/castellan/admin/v1"
	"github.com/castellan-ca/castellan/storage"
	"google.golang.org/protobuf/proto"
)

// ReasonNoCheckpointKey is the reason of a refused export or key request
// on a store without a checkpoint key.
const ReasonNoCheckpointKey = "audit.no_checkpoint_key"

// exportChunk bounds the records of one stream message, well below gRPC's
// default 4 MiB message limit for any record a store holds.
const exportChunk = 1 << 20

// ExportAuditLog streams the whole audit log, from one snapshot, to an
// operator: checkpoints first, records in chunks, the signed head last.
func (s *Server) ExportAuditLog(_ *adminpb.ExportAuditLogRequest, stream adminpb.AdminService_ExportAuditLogServer) error {
	ctx := stream.Context()
	if _, err := s.Issuer.Operator(ctx); err != nil {
		return ca.Status(err).Err()
	}
	err := s.Audit.Export(ctx, &exportStream{send: stream.Send})
	switch {
	case err == nil:
		return nil
	case errors.Is(err, storage.ErrNoCheckpointKey):
		return ca.Status(ca.Refuse(ca.ErrPrecondition, ReasonNoCheckpointKey, err)).Err()
	case ctx.Err() != nil:
		return ca.Status(ctx.Err()).Err() // the operator hung up
	}
	return auditDown("export audit log", err)
}

// exportStream is the storage.ExportSink of one ExportAuditLog call.
type exportStream struct {
	send  func(*adminpb.ExportAuditLogResponse) error
	msg   adminpb.ExportAuditLogResponse
	bytes int
}

// Checkpoint queues a checkpoint; they all go before the first record.
func (e *exportStream) Checkpoint(cp *storage.Checkpoint) error {
	e.msg.Checkpoints = append(e.msg.Checkpoints, adminapi.CheckpointToProto(cp))
	return nil
}

// Record queues a record, sending the message once it is big enough.
func (e *exportStream) Record(r *storage.Record) error {
	p := adminapi.RecordToProto(r)
	e.msg.Records = append(e.msg.Records, p)
	if e.bytes += proto.Size(p); e.bytes >= exportChunk {
		return e.flush()
	}
	return nil
}

// Head sends the last message, with the head.
func (e *exportStream) Head(h *storage.Head) error {
	e.msg.Head = adminapi.HeadToProto(h)
	return e.flush()
}

func (e *exportStream) flush() error {
	err := e.send(&e.msg)
	e.msg, e.bytes = adminpb.ExportAuditLogResponse{}, 0
	return err
}

// GetAuditCheckpointKey returns the checkpoint public key to an operator.
func (s *Server) GetAuditCheckpointKey(ctx context.Context, _ *adminpb.GetAuditCheckpointKeyRequest) (*adminpb.GetAuditCheckpointKeyResponse, error) {
	if _, err := s.Issuer.Operator(ctx); err != nil {
		return nil, ca.Status(err).Err()
	}
	pub := s.Audit.CheckpointPublicKey()
	if pub == nil {
		return nil, ca.Status(ca.Refuse(ca.ErrPrecondition, ReasonNoCheckpointKey, storage.ErrNoCheckpointKey)).Err()
	}
	pemBytes, err := keyfile.MarshalPublicKeyPEM(pub)
	if err != nil {
		return nil, ca.Status(err).Err()
	}
	return &adminpb.GetAuditCheckpointKeyResponse{PublicKeyPem: string(pemBytes), KeyId: storage.CheckpointKeyID(pub)}, nil
}
