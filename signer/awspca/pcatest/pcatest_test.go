package pcatest_test

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"encoding/base64"
	"encoding/pem"
	"errors"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/credentials"
	"github.com/aws/aws-sdk-go-v2/service/acmpca"
	"github.com/aws/aws-sdk-go-v2/service/acmpca/types"
	smithy "github.com/aws/smithy-go"

	"github.com/castellan-ca/castellan/signer/awspca/pcatest"
)

const (
	id        = "spiffe://cluster.local/ns/pca/sa/workload"
	base      = "arn:aws:acm-pca:::template/EndEntityCertificate/V1"
	blankAPI  = "arn:aws:acm-pca:::template/BlankEndEntityCertificate_APIPassthrough/V1"
	blankCrit = "arn:aws:acm-pca:::template/BlankEndEntityCertificate_CriticalBasicConstraints_APIPassthrough/V1"
)

var oidSAN = asn1.ObjectIdentifier{2, 5, 29, 17}

// csrSpec shapes a test CSR.
type csrSpec struct {
	subject     pkix.Name
	noSAN       bool
	criticalSAN bool
	key         crypto.Signer
	tamper      bool // flip a bit of the signature
}

func makeCSR(t *testing.T, s csrSpec) []byte {
	t.Helper()
	key := s.key
	if key == nil {
		key, _ = ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	}
	tmpl := &x509.CertificateRequest{Subject: s.subject}
	if !s.noSAN {
		val, _ := asn1.Marshal([]asn1.RawValue{{Class: asn1.ClassContextSpecific, Tag: 6, Bytes: []byte(id)}})
		tmpl.ExtraExtensions = []pkix.Extension{{Id: oidSAN, Critical: s.criticalSAN, Value: val}}
	}
	der, err := x509.CreateCertificateRequest(rand.Reader, tmpl, key)
	if err != nil {
		t.Fatal(err)
	}
	if s.tamper {
		der[len(der)-1] ^= 1
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der})
}

func sanExt(critical bool, uri string) types.CustomExtension {
	val, _ := asn1.Marshal([]asn1.RawValue{{Class: asn1.ClassContextSpecific, Tag: 6, Bytes: []byte(uri)}})
	return types.CustomExtension{ObjectIdentifier: aws.String("2.5.29.17"), Value: aws.String(base64.StdEncoding.EncodeToString(val)), Critical: aws.Bool(critical)}
}

// TestIssueCertificate checks the fake's reading of PCA's documentation,
// through the real SDK client: CSR validation (RFC 5280's empty subject
// rule included), template and API passthrough priorities, signing
// algorithm family, validity bounds and request signing.
func TestIssueCertificate(t *testing.T) {
	fake := pcatest.Start(t, pcatest.Options{})
	client := fake.Client()
	ztunnel := csrSpec{}
	edKey := func() crypto.Signer { _, k, _ := ed25519.GenerateKey(rand.Reader); return k }()
	for _, tc := range []struct {
		name     string
		csr      csrSpec
		template string
		api      *types.ApiPassthrough
		mod      func(*acmpca.IssueCertificateInput)
		client   *acmpca.Client
		wantCode string // PCA's error code; "" means issued
		check    func(t *testing.T, c *x509.Certificate)
	}{
		{name: "base template refuses a ztunnel CSR (empty subject, non-critical SAN)", csr: ztunnel, template: base,
			wantCode: "MalformedCSRException"},
		{name: "base template ignores API passthrough", csr: ztunnel, template: base,
			api:      &types.ApiPassthrough{Subject: &types.ASN1Subject{Organization: aws.String("cluster.local")}},
			wantCode: "MalformedCSRException"},
		{name: "base template: CSR subject and SAN, fixed usages", csr: csrSpec{criticalSAN: true}, template: base,
			check: func(t *testing.T, c *x509.Certificate) {
				if c.KeyUsage != x509.KeyUsageDigitalSignature|x509.KeyUsageKeyEncipherment || len(c.Subject.Names) != 0 || c.URIs[0].String() != id {
					t.Errorf("KeyUsage %b subject %q URIs %v", c.KeyUsage, c.Subject, c.URIs)
				}
			}},
		{name: "blank template without passthrough refuses a ztunnel CSR", csr: ztunnel, template: blankCrit, wantCode: "MalformedCSRException"},
		{name: "API subject: the CSR's non-critical SAN is copied beside it", csr: ztunnel, template: blankCrit,
			api: &types.ApiPassthrough{Subject: &types.ASN1Subject{Organization: aws.String("cluster.local")}},
			check: func(t *testing.T, c *x509.Certificate) {
				if c.Subject.String() != "O=cluster.local" || critical(c, oidSAN) || c.KeyUsage != 0 {
					t.Errorf("subject %q, SAN critical %v, KeyUsage %b; want the API's subject, the CSR's SAN, no key usage", c.Subject, critical(c, oidSAN), c.KeyUsage)
				}
			}},
		{name: "API critical SAN with an empty subject", csr: ztunnel, template: blankCrit,
			api: &types.ApiPassthrough{Extensions: &types.Extensions{CustomExtensions: []types.CustomExtension{sanExt(true, id)}}},
			check: func(t *testing.T, c *x509.Certificate) {
				if len(c.Subject.Names) != 0 || !critical(c, oidSAN) {
					t.Errorf("subject %q, SAN critical %v; want empty and critical", c.Subject, critical(c, oidSAN))
				}
			}},
		{name: "API SAN replaces the CSR's", csr: ztunnel, template: blankAPI,
			api: &types.ApiPassthrough{Subject: &types.ASN1Subject{Organization: aws.String("cluster.local")},
				Extensions: &types.Extensions{CustomExtensions: []types.CustomExtension{sanExt(false, "spiffe://cluster.local/ns/pca/sa/api")}}},
			check: func(t *testing.T, c *x509.Certificate) {
				if len(c.URIs) != 1 || c.URIs[0].String() != "spiffe://cluster.local/ns/pca/sa/api" || critical(c, asn1.ObjectIdentifier{2, 5, 29, 19}) {
					t.Errorf("URIs %v, basic constraints critical %v; want the API's SAN, non-critical CA:FALSE", c.URIs, critical(c, asn1.ObjectIdentifier{2, 5, 29, 19}))
				}
			}},
		{name: "typed API SAN is critical with an empty subject", csr: ztunnel, template: blankCrit,
			api: &types.ApiPassthrough{Extensions: &types.Extensions{SubjectAlternativeNames: []types.GeneralName{{UniformResourceIdentifier: aws.String(id)}}}},
			check: func(t *testing.T, c *x509.Certificate) {
				if !critical(c, oidSAN) {
					t.Error("typed SAN beside an empty subject is not critical")
				}
			}},
		{name: "one SAN given twice", csr: ztunnel, template: blankCrit,
			api: &types.ApiPassthrough{Extensions: &types.Extensions{SubjectAlternativeNames: []types.GeneralName{{UniformResourceIdentifier: aws.String(id)}},
				CustomExtensions: []types.CustomExtension{sanExt(true, id)}}},
			wantCode: "ValidationException"},
		{name: "empty SAN entry", csr: csrSpec{subject: pkix.Name{CommonName: "x"}}, template: blankCrit,
			api:      &types.ApiPassthrough{Extensions: &types.Extensions{CustomExtensions: []types.CustomExtension{sanExt(false, " ")}}},
			wantCode: "MalformedCSRException"},
		{name: "empty subject and no SAN", csr: csrSpec{noSAN: true}, template: blankCrit, wantCode: "MalformedCSRException"},
		{name: "Ed25519 key", csr: csrSpec{criticalSAN: true, key: edKey}, template: blankCrit, wantCode: "MalformedCSRException"},
		{name: "CSR signature does not verify", csr: csrSpec{criticalSAN: true, tamper: true}, template: blankCrit, wantCode: "MalformedCSRException"},
		{name: "template the fake does not model", csr: csrSpec{criticalSAN: true}, template: "arn:aws:acm-pca:::template/CodeSigningCertificate/V1",
			wantCode: "InvalidArgsException"},
		{name: "signing algorithm of another family", csr: csrSpec{criticalSAN: true}, template: blankCrit,
			mod: func(in *acmpca.IssueCertificateInput) { in.SigningAlgorithm = types.SigningAlgorithmSha256withrsa }, wantCode: "InvalidArgsException"},
		{name: "NotAfter past the CA's", csr: csrSpec{criticalSAN: true}, template: blankCrit,
			mod: func(in *acmpca.IssueCertificateInput) {
				in.Validity.Value = aws.Int64(fake.CACertificate().NotAfter.Add(time.Second).Unix())
			}, wantCode: "ValidationException"},
		{name: "unknown access key", csr: csrSpec{criticalSAN: true}, template: blankCrit,
			client: fake.Client(func(o *acmpca.Options) {
				o.Credentials = credentials.NewStaticCredentialsProvider("AKIAOTHER", pcatest.SecretAccessKey, "")
			}), wantCode: "UnrecognizedClientException"},
		{name: "wrong secret key", csr: csrSpec{criticalSAN: true}, template: blankCrit,
			client: fake.Client(func(o *acmpca.Options) {
				o.Credentials = credentials.NewStaticCredentialsProvider(pcatest.AccessKeyID, "not-the-secret", "")
			}), wantCode: "InvalidSignatureException"},
		{name: "another region", csr: csrSpec{criticalSAN: true}, template: blankCrit,
			client: fake.Client(func(o *acmpca.Options) { o.Region = "us-east-1" }), wantCode: "InvalidSignatureException"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			in := &acmpca.IssueCertificateInput{
				CertificateAuthorityArn: aws.String(fake.CAARN),
				Csr:                     makeCSR(t, tc.csr),
				SigningAlgorithm:        types.SigningAlgorithmSha256withecdsa,
				TemplateArn:             aws.String(tc.template),
				Validity:                &types.Validity{Type: types.ValidityPeriodTypeAbsolute, Value: aws.Int64(time.Now().Add(time.Hour).Unix())},
				ApiPassthrough:          tc.api,
			}
			if tc.mod != nil {
				tc.mod(in)
			}
			c := client
			if tc.client != nil {
				c = tc.client
			}
			out, err := c.IssueCertificate(t.Context(), in, func(o *acmpca.Options) { o.RetryMaxAttempts = 1 })
			var apiErr smithy.APIError
			switch {
			case tc.wantCode != "":
				if !errors.As(err, &apiErr) || apiErr.ErrorCode() != tc.wantCode {
					t.Fatalf("IssueCertificate: %v, want %s", err, tc.wantCode)
				}
				return
			case err != nil:
				t.Fatalf("IssueCertificate: %v", err)
			}
			got, err := c.GetCertificate(t.Context(), &acmpca.GetCertificateInput{CertificateArn: out.CertificateArn, CertificateAuthorityArn: aws.String(fake.CAARN)})
			if err != nil {
				t.Fatalf("GetCertificate: %v", err)
			}
			block, _ := pem.Decode([]byte(aws.ToString(got.Certificate)))
			cert, err := x509.ParseCertificate(block.Bytes)
			if err != nil {
				t.Fatal(err)
			}
			if err := cert.CheckSignatureFrom(fake.CACertificate()); err != nil || !bytes.Equal(cert.AuthorityKeyId, fake.CACertificate().SubjectKeyId) {
				t.Errorf("certificate not signed by the fake's CA (AKI %x): %v", cert.AuthorityKeyId, err)
			}
			if !strings.HasSuffix(aws.ToString(out.CertificateArn), "/certificate/"+strings.TrimLeft(cert.SerialNumber.Text(16), "0")) {
				t.Errorf("ARN %s does not end with the serial %x", aws.ToString(out.CertificateArn), cert.SerialNumber)
			}
			tc.check(t, cert)
		})
	}
}

func critical(c *x509.Certificate, oid asn1.ObjectIdentifier) bool {
	i := slices.IndexFunc(c.Extensions, func(e pkix.Extension) bool { return e.Id.Equal(oid) })
	return i >= 0 && c.Extensions[i].Critical
}

// TestIdempotencyAndProgress: one token issues one certificate for five
// minutes; a certificate in progress answers RequestInProgressException.
func TestIdempotencyAndProgress(t *testing.T) {
	var mu sync.Mutex
	now := time.Now()
	clock := func() time.Time { mu.Lock(); defer mu.Unlock(); return now }
	fake := pcatest.Start(t, pcatest.Options{Now: clock})
	client := fake.Client()
	csr := makeCSR(t, csrSpec{criticalSAN: true})
	issue := func() string {
		t.Helper()
		out, err := client.IssueCertificate(t.Context(), &acmpca.IssueCertificateInput{
			CertificateAuthorityArn: aws.String(fake.CAARN), Csr: csr, SigningAlgorithm: types.SigningAlgorithmSha256withecdsa,
			TemplateArn: aws.String(blankCrit), IdempotencyToken: aws.String("token-1"),
			Validity: &types.Validity{Type: types.ValidityPeriodTypeDays, Value: aws.Int64(1)},
		})
		if err != nil {
			t.Fatal(err)
		}
		return aws.ToString(out.CertificateArn)
	}
	fake.SetPending(time.Minute)
	first := issue()
	if again := issue(); again != first || fake.Issued() != 1 {
		t.Errorf("same token: ARN %s then %s, %d certificates; want one", first, again, fake.Issued())
	}
	_, err := client.GetCertificate(t.Context(), &acmpca.GetCertificateInput{CertificateArn: aws.String(first), CertificateAuthorityArn: aws.String(fake.CAARN)})
	var inProgress *types.RequestInProgressException
	if !errors.As(err, &inProgress) {
		t.Errorf("GetCertificate while pending: %v, want RequestInProgressException", err)
	}
	mu.Lock()
	now = now.Add(6 * time.Minute)
	mu.Unlock()
	if later := issue(); later == first || fake.Issued() != 2 {
		t.Errorf("same token after five minutes: ARN %s (first %s), %d certificates; want a new one", later, first, fake.Issued())
	}
	if _, err := client.GetCertificate(t.Context(), &acmpca.GetCertificateInput{CertificateArn: aws.String(first), CertificateAuthorityArn: aws.String(fake.CAARN)}); err != nil {
		t.Errorf("GetCertificate once ready: %v", err)
	}
}

// TestCACertificate: a subordinate CA reports its chain up to the root, a
// root CA none; a rotation re-certifies the subordinate's key under a new root.
func TestCACertificate(t *testing.T) {
	get := func(t *testing.T, fake *pcatest.Server) (*x509.Certificate, string) {
		out, err := fake.Client().GetCertificateAuthorityCertificate(t.Context(),
			&acmpca.GetCertificateAuthorityCertificateInput{CertificateAuthorityArn: aws.String(fake.CAARN)})
		if err != nil {
			t.Fatal(err)
		}
		block, _ := pem.Decode([]byte(aws.ToString(out.Certificate)))
		c, _ := x509.ParseCertificate(block.Bytes)
		return c, aws.ToString(out.CertificateChain)
	}
	t.Run("root CA", func(t *testing.T) {
		fake := pcatest.Start(t, pcatest.Options{RootIssues: true})
		c, chain := get(t, fake)
		if !c.Equal(fake.Root()) || chain != "" {
			t.Errorf("root CA: certificate is the root %v, chain %q; want the root and no chain", c.Equal(fake.Root()), chain)
		}
		fake.Rotate(t)
		renewed, _ := get(t, fake)
		if renewed.Equal(c) || !bytes.Equal(renewed.RawSubjectPublicKeyInfo, c.RawSubjectPublicKeyInfo) || renewed.CheckSignatureFrom(renewed) != nil {
			t.Error("rotation did not renew the root CA's certificate for its key")
		}
	})
	t.Run("rotation", func(t *testing.T) {
		fake := pcatest.Start(t, pcatest.Options{})
		before, _ := get(t, fake)
		fake.Rotate(t)
		after, chain := get(t, fake)
		if after.Equal(before) || !bytes.Equal(after.RawSubjectPublicKeyInfo, before.RawSubjectPublicKeyInfo) || after.CheckSignatureFrom(fake.Root()) != nil {
			t.Error("rotation did not re-certify the CA's key under the new root")
		}
		if !strings.Contains(chain, "BEGIN CERTIFICATE") {
			t.Errorf("chain %q", chain)
		}
	})
}
