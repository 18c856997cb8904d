package ca

import (
	"context"
	"errors"
	"fmt"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Refusal is a classified pipeline failure: Kind (one of the Err* sentinels)
// picks the gRPC code, Reason is the audit reason code, Err the cause, which is
// logged and audited but shown to the client only for its own mistakes.
type Refusal struct {
	Kind   error
	Reason string
	Err    error
}

// Error is the reason code and the cause.
func (r *Refusal) Error() string { return r.Reason + ": " + r.Err.Error() }

// Unwrap exposes both the kind and the cause to errors.Is/As.
func (r *Refusal) Unwrap() []error { return []error{r.Kind, r.Err} }

// Refuse classifies err: kind (one of the Err* sentinels) picks the gRPC code
// and reason is the audit reason code.
func Refuse(kind error, reason string, err error) error {
	return &Refusal{Kind: kind, Reason: reason, Err: err}
}

// ReasonOf returns the audit reason code of err ("" for nil).
func ReasonOf(err error) string {
	if err == nil {
		return ""
	}
	var r *Refusal
	if errors.As(err, &r) {
		return r.Reason
	}
	if errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		return ReasonCallerGone
	}
	return "internal"
}

// Status is the one place that maps pipeline errors to gRPC statuses. Messages
// are fixed per kind (Istio's wording where operators grep for it); only the
// caller's own request mistakes are explained, never why authentication failed.
func Status(err error) *status.Status {
	if err == nil {
		return status.New(codes.OK, "")
	}
	// A Refusal's Kind alone picks the code: its cause may wrap other kinds
	// (a backend error wrapping context.Canceled must stay what we classified).
	var r *Refusal
	detail, kind := "", err
	if errors.As(err, &r) {
		detail, kind = r.Err.Error(), r.Kind
	}
	switch {
	case errors.Is(kind, ErrUnauthenticated):
		if r != nil && r.Reason == ReasonImpersonation {
			return status.New(codes.Unauthenticated, "request impersonation authentication failure")
		}
		return status.New(codes.Unauthenticated, "request authenticate failure")
	case errors.Is(kind, ErrPermissionDenied):
		return status.New(codes.PermissionDenied, "permission denied")
	case errors.Is(kind, ErrInvalidRequest), errors.Is(kind, ErrTTLTooLong), errors.Is(kind, ErrKeyType):
		return status.New(codes.InvalidArgument, fmt.Sprintf("CSR signing error (%s)", detail))
	case errors.Is(kind, ErrOverloaded):
		return status.New(codes.ResourceExhausted, "CA overloaded, retry later")
	case errors.Is(kind, ErrRateLimited):
		return status.New(codes.ResourceExhausted, "rate limit exceeded, retry later")
	case errors.Is(kind, ErrUnavailable):
		return status.New(codes.Unavailable, "CA temporarily unavailable, retry later")
	case errors.Is(kind, ErrNotFound):
		return status.New(codes.NotFound, "not found")
	case errors.Is(kind, ErrPrecondition):
		return status.New(codes.FailedPrecondition, detail)
	case errors.Is(kind, context.Canceled):
		return status.New(codes.Canceled, "request cancelled")
	case errors.Is(kind, context.DeadlineExceeded):
		return status.New(codes.DeadlineExceeded, "request deadline exceeded")
	default:
		return status.New(codes.Internal, "CSR signing error (internal)")
	}
}
