package e2e

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"os"
	"path/filepath"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/structpb"
	pb "istio.io/api/security/v1alpha1"
	"istio.io/istio/pkg/security"
	"istio.io/istio/security/pkg/credentialfetcher"
	"istio.io/istio/security/pkg/nodeagent/caclient/providers/citadel"
	"istio.io/istio/security/pkg/pki/util"
)

// codeOK is what the tests record for a successful call.
const codeOK = "OK"

// sidecarSign has Istio's own CA client, set up as pilot-agent in a pod is
// (projected token file read by Istio's JWT credential fetcher, cluster id,
// the mesh root as trust anchor), request a certificate for csrID. It
// returns the gRPC code name and the response.
func sidecarSign(t *testing.T, srv *server, token, clusterID, csrID string) (string, []string) {
	t.Helper()
	tokenFile := filepath.Join(t.TempDir(), "istio-token")
	if err := os.WriteFile(tokenFile, []byte(token), 0o600); err != nil {
		t.Fatal(err)
	}
	fetcher, err := credentialfetcher.NewCredFetcher(security.JWT, trustDomain, tokenFile, "")
	if err != nil {
		t.Fatal(err)
	}
	client, err := citadel.NewCitadelClient(&security.Options{
		CAEndpoint: srv.grpcAddr, CAEndpointSAN: caServerName, ClusterID: clusterID, CredFetcher: fetcher,
	}, &citadel.TLSOptions{RootCert: filepath.Join(srv.dataDir, "root-cert.pem")})
	if err != nil {
		t.Fatalf("NewCitadelClient: %v", err)
	}
	defer client.Close()
	csrPEM, _, err := util.GenCSR(util.CertOptions{Host: csrID, ECSigAlg: util.EcdsaSigAlg, ECCCurve: util.P256Curve})
	if err != nil {
		t.Fatal(err)
	}
	chain, err := csrSign(t, client, csrPEM)
	if err != nil {
		return grpcCode(err), nil
	}
	return codeOK, chain
}

// ztunnelSign calls CreateCertificate the way ztunnel does (ztunnel is Rust,
// so this uses Istio's generated Go client of the same API): TLS 1.3 with
// ALPN h2, `authorization: Bearer`, `clusterid`, an ECDSA P-256 CSR for the
// workload, and ImpersonatedIdentity in the request metadata.
func ztunnelSign(t *testing.T, srv *server, token, clusterID, impersonate string) (string, []string) {
	t.Helper()
	roots := x509.NewCertPool()
	for _, c := range readCerts(t, filepath.Join(srv.dataDir, "root-cert.pem")) {
		roots.AddCert(c)
	}
	conn, err := grpc.NewClient(srv.grpcAddr, grpc.WithTransportCredentials(credentials.NewTLS(&tls.Config{
		RootCAs: roots, ServerName: caServerName, MinVersion: tls.VersionTLS13,
	})))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	csrPEM, _, err := util.GenCSR(util.CertOptions{Host: impersonate, ECSigAlg: util.EcdsaSigAlg, ECCCurve: util.P256Curve})
	if err != nil {
		t.Fatal(err)
	}
	meta, err := structpb.NewStruct(map[string]any{security.ImpersonatedIdentity: impersonate})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), rpcTimeout)
	defer cancel()
	ctx = metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+token, "clusterid", clusterID)
	resp, err := pb.NewIstioCertificateServiceClient(conn).CreateCertificate(ctx, &pb.IstioCertificateRequest{
		Csr: string(csrPEM), ValidityDuration: int64(leafTTL / time.Second), Metadata: meta,
	})
	if err != nil {
		return status.Code(err).String(), nil
	}
	return codeOK, resp.GetCertChain()
}

// leafURI returns the first URI SAN of the first certificate in a response.
func leafURI(t *testing.T, chain []string) string {
	t.Helper()
	if len(chain) < 2 {
		t.Fatalf("response has %d elements, want at least 2", len(chain))
	}
	certs, err := parseCerts([]byte(chain[0]))
	if err != nil || len(certs) != 1 {
		t.Fatalf("response element 0: %d certificates, %v", len(certs), err)
	}
	if len(certs[0].URIs) != 1 {
		t.Fatalf("leaf URI SANs = %v, want exactly one", certs[0].URIs)
	}
	return certs[0].URIs[0].String()
}
