package googlecas_test

import (
	"crypto/rand"
	"crypto/x509"
	"encoding/hex"
	"encoding/pem"
	"net/url"
	"regexp"
	"slices"
	"sync/atomic"
	"testing"
	"time"

	"cloud.google.com/go/security/privateca/apiv1/privatecapb"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/castellan-ca/castellan/ca"
	"github.com/castellan-ca/castellan/ca/catest"
	"github.com/castellan-ca/castellan/signer"
	"github.com/castellan-ca/castellan/signer/googlecas"
	"github.com/castellan-ca/castellan/signer/googlecas/castest"
	"github.com/castellan-ca/castellan/signer/signertest"
)

var workload = spiffeid.RequireFromString("spiffe://cluster.local/ns/cas/sa/workload")

// newSigner returns a signer on the fake's pool, running until the test ends.
func newSigner(t *testing.T, fake *castest.Server, cfg googlecas.Config) *googlecas.Signer {
	t.Helper()
	cfg.CAPool = castest.Pool
	cfg.ClientOptions = fake.ClientOptions()
	if cfg.Timeout == 0 {
		cfg.Timeout = 5 * time.Second
	}
	s, err := googlecas.New(t.Context(), cfg)
	if err != nil {
		t.Fatalf("googlecas.New: %v", err)
	}
	t.Cleanup(func() {
		if err := s.Close(); err != nil {
			t.Errorf("close: %v", err)
		}
	})
	signertest.RunUntilCleanup(t, s.Run) // its cleanup runs first: Run ends before Close
	return s
}

// TestConformance runs the shared suite with the real client library against
// the fake CAS; its outage stops the gRPC server and restarts it.
func TestConformance(t *testing.T) {
	fake := castest.Start(t)
	signertest.Run(t, signertest.Factory{
		New: func(t *testing.T) signer.Signer { return newSigner(t, fake, googlecas.Config{}) },
		Outage: func(t *testing.T, _ signer.Signer) func() {
			fake.Stop()
			return func() { fake.Restart(t) }
		},
		ServerSerial: true,
		Remote:       true,
	})
}

// TestRequestFields asserts exactly what the client library puts on the
// wire: config mode with the granted identity, never the CSR.
func TestRequestFields(t *testing.T) {
	fake := castest.Start(t)
	for _, tc := range []struct {
		name   string
		cfg    googlecas.Config
		key    int
		wantCA string
	}{
		{"pool", googlecas.Config{}, 0, ""},
		{"pinned CA", googlecas.Config{CertificateAuthority: castest.CAID}, 1, castest.CAID},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := newSigner(t, fake, tc.cfg)
			key := signertest.Key(tc.key)
			now := time.Now().Truncate(time.Second)
			serial, _ := signer.NewSerial(rand.Reader)
			tmpl := ca.LeafTemplate(workload, key.Public(), serial, now.Add(-2*time.Minute), now.Add(time.Hour))
			n := len(fake.Requests())
			if _, err := s.Sign(t.Context(), signertest.Request(t, tmpl, workload, key)); err != nil {
				t.Fatal(err)
			}
			reqs := fake.Requests()[n:]
			if len(reqs) != 1 {
				t.Fatalf("fake received %d requests, want 1", len(reqs))
			}
			r := reqs[0]
			cfg := r.GetCertificate().GetConfig()
			pubDER, _ := x509.MarshalPKIXPublicKey(key.Public())
			gotKey, _ := pem.Decode(cfg.GetPublicKey().GetKey())
			for _, f := range []struct {
				name      string
				got, want any
			}{
				{"parent", r.GetParent(), castest.Pool},
				{"certificate_id", r.GetCertificateId(), "castellan-" + hex.EncodeToString(serial.Bytes())},
				{"issuing_certificate_authority_id", r.GetIssuingCertificateAuthorityId(), tc.wantCA},
				{"pem_csr", r.GetCertificate().GetPemCsr(), ""},
				{"lifetime", r.GetCertificate().GetLifetime().AsDuration(), time.Hour + 2*time.Minute},
				{"requested_not_before_time", r.GetCertificate().GetRequestedNotBeforeTime().AsTime(), tmpl.NotBefore},
				{"subject", cfg.GetSubjectConfig().GetSubject().String(), ""},
				{"uris", cfg.GetSubjectConfig().GetSubjectAltName().GetUris(), []string{workload.String()}},
				{"dns_names", len(cfg.GetSubjectConfig().GetSubjectAltName().GetDnsNames()), 0},
				{"digital_signature", cfg.GetX509Config().GetKeyUsage().GetBaseKeyUsage().GetDigitalSignature(), true},
				{"key_encipherment", cfg.GetX509Config().GetKeyUsage().GetBaseKeyUsage().GetKeyEncipherment(), false},
				{"server_auth", cfg.GetX509Config().GetKeyUsage().GetExtendedKeyUsage().GetServerAuth(), true},
				{"client_auth", cfg.GetX509Config().GetKeyUsage().GetExtendedKeyUsage().GetClientAuth(), true},
				{"is_ca", cfg.GetX509Config().GetCaOptions().IsCa != nil && !cfg.GetX509Config().GetCaOptions().GetIsCa(), true},
				{"public_key format", cfg.GetPublicKey().GetFormat(), privatecapb.PublicKey_PEM},
				{"public_key", gotKey != nil && gotKey.Type == "PUBLIC KEY" && string(gotKey.Bytes) == string(pubDER), true},
				{"request_id is a UUID", regexp.MustCompile(`^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$`).MatchString(r.GetRequestId()), true},
			} {
				if !equal(f.got, f.want) {
					t.Errorf("%s = %v, want %v", f.name, f.got, f.want)
				}
			}
		})
	}
}

func equal(a, b any) bool {
	if as, ok := a.([]string); ok {
		bs, _ := b.([]string)
		return slices.Equal(as, bs)
	}
	if at, ok := a.(time.Time); ok {
		return at.Equal(b.(time.Time))
	}
	return a == b
}

// TestRetryIsIdempotent: the client library retries an Unavailable answer
// with the same request_id and certificate_id, so a response lost after CAS
// issued gives back that certificate instead of a second one.
func TestRetryIsIdempotent(t *testing.T) {
	fake := castest.Start(t)
	s := newSigner(t, fake, googlecas.Config{})
	var calls atomic.Int32
	fake.Fail = func(*privatecapb.CreateCertificateRequest) (error, bool) {
		if calls.Add(1) == 1 {
			return status.Error(codes.Unavailable, "connection reset after issuing"), true
		}
		return nil, false
	}
	n, issued := len(fake.Requests()), fake.Issued()
	res := catest.IssueThrough(t, googlecas.Backend, s, workload, signertest.Key(2), catest.CSROptions{})
	if res.Err != nil {
		t.Fatalf("issue: %v", res.Err)
	}
	reqs := fake.Requests()[n:]
	if len(reqs) != 2 {
		t.Fatalf("fake received %d requests, want 2 (one retry)", len(reqs))
	}
	if reqs[0].GetRequestId() != reqs[1].GetRequestId() || reqs[0].GetCertificateId() != reqs[1].GetCertificateId() {
		t.Errorf("retry changed ids: request %q→%q, certificate %q→%q", reqs[0].GetRequestId(), reqs[1].GetRequestId(), reqs[0].GetCertificateId(), reqs[1].GetCertificateId())
	}
	if got := fake.Issued() - issued; got != 1 {
		t.Errorf("fake issued %d certificates, want 1", got)
	}
}

// TestErrorsThroughIssuer maps CAS answers to what the client and the audit
// log see: transient ones to Unavailable, refusals to Internal, and a wrong
// certificate to Internal (signer.bad_result), never to the client.
func TestErrorsThroughIssuer(t *testing.T) {
	fake := castest.Start(t)
	other, _ := url.Parse("spiffe://cluster.local/ns/cas/sa/other")
	for _, tc := range []struct {
		name       string
		fail       error
		mutate     func(*x509.Certificate)
		wantCode   codes.Code
		wantReason string
	}{
		{"quota exhausted", status.Error(codes.ResourceExhausted, "quota exceeded for CreateCertificate"), nil, codes.Unavailable, ca.ReasonSignerDown},
		{"unavailable", status.Error(codes.Unavailable, "backend down"), nil, codes.Unavailable, ca.ReasonSignerDown},
		{"invalid argument", status.Error(codes.InvalidArgument, "identity constraints violated"), nil, codes.Internal, ca.ReasonSignerError},
		{"permission denied", status.Error(codes.PermissionDenied, "caller lacks privateca.certificates.create"), nil, codes.Internal, ca.ReasonSignerError},
		{"certificate for another SAN", nil, func(c *x509.Certificate) { c.URIs = []*url.URL{other} }, codes.Internal, ca.ReasonSignerBadChain},
		{"certificate with an extra DNS SAN", nil, func(c *x509.Certificate) { c.DNSNames = []string{"evil.example.com"} }, codes.Internal, ca.ReasonSignerBadChain},
		{"certificate outliving the grant", nil, func(c *x509.Certificate) { c.NotAfter = c.NotAfter.Add(time.Hour) }, codes.Internal, ca.ReasonSignerBadChain},
		{"CA certificate", nil, func(c *x509.Certificate) { c.IsCA = true }, codes.Internal, ca.ReasonSignerBadChain},
	} {
		t.Run(tc.name, func(t *testing.T) {
			fake.Fail = func(*privatecapb.CreateCertificateRequest) (error, bool) { return tc.fail, false }
			fake.Mutate = tc.mutate
			t.Cleanup(func() { fake.Fail, fake.Mutate = nil, nil })
			s := newSigner(t, fake, googlecas.Config{Timeout: 2 * time.Second})
			res := catest.IssueThrough(t, googlecas.Backend, s, workload, signertest.Key(3), catest.CSROptions{})
			if got := ca.Status(res.Err).Code(); got != tc.wantCode {
				t.Fatalf("code = %v, want %v (error: %v)", got, tc.wantCode, res.Err)
			}
			if res.Result != nil {
				t.Error("a failed request returned a certificate")
			}
			if res.Record.Reason != tc.wantReason || res.Record.Code != tc.wantCode.String() || res.Record.Serial != "" {
				t.Errorf("audit record reason %q code %q serial %q, want %q %q and no serial", res.Record.Reason, res.Record.Code, res.Record.Serial, tc.wantReason, tc.wantCode)
			}
		})
	}
}

// TestPoolPolicyRefusesNotBefore: a pool that does not allow
// requester-specified not_before_time refuses every request (configuration
// error, Internal), which the README tells operators to enable.
func TestPoolPolicyRefusesNotBefore(t *testing.T) {
	fake := castest.Start(t)
	fake.AllowNotBefore = false
	s := newSigner(t, fake, googlecas.Config{})
	res := catest.IssueThrough(t, googlecas.Backend, s, workload, signertest.Key(4), catest.CSROptions{})
	if ca.Status(res.Err).Code() != codes.Internal || status.Code(res.Err) != codes.FailedPrecondition {
		t.Errorf("err = %v, want Internal from CAS's FailedPrecondition", res.Err)
	}
}

// TestTrustBundleFollowsPool rotates the pool's CAs and shows the bundle
// following, by polling and as soon as a leaf comes from an unknown root.
func TestTrustBundleFollowsPool(t *testing.T) {
	for _, tc := range []struct {
		name    string
		refresh time.Duration
		sign    bool
	}{
		{"poll", 100 * time.Millisecond, false},
		{"leaf from an unknown root", time.Hour, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			fake := castest.Start(t)
			changed := make(chan struct{}, 1)
			s := newSigner(t, fake, googlecas.Config{RefreshInterval: tc.refresh, OnChange: func() { changed <- struct{}{} }})
			fake.Rotate(t)
			if tc.sign {
				key := signertest.Key(5)
				serial, _ := signer.NewSerial(rand.Reader)
				tmpl := ca.LeafTemplate(workload, key.Public(), serial, time.Now().Add(-time.Minute), time.Now().Add(time.Hour))
				if _, err := s.Sign(t.Context(), signertest.Request(t, tmpl, workload, key)); err != nil {
					t.Fatal(err)
				}
			}
			select {
			case <-changed:
			case <-time.After(30 * time.Second):
				t.Fatal("OnChange not called after the pool's CAs changed")
			}
			if got := s.TrustBundle(); len(got) != 1 || !got[0].Equal(fake.Root.Cert) {
				t.Fatalf("TrustBundle = %d certificates, want the new root", len(got))
			}
		})
	}
}
