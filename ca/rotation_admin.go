package ca

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/castellan-ca/castellan/authn"
	adminpb "github.com/castellan-ca/castellan/proto/castellan/admin/v1"
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

// Reasons of rotation failures.
const (
	// ReasonRotationRefused: a step refused as unsafe or impossible now.
	ReasonRotationRefused = "ca.rotate.refused"
	// ReasonCAStateDown: the CA state store failed.
	ReasonCAStateDown = "ca.state.unavailable"
)

// Rotation is the CA rotation workflow the admin API drives (package
// ca/rotation). Refusals wrap ErrPrecondition and say why; other errors are
// storage failures.
type Rotation interface {
	// Status reports every CA of the shared rotation state.
	Status(ctx context.Context) (*RotationStatus, error)
	// Rotate runs one step and returns the state after it.
	Rotate(ctx context.Context, req RotateRequest) (*RotationStatus, error)
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
	// Summary describes what the last step did (Rotate only).
	Summary string
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
}

// GetCAStatus returns the rotation state to an operator.
func (s *Server) GetCAStatus(ctx context.Context, _ *adminpb.GetCAStatusRequest) (*adminpb.GetCAStatusResponse, error) {
	if _, err := s.operator(ctx); err != nil {
		return nil, Status(err).Err()
	}
	st, err := s.Rotation.Status(ctx)
	if err != nil {
		return nil, Status(rotationError(err)).Err()
	}
	return &adminpb.GetCAStatusResponse{Status: statusToProto(st)}, nil
}

// RotateCA runs one rotation step for an operator.
func (s *Server) RotateCA(ctx context.Context, in *adminpb.RotateCARequest) (*adminpb.RotateCAResponse, error) {
	caller, err := s.operator(ctx)
	if err != nil {
		return nil, Status(err).Err()
	}
	st, err := s.Rotation.Rotate(ctx, RotateRequest{Step: in.GetStep(), Target: in.GetTarget(), Force: in.GetForce(), Caller: caller.Name})
	if err != nil {
		return nil, Status(rotationError(err)).Err()
	}
	return &adminpb.RotateCAResponse{Status: statusToProto(st)}, nil
}

// operator authenticates an operator and returns who it is; it refuses
// when no rotation workflow is configured.
func (s *Server) operator(ctx context.Context) (*authn.Caller, error) {
	caller, err := s.Issuer.cfg.Authenticator.Authenticate(ctx)
	switch {
	case errors.Is(err, authn.ErrUnavailable):
		return nil, refuse(ErrUnavailable, ReasonAuthnDown, err)
	case err != nil:
		return nil, refuse(ErrUnauthenticated, ReasonAuthnFailed, err)
	case !caller.Operator:
		return nil, refuse(ErrPermissionDenied, ReasonNotOperator, fmt.Errorf("%s is not an operator", caller.Name))
	case s.Rotation == nil:
		return nil, refuse(ErrPrecondition, ReasonRotationRefused, errors.New("CA rotation is not configured on this server"))
	}
	return caller, nil
}

// rotationError classifies a Rotation error: refusals keep their message
// for the operator, anything else is a storage failure worth a retry.
func rotationError(err error) error {
	if errors.Is(err, ErrPrecondition) {
		return refuse(ErrPrecondition, ReasonRotationRefused, err)
	}
	return refuse(ErrUnavailable, ReasonCAStateDown, err)
}

func statusToProto(st *RotationStatus) *adminpb.CAStatus {
	out := &adminpb.CAStatus{Backend: st.Backend, Version: st.Version, PropagationWindowSeconds: int64(st.PropagationWindow / time.Second),
		Schedule: st.Schedule, Summary: st.Summary}
	for _, c := range st.CAs {
		out.Cas = append(out.Cas, &adminpb.CAInfo{
			KeyId: c.KeyID, RootKeyId: c.RootKeyID, Role: c.Role, Source: c.Source, Phase: c.Phase, Subject: c.Subject,
			NotBefore: ts(c.NotBefore), NotAfter: ts(c.NotAfter), PreparedAt: ts(c.PreparedAt), ActivatedAt: ts(c.ActivatedAt),
			DeactivatedAt: ts(c.DeactivatedAt), RetiredAt: ts(c.RetiredAt), DependentsUntil: ts(c.DependentsUntil),
			NextStepAt: ts(c.NextStepAt), Issuing: c.Issuing,
		})
	}
	return out
}

// RotationStatusFromProto is the inverse of the conversion the server does, for castellanctl.
func RotationStatusFromProto(p *adminpb.CAStatus) *RotationStatus {
	st := &RotationStatus{Backend: p.GetBackend(), Version: p.GetVersion(), PropagationWindow: time.Duration(p.GetPropagationWindowSeconds()) * time.Second,
		Schedule: p.GetSchedule(), Summary: p.GetSummary()}
	for _, c := range p.GetCas() {
		st.CAs = append(st.CAs, CAStatus{
			KeyID: c.GetKeyId(), RootKeyID: c.GetRootKeyId(), Role: c.GetRole(), Source: c.GetSource(), Phase: c.GetPhase(), Subject: c.GetSubject(),
			NotBefore: fromTS(c.GetNotBefore()), NotAfter: fromTS(c.GetNotAfter()), PreparedAt: fromTS(c.GetPreparedAt()),
			ActivatedAt: fromTS(c.GetActivatedAt()), DeactivatedAt: fromTS(c.GetDeactivatedAt()), RetiredAt: fromTS(c.GetRetiredAt()),
			DependentsUntil: fromTS(c.GetDependentsUntil()), NextStepAt: fromTS(c.GetNextStepAt()), Issuing: c.GetIssuing(),
		})
	}
	return st
}
