// Package castest is an in-process Google CAS for tests: a gRPC server on the
// real privatecapb service definition, listening on 127.0.0.1, that the real
// client library talks to. It implements what Castellan uses (CreateCertificate
// in config mode, FetchCaCerts) with CAS's documented semantics: request_id
// idempotency, unique certificate IDs, requested_not_before_time when the
// pool allows it, lifetime truncated to the issuing CA. It records every
// request and can be told to fail or misbehave.
package castest

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"net/url"
	"sync"
	"testing"
	"time"

	"cloud.google.com/go/security/privateca/apiv1/privatecapb"
	"github.com/castellan-ca/castellan/signer"
	"google.golang.org/api/option"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
)

// Resource names of the fake pool.
const (
	Pool = "projects/castellan-test/locations/us-central1/caPools/workloads"
	CAID = "issuing-ca"
)

// Server is the fake CAS. Its exported fields may be changed between requests.
type Server struct {
	privatecapb.UnimplementedCertificateAuthorityServiceServer

	// Addr is the 127.0.0.1:PORT the server listens on.
	Addr string

	mu sync.Mutex
	// Root and CA are the pool's root and its issuing CA (signed by Root).
	Root, CA *KeyPair
	// AllowNotBefore is the pool's allow_requester_specified_not_before_time.
	AllowNotBefore bool
	// Fail, if set, is asked before each CreateCertificate; a non-nil error
	// (a gRPC status) is returned instead. issued says whether the
	// certificate was created first (a response lost on the way back).
	Fail func(req *privatecapb.CreateCertificateRequest) (err error, issued bool)
	// Mutate, if set, changes each certificate before it is signed, to make
	// the fake return something other than what was asked.
	Mutate func(*x509.Certificate)

	requests []*privatecapb.CreateCertificateRequest
	byReqID  map[string]*privatecapb.Certificate
	byCertID map[string]bool

	grpc *grpc.Server
}

// KeyPair is a CA certificate and its key.
type KeyPair struct {
	Cert *x509.Certificate
	Key  crypto.Signer
}

// Start runs a fake CAS with a fresh root and issuing CA until the test ends.
func Start(t testing.TB) *Server {
	t.Helper()
	s, err := Listen("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.Stop)
	return s
}

// Listen runs a fake CAS on addr with a fresh root and issuing CA, until Stop.
func Listen(addr string) (*Server, error) {
	root, ca, err := newCAs("Castellan test CAS")
	if err != nil {
		return nil, err
	}
	s := &Server{Root: root, CA: ca, AllowNotBefore: true, byReqID: map[string]*privatecapb.Certificate{}, byCertID: map[string]bool{}}
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, err
	}
	s.Addr = l.Addr().String()
	s.serve(l)
	return s, nil
}

// newCAs makes a root and an issuing CA signed by it, valid for a year.
func newCAs(name string) (root, issuing *KeyPair, err error) {
	mk := func(cn string, parent *KeyPair) (*KeyPair, error) {
		key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			return nil, err
		}
		serial, err := signer.NewSerial(rand.Reader)
		if err != nil {
			return nil, err
		}
		now := time.Now().Truncate(time.Second)
		tmpl := &x509.Certificate{SerialNumber: serial, Subject: pkix.Name{Organization: []string{"Castellan test"}, CommonName: cn},
			NotBefore: now.Add(-time.Hour), NotAfter: now.Add(365 * 24 * time.Hour),
			KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature, BasicConstraintsValid: true, IsCA: true}
		issuer, issuerKey := tmpl, crypto.Signer(key)
		if parent != nil {
			issuer, issuerKey = parent.Cert, parent.Key
		}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, issuer, key.Public(), issuerKey)
		if err != nil {
			return nil, err
		}
		cert, err := x509.ParseCertificate(der)
		return &KeyPair{Cert: cert, Key: key}, err
	}
	if root, err = mk(name+" root", nil); err != nil {
		return nil, nil, fmt.Errorf("fake CAS root: %w", err)
	}
	if issuing, err = mk(name+" issuing CA", root); err != nil {
		return nil, nil, fmt.Errorf("fake CAS issuing CA: %w", err)
	}
	return root, issuing, nil
}

func (s *Server) serve(l net.Listener) {
	g := grpc.NewServer()
	privatecapb.RegisterCertificateAuthorityServiceServer(g, s)
	s.mu.Lock()
	s.grpc = g
	s.mu.Unlock()
	go func() { _ = g.Serve(l) }()
}

// Stop closes the listener and every connection: an outage.
func (s *Server) Stop() {
	s.mu.Lock()
	g := s.grpc
	s.grpc = nil
	s.mu.Unlock()
	if g != nil {
		g.Stop()
	}
}

// Restart serves again on the same address, with the same state.
func (s *Server) Restart(t testing.TB) {
	t.Helper()
	l, err := net.Listen("tcp", s.Addr)
	if err != nil {
		t.Fatalf("restart fake CAS on %s: %v", s.Addr, err)
	}
	s.serve(l)
}

// ClientOptions point the real client library at the fake: its endpoint,
// no credentials, plaintext gRPC.
func (s *Server) ClientOptions() []option.ClientOption {
	return []option.ClientOption{
		option.WithEndpoint(s.Addr),
		option.WithoutAuthentication(),
		option.WithGRPCDialOption(grpc.WithTransportCredentials(insecure.NewCredentials())),
	}
}

// Requests returns copies of the CreateCertificate requests received so far.
func (s *Server) Requests() []*privatecapb.CreateCertificateRequest {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]*privatecapb.CreateCertificateRequest, len(s.requests))
	for i, r := range s.requests {
		out[i] = proto.Clone(r).(*privatecapb.CreateCertificateRequest)
	}
	return out
}

// Issued returns how many distinct certificates the fake created.
func (s *Server) Issued() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.byCertID)
}

// Rotate replaces the pool's CAs with a new root and issuing CA.
func (s *Server) Rotate(t testing.TB) {
	t.Helper()
	root, issuing, err := newCAs("Castellan test CAS (rotated)")
	if err != nil {
		t.Fatal(err)
	}
	s.mu.Lock()
	s.Root, s.CA = root, issuing
	s.mu.Unlock()
}

// Chain returns the issuing CA and the root, in PEM, issuer first.
func (s *Server) Chain() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return signer.EncodePEM(s.CA.Cert, s.Root.Cert)
}

// FetchCaCerts returns the pool's one CA chain, issuer to root.
func (s *Server) FetchCaCerts(_ context.Context, req *privatecapb.FetchCaCertsRequest) (*privatecapb.FetchCaCertsResponse, error) {
	if req.GetCaPool() != Pool {
		return nil, status.Errorf(codes.NotFound, "CA pool %q not found", req.GetCaPool())
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	return &privatecapb.FetchCaCertsResponse{CaCerts: []*privatecapb.FetchCaCertsResponse_CertChain{
		{Certificates: []string{signer.EncodePEM(s.CA.Cert), signer.EncodePEM(s.Root.Cert)}},
	}}, nil
}

// CreateCertificate issues a certificate from the request's config.
func (s *Server) CreateCertificate(_ context.Context, req *privatecapb.CreateCertificateRequest) (*privatecapb.Certificate, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.requests = append(s.requests, proto.Clone(req).(*privatecapb.CreateCertificateRequest))
	if c, ok := s.byReqID[req.GetRequestId()]; ok && req.GetRequestId() != "" {
		return c, nil // a retry of a request that already succeeded
	}
	var failErr error
	issue := true
	if s.Fail != nil {
		var issued bool
		if failErr, issued = s.Fail(req); failErr != nil {
			issue = issued
		}
	}
	if !issue {
		return nil, failErr
	}
	c, err := s.issue(req)
	if err != nil {
		return nil, err
	}
	if req.GetRequestId() != "" {
		s.byReqID[req.GetRequestId()] = c
	}
	s.byCertID[req.GetCertificateId()] = true
	if failErr != nil {
		return nil, failErr
	}
	return c, nil
}

func (s *Server) issue(req *privatecapb.CreateCertificateRequest) (*privatecapb.Certificate, error) {
	switch {
	case req.GetParent() != Pool:
		return nil, status.Errorf(codes.NotFound, "CA pool %q not found", req.GetParent())
	case req.GetIssuingCertificateAuthorityId() != "" && req.GetIssuingCertificateAuthorityId() != CAID:
		return nil, status.Errorf(codes.NotFound, "certificate authority %q not in pool", req.GetIssuingCertificateAuthorityId())
	case s.byCertID[req.GetCertificateId()]:
		return nil, status.Errorf(codes.AlreadyExists, "certificate %q already exists", req.GetCertificateId())
	}
	cert := req.GetCertificate()
	cfg := cert.GetConfig()
	switch {
	case cfg == nil:
		return nil, status.Error(codes.InvalidArgument, "fake CAS supports config mode only")
	case cert.GetLifetime().AsDuration() <= 0:
		return nil, status.Error(codes.InvalidArgument, "lifetime is required")
	case cert.GetRequestedNotBeforeTime() != nil && !s.AllowNotBefore:
		return nil, status.Error(codes.FailedPrecondition, "pool does not allow requester-specified not_before_time")
	}
	block, _ := pem.Decode(cfg.GetPublicKey().GetKey())
	if block == nil || cfg.GetPublicKey().GetFormat() != privatecapb.PublicKey_PEM {
		return nil, status.Error(codes.InvalidArgument, "public key must be PEM")
	}
	pub, err := x509.ParsePKIXPublicKey(block.Bytes)
	if err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "public key: %v", err)
	}
	tmpl, err := template(cfg)
	if err != nil {
		return nil, err
	}
	tmpl.NotBefore = time.Now()
	if nb := cert.GetRequestedNotBeforeTime(); nb != nil {
		tmpl.NotBefore = nb.AsTime()
	}
	tmpl.NotAfter = tmpl.NotBefore.Add(cert.GetLifetime().AsDuration())
	if tmpl.NotAfter.After(s.CA.Cert.NotAfter) {
		tmpl.NotAfter = s.CA.Cert.NotAfter // CAS truncates to the issuing chain's life
	}
	if s.Mutate != nil {
		s.Mutate(tmpl)
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, s.CA.Cert, pub, s.CA.Key)
	if err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "sign: %v", err)
	}
	leaf, _ := x509.ParseCertificate(der)
	return &privatecapb.Certificate{
		Name:                       Pool + "/certificates/" + req.GetCertificateId(),
		CertificateConfig:          cert.GetCertificateConfig(),
		Lifetime:                   cert.GetLifetime(),
		IssuerCertificateAuthority: Pool + "/certificateAuthorities/" + CAID,
		PemCertificate:             signer.EncodePEM(leaf),
		PemCertificateChain:        []string{signer.EncodePEM(s.CA.Cert), signer.EncodePEM(s.Root.Cert)},
	}, nil
}

// template turns a CertificateConfig into the certificate CAS would sign.
func template(cfg *privatecapb.CertificateConfig) (*x509.Certificate, error) {
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 159)) // 20 octets, positive
	if err != nil {
		return nil, status.Errorf(codes.Internal, "serial: %v", err)
	}
	subj := cfg.GetSubjectConfig().GetSubject()
	tmpl := &x509.Certificate{SerialNumber: serial, Subject: pkix.Name{CommonName: subj.GetCommonName()}}
	if o := subj.GetOrganization(); o != "" {
		tmpl.Subject.Organization = []string{o}
	}
	san := cfg.GetSubjectConfig().GetSubjectAltName()
	tmpl.DNSNames = san.GetDnsNames()
	for _, u := range san.GetUris() {
		parsed, err := url.Parse(u)
		if err != nil {
			return nil, status.Errorf(codes.InvalidArgument, "URI SAN %q: %v", u, err)
		}
		tmpl.URIs = append(tmpl.URIs, parsed)
	}
	x := cfg.GetX509Config()
	if ku := x.GetKeyUsage().GetBaseKeyUsage(); ku != nil {
		if ku.GetDigitalSignature() {
			tmpl.KeyUsage |= x509.KeyUsageDigitalSignature
		}
		if ku.GetKeyEncipherment() {
			tmpl.KeyUsage |= x509.KeyUsageKeyEncipherment
		}
	}
	if eku := x.GetKeyUsage().GetExtendedKeyUsage(); eku != nil {
		if eku.GetServerAuth() {
			tmpl.ExtKeyUsage = append(tmpl.ExtKeyUsage, x509.ExtKeyUsageServerAuth)
		}
		if eku.GetClientAuth() {
			tmpl.ExtKeyUsage = append(tmpl.ExtKeyUsage, x509.ExtKeyUsageClientAuth)
		}
	}
	if o := x.GetCaOptions(); o != nil {
		tmpl.BasicConstraintsValid = true
		tmpl.IsCA = o.GetIsCa()
	}
	return tmpl, nil
}

// String describes the server for logs.
func (s *Server) String() string { return fmt.Sprintf("fake CAS on %s", s.Addr) }
