package ca_test

import (
	"context"
	"crypto"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"encoding/pem"
	"errors"
	"net/url"
	"strings"
	"testing"
	"time"

	"golang.org/x/crypto/cryptobyte"
	cbasn1 "golang.org/x/crypto/cryptobyte/asn1"
	"google.golang.org/grpc/codes"

	"github.com/castellan-ca/castellan/ca"
	"github.com/castellan-ca/castellan/signer"
	"github.com/castellan-ca/castellan/signer/signertest"
	"github.com/castellan-ca/castellan/storage"
)

// element encodes one ASN.1 element with the given tag byte and content.
func element(tag cbasn1.Tag, content []byte) []byte {
	var b cryptobyte.Builder
	b.AddASN1(tag, func(b *cryptobyte.Builder) { b.AddBytes(content) })
	return b.BytesOrPanic()
}

func mustMarshal(t testing.TB, v any) []byte {
	t.Helper()
	b, err := asn1.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// hostileNames is one name of every GeneralName choice but the granted URI,
// plus encodings that are no GeneralName a parser should accept, each as its
// DER element inside a subjectAltName.
func hostileNames(t testing.TB) map[string][]byte {
	t.Helper()
	ctx := func(n uint8) cbasn1.Tag { return cbasn1.Tag(n).ContextSpecific() }
	upn := append(mustMarshal(t, asn1.ObjectIdentifier{1, 3, 6, 1, 4, 1, 311, 20, 2, 3}),
		element(ctx(0).Constructed(), mustMarshal(t, asn1.RawValue{Tag: asn1.TagUTF8String, Bytes: []byte("admin@corp.example")}))...)
	dirName := mustMarshal(t, pkix.Name{CommonName: "admin", Organization: []string{"system:masters"}}.ToRDNSequence())
	return map[string][]byte{
		"otherName (UPN)":             element(ctx(0).Constructed(), upn),
		"rfc822Name":                  element(ctx(1), []byte("root@example.com")),
		"dNSName":                     element(ctx(2), []byte("app.default.svc")),
		"x400Address":                 element(ctx(3).Constructed(), element(cbasn1.SEQUENCE, nil)),
		"directoryName":               element(ctx(4).Constructed(), dirName),
		"ediPartyName":                element(ctx(5).Constructed(), element(ctx(1).Constructed(), mustMarshal(t, asn1.RawValue{Tag: asn1.TagUTF8String, Bytes: []byte("edi")}))),
		"iPAddress":                   element(ctx(7), []byte{10, 0, 0, 1}),
		"registeredID":                element(ctx(8), mustMarshal(t, asn1.ObjectIdentifier{1, 2, 3, 4})[2:]),
		"other URI":                   element(ctx(6), []byte(otherID.String())),
		"granted URI, constructed":    element(ctx(6).Constructed(), []byte(appID.String())),
		"granted URI as a UTF8String": element(cbasn1.UTF8String, []byte(appID.String())),
	}
}

// sanExtension is a subjectAltName extension holding elems.
func sanExtension(critical bool, elems ...[]byte) pkix.Extension {
	var b cryptobyte.Builder
	b.AddASN1(cbasn1.SEQUENCE, func(b *cryptobyte.Builder) {
		for _, e := range elems {
			b.AddBytes(e)
		}
	})
	return pkix.Extension{Id: oidSAN, Critical: critical, Value: b.BytesOrPanic()}
}

// grantedURI is the granted identity as a SAN element.
func grantedURI() []byte { return element(cbasn1.Tag(6).ContextSpecific(), []byte(appID.String())) }

// csrWithExtensions is a CSR by crypto/x509 that carries exts as they are.
func csrWithExtensions(t testing.TB, key crypto.Signer, exts ...pkix.Extension) string {
	t.Helper()
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{ExtraExtensions: exts}, key)
	if err != nil {
		t.Fatal(err)
	}
	return string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der}))
}

// rawCSR builds and signs (ECDSA P-256, SHA-256) a CSR with an empty
// subject and exactly the attributes given, each a DER Attribute, which
// crypto/x509 cannot produce.
func rawCSR(t testing.TB, attrs ...[]byte) string {
	t.Helper()
	key := signertest.Key(7)
	spki, err := x509.MarshalPKIXPublicKey(key.Public())
	if err != nil {
		t.Fatal(err)
	}
	var tbs cryptobyte.Builder
	tbs.AddASN1(cbasn1.SEQUENCE, func(b *cryptobyte.Builder) {
		b.AddASN1Int64(0)
		b.AddASN1(cbasn1.SEQUENCE, func(*cryptobyte.Builder) {})
		b.AddBytes(spki)
		b.AddASN1(cbasn1.Tag(0).ContextSpecific().Constructed(), func(b *cryptobyte.Builder) {
			for _, a := range attrs {
				b.AddBytes(a)
			}
		})
	})
	tbsDER := tbs.BytesOrPanic()
	digest := sha256.Sum256(tbsDER)
	sig, err := key.Sign(rand.Reader, digest[:], crypto.SHA256)
	if err != nil {
		t.Fatal(err)
	}
	var csr cryptobyte.Builder
	csr.AddASN1(cbasn1.SEQUENCE, func(b *cryptobyte.Builder) {
		b.AddBytes(tbsDER)
		b.AddASN1(cbasn1.SEQUENCE, func(b *cryptobyte.Builder) {
			b.AddASN1ObjectIdentifier(asn1.ObjectIdentifier{1, 2, 840, 10045, 4, 3, 2})
		})
		b.AddASN1BitString(sig)
	})
	return string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: csr.BytesOrPanic()}))
}

// attribute is a DER Attribute of type oid with the given values.
func attribute(oid asn1.ObjectIdentifier, values ...[]byte) []byte {
	var b cryptobyte.Builder
	b.AddASN1(cbasn1.SEQUENCE, func(b *cryptobyte.Builder) {
		b.AddASN1ObjectIdentifier(oid)
		b.AddASN1(cbasn1.SET, func(b *cryptobyte.Builder) {
			for _, v := range values {
				b.AddBytes(v)
			}
		})
	})
	return b.BytesOrPanic()
}

var oidExtensionRequest = asn1.ObjectIdentifier{1, 2, 840, 113549, 1, 9, 14}

// extensions is the DER Extensions value of an extension request.
func extensions(t testing.TB, exts ...pkix.Extension) []byte {
	t.Helper()
	return mustMarshal(t, exts)
}

// wantParseCSR checks ParseCSR's verdict on csrPEM: accepted, or refused
// as InvalidArgument with reason (any csr.* reason when reason is "").
func wantParseCSR(t *testing.T, csrPEM string, refused bool, reason string) {
	t.Helper()
	csr, err := ca.ParseCSR(csrPEM, appID)
	switch {
	case !refused:
		if err != nil {
			t.Fatalf("ParseCSR: %v", err)
		}
	case csr != nil || !errors.Is(err, ca.ErrInvalidRequest) || !strings.HasPrefix(ca.ReasonOf(err), "csr."):
		t.Fatalf("ParseCSR = %v, %v; want a refusal", csr, err)
	case reason != "" && ca.ReasonOf(err) != reason:
		t.Fatalf("reason %q, want %q (%v)", ca.ReasonOf(err), reason, err)
	}
}

// TestParseCSRNameTypes: every name type but the granted URI is refused,
// alone or beside the granted URI, whether crypto/x509 parses it or not.
func TestParseCSRNameTypes(t *testing.T) {
	key := signertest.Key(7)
	for name, elem := range hostileNames(t) {
		reason := ca.ReasonCSRForbiddenSAN
		if name == "other URI" {
			reason = ca.ReasonCSRSANMismatch
		}
		for _, tc := range []struct {
			shape string
			ext   pkix.Extension
		}{
			{"alone", sanExtension(true, elem)},
			{"after the granted URI", sanExtension(true, grantedURI(), elem)},
			{"before the granted URI, non-critical", sanExtension(false, elem, grantedURI())},
		} {
			t.Run(name+" "+tc.shape, func(t *testing.T) { wantParseCSR(t, csrWithExtensions(t, key, tc.ext), true, reason) })
		}
	}
	for _, tc := range []struct {
		name, csr string
		refused   bool
		reason    string // "" with refused: any csr.* reason
	}{
		{"granted URI alone, critical (pilot-agent)", csrWithExtensions(t, key, sanExtension(true, grantedURI())), false, ""},
		{"granted URI alone, non-critical (ztunnel)", csrWithExtensions(t, key, sanExtension(false, grantedURI())), false, ""},
		{"granted URI twice", csrWithExtensions(t, key, sanExtension(true, grantedURI(), grantedURI())), true, ca.ReasonCSRSANMismatch},
		{"empty SAN extension", csrWithExtensions(t, key, sanExtension(true)), true, ca.ReasonCSRSANMismatch},
		{"SAN with trailing data", csrWithExtensions(t, key, pkix.Extension{Id: oidSAN, Value: append(sanExtension(false, grantedURI()).Value, 0x05, 0x00)}), true, ""},
	} {
		t.Run(tc.name, func(t *testing.T) { wantParseCSR(t, tc.csr, tc.refused, tc.reason) })
	}
}

// TestParseCSRAttributes: extensions crypto/x509 does not report (a second
// extension request, a second value, another attribute) are refused.
func TestParseCSRAttributes(t *testing.T) {
	granted := extensions(t, sanExtension(true, grantedURI()))
	hostile := extensions(t, sanExtension(true, hostileNames(t)["directoryName"]))
	msExtensions := asn1.ObjectIdentifier{1, 3, 6, 1, 4, 1, 311, 2, 1, 14}
	challenge := asn1.ObjectIdentifier{1, 2, 840, 113549, 1, 9, 7}
	caTrue := extensions(t, pkix.Extension{Id: asn1.ObjectIdentifier{2, 5, 29, 19}, Critical: true, Value: mustMarshal(t, struct{ IsCA bool }{true})})
	for _, tc := range []struct {
		name, csr string
		refused   bool
		reason    string // "" with refused: any csr.* reason
	}{
		{"no attributes", rawCSR(t), false, ""},
		{"one extension request", rawCSR(t, attribute(oidExtensionRequest, granted)), false, ""},
		// crypto/x509 itself refuses a SAN requested twice.
		{"two extension requests, SAN in both", rawCSR(t, attribute(oidExtensionRequest, granted), attribute(oidExtensionRequest, hostile)), true, ""},
		{"two extension requests", rawCSR(t, attribute(oidExtensionRequest, granted), attribute(oidExtensionRequest, caTrue)), true, ca.ReasonCSRAttributes},
		{"extension request with a second value", rawCSR(t, attribute(oidExtensionRequest, granted, hostile)), true, ca.ReasonCSRAttributes},
		{"Microsoft certificate extensions", rawCSR(t, attribute(oidExtensionRequest, granted), attribute(msExtensions, hostile)), true, ca.ReasonCSRAttributes},
		{"challenge password", rawCSR(t, attribute(challenge, mustMarshal(t, "secret"))), true, ca.ReasonCSRAttributes},
	} {
		t.Run(tc.name, func(t *testing.T) { wantParseCSR(t, tc.csr, tc.refused, tc.reason) })
	}
}

// verbatimSigner is a backend that copies the CSR's extensions into the
// leaf, as Vault's sign-verbatim does. csr, when set, stands for a CSR the
// CSR checks let through: its extensions are copied instead of the request's.
type verbatimSigner struct {
	signer.Signer
	csr []byte
}

func (v verbatimSigner) Sign(ctx context.Context, req signer.SignRequest) (*signer.Chain, error) {
	der := req.CSR
	if v.csr != nil {
		der = v.csr
	}
	csr, err := x509.ParseCertificateRequest(der)
	if err != nil {
		return nil, err
	}
	tmpl := *req.Template
	tmpl.ExtraExtensions = csr.Extensions
	req.Template = &tmpl
	return v.Signer.Sign(ctx, req)
}

// TestIssueRefusesCopiedNames: whatever names a backend copies from a CSR
// into the leaf, the result check refuses every one but the granted URI, so
// no such certificate leaves the CA; the outcome is audited.
func TestIssueRefusesCopiedNames(t *testing.T) {
	key := signertest.Key(7)
	run := func(t *testing.T, copied []byte) (*ca.Issued, storage.Record, error) {
		h := newHarness(t, harnessOpts{wrapSigner: func(inner signer.Signer) signer.Signer { return verbatimSigner{Signer: inner, csr: copied} }})
		out, err := h.issuer.Issue(peerCtx(h.workloadCert(t, appID)), ca.Request{CSR: ztunnelCSR(t, key, appID)})
		return out, h.onlyRecord(t), err
	}
	t.Run("the granted URI alone is issued", func(t *testing.T) {
		out, rec, err := run(t, nil)
		if err != nil {
			t.Fatalf("Issue: %v", err)
		}
		if rec.Outcome != storage.OutcomeIssued || len(out.Chain.Leaf.URIs) != 1 || out.Chain.Leaf.URIs[0].String() != appID.String() {
			t.Errorf("issued %v, record %+v", out.Chain.Leaf.URIs, rec)
		}
	})
	for name, elem := range hostileNames(t) {
		t.Run(name, func(t *testing.T) {
			block, _ := pem.Decode([]byte(csrWithExtensions(t, key, sanExtension(true, grantedURI(), elem))))
			out, rec, err := run(t, block.Bytes)
			if out != nil || ca.Status(err).Code() != codes.Internal || ca.ReasonOf(err) != ca.ReasonSignerBadChain {
				t.Fatalf("Issue = %v, %v; want Internal %s", out, err, ca.ReasonSignerBadChain)
			}
			if rec.Outcome != storage.OutcomeFailed || rec.Reason != ca.ReasonSignerBadChain || rec.Serial != "" || rec.CertSHA256 != "" {
				t.Errorf("audit record %+v, want a failure without a certificate", rec)
			}
		})
	}
}

// TestCheckIssuedSANs drives the result check's name rules with
// certificates a backend could return.
func TestCheckIssuedSANs(t *testing.T) {
	root := newRoot(t, "SAN Root", time.Time{})
	roots := x509.NewCertPool()
	roots.AddCert(root.Cert)
	key := signertest.Key(10)
	serial, _ := signer.NewSerial(rand.Reader)
	tmpl := ca.LeafTemplate(appID, key.Public(), serial, testNow.Add(-signer.DefaultClockSkew), testNow.Add(signer.DefaultClockSkew*10))
	good := root.Sign(t, tmpl, key.Public())
	check := func(leaf *x509.Certificate, tmpl *x509.Certificate) error {
		return ca.CheckIssued(&signer.Chain{Leaf: leaf}, tmpl, key.Public(), roots, testNow)
	}
	if err := check(good, tmpl); err != nil {
		t.Fatalf("a correct leaf is refused: %v", err)
	}
	withExt := func(mod func(c *x509.Certificate)) *x509.Certificate {
		c := *good
		c.Extensions = append([]pkix.Extension(nil), good.Extensions...)
		mod(&c)
		return &c
	}
	serving := ca.ServingTemplate([]string{"castellan.example", "localhost"})
	serving.URIs = []*url.URL{appID.URL()}
	serving.NotBefore, serving.NotAfter, serving.SerialNumber = tmpl.NotBefore, tmpl.NotAfter, serial
	servingLeaf := root.Sign(t, serving, key.Public())
	reordered := root.Sign(t, func() *x509.Certificate {
		c := *serving
		c.ExtraExtensions = []pkix.Extension{sanExtension(true, grantedURI(), element(cbasn1.Tag(2).ContextSpecific(), []byte("localhost")),
			element(cbasn1.Tag(2).ContextSpecific(), []byte("castellan.example")))}
		return &c
	}(), key.Public())

	for _, tc := range []struct {
		name    string
		leaf    *x509.Certificate
		tmpl    *x509.Certificate
		wantErr string
	}{
		{"serving certificate: DNS names and a URI", servingLeaf, serving, ""},
		{"serving certificate: names in another order", reordered, serving, ""},
		{"serving template, workload leaf", good, serving, "SANs"},
		{"two SAN extensions", withExt(func(c *x509.Certificate) { c.Extensions = append(c.Extensions, sanExtension(true, grantedURI())) }), tmpl, "twice"},
		{"no SAN extension", withExt(func(c *x509.Certificate) {
			c.Extensions = nil
		}), tmpl, "0 SANs"},
		{"empty SAN extension", withExt(func(c *x509.Certificate) { c.Extensions = []pkix.Extension{sanExtension(true)} }), tmpl, "no names"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := check(tc.leaf, tc.tmpl)
			if tc.wantErr == "" {
				if err != nil {
					t.Fatalf("CheckIssued: %v", err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Fatalf("CheckIssued: %v, want an error about %q", err, tc.wantErr)
			}
		})
	}
}
