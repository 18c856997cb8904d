package kubesign

import (
	"context"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"net"
	"net/url"
	"slices"
	"testing"
	"time"

	certv1 "k8s.io/api/certificates/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/utils/ptr"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/castellan-ca/castellan/ca"
	"github.com/castellan-ca/castellan/signer"
	"github.com/castellan-ca/castellan/signer/signertest"
	"github.com/castellan-ca/castellan/storage"
)

const (
	raSigner  = "example.com/istiod-ra"
	dnsSigner = "example.com/istiod-dns"
	istiod    = "system:serviceaccount:istio-system:istiod"
)

var testPolicies = []CSRPolicy{
	{SignerName: raSigner, Requesters: []string{istiod}},
	{SignerName: dnsSigner, Requesters: []string{istiod}, Identities: IdentitiesNone, DNSNames: []string{"istiod.istio-system.svc"}},
	{SignerName: "example.com/castellan", Requesters: []string{"system:serviceaccount:mesh:castellan"}, Identities: IdentitiesTrustDomain,
		DNSNames: []string{"castellan.mesh.svc"}},
}

// csrPEM is a CSR with the given SANs, as Istio makes them (subject O=).
func csrPEM(t testing.TB, uris []string, dns []string, ips []net.IP) []byte {
	t.Helper()
	tmpl := &x509.CertificateRequest{Subject: pkix.Name{Organization: []string{""}}, DNSNames: dns, IPAddresses: ips}
	for _, u := range uris {
		pu, err := url.Parse(u)
		if err != nil {
			t.Fatal(err)
		}
		tmpl.URIs = append(tmpl.URIs, pu)
	}
	der, err := x509.CreateCertificateRequest(rand.Reader, tmpl, signertest.Key(5))
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der})
}

func approved(csr *certv1.CertificateSigningRequest) *certv1.CertificateSigningRequest {
	csr.Status.Conditions = append(csr.Status.Conditions, certv1.CertificateSigningRequestCondition{
		Type: certv1.CertificateApproved, Status: corev1.ConditionTrue, Reason: "Approved", LastUpdateTime: metav1.Now()})
	return csr
}

func TestCSRSigners(t *testing.T) {
	workload := "spiffe://cluster.local/ns/app/sa/web"
	newCSR := func(signerName, user string, request []byte) *certv1.CertificateSigningRequest {
		return &certv1.CertificateSigningRequest{
			ObjectMeta: metav1.ObjectMeta{Name: "csr-1", UID: "csr-uid", CreationTimestamp: metav1.Now()},
			Spec: certv1.CertificateSigningRequestSpec{SignerName: signerName, Username: user, Request: request,
				Usages: []certv1.KeyUsage{certv1.UsageDigitalSignature, certv1.UsageKeyEncipherment, certv1.UsageServerAuth, certv1.UsageClientAuth}},
		}
	}
	for _, tc := range []struct {
		name string
		csr  *certv1.CertificateSigningRequest
		// wantReason is the Failed condition's reason; "" for a certificate.
		wantReason string
		wantURI    string
		wantDNS    []string
		wantLife   time.Duration
	}{
		{name: "workload for istiod RA", csr: approved(newCSR(raSigner, istiod, csrPEM(t, []string{workload}, nil, nil))),
			wantURI: workload, wantLife: ca.DefaultTTL + signer.DefaultClockSkew},
		{name: "expirationSeconds honoured", csr: func() *certv1.CertificateSigningRequest {
			c := approved(newCSR(raSigner, istiod, csrPEM(t, []string{workload}, nil, nil)))
			c.Spec.ExpirationSeconds = ptr.To[int32](3600)
			return c
		}(), wantURI: workload, wantLife: time.Hour + signer.DefaultClockSkew},
		{name: "expirationSeconds above the maximum shortened", csr: func() *certv1.CertificateSigningRequest {
			c := approved(newCSR(dnsSigner, istiod, csrPEM(t, nil, []string{"istiod.istio-system.svc"}, nil)))
			c.Spec.ExpirationSeconds = ptr.To[int32](10 * 365 * 24 * 3600) // istiod asks for 10 years
			return c
		}(), wantDNS: []string{"istiod.istio-system.svc"}, wantLife: ca.DefaultMaxTTL + signer.DefaultClockSkew},
		{name: "operator identity for a Castellan behind this one", wantURI: "spiffe://cluster.local/castellan/operator",
			csr:      approved(newCSR("example.com/castellan", "system:serviceaccount:mesh:castellan", csrPEM(t, []string{"spiffe://cluster.local/castellan/operator"}, nil, nil))),
			wantLife: ca.DefaultTTL + signer.DefaultClockSkew},
		{name: "another requester", csr: approved(newCSR(raSigner, "system:serviceaccount:app:web", csrPEM(t, []string{workload}, nil, nil))),
			wantReason: "RequesterNotAuthorized"},
		{name: "DNS name not listed", csr: approved(newCSR(dnsSigner, istiod, csrPEM(t, nil, []string{"evil.example.com"}, nil))),
			wantReason: "ForbiddenSubjectAltName"},
		{name: "URI SAN from a DNS signer", csr: approved(newCSR(dnsSigner, istiod, csrPEM(t, []string{workload}, []string{"istiod.istio-system.svc"}, nil))),
			wantReason: "ForbiddenSubjectAltName"},
		{name: "DNS SAN from a workload signer", csr: approved(newCSR(raSigner, istiod, csrPEM(t, []string{workload}, []string{"istiod.istio-system.svc"}, nil))),
			wantReason: "ForbiddenSubjectAltName"},
		{name: "other trust domain", csr: approved(newCSR(raSigner, istiod, csrPEM(t, []string{"spiffe://evil.example/ns/app/sa/web"}, nil, nil))),
			wantReason: "ForbiddenSubjectAltName"},
		{name: "not a workload path", csr: approved(newCSR(raSigner, istiod, csrPEM(t, []string{"spiffe://cluster.local/castellan/operator"}, nil, nil))),
			wantReason: "ForbiddenSubjectAltName"},
		{name: "IP SAN", csr: approved(newCSR(raSigner, istiod, csrPEM(t, []string{workload}, nil, []net.IP{net.IPv4(10, 0, 0, 1)}))),
			wantReason: "ForbiddenSubjectAltName"},
		{name: "no SAN", csr: approved(newCSR(raSigner, istiod, csrPEM(t, nil, nil, nil))), wantReason: "ForbiddenSubjectAltName"},
		{name: "CA usage", csr: func() *certv1.CertificateSigningRequest {
			c := approved(newCSR(raSigner, istiod, csrPEM(t, []string{workload}, nil, nil)))
			c.Spec.Usages = append(c.Spec.Usages, certv1.UsageCertSign)
			return c
		}(), wantReason: "UnsupportedUsages"},
		{name: "request not a CSR", csr: approved(newCSR(raSigner, istiod, []byte("-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"))),
			wantReason: "InvalidRequest"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t)
			if _, err := e.client.CertificatesV1().CertificateSigningRequests().Create(context.Background(), tc.csr, metav1.CreateOptions{}); err != nil {
				t.Fatal(err)
			}
			run(t, e.csrSigner)
			var got *certv1.CertificateSigningRequest
			eventually(t, "the answer", func() bool {
				got, _ = e.client.CertificatesV1().CertificateSigningRequests().Get(context.Background(), "csr-1", metav1.GetOptions{})
				return len(got.Status.Certificate) > 0 || len(got.Status.Conditions) > 1
			})
			recs := e.records(t)
			if len(recs) != 1 || recs[0].AuthMethod != MethodCSR || recs[0].Caller != tc.csr.Spec.Username || recs[0].Peer != "csr/csr-1/csr-uid" {
				t.Fatalf("records = %+v, want one kubernetes.csr record of the requester", recs)
			}
			if tc.wantReason != "" {
				last := got.Status.Conditions[len(got.Status.Conditions)-1]
				if last.Type != certv1.CertificateFailed || last.Reason != tc.wantReason || len(got.Status.Certificate) != 0 {
					t.Errorf("status = %+v, want Failed %s and no certificate", got.Status, tc.wantReason)
				}
				if recs[0].Outcome != storage.OutcomeRefused {
					t.Errorf("record outcome = %s, want refused", recs[0].Outcome)
				}
				return
			}
			certs, err := signer.ParseCertificatesPEM(got.Status.Certificate)
			if err != nil {
				t.Fatal(err)
			}
			leaf := certs[0]
			var uris []string
			for _, u := range leaf.URIs {
				uris = append(uris, u.String())
			}
			if tc.wantURI != "" && !slices.Equal(uris, []string{tc.wantURI}) || tc.wantURI == "" && len(uris) > 0 || !slices.Equal(leaf.DNSNames, tc.wantDNS) {
				t.Errorf("leaf SANs URI %v DNS %v, want %q %v", uris, leaf.DNSNames, tc.wantURI, tc.wantDNS)
			}
			if d := leaf.NotAfter.Sub(leaf.NotBefore); d != tc.wantLife {
				t.Errorf("lifetime %s, want %s", d, tc.wantLife)
			}
			if len(leaf.Subject.Names) != 0 {
				t.Errorf("leaf subject %q: the CSR's subject was copied", leaf.Subject)
			}
			if recs[0].Outcome != storage.OutcomeIssued || recs[0].Serial != leaf.SerialNumber.Text(16) {
				t.Errorf("record = %+v", recs[0])
			}
		})
	}
}

// TestCSRSignersLeaveAlone checks the requests the signer must not touch:
// not approved, denied, another signer's, already signed.
func TestCSRSignersLeaveAlone(t *testing.T) {
	e := newEnv(t)
	req := csrPEM(t, []string{"spiffe://cluster.local/ns/app/sa/web"}, nil, nil)
	mk := func(name, signerName string) *certv1.CertificateSigningRequest {
		return &certv1.CertificateSigningRequest{ObjectMeta: metav1.ObjectMeta{Name: name, UID: types.UID(name)},
			Spec: certv1.CertificateSigningRequestSpec{SignerName: signerName, Username: istiod, Request: req}}
	}
	denied := mk("denied", raSigner)
	denied.Status.Conditions = []certv1.CertificateSigningRequestCondition{{Type: certv1.CertificateDenied, Status: corev1.ConditionTrue}}
	signed := approved(mk("signed", raSigner))
	signed.Status.Certificate = []byte("x")
	for _, c := range []*certv1.CertificateSigningRequest{mk("pending", raSigner), denied, signed,
		approved(mk("kubelet", "kubernetes.io/kubelet-serving")), approved(mk("other", "example.com/other")), approved(mk("marker", raSigner))} {
		if _, err := e.client.CertificatesV1().CertificateSigningRequests().Create(context.Background(), c, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	run(t, e.csrSigner)
	eventually(t, "the marker request", func() bool {
		c, _ := e.client.CertificatesV1().CertificateSigningRequests().Get(context.Background(), "marker", metav1.GetOptions{})
		return len(c.Status.Certificate) > 0
	})
	for _, name := range []string{"pending", "denied", "kubelet", "other"} {
		c, err := e.client.CertificatesV1().CertificateSigningRequests().Get(context.Background(), name, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if len(c.Status.Certificate) > 0 || slices.ContainsFunc(c.Status.Conditions, func(c certv1.CertificateSigningRequestCondition) bool {
			return c.Type == certv1.CertificateFailed
		}) {
			t.Errorf("%s was answered: %+v", name, c.Status)
		}
	}
	if n := len(e.records(t)); n != 1 {
		t.Errorf("records = %d, want the marker's only", n)
	}
}

func TestCSRSignersRefuseReservedNames(t *testing.T) {
	for _, name := range []string{"kubernetes.io/kube-apiserver-client", "kubernetes.io/legacy-unknown", "beta.kubernetes.io/x", "k8s.io/x"} {
		e := newEnv(t)
		err := (&CSRSigners{Client: e.client, Issuer: e.issuer, Signers: []CSRPolicy{{SignerName: name}}}).Run(context.Background())
		if err == nil {
			t.Errorf("CSRSigners for %s ran", name)
		}
		if !ReservedSignerName(name) {
			t.Errorf("ReservedSignerName(%q) = false", name)
		}
	}
	if ReservedSignerName("example.com/kubernetes.io") || ReservedSignerName("notkubernetes.io/x") {
		t.Error("a signer name of another domain is reserved")
	}
}

func (e *env) csrSigner(ctx context.Context) error {
	return (&CSRSigners{Client: e.client, Issuer: e.issuer, Signers: testPolicies, ClusterID: "Kubernetes", Metrics: NewMetrics(nil)}).Run(ctx)
}

// FuzzCSRNames feeds arbitrary requests to the parser and the SAN policy:
// whatever the bytes, nothing panics, and what is accepted is only ever an
// allowed name.
func FuzzCSRNames(f *testing.F) {
	f.Add(csrPEM(f, []string{"spiffe://cluster.local/ns/a/sa/b"}, nil, nil))
	f.Add(csrPEM(f, nil, []string{"istiod.istio-system.svc"}, nil))
	f.Add(csrPEM(f, []string{"spiffe://cluster.local/ns/a/sa/b", "spiffe://cluster.local/ns/c/sa/d"}, []string{"x"}, nil))
	f.Add([]byte("-----BEGIN CERTIFICATE REQUEST-----\n\n-----END CERTIFICATE REQUEST-----\n"))
	iss := &csrSigner{CSRSigners: &CSRSigners{Issuer: fixedTD{}}}
	f.Fuzz(func(t *testing.T, raw []byte) {
		req, err := parseRequest(raw)
		if err != nil {
			return
		}
		for _, p := range testPolicies {
			if p.Identities == "" {
				p.Identities = IdentitiesWorkload
			}
			id, dns, err := iss.names(p, req)
			if err != nil {
				continue
			}
			if !id.IsZero() && (id.TrustDomain() != td || p.Identities == IdentitiesNone) {
				t.Fatalf("policy %s accepted %s", p.SignerName, id)
			}
			for _, d := range dns {
				if !slices.Contains(p.DNSNames, d) {
					t.Fatalf("policy %s accepted DNS name %q", p.SignerName, d)
				}
			}
		}
	})
}

// fixedTD is an Issuer that only knows the trust domain (names needs no more).
type fixedTD struct{ Issuer }

func (fixedTD) TrustDomain() spiffeid.TrustDomain { return td }
