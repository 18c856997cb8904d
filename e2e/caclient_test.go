package e2e

import (
	"context"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"net"
	"path/filepath"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
	pb "istio.io/api/security/v1alpha1"
	"istio.io/istio/security/pkg/pki/util"
)

// caDial says how a raw gRPC client of the CA API connects.
type caDial struct {
	cred     *credential            // client certificate; nil: none
	localIP  string                 // source address, e.g. "127.0.0.2"; empty: any
	version  uint16                 // only this TLS version; 0: 1.2 and 1.3
	sessions tls.ClientSessionCache // TLS session resumption; nil: none
	roots    []*x509.Certificate    // trust anchors; nil: the server's root-cert.pem
}

// dialCA returns a gRPC connection to srv's CA API with Istio's generated
// client stub, closed at the end of the test.
func dialCA(t *testing.T, srv *server, o caDial) (*grpc.ClientConn, pb.IstioCertificateServiceClient) {
	t.Helper()
	if o.roots == nil {
		o.roots = readCerts(t, filepath.Join(srv.dataDir, "root-cert.pem"))
	}
	pool := x509.NewCertPool()
	for _, c := range o.roots {
		pool.AddCert(c)
	}
	cfg := &tls.Config{RootCAs: pool, ServerName: caServerName, MinVersion: tls.VersionTLS12, ClientSessionCache: o.sessions}
	if o.version != 0 {
		cfg.MinVersion, cfg.MaxVersion = o.version, o.version
	}
	if o.cred != nil {
		pair, err := tls.LoadX509KeyPair(o.cred.chainFile, o.cred.keyFile)
		if err != nil {
			t.Fatal(err)
		}
		cfg.Certificates = []tls.Certificate{pair}
	}
	opts := []grpc.DialOption{grpc.WithTransportCredentials(credentials.NewTLS(cfg))}
	if o.localIP != "" {
		d := &net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(o.localIP)}}
		opts = append(opts, grpc.WithContextDialer(func(ctx context.Context, addr string) (net.Conn, error) {
			return d.DialContext(ctx, "tcp", addr)
		}))
	}
	conn, err := grpc.NewClient(srv.grpcAddr, opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = conn.Close() })
	return conn, pb.NewIstioCertificateServiceClient(conn)
}

// signResult is one CreateCertificate call's outcome.
type signResult struct {
	code  codes.Code
	chain []string
	peer  peer.Peer // the connection it went over
}

// leafSum returns the hex SHA-256 of the leaf of a successful call.
func (r signResult) leafSum(t *testing.T) string {
	t.Helper()
	certs, err := parseCerts([]byte(r.chain[0]))
	if err != nil || len(certs) != 1 {
		t.Fatalf("response element 0: %d certificates, %v", len(certs), err)
	}
	sum := sha256.Sum256(certs[0].Raw)
	return hex.EncodeToString(sum[:])
}

// didResume reports whether the call's TLS session was resumed.
func (r signResult) didResume(t *testing.T) bool {
	t.Helper()
	info, ok := r.peer.AuthInfo.(credentials.TLSInfo)
	if !ok {
		t.Fatalf("call's peer has no TLS info: %T", r.peer.AuthInfo)
	}
	return info.State.DidResume
}

// sign asks for a certificate for id over client, with a fresh P-256 key.
func sign(t *testing.T, client pb.IstioCertificateServiceClient, id string) signResult {
	t.Helper()
	csrPEM, _, err := util.GenCSR(util.CertOptions{Host: id, ECSigAlg: util.EcdsaSigAlg, ECCCurve: util.P256Curve})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), rpcTimeout)
	defer cancel()
	var r signResult
	resp, err := client.CreateCertificate(ctx, &pb.IstioCertificateRequest{Csr: string(csrPEM), ValidityDuration: int64(leafTTL / time.Second)},
		grpc.Peer(&r.peer))
	r.code, r.chain = status.Code(err), resp.GetCertChain()
	return r
}

// issueCredential has castellanctl issue id into a new directory.
func issueCredential(t *testing.T, srv *server, id string) *credential {
	t.Helper()
	dir := t.TempDir()
	srv.ctl(t, "issue", "--identity", id, "--out-dir", dir, "--ttl", leafTTL.String())
	return &credential{keyFile: filepath.Join(dir, "key.pem"), chainFile: filepath.Join(dir, "cert-chain.pem")}
}

// matchAudit checks that every certificate a client received (hex SHA-256
// of the leaf) has exactly one issuance record in srv's audit log, and
// returns the log.
func matchAudit(t *testing.T, srv *server, received []string) []auditRecord {
	t.Helper()
	recs := srv.auditList(t)
	issued := map[string]int{}
	for _, r := range recs {
		if r.Outcome == "issued" {
			issued[r.CertSHA256]++
		}
	}
	for _, sum := range received {
		if n := issued[sum]; n != 1 {
			t.Errorf("certificate %s…: %d issuance records, want exactly 1", sum[:12], n)
		}
	}
	return recs
}
