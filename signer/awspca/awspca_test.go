package awspca_test

import (
	"context"
	"crypto"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"encoding/base64"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/credentials"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc/codes"

	"github.com/castellan-ca/castellan/ca"
	"github.com/castellan-ca/castellan/ca/catest"
	"github.com/castellan-ca/castellan/signer"
	"github.com/castellan-ca/castellan/signer/awspca"
	"github.com/castellan-ca/castellan/signer/awspca/pcatest"
	"github.com/castellan-ca/castellan/signer/signertest"
)

var workload = spiffeid.RequireFromString("spiffe://cluster.local/ns/pca/sa/workload")

// newSigner returns a signer on the fake's CA, reached by the real SDK
// client through the fake's endpoint, running until the test ends. Polls and
// retries are quick, and the rate limit is out of the way unless cfg sets one.
func newSigner(t *testing.T, fake *pcatest.Server, cfg awspca.Config) *awspca.Signer {
	t.Helper()
	cfg.CertificateAuthorityARN = fake.CAARN
	cfg.Endpoint = fake.URL
	cfg.Credentials = credentials.StaticCredentialsProvider{Value: pcatest.Credentials()}
	if cfg.Timeout == 0 {
		cfg.Timeout = 10 * time.Second
	}
	if cfg.RateLimit == 0 {
		cfg.RateLimit = 10000
	}
	if cfg.PollMinDelay == 0 {
		cfg.PollMinDelay, cfg.PollMaxDelay = 5*time.Millisecond, 20*time.Millisecond
	}
	if cfg.RetryMaxBackoff == 0 {
		cfg.RetryMaxBackoff = 20 * time.Millisecond
	}
	s, err := awspca.New(t.Context(), cfg)
	if err != nil {
		t.Fatalf("awspca.New: %v", err)
	}
	signertest.RunUntilCleanup(t, s.Run)
	return s
}

// TestConformance runs the shared suite with the real SDK client against the
// fake PCA, for a subordinate CA and a root CA; the outage stops the fake's
// HTTP server and restarts it.
func TestConformance(t *testing.T) {
	for _, tc := range []struct {
		name string
		opts pcatest.Options
	}{
		{"subordinate CA", pcatest.Options{}},
		{"root CA", pcatest.Options{RootIssues: true}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			fake := pcatest.Start(t, tc.opts)
			signertest.Run(t, signertest.Factory{
				New: func(t *testing.T) signer.Signer { return newSigner(t, fake, awspca.Config{}) },
				Outage: func(t *testing.T, _ signer.Signer) func() {
					fake.Stop()
					return func() { fake.Restart(t) }
				},
				ServerSerial:    true,
				Remote:          true,
				UnsupportedKeys: []string{"ed25519"},
			})
		})
	}
}

// TestRequestFields asserts exactly what the SDK puts on the wire: the
// caller's CSR, the template, the absolute validity, an idempotency token
// and the whole profile through ApiPassthrough, from the grant.
func TestRequestFields(t *testing.T) {
	fake := pcatest.Start(t, pcatest.Options{})
	s := newSigner(t, fake, awspca.Config{})
	req := request(t, s, signertest.Key(1))
	tmpl, serial := req.Template, req.Template.SerialNumber
	chain, err := s.Sign(t.Context(), req)
	if err != nil {
		t.Fatal(err)
	}
	reqs := fake.IssueRequests()
	if len(reqs) != 1 {
		t.Fatalf("fake received %d IssueCertificate requests, want 1", len(reqs))
	}
	r := reqs[0]
	token := sha256.Sum256(serial.Bytes())
	csrBlock, _ := pem.Decode(r.Csr)
	for _, f := range []struct {
		name      string
		got, want any
	}{
		{"CertificateAuthorityArn", r.CertificateAuthorityArn, fake.CAARN},
		{"TemplateArn", r.TemplateArn, "arn:aws:acm-pca:::template/" + awspca.TemplateCriticalBasicConstraints},
		{"SigningAlgorithm", r.SigningAlgorithm, "SHA256WITHECDSA"},
		{"Validity", *r.Validity, pcatest.Validity{Type: "ABSOLUTE", Value: tmpl.NotAfter.Unix()}},
		{"ValidityNotBefore", *r.ValidityNotBefore, pcatest.Validity{Type: "ABSOLUTE", Value: tmpl.NotBefore.Unix()}},
		{"IdempotencyToken", r.IdempotencyToken, hex.EncodeToString(token[:16])},
		{"Csr", csrBlock != nil && string(csrBlock.Bytes) == string(req.CSR), true},
		{"Subject", *r.APIPassthrough.Subject, pcatest.Subject{Organization: "cluster.local"}},
		{"ExtendedKeyUsage", len(r.APIPassthrough.Extensions.ExtendedKeyUsage), 2},
		{"SubjectAlternativeNames (typed)", len(r.APIPassthrough.Extensions.SubjectAlternativeNames), 0},
		{"BackendRef", strings.HasPrefix(chain.BackendRef, fake.CAARN+"/certificate/"), true},
	} {
		if f.got != f.want {
			t.Errorf("%s = %v, want %v", f.name, f.got, f.want)
		}
	}
	if eku := r.APIPassthrough.Extensions.ExtendedKeyUsage; len(eku) == 2 && (eku[0].ExtendedKeyUsageType != "SERVER_AUTH" || eku[1].ExtendedKeyUsageType != "CLIENT_AUTH") {
		t.Errorf("ExtendedKeyUsage = %+v, want SERVER_AUTH, CLIENT_AUTH", eku)
	}
	custom := r.APIPassthrough.Extensions.CustomExtensions
	if len(custom) != 2 {
		t.Fatalf("CustomExtensions = %+v, want the SAN and key usage", custom)
	}
	san, _ := base64.StdEncoding.DecodeString(custom[0].Value)
	var names []asn1.RawValue
	if _, err := asn1.Unmarshal(san, &names); err != nil || len(names) != 1 || names[0].Tag != 6 || string(names[0].Bytes) != workload.String() {
		t.Errorf("SAN extension holds %v (%v), want exactly the URI %s", names, err, workload)
	}
	if custom[0].ObjectIdentifier != "2.5.29.17" || custom[0].Critical {
		t.Errorf("SAN extension %s critical=%v, want 2.5.29.17 non-critical (the subject is not empty)", custom[0].ObjectIdentifier, custom[0].Critical)
	}
	if custom[1].ObjectIdentifier != "2.5.29.15" || !custom[1].Critical {
		t.Errorf("key usage extension %s critical=%v, want 2.5.29.15 critical", custom[1].ObjectIdentifier, custom[1].Critical)
	}
	if chain.Leaf.KeyUsage != x509.KeyUsageDigitalSignature {
		t.Errorf("leaf KeyUsage = %b, want digitalSignature", chain.Leaf.KeyUsage)
	}
}

// TestIstioCSRs issues the CSRs Istio's clients send, through a real issuer:
// ztunnel's (empty subject, SAN not critical: what PCA refuses on its own,
// istio#56191) and pilot-agent's (subject "O="). The leaf's subject and SAN
// come from the grant in both.
func TestIstioCSRs(t *testing.T) {
	fake := pcatest.Start(t, pcatest.Options{})
	s := newSigner(t, fake, awspca.Config{})
	for _, tc := range []struct {
		name string
		key  string
		opts catest.CSROptions
	}{
		{"ztunnel: empty subject, non-critical SAN, P-256", "ecdsa-p256", catest.CSROptions{NonCriticalSAN: true}},
		{"pilot-agent: O=, critical SAN, RSA-2048", "rsa-2048", catest.CSROptions{Subject: pkix.Name{Organization: []string{""}}}},
		{"no SAN at all", "ecdsa-p384", catest.CSROptions{NoSAN: true}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			res := catest.IssueThrough(t, awspca.Backend, s, workload, signertest.LeafKeys()[tc.key], tc.opts)
			if res.Err != nil {
				t.Fatalf("issue: %v", res.Err)
			}
			leaf := res.Result.Chain.Leaf
			if got := leaf.Subject.String(); got != "O=cluster.local" {
				t.Errorf("leaf subject = %q, want O=cluster.local", got)
			}
			if len(leaf.URIs) != 1 || leaf.URIs[0].String() != workload.String() {
				t.Errorf("leaf URIs = %v, want [%s]", leaf.URIs, workload)
			}
			if want := "backend_ref=" + res.Result.Chain.BackendRef; res.Record.Detail != want || !strings.Contains(want, fake.CAARN+"/certificate/") {
				t.Errorf("audit detail = %q, want %q", res.Record.Detail, want)
			}
			if res.Record.Serial != leaf.SerialNumber.Text(16) || res.Record.Signer != awspca.Backend {
				t.Errorf("audit record serial %q signer %q", res.Record.Serial, res.Record.Signer)
			}
		})
	}
}

// TestRetryIsIdempotent: a response lost after PCA issued is retried by the
// SDK with the same idempotency token, so PCA hands back that certificate
// instead of signing a second one.
func TestRetryIsIdempotent(t *testing.T) {
	fake := pcatest.Start(t, pcatest.Options{})
	s := newSigner(t, fake, awspca.Config{})
	fake.LoseResponses(pcatest.OpIssueCertificate, 1)
	res := catest.IssueThrough(t, awspca.Backend, s, workload, signertest.Key(2), catest.CSROptions{})
	if res.Err != nil {
		t.Fatalf("issue: %v", res.Err)
	}
	reqs := fake.IssueRequests()
	if len(reqs) != 2 || reqs[0].IdempotencyToken != reqs[1].IdempotencyToken {
		t.Fatalf("fake received %d IssueCertificate requests %+v, want a retry with the same token", len(reqs), reqs)
	}
	if got := fake.Issued(); got != 1 {
		t.Errorf("fake issued %d certificates, want 1", got)
	}
}

// TestFaults maps PCA's failures to what the client and the audit log see:
// throttling is retried, then Unavailable; a certificate still in progress
// at the deadline and a slow GetCertificate are Unavailable with the
// certificate's ARN audited and nothing returned; refusals are Internal; a
// wrong certificate never reaches the client.
func TestFaults(t *testing.T) {
	for _, tc := range []struct {
		name       string
		cfg        awspca.Config
		fault      func(*pcatest.Server)
		wantCode   codes.Code
		wantReason string
		wantCalls  map[string]int // calls per operation reaching the fake
		wantARN    bool           // the audited error names the certificate's ARN
	}{
		{name: "throttled twice, then issued", fault: func(f *pcatest.Server) { f.Throttle(pcatest.OpIssueCertificate, 2) },
			wantCode: codes.OK, wantCalls: map[string]int{pcatest.OpIssueCertificate: 3}},
		{name: "throttled on every attempt", fault: func(f *pcatest.Server) { f.Throttle(pcatest.OpIssueCertificate, 100) },
			wantCode: codes.Unavailable, wantReason: ca.ReasonSignerDown, wantCalls: map[string]int{pcatest.OpIssueCertificate: awspca.DefaultMaxAttempts}},
		{name: "GetCertificate throttled on every attempt", fault: func(f *pcatest.Server) { f.Throttle(pcatest.OpGetCertificate, 100) },
			wantCode: codes.Unavailable, wantReason: ca.ReasonSignerDown, wantARN: true,
			wantCalls: map[string]int{pcatest.OpIssueCertificate: 1, pcatest.OpGetCertificate: awspca.DefaultMaxAttempts}},
		{name: "RateExceeded on every attempt", fault: func(f *pcatest.Server) { f.Inject(pcatest.OpIssueCertificate, "RateExceeded", 100) },
			wantCode: codes.Unavailable, wantReason: ca.ReasonSignerDown, wantCalls: map[string]int{pcatest.OpIssueCertificate: awspca.DefaultMaxAttempts}},
		{name: "certificate still in progress at the deadline", cfg: awspca.Config{Timeout: 300 * time.Millisecond},
			fault:    func(f *pcatest.Server) { f.SetPending(time.Hour) },
			wantCode: codes.Unavailable, wantReason: ca.ReasonSignerDown, wantARN: true},
		{name: "GetCertificate slower than the deadline", cfg: awspca.Config{Timeout: 300 * time.Millisecond},
			fault:    func(f *pcatest.Server) { f.SetGetDelay(time.Hour) },
			wantCode: codes.Unavailable, wantReason: ca.ReasonSignerDown, wantARN: true},
		{name: "access denied", fault: func(f *pcatest.Server) { f.Inject(pcatest.OpIssueCertificate, "AccessDeniedException", 1) },
			wantCode: codes.Internal, wantReason: ca.ReasonSignerError, wantCalls: map[string]int{pcatest.OpIssueCertificate: 1}},
		{name: "CA out of certificates", fault: func(f *pcatest.Server) { f.Inject(pcatest.OpIssueCertificate, "LimitExceededException", 100) },
			wantCode: codes.Internal, wantReason: ca.ReasonSignerError},
		{name: "certificate for another SAN", fault: func(f *pcatest.Server) {
			f.SetMutate(func(c *x509.Certificate) {
				for i, e := range c.ExtraExtensions {
					if e.Id.Equal(asn1.ObjectIdentifier{2, 5, 29, 17}) {
						c.ExtraExtensions[i].Value, _ = asn1.Marshal([]asn1.RawValue{{Class: asn1.ClassContextSpecific, Tag: 6, Bytes: []byte("spiffe://cluster.local/ns/pca/sa/other")}})
					}
				}
			})
		}, wantCode: codes.Internal, wantReason: ca.ReasonSignerBadChain},
		{name: "certificate outliving the grant", fault: func(f *pcatest.Server) {
			f.SetMutate(func(c *x509.Certificate) { c.NotAfter = c.NotAfter.Add(time.Hour) })
		}, wantCode: codes.Internal, wantReason: ca.ReasonSignerBadChain},
		{name: "CA certificate", fault: func(f *pcatest.Server) {
			f.SetMutate(func(c *x509.Certificate) { c.BasicConstraintsValid, c.IsCA = true, true })
		}, wantCode: codes.Internal, wantReason: ca.ReasonSignerBadChain},
	} {
		t.Run(tc.name, func(t *testing.T) {
			fake := pcatest.Start(t, pcatest.Options{})
			s := newSigner(t, fake, tc.cfg)
			tc.fault(fake)
			res := catest.IssueThrough(t, awspca.Backend, s, workload, signertest.Key(3), catest.CSROptions{})
			if got := ca.Status(res.Err).Code(); got != tc.wantCode {
				t.Fatalf("code = %v, want %v (error: %v)", got, tc.wantCode, res.Err)
			}
			for op, n := range tc.wantCalls {
				if got := fake.Calls(op); got != n {
					t.Errorf("%s reached the fake %d times, want %d", op, got, n)
				}
			}
			if tc.wantCode == codes.OK {
				return
			}
			if res.Result != nil {
				t.Error("a failed request returned a certificate")
			}
			if res.Record.Reason != tc.wantReason || res.Record.Code != tc.wantCode.String() || res.Record.Serial != "" {
				t.Errorf("audit record reason %q code %q serial %q, want %q %q and no serial", res.Record.Reason, res.Record.Code, res.Record.Serial, tc.wantReason, tc.wantCode)
			}
			if tc.wantARN && !strings.Contains(res.Record.Detail, fake.CAARN+"/certificate/") {
				t.Errorf("audit detail %q does not name the certificate's ARN", res.Record.Detail)
			}
			if tc.wantCode == codes.Unavailable && !errors.Is(res.Err, signer.ErrSignerUnavailable) {
				t.Errorf("error %v does not wrap signer.ErrSignerUnavailable", res.Err)
			}
		})
	}
}

// TestRateLimit: a call the client's rate limit cannot admit before the
// deadline fails as unavailable without reaching PCA, and so does a request
// that finds every concurrency slot taken until its deadline.
func TestRateLimit(t *testing.T) {
	t.Run("rate", func(t *testing.T) {
		fake := pcatest.Start(t, pcatest.Options{})
		// New's refresh takes the only token; the next comes in 100 s.
		s := newSigner(t, fake, awspca.Config{RateLimit: 0.01, Timeout: 500 * time.Millisecond})
		res := catest.IssueThrough(t, awspca.Backend, s, workload, signertest.Key(4), catest.CSROptions{})
		if ca.Status(res.Err).Code() != codes.Unavailable || !errors.Is(res.Err, signer.ErrSignerUnavailable) {
			t.Fatalf("err = %v, want Unavailable", res.Err)
		}
		if got := fake.Calls(pcatest.OpIssueCertificate); got != 0 {
			t.Errorf("IssueCertificate reached the fake %d times, want 0", got)
		}
	})
	t.Run("concurrency", func(t *testing.T) {
		fake := pcatest.Start(t, pcatest.Options{})
		fake.SetPending(time.Hour)
		s := newSigner(t, fake, awspca.Config{MaxConcurrent: 1, Timeout: 2 * time.Second})
		first := make(chan error, 1)
		go func() {
			_, err := s.Sign(t.Context(), request(t, s, signertest.Key(5)))
			first <- err
		}()
		for fake.Calls(pcatest.OpGetCertificate) == 0 { // the first request holds the slot, polling
			time.Sleep(5 * time.Millisecond)
		}
		// The caller's deadline comes first: it ends the wait for a slot.
		ctx, cancel := context.WithTimeout(t.Context(), 200*time.Millisecond)
		defer cancel()
		_, err := s.Sign(ctx, request(t, s, signertest.Key(6)))
		if !errors.Is(err, context.DeadlineExceeded) || !strings.Contains(err.Error(), "1 requests already at PCA") {
			t.Errorf("second Sign: %v, want the deadline, waiting for a slot", err)
		}
		if got := fake.Calls(pcatest.OpIssueCertificate); got != 1 {
			t.Errorf("IssueCertificate reached the fake %d times, want 1", got)
		}
		if err := <-first; !errors.Is(err, signer.ErrSignerUnavailable) {
			t.Errorf("first Sign: %v, want unavailable (still in progress)", err)
		}
	})
}

// request is a workload request for key as the issuer makes it for s.
func request(t *testing.T, s *awspca.Signer, key crypto.Signer) signer.SignRequest {
	t.Helper()
	serial, err := signer.NewSerial(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now().Truncate(time.Second)
	tmpl := ca.LeafTemplate(workload, key.Public(), serial, now.Add(-signer.DefaultClockSkew), now.Add(time.Hour))
	tmpl.Subject = s.LeafSubject(workload)
	return signertest.Request(t, tmpl, workload, key)
}

// TestConfigRefused: a configuration PCA cannot serve correctly fails in
// New, naming what is wrong.
func TestConfigRefused(t *testing.T) {
	for _, tc := range []struct {
		name  string
		cfg   awspca.Config
		field string
		want  string
	}{
		{"not an ARN", awspca.Config{CertificateAuthorityARN: "ca-1234"}, "CertificateAuthorityARN", "is not a CA ARN"},
		{"a certificate ARN", awspca.Config{CertificateAuthorityARN: "arn:aws:acm-pca:eu-west-1:111122223333:certificate-authority/x/certificate/y"},
			"CertificateAuthorityARN", "is not a CA ARN"},
		{"another service", awspca.Config{CertificateAuthorityARN: "arn:aws:acm:eu-west-1:111122223333:certificate-authority/x"}, "CertificateAuthorityARN", "is not a CA ARN"},
		{"base template", awspca.Config{CertificateAuthorityARN: "arn:aws:acm-pca:eu-west-1:111122223333:certificate-authority/x",
			TemplateARN: "arn:aws:acm-pca:::template/EndEntityCertificate/V1"}, "TemplateARN", "only blank API-passthrough end-entity templates"},
		{"template of another partition", awspca.Config{CertificateAuthorityARN: "arn:aws-us-gov:acm-pca:us-gov-west-1:111122223333:certificate-authority/x",
			TemplateARN: "arn:aws:acm-pca:::template/" + awspca.TemplateBlank}, "TemplateARN", "arn:aws-us-gov:acm-pca:::template/"},
		{"unknown signing algorithm", awspca.Config{CertificateAuthorityARN: "arn:aws:acm-pca:eu-west-1:111122223333:certificate-authority/x",
			SigningAlgorithm: "SHA1WITHRSA"}, "SigningAlgorithm", "is not one of PCA's"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var fe *awspca.FieldError
			if err := tc.cfg.Validate(); !errors.As(err, &fe) || fe.Field != tc.field {
				t.Errorf("Validate: %v, want a FieldError for %s", err, tc.field)
			}
			_, err := awspca.New(t.Context(), tc.cfg)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("New: %v, want an error saying %q", err, tc.want)
			}
		})
	}
	if err := (awspca.Config{CertificateAuthorityARN: "arn:aws-cn:acm-pca:cn-north-1:111122223333:certificate-authority/x"}).Validate(); err != nil {
		t.Errorf("Validate of a China-partition CA with the default template: %v", err)
	}
}

// TestRSACA: the signing algorithm follows the CA's key family.
func TestRSACA(t *testing.T) {
	fake := pcatest.Start(t, pcatest.Options{RSA: true})
	s := newSigner(t, fake, awspca.Config{})
	res := catest.IssueThrough(t, awspca.Backend, s, workload, signertest.Key(7), catest.CSROptions{})
	if res.Err != nil {
		t.Fatalf("issue: %v", res.Err)
	}
	if got := fake.IssueRequests()[0].SigningAlgorithm; got != "SHA256WITHRSA" {
		t.Errorf("SigningAlgorithm = %s, want SHA256WITHRSA", got)
	}
	if alg := res.Result.Chain.Leaf.SignatureAlgorithm; alg != x509.SHA256WithRSA {
		t.Errorf("leaf signature algorithm = %v", alg)
	}
}
