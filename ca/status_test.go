package ca_test

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"

	"google.golang.org/grpc/codes"

	"github.com/castellan-ca/castellan/ca"
)

func TestStatus(t *testing.T) {
	const secret = "token signature invalid for kid=abc"
	ref := func(kind error, reason, cause string) error {
		return &ca.Refusal{Kind: kind, Reason: reason, Err: errors.New(cause)}
	}
	tests := []struct {
		name       string
		err        error
		wantCode   codes.Code
		wantMsg    string
		wantReason string
	}{
		{name: "nil is OK", err: nil, wantCode: codes.OK, wantMsg: "", wantReason: ""},
		{name: "unauthenticated", err: ref(ca.ErrUnauthenticated, ca.ReasonAuthnFailed, secret),
			wantCode: codes.Unauthenticated, wantMsg: "request authenticate failure", wantReason: ca.ReasonAuthnFailed},
		{name: "no credentials", err: ref(ca.ErrUnauthenticated, ca.ReasonNoCredentials, secret),
			wantCode: codes.Unauthenticated, wantMsg: "request authenticate failure", wantReason: ca.ReasonNoCredentials},
		{name: "impersonation", err: ref(ca.ErrUnauthenticated, ca.ReasonImpersonation, "pod not on node "+secret),
			wantCode: codes.Unauthenticated, wantMsg: "request impersonation authentication failure", wantReason: ca.ReasonImpersonation},
		{name: "impersonation wrapped", err: fmt.Errorf("issue: %w", ref(ca.ErrUnauthenticated, ca.ReasonImpersonation, secret)),
			wantCode: codes.Unauthenticated, wantMsg: "request impersonation authentication failure", wantReason: ca.ReasonImpersonation},
		{name: "bare unauthenticated sentinel", err: ca.ErrUnauthenticated,
			wantCode: codes.Unauthenticated, wantMsg: "request authenticate failure", wantReason: "internal"},
		{name: "permission denied", err: ref(ca.ErrPermissionDenied, ca.ReasonNotOperator, secret),
			wantCode: codes.PermissionDenied, wantMsg: "permission denied", wantReason: ca.ReasonNotOperator},
		{name: "invalid request explains", err: ref(ca.ErrInvalidRequest, "csr.not_pem", "CSR is not PEM"),
			wantCode: codes.InvalidArgument, wantMsg: "CSR signing error (CSR is not PEM)", wantReason: "csr.not_pem"},
		{name: "invalid request wrapped twice", err: fmt.Errorf("a: %w", fmt.Errorf("b: %w", ref(ca.ErrInvalidRequest, ca.ReasonMetadata, "bad metadata"))),
			wantCode: codes.InvalidArgument, wantMsg: "CSR signing error (bad metadata)", wantReason: ca.ReasonMetadata},
		{name: "ttl too long", err: ref(ca.ErrTTLTooLong, ca.ReasonTTL, "too long"),
			wantCode: codes.InvalidArgument, wantMsg: "CSR signing error (too long)", wantReason: ca.ReasonTTL},
		{name: "key type", err: ref(ca.ErrKeyType, "csr.key", "RSA 1024"),
			wantCode: codes.InvalidArgument, wantMsg: "CSR signing error (RSA 1024)", wantReason: "csr.key"},
		{name: "overloaded", err: ref(ca.ErrOverloaded, ca.ReasonOverload, "512 in flight"),
			wantCode: codes.ResourceExhausted, wantMsg: "CA overloaded, retry later", wantReason: ca.ReasonOverload},
		{name: "unavailable", err: ref(ca.ErrUnavailable, ca.ReasonAuditDown, "disk full"),
			wantCode: codes.Unavailable, wantMsg: "CA temporarily unavailable, retry later", wantReason: ca.ReasonAuditDown},
		{name: "unavailable wrapping a cancellation", err: &ca.Refusal{Kind: ca.ErrUnavailable, Reason: ca.ReasonSignerDown, Err: context.Canceled},
			wantCode: codes.Unavailable, wantMsg: "CA temporarily unavailable, retry later", wantReason: ca.ReasonSignerDown},
		{name: "canceled", err: context.Canceled,
			wantCode: codes.Canceled, wantMsg: "request cancelled", wantReason: "request.cancelled"},
		{name: "canceled wrapped", err: fmt.Errorf("sign: %w", context.Canceled),
			wantCode: codes.Canceled, wantMsg: "request cancelled", wantReason: "request.cancelled"},
		{name: "deadline", err: context.DeadlineExceeded,
			wantCode: codes.DeadlineExceeded, wantMsg: "request deadline exceeded", wantReason: "request.cancelled"},
		{name: "internal refusal", err: ref(ca.ErrInternal, ca.ReasonSignerBadChain, "leaf key mismatch"),
			wantCode: codes.Internal, wantMsg: "CSR signing error (internal)", wantReason: ca.ReasonSignerBadChain},
		{name: "unclassified error", err: errors.New("boom " + secret),
			wantCode: codes.Internal, wantMsg: "CSR signing error (internal)", wantReason: "internal"},
		// The Kind of a Refusal picks the code (its documented contract): a
		// cause that happens to wrap another sentinel must not change it.
		{name: "internal refusal whose cause wraps a client sentinel", err: &ca.Refusal{Kind: ca.ErrInternal, Reason: ca.ReasonSignerError, Err: fmt.Errorf("backend: %w", ca.ErrKeyType)},
			wantCode: codes.Internal, wantMsg: "CSR signing error (internal)", wantReason: ca.ReasonSignerError},
		{name: "internal refusal whose cause is a cancellation", err: &ca.Refusal{Kind: ca.ErrInternal, Reason: ca.ReasonSignerError, Err: fmt.Errorf("backend: %w", context.Canceled)},
			wantCode: codes.Internal, wantMsg: "CSR signing error (internal)", wantReason: ca.ReasonSignerError},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			st := ca.Status(tc.err)
			if st.Code() != tc.wantCode || st.Message() != tc.wantMsg {
				t.Errorf("Status = %s %q, want %s %q", st.Code(), st.Message(), tc.wantCode, tc.wantMsg)
			}
			if got := ca.ReasonOf(tc.err); got != tc.wantReason {
				t.Errorf("ReasonOf = %q, want %q", got, tc.wantReason)
			}
			if tc.wantCode != codes.InvalidArgument && strings.Contains(st.Message(), secret) {
				t.Errorf("message %q leaks the cause", st.Message())
			}
			if len(st.Proto().GetDetails()) != 0 {
				t.Errorf("status carries %d details, want none", len(st.Proto().GetDetails()))
			}
		})
	}
}

func TestRefusalUnwrap(t *testing.T) {
	cause := errors.New("cause")
	err := fmt.Errorf("outer: %w", &ca.Refusal{Kind: ca.ErrInvalidRequest, Reason: "csr.parse", Err: cause})
	if !errors.Is(err, ca.ErrInvalidRequest) || !errors.Is(err, cause) {
		t.Errorf("errors.Is does not reach both the kind and the cause of %v", err)
	}
	if errors.Is(err, ca.ErrUnavailable) {
		t.Errorf("%v matches an unrelated kind", err)
	}
	if got, want := err.Error(), "outer: csr.parse: cause"; got != want {
		t.Errorf("Error() = %q, want %q", got, want)
	}
}
