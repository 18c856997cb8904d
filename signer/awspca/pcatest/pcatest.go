// Package pcatest is an in-process AWS Private CA for tests: an HTTP server
// speaking PCA's AWS JSON 1.1 protocol (POST /, X-Amz-Target
// ACMPrivateCA.<Operation>, SigV4-signed) for the operations Castellan uses:
// IssueCertificate, GetCertificate and GetCertificateAuthorityCertificate.
// The real AWS SDK client reaches it through a custom endpoint.
//
// It follows PCA's documentation where Castellan relies on it (see issue.go):
// the CSR is verified and validated, including RFC 5280's rule that an empty
// subject needs a critical SAN; templates and API passthrough decide the
// subject and extensions; idempotency tokens dedupe issuance for five
// minutes; issuance is asynchronous (GetCertificate answers
// RequestInProgressException until the certificate is ready); NotAfter may
// not pass the CA's. It signs with a real test CA, and it can throttle, be
// slow, rotate its root and go down, for fault tests.
package pcatest

import (
	"context"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	v4 "github.com/aws/aws-sdk-go-v2/aws/signer/v4"
	"github.com/aws/aws-sdk-go-v2/credentials"
	"github.com/aws/aws-sdk-go-v2/service/acmpca"
	"github.com/aws/aws-sdk-go-v2/service/acmpca/schemas"
	"github.com/aws/smithy-go/transport/http/protocol/awsjson"
)

// The fake's account, region and the only credentials it accepts.
const (
	Region          = "eu-west-1"
	Account         = "111122223333"
	AccessKeyID     = "AKIAFAKEPCACASTELLAN"
	SecretAccessKey = "fake-pca-secret-access-key-for-tests-only"
	// CAID is the id part of the CA's ARN.
	CAID = "0f3c9a52-7d41-4b8e-9e07-5c2b1d6a8f10"
	// idempotencyWindow is how long PCA remembers an idempotency token.
	idempotencyWindow = 5 * time.Minute
	// maxBody bounds a request body; real requests are a few kilobytes.
	maxBody = 1 << 20
)

// Operation names (X-Amz-Target ACMPrivateCA.<name>).
const (
	OpIssueCertificate                   = "IssueCertificate"
	OpGetCertificate                     = "GetCertificate"
	OpGetCertificateAuthorityCertificate = "GetCertificateAuthorityCertificate"
)

// Options shape the fake's CA.
type Options struct {
	// RootIssues makes the CA a root CA that signs leaves itself; otherwise
	// it is a subordinate CA under a root (the usual PCA hierarchy).
	RootIssues bool
	// RSA gives the CA an RSA-2048 key; otherwise ECDSA P-256.
	RSA bool
	// CALifetime is the CA certificate's lifetime from now; zero means a year.
	CALifetime time.Duration
	// Now is the fake's clock; nil means time.Now.
	Now func() time.Time
}

// Server is the fake PCA. Its methods are safe for concurrent use.
type Server struct {
	// URL is the endpoint to give the SDK (BaseEndpoint): http://127.0.0.1:PORT.
	URL string
	// CAARN is the CA's ARN.
	CAARN string

	opts Options
	now  func() time.Time

	mu       sync.Mutex
	root, ca *keyPair // ca == root when opts.RootIssues
	certs    map[string]*issuedCert
	tokens   map[string]tokenEntry
	issues   []IssueRequest
	calls    map[string]int
	inject   map[string]injected
	pending  time.Duration // how long a new certificate stays in progress
	getDelay time.Duration // how long each GetCertificate takes to answer
	mutate   func(*x509.Certificate)

	addr string
	http *http.Server
	wg   sync.WaitGroup
}

type issuedCert struct {
	der     []byte
	chain   []byte // PEM: issuing CA up to the root, as of issuance
	readyAt time.Time
}

type tokenEntry struct {
	arn string
	at  time.Time
}

// Start runs a fake PCA until the test ends.
func Start(t testing.TB, opts Options) *Server {
	t.Helper()
	s, err := Listen("127.0.0.1:0", opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.Stop)
	return s
}

// Listen runs a fake PCA on addr until Stop.
func Listen(addr string, opts Options) (*Server, error) {
	s := &Server{opts: opts, now: opts.Now, certs: map[string]*issuedCert{}, tokens: map[string]tokenEntry{},
		calls: map[string]int{}, inject: map[string]injected{}}
	if s.now == nil {
		s.now = time.Now
	}
	s.CAARN = fmt.Sprintf("arn:aws:acm-pca:%s:%s:certificate-authority/%s", Region, Account, CAID)
	if err := s.newHierarchy(); err != nil {
		return nil, err
	}
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, err
	}
	s.addr = l.Addr().String()
	s.URL = "http://" + s.addr
	s.serve(l)
	return s, nil
}

func (s *Server) serve(l net.Listener) {
	srv := &http.Server{Handler: s, ReadHeaderTimeout: 10 * time.Second}
	s.mu.Lock()
	s.http = srv
	s.mu.Unlock()
	s.wg.Add(1)
	go func() { defer s.wg.Done(); _ = srv.Serve(l) }()
}

// Stop closes the listener and every connection: an outage.
func (s *Server) Stop() {
	s.mu.Lock()
	srv := s.http
	s.http = nil
	s.mu.Unlock()
	if srv != nil {
		_ = srv.Close()
		s.wg.Wait()
	}
}

// Restart serves again on the same address, with the same state.
func (s *Server) Restart(t testing.TB) {
	t.Helper()
	l, err := net.Listen("tcp", s.addr)
	if err != nil {
		t.Fatalf("restart fake PCA on %s: %v", s.addr, err)
	}
	s.serve(l)
}

// Credentials are the static credentials the fake accepts.
func Credentials() aws.Credentials {
	return aws.Credentials{AccessKeyID: AccessKeyID, SecretAccessKey: SecretAccessKey, Source: "pcatest"}
}

// injected is a fault for the next n calls of an operation.
type injected struct {
	code  string
	n     int
	after bool // answer the error after doing the work: a lost response
}

// Throttle makes the next n calls of op fail with ThrottlingException.
func (s *Server) Throttle(op string, n int) { s.Inject(op, "ThrottlingException", n) }

// Inject makes the next n calls of op fail with the error code (an
// InternalFailure or ServiceUnavailable comes with HTTP 500, others 400)
// before they do anything.
func (s *Server) Inject(op, code string, n int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.inject[op] = injected{code: code, n: n}
}

// LoseResponses makes the next n calls of op do their work and then answer
// InternalFailure, as if the response were lost on the way back.
func (s *Server) LoseResponses(op string, n int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.inject[op] = injected{code: "InternalFailure", n: n, after: true}
}

// SetPending makes certificates issued from now on stay in progress for d
// (GetCertificate answers RequestInProgressException meanwhile).
func (s *Server) SetPending(d time.Duration) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.pending = d
}

// SetGetDelay makes every GetCertificate take d to answer (or until the
// client hangs up).
func (s *Server) SetGetDelay(d time.Duration) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.getDelay = d
}

// SetMutate has f change each certificate before it is signed, to make the
// fake return something other than what was asked; nil stops it.
func (s *Server) SetMutate(f func(*x509.Certificate)) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.mutate = f
}

// Calls returns how many requests for op reached the fake (throttled ones included).
func (s *Server) Calls(op string) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.calls[op]
}

// IssueRequests returns the IssueCertificate requests received so far.
func (s *Server) IssueRequests() []IssueRequest {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]IssueRequest(nil), s.issues...)
}

// Issued returns how many distinct certificates the fake created.
func (s *Server) Issued() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.certs)
}

// ServeHTTP answers one AWS JSON 1.1 request.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	body, err := io.ReadAll(io.LimitReader(r.Body, maxBody+1))
	switch {
	case err != nil:
		writeError(w, http.StatusBadRequest, "SerializationException", "read body: "+err.Error())
		return
	case len(body) > maxBody:
		writeError(w, http.StatusRequestEntityTooLarge, "SerializationException", "request body too large")
		return
	case r.Method != http.MethodPost || r.URL.Path != "/":
		writeError(w, http.StatusNotFound, "UnknownOperationException", "PCA serves POST / only")
		return
	case r.Header.Get("Content-Type") != "application/x-amz-json-1.1":
		writeError(w, http.StatusBadRequest, "SerializationException", "Content-Type must be application/x-amz-json-1.1")
		return
	}
	if code, msg := verifySignature(r, body); code != "" {
		writeError(w, http.StatusBadRequest, code, msg)
		return
	}
	op, ok := strings.CutPrefix(r.Header.Get("X-Amz-Target"), "ACMPrivateCA.")
	if !ok {
		writeError(w, http.StatusBadRequest, "UnknownOperationException", "X-Amz-Target must be ACMPrivateCA.<operation>")
		return
	}
	s.mu.Lock()
	s.calls[op]++
	fault := s.inject[op]
	if fault.n > 0 {
		fault.n--
		s.inject[op] = fault
		fault.n++
	}
	s.mu.Unlock()
	if fault.n > 0 && !fault.after {
		writeInjected(w, fault.code)
		return
	}
	var out any
	switch op {
	case OpIssueCertificate:
		out, err = s.issueCertificate(body)
	case OpGetCertificate:
		out, err = s.getCertificate(r.Context(), body)
	case OpGetCertificateAuthorityCertificate:
		out, err = s.getCACertificate(body)
	default:
		err = &apiError{"UnknownOperationException", "the fake PCA implements IssueCertificate, GetCertificate and GetCertificateAuthorityCertificate, not " + op}
	}
	if fault.n > 0 && fault.after {
		writeInjected(w, fault.code)
		return
	}
	var ae *apiError
	switch {
	case errors.As(err, &ae):
		writeError(w, http.StatusBadRequest, ae.code, ae.msg)
	case err != nil:
		writeError(w, http.StatusInternalServerError, "InternalFailure", err.Error())
	default:
		w.Header().Set("Content-Type", "application/x-amz-json-1.1")
		_ = json.NewEncoder(w).Encode(out)
	}
}

// apiError is an error PCA answers with: its __type and message.
type apiError struct{ code, msg string }

// Error is the code and message PCA would answer.
func (e *apiError) Error() string { return e.code + ": " + e.msg }

func errorf(code, format string, a ...any) error {
	return &apiError{code, fmt.Sprintf(format, a...)}
}

func writeInjected(w http.ResponseWriter, code string) {
	status := http.StatusBadRequest
	if code == "InternalFailure" || code == "ServiceUnavailable" {
		status = http.StatusInternalServerError
	}
	writeError(w, status, code, "injected by the test")
}

func writeError(w http.ResponseWriter, status int, code, msg string) {
	w.Header().Set("Content-Type", "application/x-amz-json-1.1")
	w.Header().Set("X-Amzn-ErrorType", code)
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(map[string]string{"__type": code, "message": msg})
}

// verifySignature recomputes the request's SigV4 signature over the headers
// it names with the fake's secret key: only correctly signed requests for
// service acm-pca in the fake's region and account key pass.
func verifySignature(r *http.Request, body []byte) (code, msg string) {
	auth := r.Header.Get("Authorization")
	rest, ok := strings.CutPrefix(auth, "AWS4-HMAC-SHA256 ")
	if !ok {
		return "MissingAuthenticationTokenException", "request is not signed with AWS4-HMAC-SHA256"
	}
	fields := map[string]string{}
	for _, f := range strings.Split(rest, ",") {
		k, v, _ := strings.Cut(strings.TrimSpace(f), "=")
		fields[k] = v
	}
	scope := strings.Split(fields["Credential"], "/")
	if len(scope) != 5 || scope[3] != "acm-pca" || scope[4] != "aws4_request" {
		return "IncompleteSignatureException", "credential scope must be KEY/DATE/REGION/acm-pca/aws4_request"
	}
	if scope[0] != AccessKeyID {
		return "UnrecognizedClientException", "The security token included in the request is invalid."
	}
	if scope[2] != Region {
		return "InvalidSignatureException", fmt.Sprintf("credential should be scoped to a valid region, not %q", scope[2])
	}
	signingTime, err := time.Parse("20060102T150405Z", r.Header.Get("X-Amz-Date"))
	if err != nil {
		return "IncompleteSignatureException", "X-Amz-Date missing or malformed"
	}
	// Rebuild the request with exactly the headers it says it signed.
	req, err := http.NewRequest(r.Method, "http://"+r.Host+r.URL.RequestURI(), nil)
	if err != nil {
		return "IncompleteSignatureException", err.Error()
	}
	for _, h := range strings.Split(fields["SignedHeaders"], ";") {
		switch h {
		case "host":
		case "content-length":
			req.ContentLength = int64(len(body))
		default:
			req.Header[http.CanonicalHeaderKey(h)] = r.Header.Values(h)
		}
	}
	sum := sha256.Sum256(body)
	if err := v4.NewSigner().SignHTTP(context.Background(), Credentials(), req, hex.EncodeToString(sum[:]), "acm-pca", Region, signingTime); err != nil {
		return "IncompleteSignatureException", err.Error()
	}
	if req.Header.Get("Authorization") != auth {
		return "InvalidSignatureException", "The request signature we calculated does not match the signature you provided."
	}
	return "", ""
}

// Client returns an SDK client for the fake, speaking PCA's AWS JSON 1.1
// protocol with the fake's credentials; opts adjust it.
func (s *Server) Client(opts ...func(*acmpca.Options)) *acmpca.Client {
	// acmpca.New sets its default protocol after reading Options: only an
	// option function can choose another.
	json11 := func(o *acmpca.Options) { o.Protocol = awsjson.New11(schemas.ACMPrivateCA) }
	return acmpca.New(acmpca.Options{
		Region:       Region,
		BaseEndpoint: aws.String(s.URL),
		Credentials:  credentials.StaticCredentialsProvider{Value: Credentials()},
	}, append([]func(*acmpca.Options){json11}, opts...)...)
}
