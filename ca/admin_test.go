package ca_test

import (
	"context"
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/castellan-ca/castellan/authn"
	"github.com/castellan-ca/castellan/ca"
	"github.com/castellan-ca/castellan/ca/admin"
	"github.com/castellan-ca/castellan/internal/adminapi"
	adminpb "github.com/castellan-ca/castellan/proto/castellan/admin/v1"
	"github.com/castellan-ca/castellan/signer/signertest"
	"github.com/castellan-ca/castellan/storage"
	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/types/known/timestamppb"
)

// fakeRotation records the request and answers with a fixed result.
type fakeRotation struct {
	got   adminapi.RotateRequest
	rekey adminapi.RekeyRequest
	err   error
	st    *adminapi.RotationStatus
}

func (f *fakeRotation) Rekey(_ context.Context, req adminapi.RekeyRequest) (*adminapi.RotationStatus, error) {
	f.rekey = req
	return f.st, f.err
}

func (f *fakeRotation) Status(context.Context) (*adminapi.RotationStatus, error) { return f.st, f.err }

func (f *fakeRotation) Rotate(_ context.Context, req adminapi.RotateRequest) (*adminapi.RotationStatus, error) {
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
	status := &adminapi.RotationStatus{Backend: "selfsigned", Version: 7, PropagationWindow: time.Hour, Schedule: true, Summary: "did it",
		SealedUnder: []string{"0123456789abcdef", "fedcba9876543210"},
		CAs: []adminapi.CAStatus{{KeyID: "ab", RootKeyID: "ab", Role: "root", Source: "managed", Phase: "active", Subject: "CN=r",
			NotBefore: at, NotAfter: at.Add(time.Hour), DependentsUntil: at.Add(time.Minute), NextStepAt: at.Add(2 * time.Minute), Issuing: true},
			{KeyID: "cd", RootKeyID: "ab", Role: "intermediate", Source: "managed", Phase: "active", Subject: "CN=i",
				NotBefore: at, NotAfter: at.Add(time.Hour), KeyURI: "pkcs11:id=cd;object=cd"}}}
	operator := peerCtx(h.operatorCert(t))
	workload := peerCtx(signLeaf(t, h.root, signertest.Key(3), appID.URL(), nil))

	for _, tc := range []struct {
		name     string
		ctx      context.Context
		rotation admin.Rotation
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
			s := &admin.Server{Issuer: h.issuer, Rotation: tc.rotation}
			resp, err := s.RotateCA(tc.ctx, &adminpb.RotateCARequest{Step: "activate", Target: "intermediate", Force: true})
			wantStatus(t, err, tc.wantCode, tc.wantMsg)
			_, serr := s.GetCAStatus(tc.ctx, &adminpb.GetCAStatusRequest{})
			wantStatus(t, serr, tc.wantCode, tc.wantMsg)
			rekeyed, rerr := s.RekeyCA(tc.ctx, &adminpb.RekeyCARequest{NewKekFile: "/etc/castellan/kek/next"})
			wantStatus(t, rerr, tc.wantCode, tc.wantMsg)
			if tc.wantCode != codes.OK {
				return
			}
			if got := tc.rotation.(*fakeRotation).got; got != (adminapi.RotateRequest{Step: "activate", Target: "intermediate", Force: true, Caller: operatorID.String()}) {
				t.Errorf("Rotate got %+v", got)
			}
			if got := tc.rotation.(*fakeRotation).rekey; got != (adminapi.RekeyRequest{NewKEKFile: "/etc/castellan/kek/next", Caller: operatorID.String()}) {
				t.Errorf("Rekey got %+v", got)
			}
			// What castellanctl reads back is what the rotation reported.
			for _, st := range []*adminpb.CAStatus{resp.GetStatus(), rekeyed.GetStatus()} {
				if back := adminapi.RotationStatusFromProto(st); fmt.Sprint(back) != fmt.Sprint(status) {
					t.Errorf("status round trip:\n%+v\nwant\n%+v", back, status)
				}
			}
		})
	}
}

// downAuthenticator is an authenticator whose backend cannot answer.
type downAuthenticator struct{}

func (downAuthenticator) Authenticate(context.Context) (*authn.Caller, error) {
	return nil, fmt.Errorf("tokenreview: %w", authn.ErrUnavailable)
}

// TestAdminAuthenticatorDown: when the authenticator cannot answer, every
// admin call answers Unavailable (worth a retry), PruneAuditLog included,
// and nothing is pruned or audited.
func TestAdminAuthenticatorDown(t *testing.T) {
	h := newHarness(t, harnessOpts{config: func(c *ca.Config) { c.Authenticator = downAuthenticator{} }})
	s := &admin.Server{Issuer: h.issuer, Audit: h.store, Rotation: &fakeRotation{}}
	ctx := peerCtx(h.operatorCert(t))
	before := timestamppb.New(h.clock.Now().Add(time.Hour))
	for name, call := range map[string]func() error{
		"PruneAuditLog": func() error {
			_, err := s.PruneAuditLog(ctx, &adminpb.PruneAuditLogRequest{Before: before})
			return err
		},
		"ListAuditRecords": func() error {
			_, err := s.ListAuditRecords(ctx, &adminpb.ListAuditRecordsRequest{})
			return err
		},
		"GetAuditRecord": func() error { _, err := s.GetAuditRecord(ctx, &adminpb.GetAuditRecordRequest{}); return err },
		"VerifyAuditLog": func() error { _, err := s.VerifyAuditLog(ctx, &adminpb.VerifyAuditLogRequest{}); return err },
		"GetTrustBundle": func() error { _, err := s.GetTrustBundle(ctx, &adminpb.GetTrustBundleRequest{}); return err },
		"GetCAStatus":    func() error { _, err := s.GetCAStatus(ctx, &adminpb.GetCAStatusRequest{}); return err },
		"RotateCA": func() error {
			_, err := s.RotateCA(ctx, &adminpb.RotateCARequest{Step: "prepare", Target: "root"})
			return err
		},
		"RekeyCA": func() error { _, err := s.RekeyCA(ctx, &adminpb.RekeyCARequest{Finish: true}); return err },
		"IssueCertificate": func() error {
			_, err := s.IssueCertificate(ctx, &adminpb.IssueCertificateRequest{Csr: ztunnelCSR(t, signertest.Key(7), appID), Identity: appID.String()})
			return err
		},
	} {
		t.Run(name, func(t *testing.T) {
			wantStatus(t, call(), codes.Unavailable, "CA temporarily unavailable, retry later")
		})
	}
	for _, r := range h.records(t) {
		if r.Kind == storage.KindOperator {
			t.Errorf("operator action audited without an authenticated operator: %+v", r)
		}
	}
}
