package ca_test

import (
	"context"
	"crypto/x509"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc/codes"
	grpcmd "google.golang.org/grpc/metadata"
	"google.golang.org/protobuf/types/known/structpb"

	"github.com/castellan-ca/castellan/authn"
	"github.com/castellan-ca/castellan/ca"
	authpb "github.com/castellan-ca/castellan/proto/istio/v1/auth"
	"github.com/castellan-ca/castellan/signer"
	"github.com/castellan-ca/castellan/signer/signertest"
	"github.com/castellan-ca/castellan/storage"
)

// Headers the fuzzed authenticator reads: who the caller claims to be and
// whether it is an operator. Real authenticators prove this; here the
// fuzzer decides it, so that every path of the pipeline after
// authentication gets hostile input.
const (
	hdrCaller   = "x-fuzz-caller"
	hdrOperator = "x-fuzz-operator"
)

// headerAuthn authenticates from the request headers, as the seam every
// real authenticator sits behind.
type headerAuthn struct{}

func (headerAuthn) Authenticate(ctx context.Context) (*authn.Caller, error) {
	md, _ := grpcmd.FromIncomingContext(ctx)
	vals := md.Get(hdrCaller)
	if len(vals) == 0 {
		return nil, authn.ErrNoCredentials
	}
	if op := md.Get(hdrOperator); len(op) > 0 && op[0] == "yes" {
		return &authn.Caller{Method: "fuzz", Name: "operator " + vals[0], Operator: true}, nil
	}
	id, err := authn.ParseWorkloadID(td, vals[0])
	if err != nil {
		return nil, &authn.Failure{Method: "fuzz", Err: err}
	}
	return &authn.Caller{Method: "fuzz", Identity: id, Name: id.String()}, nil
}

// nodeCaller and nodeLocal: the node authorizer lets nodeCaller (a
// ztunnel) obtain identities in namespace "node-local", and nothing else.
var nodeCaller = spiffeid.RequireFromPath(td, "/ns/istio-system/sa/ztunnel")

type fuzzNodeAuthz struct{}

func (fuzzNodeAuthz) Authorize(_ context.Context, caller *authn.Caller, id spiffeid.ID) error {
	if mayImpersonate(caller.Identity, id) {
		return nil
	}
	return authn.ErrBadIdentity
}

func mayImpersonate(caller, id spiffeid.ID) bool {
	return caller == nodeCaller && strings.HasPrefix(id.Path(), "/ns/node-local/")
}

// countingAudit is an audit log in memory that keeps the number of records
// and the last one.
type countingAudit struct {
	mu   sync.Mutex
	n    int
	last storage.Record
}

func (c *countingAudit) Append(_ context.Context, rec *storage.Record) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.n++
	c.last = *rec
	return nil
}

func (c *countingAudit) state() (int, storage.Record) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.n, c.last
}

// metadataValue shapes the ImpersonatedIdentity metadata value by kind.
func metadataValue(kind uint8, s string) (any, bool) {
	switch kind % 6 {
	case 0:
		return s, true
	case 1:
		return float64(len(s)), true
	case 2:
		return s != "", true
	case 3:
		return map[string]any{"id": s}, true
	case 4:
		return []any{s, s}, true
	}
	return nil, false
}

// FuzzIssuePipeline drives CreateCertificate, the gRPC edge, with arbitrary
// CSR bytes, requested validity, request metadata and headers (the caller's
// claimed identity through the authenticator seam, clusterid, any other).
// Whatever comes in, the pipeline never panics, writes exactly one audit
// record per request, and issues only the identity the caller may have:
// its own, one it may impersonate, or any for an operator, always exactly
// the one recorded as granted, as the leaf's only SAN.
func FuzzIssuePipeline(f *testing.F) {
	key := signertest.Key(7)
	app, other, local := appID.String(), otherID.String(), "spiffe://cluster.local/ns/node-local/sa/web"
	localID := spiffeid.RequireFromString(local)
	// Arguments: CSR, validity, caller and operator headers, the requested
	// identity and the shape of its metadata value, one more header (and
	// metadata key) with its value.
	seed := func(csr string, validity int64, caller, operator, imp string, impKind uint8, header, value string) {
		f.Add(csr, validity, caller, operator, imp, impKind, header, value)
	}
	seed(ztunnelCSR(f, key, appID), 0, app, "", "", 5, "clusterid", "Kubernetes")
	seed(pilotAgentCSR(f, leafKey("rsa-2048"), appID), 3600, app, "", "", 0, "clusterid", "")
	seed(makeCSR(f, csrSpec{key: key}), -1, app, "", app, 0, "x-extra", "v")
	seed(ztunnelCSR(f, key, localID), 0, nodeCaller.String(), "", local, 0, "clusterid", "Kubernetes")
	seed(ztunnelCSR(f, key, otherID), 0, nodeCaller.String(), "", other, 0, "clusterid", "c")
	seed(ztunnelCSR(f, key, otherID), 0, app, "", other, 0, "clusterid", "c")
	seed(ztunnelCSR(f, key, otherID), 0, "operator", "yes", other, 0, "", "")
	seed(ztunnelCSR(f, key, appID), 0, app, "", app, 3, "clusterid", "\x00k")
	seed(ztunnelCSR(f, key, appID), 0, app, "", app, 0, "clusterid", "\xff")
	seed(csrWithExtensions(f, key, sanExtension(true, grantedURI(), hostileNames(f)["directoryName"])), 0, app, "", "", 5, "", "")
	seed("", 1<<62, "", "", "", 1, "authorization", "Bearer x")
	seed(strings.Repeat("-----BEGIN CERTIFICATE REQUEST-----\n", 3), 0, "spiffe://cluster.local/ns/a/sa/b/../../x", "", "", 2, "", "")

	root := newRoot(f, "Fuzz Root", time.Time{})
	audit := &countingAudit{}
	authority := ca.NewAuthority()
	if _, err := authority.Use("selfsigned", newLocalSigner(f, root, []*x509.Certificate{root.Cert}, nil, nil)); err != nil {
		f.Fatal(err)
	}
	issuer, err := ca.NewIssuer(ca.Config{TrustDomain: td, Authenticator: headerAuthn{}, NodeAuthorizer: fuzzNodeAuthz{},
		Audit: audit, Authority: authority})
	if err != nil {
		f.Fatal(err)
	}
	server := &ca.Server{Issuer: issuer}

	f.Fuzz(func(t *testing.T, csr string, validity int64, caller, operator, imp string, impKind uint8, header, value string) {
		md := grpcmd.MD{}
		if caller != "" {
			md.Append(hdrCaller, caller)
		}
		if operator != "" {
			md.Append(hdrOperator, operator)
		}
		if header != "" {
			md.Append(header, value)
		}
		meta := map[string]any{ca.MetaCertSigner: value, header: imp}
		if v, ok := metadataValue(impKind, imp); ok {
			meta[ca.MetaImpersonatedIdentity] = v
		}
		req := &authpb.IstioCertificateRequest{Csr: csr, ValidityDuration: validity}
		if s, err := structpb.NewStruct(meta); err == nil { // invalid UTF-8 never gets past gRPC's decoding
			req.Metadata = s
		}
		before, _ := audit.state()
		resp, err := server.CreateCertificate(grpcmd.NewIncomingContext(peerCtx(), md), req)
		after, rec := audit.state()
		if after != before+1 {
			t.Fatalf("%d audit records for one request", after-before)
		}
		if err != nil {
			if resp != nil || rec.Outcome == storage.OutcomeIssued || rec.Serial != "" || rec.Reason == "" {
				t.Fatalf("refusal %v with a response or a record of issuance: %+v", err, rec)
			}
			if code := ca.Status(err).Code(); code == codes.OK || code == codes.Unknown {
				t.Fatalf("refusal %v has code %s", err, code)
			}
			return
		}
		if rec.Outcome != storage.OutcomeIssued || len(resp.GetCertChain()) < 2 {
			t.Fatalf("issued %d elements, record %+v", len(resp.GetCertChain()), rec)
		}
		certs, err := signer.ParseCertificatesPEM([]byte(resp.GetCertChain()[0]))
		if err != nil || len(certs) != 1 {
			t.Fatalf("leaf element: %d certificates, %v", len(certs), err)
		}
		uri, present, err := onlyURISAN(certs[0].Extensions)
		if !present || err != nil || uri != rec.GrantedIdentity {
			t.Fatalf("leaf SAN %q (%v), recorded grant %q", uri, err, rec.GrantedIdentity)
		}
		// What the caller may have, from the request as the server saw it.
		claimed, requested := md.Get(hdrCaller)[0], ""
		if r, ok := req.GetMetadata().AsMap()[ca.MetaImpersonatedIdentity].(string); ok {
			requested = r
		}
		switch {
		case len(md.Get(hdrOperator)) > 0 && md.Get(hdrOperator)[0] == "yes":
			if uri != requested {
				t.Fatalf("operator got %s, asked for %q", uri, requested)
			}
		case requested == "" || requested == claimed:
			if uri != claimed {
				t.Fatalf("caller %q got %s", claimed, uri)
			}
		case uri != requested || !mayImpersonate(authnID(t, claimed), authnID(t, uri)):
			t.Fatalf("caller %q got %s, asking for %q", claimed, uri, requested)
		}
	})
}

// authnID parses a workload ID the pipeline accepted.
func authnID(t *testing.T, s string) spiffeid.ID {
	t.Helper()
	id, err := authn.ParseWorkloadID(td, s)
	if err != nil {
		t.Fatalf("the pipeline accepted %q: %v", s, err)
	}
	return id
}
