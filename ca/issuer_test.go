package ca_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"net/url"
	"strings"
	"sync/atomic"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/structpb"

	"github.com/castellan-ca/castellan/authn"
	"github.com/castellan-ca/castellan/ca"
	"github.com/castellan-ca/castellan/internal/adminapi"
	"github.com/castellan-ca/castellan/signer"
	"github.com/castellan-ca/castellan/signer/signertest"
	"github.com/castellan-ca/castellan/storage"
	"github.com/castellan-ca/castellan/storage/embedded"
)

const (
	testPeer    = "10.1.2.3:40000"
	testCluster = "Kubernetes"
)

// signerFunc overrides a real signer's Sign (fault injection); TrustBundle stays real.
type signerFunc struct {
	signer.Signer
	sign func(ctx context.Context, req signer.SignRequest) (*signer.Chain, error)
}

func (s signerFunc) Sign(ctx context.Context, req signer.SignRequest) (*signer.Chain, error) {
	return s.sign(ctx, req)
}

// tamper has the real signer sign a modified request: a backend that deviates.
func tamper(mod func(req *signer.SignRequest, tmpl *x509.Certificate)) func(signer.Signer) signer.Signer {
	return func(inner signer.Signer) signer.Signer {
		return signerFunc{Signer: inner, sign: func(ctx context.Context, req signer.SignRequest) (*signer.Chain, error) {
			tmpl := *req.Template
			req.Template = &tmpl
			mod(&req, &tmpl)
			return inner.Sign(ctx, req)
		}}
	}
}

func failSigner(err error) func(signer.Signer) signer.Signer {
	return func(inner signer.Signer) signer.Signer {
		return signerFunc{Signer: inner, sign: func(context.Context, signer.SignRequest) (*signer.Chain, error) { return nil, err }}
	}
}

// blockingSigner signs with the real signer once release is closed, after
// announcing on entered that a call is inside Sign.
type blockingSigner struct {
	signer.Signer
	entered chan struct{}
	release chan struct{}
}

func newBlockingSigner(inner signer.Signer) *blockingSigner {
	return &blockingSigner{Signer: inner, entered: make(chan struct{}, 16), release: make(chan struct{})}
}

func (b *blockingSigner) Sign(ctx context.Context, req signer.SignRequest) (*signer.Chain, error) {
	b.entered <- struct{}{}
	<-b.release
	return b.Signer.Sign(ctx, req)
}

// failingAudit simulates an audit store that cannot commit.
type failingAudit struct{ err error }

func (f failingAudit) Append(context.Context, *storage.Record) error { return f.err }

// switchableAudit forwards to the real store until fail is set.
type switchableAudit struct {
	inner ca.AuditLog
	fail  atomic.Bool
}

func (s *switchableAudit) Append(ctx context.Context, rec *storage.Record) error {
	if s.fail.Load() {
		return errors.New("disk full")
	}
	return s.inner.Append(ctx, rec)
}

// nodeAuthz is a node authorizer with a fixed decision, counting its calls.
type nodeAuthz struct {
	err   error
	calls atomic.Int32
}

func (n *nodeAuthz) Authorize(context.Context, *authn.Caller, spiffeid.ID) error {
	n.calls.Add(1)
	return n.err
}

func withAuthz(n *nodeAuthz) func(*ca.Config) {
	return func(c *ca.Config) { c.NodeAuthorizer = n }
}

// metadata converts m the way the gRPC server does: through structpb.
func metadata(t testing.TB, m map[string]any) map[string]any {
	t.Helper()
	s, err := structpb.NewStruct(m)
	if err != nil {
		t.Fatal(err)
	}
	return s.AsMap()
}

// auditView is the part of a record a case states exactly.
func auditView(r storage.Record) storage.Record {
	return storage.Record{Kind: r.Kind, Peer: r.Peer, ClusterID: r.ClusterID, AuthMethod: r.AuthMethod, Caller: r.Caller,
		RequestedIdentity: r.RequestedIdentity, GrantedIdentity: r.GrantedIdentity, Outcome: r.Outcome,
		Reason: r.Reason, Code: r.Code, Signer: r.Signer}
}

// checkIssued asserts the response layout of DESIGN.md §2, the leaf profile and
// that the audit record describes exactly the returned leaf.
func checkIssued(t *testing.T, out *ca.Issued, roots []*x509.Certificate, id spiffeid.ID, now time.Time, ttl time.Duration, rec storage.Record) *x509.Certificate {
	t.Helper()
	if out == nil || out.Chain == nil || out.Chain.Leaf == nil {
		t.Fatal("no certificate returned")
	}
	els := out.Elements
	if len(els) < 2 {
		t.Fatalf("response has %d elements, want at least 2", len(els))
	}
	var parsed []*x509.Certificate
	for i, e := range els[:len(els)-1] {
		block, rest := pem.Decode([]byte(e))
		if block == nil || block.Type != "CERTIFICATE" || len(bytes.TrimSpace(rest)) != 0 {
			t.Fatalf("element %d is not exactly one PEM certificate: %q", i, e)
		}
		c, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			t.Fatalf("element %d: %v", i, err)
		}
		parsed = append(parsed, c)
	}
	if want := signer.EncodePEM(roots...); els[len(els)-1] != want {
		t.Fatalf("last element is not the whole bundle:\n%s\nwant\n%s", els[len(els)-1], want)
	}
	bundle, err := signer.ParseCertificatesPEM([]byte(els[len(els)-1]))
	if err != nil {
		t.Fatalf("bundle element: %v", err)
	}
	leaf := parsed[0]
	if !bytes.Equal(leaf.Raw, out.Chain.Leaf.Raw) {
		t.Error("first element is not Chain.Leaf")
	}
	if len(parsed)-1 != len(out.Chain.Intermediates) {
		t.Errorf("%d intermediate elements, chain has %d", len(parsed)-1, len(out.Chain.Intermediates))
	}
	pool, inter := x509.NewCertPool(), x509.NewCertPool()
	for _, r := range bundle {
		pool.AddCert(r)
	}
	for _, c := range parsed[1:] {
		inter.AddCert(c)
	}
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: pool, Intermediates: inter, CurrentTime: now,
		KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth, x509.ExtKeyUsageServerAuth}}); err != nil {
		t.Errorf("leaf does not verify to the returned bundle: %v", err)
	}
	if len(leaf.URIs) != 1 || leaf.URIs[0].String() != id.String() {
		t.Errorf("leaf URIs = %v, want [%s]", leaf.URIs, id)
	}
	if ski, err := signer.KeyID(leaf.PublicKey); err != nil || !bytes.Equal(leaf.SubjectKeyId, ski) {
		t.Errorf("leaf SubjectKeyId = %x, want the key's RFC 7093 id %x (%v)", leaf.SubjectKeyId, ski, err)
	}
	if !leaf.NotBefore.Equal(now.Add(-signer.DefaultClockSkew)) {
		t.Errorf("NotBefore = %s, want now-2m = %s", leaf.NotBefore, now.Add(-signer.DefaultClockSkew))
	}
	if ttl > 0 && !leaf.NotAfter.Equal(now.Add(ttl)) {
		t.Errorf("NotAfter = %s, want now+%s = %s", leaf.NotAfter, ttl, now.Add(ttl))
	}
	sum := sha256.Sum256(leaf.Raw)
	if rec.Serial != leaf.SerialNumber.Text(16) || rec.CertSHA256 != hex.EncodeToString(sum[:]) {
		t.Errorf("audit serial/sha256 = %s/%s, want %s/%x", rec.Serial, rec.CertSHA256, leaf.SerialNumber.Text(16), sum)
	}
	if !rec.NotBefore.Equal(leaf.NotBefore) || !rec.NotAfter.Equal(leaf.NotAfter) {
		t.Errorf("audit validity %s..%s, leaf %s..%s", rec.NotBefore, rec.NotAfter, leaf.NotBefore, leaf.NotAfter)
	}
	if rec.IssuerKeyID != hex.EncodeToString(leaf.AuthorityKeyId) || rec.IssuerKeyID == "" {
		t.Errorf("audit issuer key id %q, leaf AKI %x", rec.IssuerKeyID, leaf.AuthorityKeyId)
	}
	return leaf
}

type issueCase struct {
	name string
	opts harnessOpts
	// ctx is the caller's connection (default: a workload certificate for appID).
	ctx func(t *testing.T, h *harness) context.Context
	// req adjusts the request (default: a ztunnel CSR for appID, no metadata).
	req func(t *testing.T, h *harness, r *ca.Request)

	wantCode   codes.Code
	wantReason string
	wantKind   error  // errors.Is target besides the code's own kind
	wantMsg    string // exact status message when set
	// rec is the expected audit record (Kind, Peer, ClusterID filled in);
	// noRecord means the audit write itself fails.
	rec      storage.Record
	noRecord bool

	// For issued certificates: identity and lifetime of the leaf.
	id    spiffeid.ID
	ttl   time.Duration
	check func(t *testing.T, h *harness, leaf *x509.Certificate)
}

func TestIssue(t *testing.T) {
	csrKey := signertest.Key(7)
	app, other := appID.String(), otherID.String()
	csrFor := func(id spiffeid.ID) func(t *testing.T, h *harness, r *ca.Request) {
		return func(t *testing.T, h *harness, r *ca.Request) { r.CSR = ztunnelCSR(t, csrKey, id) }
	}
	withMeta := func(m map[string]any, csrID spiffeid.ID) func(t *testing.T, h *harness, r *ca.Request) {
		return func(t *testing.T, h *harness, r *ca.Request) {
			r.Metadata = metadata(t, m)
			r.CSR = ztunnelCSR(t, csrKey, csrID)
		}
	}
	validity := func(secs int64) func(t *testing.T, h *harness, r *ca.Request) {
		return func(t *testing.T, h *harness, r *ca.Request) { r.ValiditySeconds = secs }
	}
	noCert := func(*testing.T, *harness) context.Context { return peerCtx() }
	operator := func(t *testing.T, h *harness) context.Context { return peerCtx(h.operatorCert(t)) }
	mtls := func(outcome, code, reason, requested, granted string) storage.Record {
		return storage.Record{AuthMethod: authn.MethodMTLS, Caller: app, Outcome: outcome, Code: code, Reason: reason,
			RequestedIdentity: requested, GrantedIdentity: granted}
	}
	// signed marks a record of a request that reached the signer.
	signed := func(r storage.Record) storage.Record { r.Signer = "selfsigned"; return r }
	issued := func(requested, granted string) storage.Record {
		return signed(mtls(storage.OutcomeIssued, "OK", "", requested, granted))
	}
	badResult := signed(mtls(storage.OutcomeFailed, "Internal", ca.ReasonSignerBadChain, "", app))
	rogueRoot := newRoot(t, "Rogue", time.Time{})
	rogue := newLocalSigner(t, rogueRoot, []*x509.Certificate{rogueRoot.Cert}, nil, nil)
	var denyAll = func() *nodeAuthz { return &nodeAuthz{err: errors.New("pod not on the caller's node")} }

	tests := []issueCase{
		{name: "renew own identity", wantCode: codes.OK, rec: issued("", app), id: appID, ttl: ca.DefaultTTL},
		{name: "renew own identity with a pilot-agent RSA CSR", wantCode: codes.OK, rec: issued("", app), id: appID, ttl: ca.DefaultTTL,
			req: func(t *testing.T, h *harness, r *ca.Request) { r.CSR = pilotAgentCSR(t, leafKey("rsa-2048"), appID) },
			check: func(t *testing.T, h *harness, leaf *x509.Certificate) {
				if leaf.KeyUsage != x509.KeyUsageDigitalSignature|x509.KeyUsageKeyEncipherment {
					t.Errorf("RSA leaf KeyUsage = %b", leaf.KeyUsage)
				}
			}},
		{name: "CSR without SAN gets the granted one", wantCode: codes.OK, rec: issued("", app), id: appID, ttl: ca.DefaultTTL,
			req: func(t *testing.T, h *harness, r *ca.Request) { r.CSR = makeCSR(t, csrSpec{key: csrKey}) }},
		{name: "requested validity one hour", req: validity(3600), wantCode: codes.OK, rec: issued("", app), id: appID, ttl: time.Hour},
		{name: "requested validity zero means 24h", req: validity(0), wantCode: codes.OK, rec: issued("", app), id: appID, ttl: 24 * time.Hour},
		{name: "requested validity negative means 24h", req: validity(-1), wantCode: codes.OK, rec: issued("", app), id: appID, ttl: 24 * time.Hour},
		{name: "requested validity exactly max", req: validity(int64(ca.DefaultMaxTTL / time.Second)), wantCode: codes.OK, rec: issued("", app), id: appID, ttl: ca.DefaultMaxTTL},
		{name: "requested validity above max refused", req: validity(int64(ca.DefaultMaxTTL/time.Second) + 1),
			wantCode: codes.InvalidArgument, wantReason: ca.ReasonTTL, wantKind: ca.ErrTTLTooLong,
			rec: mtls(storage.OutcomeRefused, "InvalidArgument", ca.ReasonTTL, "", app)},
		{name: "requested validity above max clamped", req: validity(int64(ca.DefaultMaxTTL/time.Second) + 1),
			opts:     harnessOpts{config: func(c *ca.Config) { c.TTL.Mode = ca.TTLClamp }},
			wantCode: codes.OK, rec: issued("", app), id: appID, ttl: ca.DefaultMaxTTL},
		{name: "custom max clamped", req: validity(7 * 24 * 3600),
			opts:     harnessOpts{config: func(c *ca.Config) { c.TTL = ca.TTLPolicy{Max: 48 * time.Hour, Mode: ca.TTLClamp} }},
			wantCode: codes.OK, rec: issued("", app), id: appID, ttl: 48 * time.Hour},
		{name: "leaf never outlives the CA", req: validity(48 * 3600),
			opts:     harnessOpts{rootNotAfter: testNow.Add(10 * time.Hour)},
			wantCode: codes.OK, rec: issued("", app), id: appID,
			check: func(t *testing.T, h *harness, leaf *x509.Certificate) {
				if !leaf.NotAfter.Equal(h.root.Cert.NotAfter) {
					t.Errorf("NotAfter = %s, want the CA's %s", leaf.NotAfter, h.root.Cert.NotAfter)
				}
			}},

		{name: "no client certificate", ctx: noCert, wantCode: codes.Unauthenticated, wantReason: ca.ReasonNoCredentials,
			wantKind: authn.ErrNoCredentials, wantMsg: "request authenticate failure",
			rec: storage.Record{Outcome: storage.OutcomeRefused, Code: "Unauthenticated", Reason: ca.ReasonNoCredentials}},
		{name: "no peer", ctx: func(*testing.T, *harness) context.Context { return context.Background() },
			wantCode: codes.Unauthenticated, wantReason: ca.ReasonNoCredentials, wantMsg: "request authenticate failure",
			rec: storage.Record{Outcome: storage.OutcomeRefused, Code: "Unauthenticated", Reason: ca.ReasonNoCredentials}},
		{name: "certificate from another CA",
			ctx: func(t *testing.T, h *harness) context.Context {
				return peerCtx(signLeaf(t, newRoot(t, "Rogue", time.Time{}), signertest.Key(3), appID.URL(), nil))
			},
			wantCode: codes.Unauthenticated, wantReason: ca.ReasonAuthnFailed, wantMsg: "request authenticate failure",
			rec: storage.Record{AuthMethod: authn.MethodMTLS, Outcome: storage.OutcomeRefused, Code: "Unauthenticated", Reason: ca.ReasonAuthnFailed}},

		{name: "impersonation without node authorizer", req: withMeta(map[string]any{ca.MetaImpersonatedIdentity: other}, otherID),
			wantCode: codes.Unauthenticated, wantReason: ca.ReasonImpersonation, wantMsg: "request impersonation authentication failure",
			rec: mtls(storage.OutcomeRefused, "Unauthenticated", ca.ReasonImpersonation, other, "")},
		{name: "impersonating own identity needs no authorizer", req: withMeta(map[string]any{ca.MetaImpersonatedIdentity: app}, appID),
			wantCode: codes.OK, rec: issued(app, app), id: appID, ttl: ca.DefaultTTL},
		{name: "impersonation allowed by node authorizer", opts: harnessOpts{config: withAuthz(&nodeAuthz{})},
			req:      withMeta(map[string]any{ca.MetaImpersonatedIdentity: other, ca.MetaCertSigner: ""}, otherID),
			wantCode: codes.OK, rec: issued(other, other), id: otherID, ttl: ca.DefaultTTL},
		{name: "impersonation refused by node authorizer", opts: harnessOpts{config: withAuthz(denyAll())},
			req:      withMeta(map[string]any{ca.MetaImpersonatedIdentity: other}, otherID),
			wantCode: codes.Unauthenticated, wantReason: ca.ReasonImpersonation, wantMsg: "request impersonation authentication failure",
			rec: mtls(storage.OutcomeRefused, "Unauthenticated", ca.ReasonImpersonation, other, "")},
		{name: "node authorizer unavailable", opts: harnessOpts{config: withAuthz(&nodeAuthz{err: fmt.Errorf("informer: %w", authn.ErrUnavailable)})},
			req:      withMeta(map[string]any{ca.MetaImpersonatedIdentity: other}, otherID),
			wantCode: codes.Unavailable, wantReason: ca.ReasonAuthnDown,
			rec: mtls(storage.OutcomeFailed, "Unavailable", ca.ReasonAuthnDown, other, "")},
		{name: "impersonating another trust domain even if the authorizer allows", opts: harnessOpts{config: withAuthz(&nodeAuthz{})},
			req:      withMeta(map[string]any{ca.MetaImpersonatedIdentity: foreignID.String()}, foreignID),
			wantCode: codes.Unauthenticated, wantReason: ca.ReasonImpersonation, wantMsg: "request impersonation authentication failure",
			rec: mtls(storage.OutcomeRefused, "Unauthenticated", ca.ReasonImpersonation, foreignID.String(), "")},
		{name: "impersonating a path-like identity", opts: harnessOpts{config: withAuthz(&nodeAuthz{})},
			req:      withMeta(map[string]any{ca.MetaImpersonatedIdentity: "spiffe://cluster.local/ns/a/sa/b/sa/c"}, appID),
			wantCode: codes.Unauthenticated, wantReason: ca.ReasonImpersonation,
			rec: mtls(storage.OutcomeRefused, "Unauthenticated", ca.ReasonImpersonation, "spiffe://cluster.local/ns/a/sa/b/sa/c", "")},
		{name: "ImpersonatedIdentity as a number", req: withMeta(map[string]any{ca.MetaImpersonatedIdentity: 3}, appID),
			wantCode: codes.InvalidArgument, wantReason: ca.ReasonMetadata, wantKind: ca.ErrInvalidRequest,
			rec: mtls(storage.OutcomeRefused, "InvalidArgument", ca.ReasonMetadata, "", "")},
		{name: "CertSigner as a struct", req: withMeta(map[string]any{ca.MetaCertSigner: map[string]any{"a": "b"}}, appID),
			wantCode: codes.InvalidArgument, wantReason: ca.ReasonMetadata,
			rec: mtls(storage.OutcomeRefused, "InvalidArgument", ca.ReasonMetadata, "", "")},
		{name: "unknown metadata keys ignored", req: withMeta(map[string]any{"Foo": 1, "Bar": []any{"x"}, ca.MetaCertSigner: ""}, appID),
			wantCode: codes.OK, rec: issued("", app), id: appID, ttl: ca.DefaultTTL},

		{name: "CSR for another SAN", req: csrFor(otherID), wantCode: codes.InvalidArgument, wantReason: "csr.san_mismatch",
			rec: mtls(storage.OutcomeRefused, "InvalidArgument", "csr.san_mismatch", "", app)},
		{name: "CSR not PEM", req: func(t *testing.T, h *harness, r *ca.Request) { r.CSR = "hello" },
			wantCode: codes.InvalidArgument, wantReason: "csr.not_pem", wantMsg: "CSR signing error (CSR is not PEM)",
			rec: mtls(storage.OutcomeRefused, "InvalidArgument", "csr.not_pem", "", app)},
		{name: "CSR with a weak key", req: func(t *testing.T, h *harness, r *ca.Request) { r.CSR = ztunnelCSR(t, moreKeys().rsa1024, appID) },
			wantCode: codes.InvalidArgument, wantReason: "csr.key", wantKind: ca.ErrKeyType,
			rec: mtls(storage.OutcomeRefused, "InvalidArgument", "csr.key", "", app)},

		{name: "operator issues a named identity", ctx: operator,
			req: func(t *testing.T, h *harness, r *ca.Request) {
				r.OperatorOnly, r.Identity, r.CSR = true, other, ztunnelCSR(t, csrKey, otherID)
			},
			wantCode: codes.OK, id: otherID, ttl: ca.DefaultTTL,
			rec: storage.Record{AuthMethod: authn.MethodOperator, Caller: operatorID.String(), Outcome: storage.OutcomeIssued, Code: "OK",
				RequestedIdentity: other, GrantedIdentity: other, Signer: "selfsigned"}},
		{name: "operator without identity", ctx: operator,
			req:      func(t *testing.T, h *harness, r *ca.Request) { r.OperatorOnly = true },
			wantCode: codes.InvalidArgument, wantReason: ca.ReasonBadIdentity,
			rec: storage.Record{AuthMethod: authn.MethodOperator, Caller: operatorID.String(), Outcome: storage.OutcomeRefused,
				Code: "InvalidArgument", Reason: ca.ReasonBadIdentity}},
		{name: "operator asks for another trust domain", ctx: operator,
			req: func(t *testing.T, h *harness, r *ca.Request) {
				r.OperatorOnly, r.Identity, r.CSR = true, foreignID.String(), ztunnelCSR(t, csrKey, foreignID)
			},
			wantCode: codes.InvalidArgument, wantReason: ca.ReasonBadIdentity,
			rec: storage.Record{AuthMethod: authn.MethodOperator, Caller: operatorID.String(), Outcome: storage.OutcomeRefused,
				Code: "InvalidArgument", Reason: ca.ReasonBadIdentity, RequestedIdentity: foreignID.String()}},
		{name: "two different identities requested", ctx: operator,
			req: func(t *testing.T, h *harness, r *ca.Request) {
				r.OperatorOnly, r.Identity = true, other
				r.Metadata = metadata(t, map[string]any{ca.MetaImpersonatedIdentity: app})
			},
			wantCode: codes.InvalidArgument, wantReason: ca.ReasonMetadata,
			rec: storage.Record{AuthMethod: authn.MethodOperator, Caller: operatorID.String(), Outcome: storage.OutcomeRefused,
				Code: "InvalidArgument", Reason: ca.ReasonMetadata}},
		{name: "workload on the operator API", req: func(t *testing.T, h *harness, r *ca.Request) { r.OperatorOnly, r.Identity = true, app },
			wantCode: codes.PermissionDenied, wantReason: ca.ReasonNotOperator, wantMsg: "permission denied",
			rec: mtls(storage.OutcomeRefused, "PermissionDenied", ca.ReasonNotOperator, "", "")},

		{name: "audit store failing withholds the certificate", opts: harnessOpts{wrapAudit: func(ca.AuditLog) ca.AuditLog { return failingAudit{errors.New("disk full")} }},
			wantCode: codes.Unavailable, wantReason: ca.ReasonAuditDown, wantKind: ca.ErrUnavailable, noRecord: true},
		{name: "audit store failing keeps a refusal's code", ctx: noCert,
			opts:     harnessOpts{wrapAudit: func(ca.AuditLog) ca.AuditLog { return failingAudit{errors.New("disk full")} }},
			wantCode: codes.Unauthenticated, wantReason: ca.ReasonNoCredentials, noRecord: true},

		{name: "signer signs another SAN", opts: harnessOpts{wrapSigner: tamper(func(_ *signer.SignRequest, c *x509.Certificate) { c.URIs = []*url.URL{otherID.URL()} })},
			wantCode: codes.Internal, wantReason: ca.ReasonSignerBadChain, wantKind: ca.ErrInternal, wantMsg: "CSR signing error (internal)", rec: badResult},
		{name: "signer adds a DNS SAN", opts: harnessOpts{wrapSigner: tamper(func(_ *signer.SignRequest, c *x509.Certificate) { c.DNSNames = []string{"evil.example"} })},
			wantCode: codes.Internal, wantReason: ca.ReasonSignerBadChain, rec: badResult},
		{name: "signer certifies another key", opts: harnessOpts{wrapSigner: tamper(func(r *signer.SignRequest, _ *x509.Certificate) { r.PublicKey = signertest.Key(9).Public() })},
			wantCode: codes.Internal, wantReason: ca.ReasonSignerBadChain, rec: badResult},
		{name: "signer issues a CA certificate", opts: harnessOpts{wrapSigner: tamper(func(_ *signer.SignRequest, c *x509.Certificate) {
			c.IsCA, c.KeyUsage = true, c.KeyUsage|x509.KeyUsageCertSign
		})}, wantCode: codes.Internal, wantReason: ca.ReasonSignerBadChain, rec: badResult},
		{name: "signer extends the lifetime", opts: harnessOpts{wrapSigner: tamper(func(_ *signer.SignRequest, c *x509.Certificate) { c.NotAfter = c.NotAfter.Add(time.Hour) })},
			wantCode: codes.Internal, wantReason: ca.ReasonSignerBadChain, rec: badResult},
		{name: "signer drops clientAuth", opts: harnessOpts{wrapSigner: tamper(func(_ *signer.SignRequest, c *x509.Certificate) {
			c.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}
		})}, wantCode: codes.Internal, wantReason: ca.ReasonSignerBadChain, rec: badResult},
		{name: "signer chains to another root", opts: harnessOpts{wrapSigner: func(inner signer.Signer) signer.Signer {
			return signerFunc{Signer: inner, sign: rogue.Sign}
		}}, wantCode: codes.Internal, wantReason: ca.ReasonSignerBadChain, rec: badResult},
		{name: "signer returns no chain", opts: harnessOpts{wrapSigner: failSigner(nil)},
			wantCode: codes.Internal, wantReason: ca.ReasonSignerBadChain, rec: badResult},
		{name: "signer error", opts: harnessOpts{wrapSigner: failSigner(errors.New("HSM says no"))},
			wantCode: codes.Internal, wantReason: ca.ReasonSignerError, wantMsg: "CSR signing error (internal)",
			rec: signed(mtls(storage.OutcomeFailed, "Internal", ca.ReasonSignerError, "", app))},
		{name: "signer unavailable", opts: harnessOpts{wrapSigner: failSigner(fmt.Errorf("vault: %w", signer.ErrSignerUnavailable))},
			wantCode: codes.Unavailable, wantReason: ca.ReasonSignerDown, wantKind: signer.ErrSignerUnavailable,
			rec: signed(mtls(storage.OutcomeFailed, "Unavailable", ca.ReasonSignerDown, "", app))},
		{name: "signer deadline", opts: harnessOpts{wrapSigner: failSigner(fmt.Errorf("cas: %w", context.DeadlineExceeded))},
			wantCode: codes.Unavailable, wantReason: ca.ReasonSignerDown,
			rec: signed(mtls(storage.OutcomeFailed, "Unavailable", ca.ReasonSignerDown, "", app))},
		{name: "no active signer", opts: harnessOpts{config: func(c *ca.Config) { c.Authority = ca.NewAuthority() }},
			wantCode: codes.Unavailable, wantReason: ca.ReasonNoSigner,
			rec: storage.Record{AuthMethod: authn.MethodMTLS, Caller: app, Outcome: storage.OutcomeFailed, Code: "Unavailable",
				Reason: ca.ReasonNoSigner, GrantedIdentity: app}},
		// The caller's doing, not the signer's: a reason of its own, and Canceled.
		{name: "caller hung up: refused but still audited",
			ctx: func(t *testing.T, h *harness) context.Context {
				ctx, cancel := context.WithCancel(peerCtx(h.workloadCert(t, appID)))
				cancel()
				return ctx
			},
			wantCode: codes.Canceled, wantReason: ca.ReasonCallerGone, wantKind: context.Canceled,
			rec: signed(mtls(storage.OutcomeFailed, "Canceled", ca.ReasonCallerGone, "", app))},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			h := newHarness(t, tc.opts)
			ctx := peerCtx(h.workloadCert(t, appID))
			if tc.ctx != nil {
				ctx = tc.ctx(t, h)
			}
			req := ca.Request{CSR: ztunnelCSR(t, csrKey, appID), Peer: testPeer, ClusterID: testCluster}
			if tc.req != nil {
				tc.req(t, h, &req)
			}
			out, err := h.issuer.Issue(ctx, req)

			st := ca.Status(err)
			if st.Code() != tc.wantCode {
				t.Fatalf("code = %s (%v), want %s", st.Code(), err, tc.wantCode)
			}
			if got := ca.ReasonOf(err); got != tc.wantReason {
				t.Errorf("reason = %q, want %q (%v)", got, tc.wantReason, err)
			}
			if tc.wantKind != nil && !errors.Is(err, tc.wantKind) {
				t.Errorf("error %v does not wrap %v", err, tc.wantKind)
			}
			if tc.wantMsg != "" && st.Message() != tc.wantMsg {
				t.Errorf("message = %q, want %q", st.Message(), tc.wantMsg)
			}
			if err != nil && out != nil {
				t.Errorf("Issue returned a certificate with error %v", err)
			}

			recs := h.records(t)
			if tc.noRecord {
				if len(recs) != 0 {
					t.Errorf("%d records reached the store, want none", len(recs))
				}
				return
			}
			if len(recs) != 1 {
				t.Fatalf("audit log holds %d records, want 1", len(recs))
			}
			rec := recs[0]
			want := tc.rec
			want.Kind, want.Peer, want.ClusterID = storage.KindCSR, testPeer, testCluster
			if got := auditView(rec); got != want {
				t.Errorf("audit record\n got %+v\nwant %+v", got, want)
			}
			if !rec.Time.Equal(testNow) || len(rec.RequestID) != 24 || rec.Hash == "" || rec.Seq != 1 {
				t.Errorf("audit time/request id/hash/seq = %s/%q/%q/%d", rec.Time, rec.RequestID, rec.Hash, rec.Seq)
			}
			if err != nil {
				if rec.Serial != "" || rec.CertSHA256 != "" || rec.Detail == "" {
					t.Errorf("refusal record serial %q sha %q detail %q", rec.Serial, rec.CertSHA256, rec.Detail)
				}
				return
			}
			leaf := checkIssued(t, out, []*x509.Certificate{h.root.Cert}, tc.id, testNow, tc.ttl, rec)
			if !bytes.Equal(leaf.AuthorityKeyId, h.root.Cert.SubjectKeyId) {
				t.Errorf("leaf AKI %x, want the root's SKI %x", leaf.AuthorityKeyId, h.root.Cert.SubjectKeyId)
			}
			if tc.check != nil {
				tc.check(t, h, leaf)
			}
			if res, err := h.store.Verify(context.Background()); err != nil || !res.OK || res.Records != 1 {
				t.Errorf("audit chain verify = %+v, %v", res, err)
			}
		})
	}
}

// TestIssueAuditStoreClosed uses the real store after Close: the issued
// certificate must be withheld and nothing recorded.
func TestIssueAuditStoreClosed(t *testing.T) {
	dir := t.TempDir()
	h := newHarness(t, harnessOpts{})
	store, err := embedded.Open(context.Background(), dir+"/closed.db", embedded.Options{Writer: "closed"})
	if err != nil {
		t.Fatal(err)
	}
	h.cfg.Audit = store
	is, err := ca.NewIssuer(h.cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := store.Close(); err != nil {
		t.Fatal(err)
	}
	out, err := is.Issue(peerCtx(h.workloadCert(t, appID)), ca.Request{CSR: ztunnelCSR(t, signertest.Key(7), appID)})
	if out != nil {
		t.Fatal("certificate returned although its audit record was not committed")
	}
	if ca.Status(err).Code() != codes.Unavailable || ca.ReasonOf(err) != ca.ReasonAuditDown || !errors.Is(err, storage.ErrClosed) {
		t.Fatalf("err = %v (code %s, reason %q), want Unavailable audit.unavailable wrapping storage.ErrClosed",
			err, ca.Status(err).Code(), ca.ReasonOf(err))
	}
	reopened, err := embedded.Open(context.Background(), dir+"/closed.db", embedded.Options{Writer: "closed"})
	if err != nil {
		t.Fatal(err)
	}
	defer reopened.Close()
	if recs, err := reopened.List(context.Background(), storage.Query{}); err != nil || len(recs) != 0 {
		t.Fatalf("closed store holds %d records (%v), want 0", len(recs), err)
	}
}

func TestIssueIntermediateChain(t *testing.T) {
	h := newHarness(t, harnessOpts{})
	inter := h.root.NewIntermediate(t, "Issuing CA", signertest.CertOptions{NotBefore: testNow.Add(-time.Hour), NotAfter: testNow.Add(10 * 24 * time.Hour)})
	s := newLocalSigner(t, inter, []*x509.Certificate{h.root.Cert}, nil, h.clock.Now)
	if _, err := h.authority.Use("intermediate", s); err != nil {
		t.Fatal(err)
	}
	out, err := h.issuer.Issue(peerCtx(h.workloadCert(t, appID)), ca.Request{
		CSR: pilotAgentCSR(t, signertest.Key(8), appID), ValiditySeconds: 30 * 24 * 3600})
	if err != nil {
		t.Fatal(err)
	}
	rec := h.onlyRecord(t)
	leaf := checkIssued(t, out, []*x509.Certificate{h.root.Cert}, appID, testNow, 0, rec)
	if len(out.Elements) != 3 || out.Elements[1] != signer.EncodePEM(inter.Cert) {
		t.Fatalf("elements = %d, want [leaf, intermediate, bundle]", len(out.Elements))
	}
	if !leaf.NotAfter.Equal(inter.Cert.NotAfter) {
		t.Errorf("leaf NotAfter %s, want clamped to the intermediate's %s", leaf.NotAfter, inter.Cert.NotAfter)
	}
	if rec.Signer != "intermediate" || rec.IssuerKeyID != hex.EncodeToString(inter.Cert.SubjectKeyId) {
		t.Errorf("audit signer %q issuer key %q, want intermediate %x", rec.Signer, rec.IssuerKeyID, inter.Cert.SubjectKeyId)
	}
}

func TestIssueOverload(t *testing.T) {
	var blocker *blockingSigner
	h := newHarness(t, harnessOpts{
		wrapSigner: func(s signer.Signer) signer.Signer { blocker = newBlockingSigner(s); return blocker },
		config:     func(c *ca.Config) { c.MaxInFlight = 1 },
	})
	ctx := peerCtx(h.workloadCert(t, appID))
	req := ca.Request{CSR: ztunnelCSR(t, signertest.Key(7), appID)}
	type result struct {
		out *ca.Issued
		err error
	}
	first := make(chan result, 1)
	go func() { out, err := h.issuer.Issue(ctx, req); first <- result{out, err} }()
	<-blocker.entered

	second := make(chan result, 1)
	go func() { out, err := h.issuer.Issue(ctx, req); second <- result{out, err} }()
	var r result
	select {
	case r = <-second:
	case <-time.After(30 * time.Second):
		close(blocker.release)
		t.Fatal("second call queued behind the first instead of being refused")
	}
	if r.out != nil || ca.Status(r.err).Code() != codes.ResourceExhausted || ca.ReasonOf(r.err) != ca.ReasonOverload || !errors.Is(r.err, ca.ErrOverloaded) {
		t.Fatalf("second call = %v, %v; want ResourceExhausted overload", r.out, r.err)
	}
	close(blocker.release)
	if r := <-first; r.err != nil || r.out == nil {
		t.Fatalf("first call = %v, %v", r.out, r.err)
	}
	// The slot is free again.
	if _, err := h.issuer.Issue(ctx, req); err != nil {
		t.Fatalf("call after the overload: %v", err)
	}
	// The refusal is not audited per call (a flood would cost a record
	// each) but in the admission's next summary.
	recs := h.records(t)
	if len(recs) != 2 || recs[0].Outcome != storage.OutcomeIssued || recs[1].Outcome != storage.OutcomeIssued {
		t.Fatalf("audit records %+v, want the 2 issuances", recs)
	}
	h.issuer.Admission().Summarize(context.Background())
	sums := summaries(t, h, ca.ReasonOverload)
	if len(sums) != 1 || refusedIn(t, sums[0]) != 1 || sums[0].Code != "ResourceExhausted" || sums[0].Outcome != storage.OutcomeRefused {
		t.Errorf("overload summaries %+v, want one of 1 refused call", sums)
	}
}

// TestIssueSlotsReleasedOnError: refusals must give their slot back.
func TestIssueSlotsReleasedOnError(t *testing.T) {
	h := newHarness(t, harnessOpts{config: func(c *ca.Config) { c.MaxInFlight = 1 }})
	ctx := peerCtx(h.workloadCert(t, appID))
	for i := range 5 {
		if _, err := h.issuer.Issue(ctx, ca.Request{CSR: "bad"}); ca.ReasonOf(err) != "csr.not_pem" {
			t.Fatalf("call %d: %v", i, err)
		}
	}
	if _, err := h.issuer.Issue(ctx, ca.Request{CSR: ztunnelCSR(t, signertest.Key(7), appID)}); err != nil {
		t.Fatalf("after refusals: %v", err)
	}
}

func TestIssueAuthoritySwap(t *testing.T) {
	var blocker *blockingSigner
	h := newHarness(t, harnessOpts{wrapSigner: func(s signer.Signer) signer.Signer { blocker = newBlockingSigner(s); return blocker }})
	close(blocker.release) // not blocking until the mid-flight subtest re-arms it
	rootB := newRoot(t, "Castellan Test Root B", time.Time{})
	signerB := newLocalSigner(t, rootB, []*x509.Certificate{rootB.Cert}, nil, h.clock.Now)
	clientA := peerCtx(h.workloadCert(t, appID)) // issued by root A
	req := ca.Request{CSR: ztunnelCSR(t, signertest.Key(7), appID)}

	out, err := h.issuer.Issue(clientA, req)
	if err != nil {
		t.Fatal(err)
	}
	<-blocker.entered
	checkIssued(t, out, []*x509.Certificate{h.root.Cert}, appID, testNow, ca.DefaultTTL, h.records(t)[0])

	// A request in flight across the swap gets one consistent CA: the old one.
	blocker.release = make(chan struct{})
	inflight := make(chan *ca.Issued, 1)
	go func() {
		out, err := h.issuer.Issue(clientA, req)
		if err != nil {
			t.Errorf("in-flight request: %v", err)
		}
		inflight <- out
	}()
	<-blocker.entered
	st, err := h.authority.Use("selfsigned", signerB, h.root.Cert)
	if err != nil {
		t.Fatal(err)
	}
	if st.Generation != 2 || len(st.Roots) != 2 {
		t.Fatalf("state generation %d with %d roots, want 2 and 2", st.Generation, len(st.Roots))
	}
	close(blocker.release)
	if out := <-inflight; out != nil {
		if err := out.Chain.Leaf.CheckSignatureFrom(h.root.Cert); err != nil {
			t.Errorf("in-flight leaf not signed by the old CA: %v", err)
		}
		if last := out.Elements[len(out.Elements)-1]; last != signer.EncodePEM(h.root.Cert) {
			t.Error("in-flight response mixes the old leaf with the new bundle")
		}
	}

	// After the swap: signed by B, bundle holds B and the retained A, and the
	// A-issued client certificate still authenticates.
	out, err = h.issuer.Issue(clientA, req)
	if err != nil {
		t.Fatalf("after swap: %v", err)
	}
	recs := h.records(t)
	leaf := checkIssued(t, out, []*x509.Certificate{rootB.Cert, h.root.Cert}, appID, testNow, ca.DefaultTTL, recs[len(recs)-1])
	if err := leaf.CheckSignatureFrom(rootB.Cert); err != nil {
		t.Errorf("leaf after the swap not signed by the new CA: %v", err)
	}
	if recs[len(recs)-1].IssuerKeyID != hex.EncodeToString(rootB.Cert.SubjectKeyId) {
		t.Errorf("audit issuer key %q, want B's %x", recs[len(recs)-1].IssuerKeyID, rootB.Cert.SubjectKeyId)
	}

	// Retiring A: its client certificates stop authenticating.
	if _, err := h.authority.Use("selfsigned", signerB); err != nil {
		t.Fatal(err)
	}
	if _, err := h.issuer.Issue(clientA, req); ca.Status(err).Code() != codes.Unauthenticated || ca.ReasonOf(err) != ca.ReasonAuthnFailed {
		t.Fatalf("A-issued client after A retired: %v, want Unauthenticated authn.failed", err)
	}
	out, err = h.issuer.Issue(peerCtx(signLeaf(t, rootB, signertest.Key(3), appID.URL(), nil)), req)
	if err != nil {
		t.Fatal(err)
	}
	if last := out.Elements[len(out.Elements)-1]; last != signer.EncodePEM(rootB.Cert) {
		t.Error("bundle still holds the retired root")
	}
}

// TestIssueAuditFieldsValidUTF8: attacker-controlled strings pass through
// storage.Sanitize before they reach the audit record or the log: cut on a
// character boundary, so that the record can still be served by the admin
// API (proto3 strings must be UTF-8) and stored by a PostgreSQL TEXT column,
// and without control characters.
func TestIssueAuditFieldsValidUTF8(t *testing.T) {
	h := newHarness(t, harnessOpts{})
	requested := strings.Repeat("a", storage.MaxNameLen-1) + "é\x1b[31m" // the cut lands inside "é"
	cluster := "c\x00\n" + strings.Repeat("c", storage.MaxNameLen-3) + "é"
	_, err := h.issuer.Issue(peerCtx(h.workloadCert(t, appID)), ca.Request{
		CSR:       ztunnelCSR(t, signertest.Key(7), appID),
		Metadata:  metadata(t, map[string]any{ca.MetaImpersonatedIdentity: requested}),
		ClusterID: cluster,
	})
	if ca.ReasonOf(err) != ca.ReasonImpersonation {
		t.Fatalf("err = %v, want an impersonation refusal", err)
	}
	rec := h.onlyRecord(t)
	for name, v := range map[string]string{"requested_identity": rec.RequestedIdentity, "cluster_id": rec.ClusterID, "detail": rec.Detail} {
		if !utf8.ValidString(v) || strings.ContainsAny(v, "\x00\x1b\n") {
			t.Errorf("audit %s is not sanitised: ...%q", name, v[max(0, len(v)-8):])
		}
	}
	for name, got := range map[string][2]string{
		"requested_identity": {rec.RequestedIdentity, storage.Sanitize(requested, storage.MaxNameLen)},
		"cluster_id":         {rec.ClusterID, storage.Sanitize(cluster, storage.MaxNameLen)},
	} {
		if got[0] != got[1] || !strings.HasSuffix(got[0], storage.Truncated) {
			t.Errorf("audit %s = ...%q (%d bytes), want it cut to %d bytes ending in %q", name, got[0][max(0, len(got[0])-8):], len(got[0]), storage.MaxNameLen, storage.Truncated)
		}
	}
	if _, err := proto.Marshal(adminapi.RecordToProto(&rec)); err != nil {
		t.Errorf("record cannot be served by the admin API: %v", err)
	}
}
