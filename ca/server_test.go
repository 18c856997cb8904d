package ca_test

import (
	"context"
	"crypto"
	"crypto/tls"
	"crypto/x509"
	"log/slog"
	"net"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	grpcmd "google.golang.org/grpc/metadata"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/structpb"

	"github.com/castellan-ca/castellan/ca"
	"github.com/castellan-ca/castellan/ca/admin"
	"github.com/castellan-ca/castellan/internal/adminapi"
	adminpb "github.com/castellan-ca/castellan/proto/castellan/admin/v1"
	authpb "github.com/castellan-ca/castellan/proto/istio/v1/auth"
	"github.com/castellan-ca/castellan/signer"
	"github.com/castellan-ca/castellan/signer/signertest"
	"github.com/castellan-ca/castellan/storage"
)

const serviceName = "istiod.istio-system.svc"

// grpcCA is the CA served over real TLS and gRPC on 127.0.0.1.
type grpcCA struct {
	*harness
	addr string
}

func startServer(t *testing.T) *grpcCA {
	t.Helper()
	h := newHarness(t, harnessOpts{})
	sc := &ca.ServingCert{Issuer: h.issuer, DNSNames: []string{serviceName}, Logger: slog.New(slog.DiscardHandler)}
	srv := grpc.NewServer(
		grpc.Creds(credentials.NewTLS(&tls.Config{GetCertificate: sc.GetCertificate, ClientAuth: tls.RequestClientCert, MinVersion: tls.VersionTLS12})),
		grpc.MaxRecvMsgSize(64<<10),
	)
	authpb.RegisterIstioCertificateServiceServer(srv, &ca.Server{Issuer: h.issuer})
	adminpb.RegisterAdminServiceServer(srv, &admin.Server{Issuer: h.issuer, Audit: h.store})
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { defer close(done); _ = srv.Serve(lis) }()
	t.Cleanup(func() { srv.Stop(); <-done })
	return &grpcCA{harness: h, addr: lis.Addr().String()}
}

// clientTLS trusts the harness root, checks the service name and presents cert (if any).
func (g *grpcCA) clientTLS(cert *x509.Certificate, key crypto.Signer) *tls.Config {
	pool := x509.NewCertPool()
	pool.AddCert(g.root.Cert)
	cfg := &tls.Config{RootCAs: pool, ServerName: serviceName}
	if cert != nil {
		cfg.Certificates = []tls.Certificate{{Certificate: [][]byte{cert.Raw}, PrivateKey: key, Leaf: cert}}
	}
	return cfg
}

func (g *grpcCA) dial(t *testing.T, creds credentials.TransportCredentials) *grpc.ClientConn {
	t.Helper()
	conn, err := grpc.NewClient(g.addr, grpc.WithTransportCredentials(creds))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = conn.Close() })
	return conn
}

func (g *grpcCA) workload(t *testing.T) *tls.Config {
	return g.clientTLS(g.workloadCert(t, appID), signertest.Key(3))
}

func (g *grpcCA) operator(t *testing.T) *tls.Config {
	return g.clientTLS(g.operatorCert(t), signertest.Key(4))
}

func testCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func wantStatus(t *testing.T, err error, code codes.Code, msgPrefix string) {
	t.Helper()
	st, _ := status.FromError(err)
	if st.Code() != code || !strings.HasPrefix(st.Message(), msgPrefix) {
		t.Fatalf("status = %s %q, want %s %q…", st.Code(), st.Message(), code, msgPrefix)
	}
}

func TestServerCreateCertificate(t *testing.T) {
	g := startServer(t)
	client := authpb.NewIstioCertificateServiceClient(g.dial(t, credentials.NewTLS(g.workload(t))))
	csr := ztunnelCSR(t, signertest.Key(7), appID)

	t.Run("issued", func(t *testing.T) {
		md, err := structpb.NewStruct(map[string]any{ca.MetaCertSigner: "", "Custom": 1})
		if err != nil {
			t.Fatal(err)
		}
		ctx := grpcmd.AppendToOutgoingContext(testCtx(t), "clusterid", "Kubernetes")
		var p peer.Peer
		resp, err := client.CreateCertificate(ctx, &authpb.IstioCertificateRequest{Csr: csr, ValidityDuration: 3600, Metadata: md}, grpc.Peer(&p))
		if err != nil {
			t.Fatalf("CreateCertificate: %v", err)
		}
		recs, err := g.store.List(context.Background(), storage.Query{Identity: appID.String()})
		if err != nil || len(recs) != 1 {
			t.Fatalf("audit records for %s: %d, %v", appID, len(recs), err)
		}
		checkIssued(t, &ca.Issued{Chain: &signer.Chain{Leaf: mustParsePEM(t, resp.CertChain[0])}, Elements: resp.CertChain},
			[]*x509.Certificate{g.root.Cert}, appID, testNow, time.Hour, recs[0])
		if recs[0].ClusterID != "Kubernetes" || !strings.HasPrefix(recs[0].Peer, "127.0.0.1:") || recs[0].Peer == p.Addr.String() {
			// The audited peer is the client's address, not the server's.
			t.Errorf("audit cluster %q peer %q (server %s)", recs[0].ClusterID, recs[0].Peer, p.Addr)
		}
	})
	t.Run("metadata of the wrong type", func(t *testing.T) {
		md, _ := structpb.NewStruct(map[string]any{ca.MetaImpersonatedIdentity: 42})
		_, err := client.CreateCertificate(testCtx(t), &authpb.IstioCertificateRequest{Csr: csr, Metadata: md})
		wantStatus(t, err, codes.InvalidArgument, "CSR signing error (metadata \"ImpersonatedIdentity\" must be a string")
	})
	t.Run("impersonation", func(t *testing.T) {
		md, _ := structpb.NewStruct(map[string]any{ca.MetaImpersonatedIdentity: otherID.String()})
		_, err := client.CreateCertificate(testCtx(t), &authpb.IstioCertificateRequest{Csr: ztunnelCSR(t, signertest.Key(7), otherID), Metadata: md})
		wantStatus(t, err, codes.Unauthenticated, "request impersonation authentication failure")
		if st, _ := status.FromError(err); st.Message() != "request impersonation authentication failure" {
			t.Errorf("message %q leaks detail", st.Message())
		}
	})
	t.Run("without client certificate", func(t *testing.T) {
		anon := authpb.NewIstioCertificateServiceClient(g.dial(t, credentials.NewTLS(g.clientTLS(nil, nil))))
		_, err := anon.CreateCertificate(testCtx(t), &authpb.IstioCertificateRequest{Csr: csr})
		wantStatus(t, err, codes.Unauthenticated, "request authenticate failure")
	})
	t.Run("oversized message", func(t *testing.T) {
		before := len(g.records(t))
		_, err := client.CreateCertificate(testCtx(t), &authpb.IstioCertificateRequest{Csr: strings.Repeat("A", 100<<10)})
		wantStatus(t, err, codes.ResourceExhausted, "")
		if after := len(g.records(t)); after != before {
			t.Errorf("oversized request reached the pipeline: %d new records", after-before)
		}
	})
	t.Run("plaintext client", func(t *testing.T) {
		plain := authpb.NewIstioCertificateServiceClient(g.dial(t, insecure.NewCredentials()))
		_, err := plain.CreateCertificate(testCtx(t), &authpb.IstioCertificateRequest{Csr: csr})
		wantStatus(t, err, codes.Unavailable, "")
	})
	for _, v := range []struct {
		name    string
		version uint16
	}{{"TLS 1.2 only (pilot-agent FIPS)", tls.VersionTLS12}, {"TLS 1.3 only (ztunnel)", tls.VersionTLS13}} {
		t.Run(v.name, func(t *testing.T) {
			cfg := g.workload(t)
			cfg.MinVersion, cfg.MaxVersion = v.version, v.version
			c := authpb.NewIstioCertificateServiceClient(g.dial(t, credentials.NewTLS(cfg)))
			var p peer.Peer
			resp, err := c.CreateCertificate(testCtx(t), &authpb.IstioCertificateRequest{Csr: csr}, grpc.Peer(&p))
			if err != nil {
				t.Fatalf("CreateCertificate: %v", err)
			}
			if len(resp.CertChain) < 2 {
				t.Errorf("%d elements", len(resp.CertChain))
			}
			info, ok := p.AuthInfo.(credentials.TLSInfo)
			if !ok || info.State.Version != v.version || info.State.NegotiatedProtocol != "h2" {
				t.Errorf("negotiated %x/%q, want %x/h2", info.State.Version, info.State.NegotiatedProtocol, v.version)
			}
		})
	}
}

func mustParsePEM(t *testing.T, s string) *x509.Certificate {
	t.Helper()
	certs, err := signer.ParseCertificatesPEM([]byte(s))
	if err != nil || len(certs) != 1 {
		t.Fatalf("element: %d certificates, %v", len(certs), err)
	}
	return certs[0]
}

func TestServerAdmin(t *testing.T) {
	g := startServer(t)
	op := adminpb.NewAdminServiceClient(g.dial(t, credentials.NewTLS(g.operator(t))))
	wl := adminpb.NewAdminServiceClient(g.dial(t, credentials.NewTLS(g.workload(t))))
	anon := adminpb.NewAdminServiceClient(g.dial(t, credentials.NewTLS(g.clientTLS(nil, nil))))

	t.Run("operator", func(t *testing.T) {
		resp, err := op.IssueCertificate(testCtx(t), &adminpb.IssueCertificateRequest{
			Csr: ztunnelCSR(t, signertest.Key(7), otherID), Identity: otherID.String(), ValiditySeconds: 600})
		if err != nil {
			t.Fatalf("IssueCertificate: %v", err)
		}
		leaf := mustParsePEM(t, resp.CertChain[0])
		if len(leaf.URIs) != 1 || leaf.URIs[0].String() != otherID.String() {
			t.Errorf("issued %v, want %s", leaf.URIs, otherID)
		}
		_, err = op.IssueCertificate(testCtx(t), &adminpb.IssueCertificateRequest{Csr: ztunnelCSR(t, signertest.Key(7), otherID)})
		wantStatus(t, err, codes.InvalidArgument, "CSR signing error (")

		before := time.Now()
		tb, err := op.GetTrustBundle(testCtx(t), &adminpb.GetTrustBundleRequest{})
		if err != nil {
			t.Fatalf("GetTrustBundle: %v", err)
		}
		after := time.Now()
		if tb.BundlePem != signer.EncodePEM(g.root.Cert) || tb.TrustDomain != "cluster.local" {
			t.Errorf("trust bundle %q for %q", tb.BundlePem, tb.TrustDomain)
		}
		// The same clock on both sides: the server's time falls within the call.
		if st := tb.GetServerTime().AsTime(); st.Before(before.Truncate(time.Microsecond)) || st.After(after) {
			t.Errorf("server time %v, want within the call [%v, %v]", st, before, after)
		}

		list, err := op.ListAuditRecords(testCtx(t), &adminpb.ListAuditRecordsRequest{Identity: otherID.String(), Outcome: storage.OutcomeIssued})
		if err != nil {
			t.Fatalf("ListAuditRecords: %v", err)
		}
		if len(list.Records) != 1 || list.Records[0].Serial != leaf.SerialNumber.Text(16) || list.Records[0].Caller != operatorID.String() {
			t.Fatalf("records = %v, want the one issuance of serial %x by the operator", list.Records, leaf.SerialNumber)
		}
		stored := g.records(t)
		var want storage.Record
		for _, r := range stored {
			if r.Seq == list.Records[0].Seq {
				want = r
			}
		}
		if got, err := adminapi.RecordFromProto(list.Records[0]); err != nil || got.Hash != want.Hash || got.ComputeHash() != want.Hash {
			t.Errorf("record does not survive the admin API intact: hash %q recomputed %q, stored %q", got.Hash, got.ComputeHash(), want.Hash)
		}

		v, err := op.VerifyAuditLog(testCtx(t), &adminpb.VerifyAuditLogRequest{})
		if err != nil {
			t.Fatalf("VerifyAuditLog: %v", err)
		}
		if !v.Ok || v.Records != int64(len(stored)) || v.Writers != 1 {
			t.Errorf("verify = ok %v records %d writers %d, want ok with %d records", v.Ok, v.Records, v.Writers, len(stored))
		}
	})

	for _, c := range []struct {
		name   string
		client adminpb.AdminServiceClient
		code   codes.Code
		msg    string
	}{
		{"workload certificate", wl, codes.PermissionDenied, "permission denied"},
		{"no certificate", anon, codes.Unauthenticated, "request authenticate failure"},
	} {
		t.Run(c.name, func(t *testing.T) {
			_, err := c.client.GetTrustBundle(testCtx(t), &adminpb.GetTrustBundleRequest{})
			wantStatus(t, err, c.code, c.msg)
			_, err = c.client.ListAuditRecords(testCtx(t), &adminpb.ListAuditRecordsRequest{})
			wantStatus(t, err, c.code, c.msg)
			_, err = c.client.VerifyAuditLog(testCtx(t), &adminpb.VerifyAuditLogRequest{})
			wantStatus(t, err, c.code, c.msg)
			_, err = c.client.IssueCertificate(testCtx(t), &adminpb.IssueCertificateRequest{
				Csr: ztunnelCSR(t, signertest.Key(7), appID), Identity: appID.String()})
			wantStatus(t, err, c.code, c.msg)
		})
	}
}

// TestServerAuditListSurvivesHostileInput: whatever a workload puts in its
// request metadata, operators can still list the audit log.
func TestServerAuditListSurvivesHostileInput(t *testing.T) {
	g := startServer(t)
	wl := authpb.NewIstioCertificateServiceClient(g.dial(t, credentials.NewTLS(g.workload(t))))
	md, err := structpb.NewStruct(map[string]any{ca.MetaImpersonatedIdentity: strings.Repeat("a", 2047) + "é"})
	if err != nil {
		t.Fatal(err)
	}
	_, err = wl.CreateCertificate(testCtx(t), &authpb.IstioCertificateRequest{Csr: ztunnelCSR(t, signertest.Key(7), appID), Metadata: md})
	wantStatus(t, err, codes.Unauthenticated, "request impersonation authentication failure")

	op := adminpb.NewAdminServiceClient(g.dial(t, credentials.NewTLS(g.operator(t))))
	list, err := op.ListAuditRecords(testCtx(t), &adminpb.ListAuditRecordsRequest{})
	if err != nil {
		t.Fatalf("ListAuditRecords after a hostile request: %v", err)
	}
	if n := len(g.records(t)); len(list.Records) != n {
		t.Errorf("listed %d records, store holds %d", len(list.Records), n)
	}
}
