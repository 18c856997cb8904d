// Package adminapi is the Go side of Castellan's admin API that both ends
// share: the rotation requests and statuses the server's rotation workflow
// speaks, and the conversions between them, audit records and their protobuf
// messages. It links neither the issuance pipeline nor authentication, so
// castellanctl, a thin client of the API, stays small.
package adminapi

import (
	"time"

	adminpb "github.com/castellan-ca/castellan/proto/castellan/admin/v1"
	"github.com/castellan-ca/castellan/storage"
	"google.golang.org/protobuf/types/known/timestamppb"
)

// Rotation steps and targets of RotateRequest (DESIGN.md §6).
const (
	// StepPrepare makes a new CA and adds its root to the trust bundle.
	StepPrepare = "prepare"
	// StepActivate switches issuance to the prepared CA.
	StepActivate = "activate"
	// StepRetire removes the previous CA (its root leaves the bundle).
	StepRetire = "retire"

	// TargetRoot rotates the root (and the intermediate under it, if any).
	TargetRoot = "root"
	// TargetIntermediate rotates the intermediate under the same root.
	TargetIntermediate = "intermediate"
)

// Audit reasons of rotation failures.
const (
	// ReasonRotationRefused: a step refused as unsafe or impossible now.
	ReasonRotationRefused = "ca.rotate.refused"
	// ReasonCAStateDown: the CA state store failed.
	ReasonCAStateDown = "ca.state.unavailable"
	// ReasonRekeyRefused: a KEK rekey step refused as unsafe or impossible now.
	ReasonRekeyRefused = "ca.rekey.refused"
)

// RekeyRequest is one operator step of a key-encryption key rotation.
type RekeyRequest struct {
	// NewKEKFile names a file on the server holding the new KEK; it must be
	// one of the server's configured KEK files. Empty with Finish.
	NewKEKFile string
	// Finish drops the sealings under every KEK but the rekey's new one.
	Finish bool
	// Caller names the operator, for the audit record.
	Caller string
}

// RotateRequest is one operator rotation step.
type RotateRequest struct {
	// Step is StepPrepare, StepActivate or StepRetire.
	Step string
	// Target is TargetRoot or TargetIntermediate.
	Target string
	// Force skips the safety check of the step (audited).
	Force bool
	// Caller names the operator, for the audit record.
	Caller string
}

// RotationStatus is the rotation state as operators see it.
type RotationStatus struct {
	// Backend is the signer backend ("selfsigned", "intermediate").
	Backend string
	// Version of the stored state; it increases with every change.
	Version uint64
	// PropagationWindow is how long a prepared CA waits before activation.
	PropagationWindow time.Duration
	// Schedule reports whether rotation steps run automatically.
	Schedule bool
	// CAs lists every CA, retired ones included, roots first.
	CAs []CAStatus
	// Summary describes what the last step did (Rotate and Rekey only).
	Summary string
	// SealedUnder lists the ids of the key-encryption keys the CA keys
	// sealed in the state are sealed under, the newest first ("" for
	// unencrypted keys); two during a rekey, none when the state seals no key
	// (keys a key provider holds have none: CAStatus.KeyURI).
	SealedUnder []string
}

// CAStatus is one CA of RotationStatus.
type CAStatus struct {
	// KeyID is the hex SubjectKeyId; RootKeyID that of the root it chains to.
	KeyID, RootKeyID string
	// Role, Source and Phase take the values of the storage.Role*,
	// storage.Source* and storage.Phase* constants.
	Role, Source, Phase string
	// Subject is the certificate's subject; NotBefore and NotAfter its validity.
	Subject             string
	NotBefore, NotAfter time.Time
	// Times of the phase changes; zero until reached.
	PreparedAt, ActivatedAt, DeactivatedAt, RetiredAt time.Time
	// DependentsUntil bounds the NotAfter of every workload certificate that
	// chains to this CA (zero: none issued).
	DependentsUntil time.Time
	// NextStepAt is when the next phase step becomes safe without --force
	// (activation of a prepared CA, retirement of a previous one), or when
	// the schedule prepares the successor of an active one; zero if none.
	NextStepAt time.Time
	// Issuing marks the CA that signs workload certificates now.
	Issuing bool
	// KeyURI is where a key provider (HSM, KMS) holds the CA's key; empty
	// for a key sealed in the state, an external CA and a retired one.
	KeyURI string
}

// RecordToProto converts an audit record for the admin API.
func RecordToProto(r *storage.Record) *adminpb.AuditRecord {
	return &adminpb.AuditRecord{
		Seq: r.Seq, Writer: r.Writer, Time: timestamp(r.Time), Kind: r.Kind, RequestId: r.RequestID, Peer: r.Peer,
		AuthMethod: r.AuthMethod, Caller: r.Caller, ClusterId: r.ClusterID, RequestedIdentity: r.RequestedIdentity,
		GrantedIdentity: r.GrantedIdentity, Outcome: r.Outcome, Reason: r.Reason, Code: r.Code, Serial: r.Serial,
		NotBefore: timestamp(r.NotBefore), NotAfter: timestamp(r.NotAfter), CertSha256: r.CertSHA256, Signer: r.Signer,
		IssuerKeyId: r.IssuerKeyID, Detail: r.Detail, PrevHash: r.PrevHash, Hash: r.Hash,
	}
}

// RecordFromProto is the inverse of RecordToProto, for castellanctl.
func RecordFromProto(p *adminpb.AuditRecord) storage.Record {
	return storage.Record{
		Seq: p.GetSeq(), Writer: p.GetWriter(), Time: fromTimestamp(p.GetTime()), Kind: p.GetKind(), RequestID: p.GetRequestId(),
		Peer: p.GetPeer(), AuthMethod: p.GetAuthMethod(), Caller: p.GetCaller(), ClusterID: p.GetClusterId(),
		RequestedIdentity: p.GetRequestedIdentity(), GrantedIdentity: p.GetGrantedIdentity(), Outcome: p.GetOutcome(),
		Reason: p.GetReason(), Code: p.GetCode(), Serial: p.GetSerial(), NotBefore: fromTimestamp(p.GetNotBefore()),
		NotAfter: fromTimestamp(p.GetNotAfter()), CertSHA256: p.GetCertSha256(), Signer: p.GetSigner(),
		IssuerKeyID: p.GetIssuerKeyId(), Detail: p.GetDetail(), PrevHash: p.GetPrevHash(), Hash: p.GetHash(),
	}
}

// PruneToProto describes a prune of the records before before for the admin
// API: its checkpoint (nil when nothing was old enough) and what it removed.
func PruneToProto(before time.Time, cp *storage.Checkpoint) *adminpb.PruneAuditLogResponse {
	out := &adminpb.PruneAuditLogResponse{Before: timestamp(before.UTC())}
	if cp == nil {
		return out
	}
	out.CheckpointId, out.Time, out.KeyId, out.Signature = cp.ID, timestamp(cp.Time), cp.KeyID, cp.Signature
	for _, e := range cp.Writers {
		out.Writers = append(out.Writers, &adminpb.AuditCheckpointEntry{Writer: e.Writer, Seq: e.Seq, Hash: e.Hash, Removed: e.Removed})
		out.Removed += e.Removed
	}
	return out
}

// StatusToProto converts a rotation status for the admin API.
func StatusToProto(st *RotationStatus) *adminpb.CAStatus {
	out := &adminpb.CAStatus{Backend: st.Backend, Version: st.Version, PropagationWindowSeconds: int64(st.PropagationWindow / time.Second),
		Schedule: st.Schedule, Summary: st.Summary, SealedUnder: st.SealedUnder}
	for _, c := range st.CAs {
		out.Cas = append(out.Cas, &adminpb.CAInfo{
			KeyId: c.KeyID, RootKeyId: c.RootKeyID, Role: c.Role, Source: c.Source, Phase: c.Phase, Subject: c.Subject,
			NotBefore: timestamp(c.NotBefore), NotAfter: timestamp(c.NotAfter), PreparedAt: timestamp(c.PreparedAt),
			ActivatedAt: timestamp(c.ActivatedAt), DeactivatedAt: timestamp(c.DeactivatedAt), RetiredAt: timestamp(c.RetiredAt),
			DependentsUntil: timestamp(c.DependentsUntil), NextStepAt: timestamp(c.NextStepAt), Issuing: c.Issuing, KeyUri: c.KeyURI,
		})
	}
	return out
}

// RotationStatusFromProto is the inverse of StatusToProto, for castellanctl.
func RotationStatusFromProto(p *adminpb.CAStatus) *RotationStatus {
	st := &RotationStatus{Backend: p.GetBackend(), Version: p.GetVersion(), PropagationWindow: time.Duration(p.GetPropagationWindowSeconds()) * time.Second,
		Schedule: p.GetSchedule(), Summary: p.GetSummary(), SealedUnder: p.GetSealedUnder()}
	for _, c := range p.GetCas() {
		st.CAs = append(st.CAs, CAStatus{
			KeyID: c.GetKeyId(), RootKeyID: c.GetRootKeyId(), Role: c.GetRole(), Source: c.GetSource(), Phase: c.GetPhase(), Subject: c.GetSubject(),
			NotBefore: fromTimestamp(c.GetNotBefore()), NotAfter: fromTimestamp(c.GetNotAfter()), PreparedAt: fromTimestamp(c.GetPreparedAt()),
			ActivatedAt: fromTimestamp(c.GetActivatedAt()), DeactivatedAt: fromTimestamp(c.GetDeactivatedAt()), RetiredAt: fromTimestamp(c.GetRetiredAt()),
			DependentsUntil: fromTimestamp(c.GetDependentsUntil()), NextStepAt: fromTimestamp(c.GetNextStepAt()), Issuing: c.GetIssuing(),
			KeyURI: c.GetKeyUri(),
		})
	}
	return st
}

// timestamp converts t for the admin API; the zero time becomes an unset field.
func timestamp(t time.Time) *timestamppb.Timestamp {
	if t.IsZero() {
		return nil
	}
	return timestamppb.New(t)
}

// fromTimestamp is the inverse of timestamp, in UTC.
func fromTimestamp(t *timestamppb.Timestamp) time.Time {
	if t == nil {
		return time.Time{}
	}
	return t.AsTime().UTC()
}
