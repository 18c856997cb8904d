package ca_test

import (
	"context"
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/castellan-ca/castellan/ca"
	adminpb "github.com/castellan-ca/castellan/proto/castellan/admin/v1"
	"github.com/castellan-ca/castellan/signer/signertest"
	"google.golang.org/grpc/codes"
)

// fakeRotation records the request and answers with a fixed result.
type fakeRotation struct {
	got ca.RotateRequest
	err error
	st  *ca.RotationStatus
}

func (f *fakeRotation) Status(context.Context) (*ca.RotationStatus, error) { return f.st, f.err }

func (f *fakeRotation) Rotate(_ context.Context, req ca.RotateRequest) (*ca.RotationStatus, error) {
	f.got = req
	return f.st, f.err
}

// refusal mimics ca/rotation's refusals: it matches ErrPrecondition.
type refusal string

func (r refusal) Error() string        { return string(r) }
func (r refusal) Is(target error) bool { return target == ca.ErrPrecondition }

func TestServerRotation(t *testing.T) {
	h := newHarness(t, harnessOpts{})
	at := time.Date(2031, 5, 6, 7, 8, 9, 0, time.UTC)
	status := &ca.RotationStatus{Backend: "selfsigned", Version: 7, PropagationWindow: time.Hour, Schedule: true, Summary: "did it",
		CAs: []ca.CAStatus{{KeyID: "ab", RootKeyID: "ab", Role: "root", Source: "managed", Phase: "active", Subject: "CN=r",
			NotBefore: at, NotAfter: at.Add(time.Hour), DependentsUntil: at.Add(time.Minute), NextStepAt: at.Add(2 * time.Minute), Issuing: true}}}
	operator := peerCtx(h.operatorCert(t))
	workload := peerCtx(signLeaf(t, h.root, signertest.Key(3), appID.URL(), nil))

	for _, tc := range []struct {
		name     string
		ctx      context.Context
		rotation ca.Rotation
		wantCode codes.Code
		wantMsg  string
	}{
		{"operator", operator, &fakeRotation{st: status}, codes.OK, ""},
		{"workload", workload, &fakeRotation{st: status}, codes.PermissionDenied, "permission denied"},
		{"anonymous", peerCtx(), &fakeRotation{st: status}, codes.Unauthenticated, "request authenticate failure"},
		{"not configured", operator, nil, codes.FailedPrecondition, "CA rotation is not configured on this server"},
		{"refused step", operator, &fakeRotation{err: fmt.Errorf("wrapped: %w", refusal("root x was prepared at t; propagation window"))},
			codes.FailedPrecondition, "wrapped: root x was prepared at t; propagation window"},
		{"store down", operator, &fakeRotation{err: errors.New("connection refused")}, codes.Unavailable, "CA temporarily unavailable, retry later"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := &ca.Server{Issuer: h.issuer, Rotation: tc.rotation}
			resp, err := s.RotateCA(tc.ctx, &adminpb.RotateCARequest{Step: "activate", Target: "intermediate", Force: true})
			wantStatus(t, err, tc.wantCode, tc.wantMsg)
			_, serr := s.GetCAStatus(tc.ctx, &adminpb.GetCAStatusRequest{})
			wantStatus(t, serr, tc.wantCode, tc.wantMsg)
			if tc.wantCode != codes.OK {
				return
			}
			if got := tc.rotation.(*fakeRotation).got; got != (ca.RotateRequest{Step: "activate", Target: "intermediate", Force: true, Caller: operatorID.String()}) {
				t.Errorf("Rotate got %+v", got)
			}
			// What castellanctl reads back is what the rotation reported.
			back := ca.RotationStatusFromProto(resp.GetStatus())
			if fmt.Sprint(back) != fmt.Sprint(status) {
				t.Errorf("status round trip:\n%+v\nwant\n%+v", back, status)
			}
		})
	}
}
