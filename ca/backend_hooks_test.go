package ca_test

import (
	"context"
	"crypto/x509/pkix"
	"errors"
	"fmt"
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc/codes"

	"github.com/castellan-ca/castellan/ca"
	"github.com/castellan-ca/castellan/signer"
	"github.com/castellan-ca/castellan/signer/signertest"
)

// subjectSigner is a backend that asks for a subject in workload leaves
// (signer.Subjecter) and names what it issued (Chain.BackendRef), as the AWS
// Private CA backend does; it signs with the real local signer.
type subjectSigner struct {
	signer.Signer
	subject pkix.Name
	ref     string
}

func (s subjectSigner) LeafSubject(spiffeid.ID) pkix.Name { return s.subject }

func (s subjectSigner) Sign(ctx context.Context, req signer.SignRequest) (*signer.Chain, error) {
	chain, err := s.Signer.Sign(ctx, req)
	if chain != nil {
		chain.BackendRef = s.ref
	}
	return chain, err
}

// TestBackendHooks covers what a backend may add to the profile and the
// audit record, and the refusal of a key the backend cannot certify.
func TestBackendHooks(t *testing.T) {
	org := pkix.Name{Organization: []string{td.Name()}}
	const arn = "arn:aws:acm-pca:eu-west-1:111122223333:certificate-authority/ca/certificate/0a1b"
	for _, tc := range []struct {
		name        string
		wrap        func(signer.Signer) signer.Signer
		wantCode    codes.Code
		wantReason  string
		wantSubject string
		wantDetail  string
	}{
		{name: "subject and backend reference",
			wrap:     func(in signer.Signer) signer.Signer { return subjectSigner{Signer: in, subject: org, ref: arn} },
			wantCode: codes.OK, wantSubject: "O=cluster.local", wantDetail: "backend_ref=" + arn},
		{name: "no hooks: empty subject, no detail",
			wrap:     func(in signer.Signer) signer.Signer { return in },
			wantCode: codes.OK},
		{name: "key the backend cannot certify",
			wrap:     failSigner(fmt.Errorf("aws pca signer: Ed25519: %w", signer.ErrUnsupportedKey)),
			wantCode: codes.InvalidArgument, wantReason: "csr.key"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := newHarness(t, harnessOpts{wrapSigner: tc.wrap})
			out, err := h.issuer.Issue(peerCtx(h.workloadCert(t, appID)),
				ca.Request{CSR: ztunnelCSR(t, signertest.Key(5), appID), Peer: testPeer, ClusterID: testCluster})
			if got := ca.Status(err).Code(); got != tc.wantCode {
				t.Fatalf("code = %v, want %v (%v)", got, tc.wantCode, err)
			}
			rec := h.onlyRecord(t)
			if err != nil {
				if ca.ReasonOf(err) != tc.wantReason || rec.Reason != tc.wantReason || out != nil {
					t.Errorf("reason %q, record reason %q, certificate returned %v; want %q and none", ca.ReasonOf(err), rec.Reason, out != nil, tc.wantReason)
				}
				if !errors.Is(err, ca.ErrKeyType) {
					t.Errorf("error %v does not wrap ca.ErrKeyType", err)
				}
				return
			}
			if got := out.Chain.Leaf.Subject.String(); got != tc.wantSubject {
				t.Errorf("leaf subject = %q, want %q", got, tc.wantSubject)
			}
			if rec.Detail != tc.wantDetail || out.Record.Detail != tc.wantDetail {
				t.Errorf("audit detail = %q (returned record %q), want %q", rec.Detail, out.Record.Detail, tc.wantDetail)
			}
		})
	}
}
