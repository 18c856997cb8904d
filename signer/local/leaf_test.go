package local

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
	"encoding/pem"
	"io"
	"math/big"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/castellan-ca/castellan/ca"
	"github.com/castellan-ca/castellan/signer"
	"github.com/castellan-ca/castellan/signer/signertest"
)

// leafKey is a named key of the differential tests.
type leafKey struct {
	name string
	key  crypto.Signer
}

// leafTestKeys are every workload key type the service accepts
// (ca.CheckPublicKey) plus P-521 as a CA key: RSA 3072 and 4096 come from
// testdata, as generating them would dominate the run under -race.
var leafTestKeys = sync.OnceValue(func() []leafKey {
	lk := signertest.LeafKeys()
	readRSA := func(bits string) crypto.Signer {
		b, err := os.ReadFile(filepath.Join("testdata", "rsa-"+bits+".key"))
		if err != nil {
			panic(err)
		}
		block, _ := pem.Decode(b)
		k, err := x509.ParsePKCS8PrivateKey(block.Bytes)
		if err != nil {
			panic(err)
		}
		return k.(crypto.Signer)
	}
	p521, err := ecdsa.GenerateKey(elliptic.P521(), rand.Reader)
	if err != nil {
		panic(err)
	}
	return []leafKey{
		{"ecdsa-p256", lk["ecdsa-p256"]}, {"ecdsa-p384", lk["ecdsa-p384"]}, {"ecdsa-p521", p521},
		{"rsa-2048", lk["rsa-2048"]}, {"rsa-3072", readRSA("3072")}, {"rsa-4096", readRSA("4096")},
		{"ed25519", lk["ed25519"]},
	}
})

// workloadKeys are the keys a workload may present (no P-521).
func workloadKeys() []leafKey {
	return slices.DeleteFunc(slices.Clone(leafTestKeys()), func(k leafKey) bool { return k.name == "ecdsa-p521" })
}

// issuers returns one CA per key type, plus one whose subject is empty (the
// authority key id then comes from the template, as in CreateCertificate).
func issuers(t testing.TB) []*signertest.CA {
	t.Helper()
	var out []*signertest.CA
	for _, k := range leafTestKeys() {
		out = append(out, signertest.NewRoot(t, "issuer "+k.name, signertest.CertOptions{Key: k.key}))
	}
	out = append(out, signertest.NewRoot(t, "", signertest.CertOptions{Modify: func(c *x509.Certificate) {
		c.Subject = pkix.Name{}
		c.DNSNames = []string{"nameless.example"}
	}}))
	return out
}

var (
	testID  = spiffeid.RequireFromString("spiffe://cluster.local/ns/default/sa/app")
	testURI = testID.URL()
)

func mustURL(s string) *url.URL {
	u, err := url.Parse(s)
	if err != nil {
		panic(err)
	}
	return u
}

// reference is what x509.CreateCertificate makes of the same inputs.
func reference(t testing.TB, tmpl, parent *x509.Certificate, pub crypto.PublicKey, key crypto.Signer) *x509.Certificate {
	t.Helper()
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, pub, key)
	if err != nil {
		t.Fatalf("reference CreateCertificate: %v", err)
	}
	c, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// checkIdentical asserts that the encoder's TBSCertificate is the
// reference's byte for byte, and that createLeaf's certificate carries it with
// the same signature algorithm and a signature the issuer's key verifies;
// for deterministic signatures (RSA PKCS #1 v1.5, Ed25519) the whole DER is
// the reference's.
func checkIdentical(t testing.TB, tmpl *x509.Certificate, issuer *signertest.CA, pub crypto.PublicKey) {
	t.Helper()
	ref := reference(t, tmpl, issuer.Cert, pub, issuer.Key)
	sp, fast := fastSigParams(issuer.Key)
	if !fast {
		t.Fatalf("issuer key %T: not on the fast path", issuer.Key)
	}
	tbs, ok := encodeTBS(tmpl, issuer.Cert, pub, sp)
	if !ok {
		t.Fatal("encodeTBS declined an in-profile template")
	}
	if !bytes.Equal(tbs, ref.RawTBSCertificate) {
		t.Fatalf("TBSCertificate differs from x509.CreateCertificate's\n got %x\nwant %x", tbs, ref.RawTBSCertificate)
	}
	der, err := createLeaf(rand.Reader, tmpl, issuer.Cert, pub, issuer.Key, sp, fast)
	if err != nil {
		t.Fatalf("createLeaf: %v", err)
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatalf("parse the encoder's certificate: %v", err)
	}
	if !bytes.Equal(leaf.RawTBSCertificate, ref.RawTBSCertificate) || leaf.SignatureAlgorithm != ref.SignatureAlgorithm {
		t.Fatalf("certificate: TBS equal %v, signature algorithm %v, want %v", bytes.Equal(leaf.RawTBSCertificate, ref.RawTBSCertificate), leaf.SignatureAlgorithm, ref.SignatureAlgorithm)
	}
	if err := leaf.CheckSignatureFrom(issuer.Cert); err != nil {
		t.Fatalf("the encoder's signature does not verify with the issuer's key: %v", err)
	}
	if _, isECDSA := issuer.Key.(*ecdsa.PrivateKey); !isECDSA && !bytes.Equal(der, ref.Raw) {
		t.Fatalf("deterministic signature, yet the DER differs from x509.CreateCertificate's")
	}
}

// The encoder against x509.CreateCertificate for every issuer key type ×
// every workload key type, with the profiles the pipeline builds (ca's own
// template constructors) and the edges of serials, times and names.
func TestLeafEncodingMatchesCreateCertificate(t *testing.T) {
	now := time.Date(2026, 12, 3, 13, 47, 12, 999_999_999, time.FixedZone("CET", 3600))
	skid := func(pub crypto.PublicKey) []byte {
		id, err := signer.KeyID(pub)
		if err != nil {
			t.Fatal(err)
		}
		return id
	}
	serial := func(hexs string) *big.Int {
		n, _ := new(big.Int).SetString(hexs, 16)
		return n
	}
	topBit := serial("80112233445566778899aabbccddeeff")
	type variant struct {
		name string
		tmpl func(pub crypto.PublicKey) *x509.Certificate
		// everyIssuer runs the variant under every issuer key type, not only
		// under the P-256 and the two deterministic ones.
		everyIssuer bool
	}
	workload := func(pub crypto.PublicKey) *x509.Certificate {
		tmpl := ca.LeafTemplate(testID, pub, topBit, now.Add(-2*time.Minute), now.Add(24*time.Hour))
		tmpl.SubjectKeyId = skid(pub)
		return tmpl
	}
	variants := []variant{
		{"workload leaf", workload, true},
		{"grant: DNS names only", func(pub crypto.PublicKey) *x509.Certificate {
			tmpl := workload(pub)
			tmpl.URIs, tmpl.DNSNames = nil, []string{"istiod.istio-system.svc", "castellan.castellan-system.svc", "localhost"}
			return tmpl
		}, true},
		{"grant: URI and DNS names", func(pub crypto.PublicKey) *x509.Certificate {
			tmpl := workload(pub)
			tmpl.DNSNames = []string{"a.example", "b.example"}
			return tmpl
		}, false},
		{"several URIs, emails and IPs", func(pub crypto.PublicKey) *x509.Certificate {
			tmpl := workload(pub)
			tmpl.URIs = append(tmpl.URIs, mustURL("spiffe://cluster.local/ns/x/sa/y"), mustURL("https://example.com/p?q=1#f"))
			tmpl.EmailAddresses = []string{"ops@example.com"}
			tmpl.IPAddresses = []net.IP{net.ParseIP("10.0.0.1"), net.ParseIP("2001:db8::1"), net.IPv4(192, 0, 2, 1).To4()}
			return tmpl
		}, false},
		{"serving certificate (ca.ServingTemplate)", func(pub crypto.PublicKey) *x509.Certificate {
			tmpl := ca.ServingTemplate([]string{"localhost", "castellan.castellan-system.svc"})
			tmpl.SerialNumber, tmpl.NotBefore, tmpl.NotAfter, tmpl.SubjectKeyId = topBit, now, now.Add(time.Hour), skid(pub)
			return tmpl
		}, false},
		{"operator credential (ca.ClientTemplate)", func(pub crypto.PublicKey) *x509.Certificate {
			tmpl := ca.ClientTemplate(mustURL("spiffe://cluster.local/castellan/operator"))
			tmpl.SerialNumber, tmpl.NotBefore, tmpl.NotAfter, tmpl.SubjectKeyId = topBit, now, now.Add(365*24*time.Hour), skid(pub)
			return tmpl
		}, false},
		{"small serial, no top bit", func(pub crypto.PublicKey) *x509.Certificate {
			tmpl := workload(pub)
			tmpl.SerialNumber = big.NewInt(0x7f)
			return tmpl
		}, false},
		{"zero serial", func(pub crypto.PublicKey) *x509.Certificate {
			tmpl := workload(pub)
			tmpl.SerialNumber = new(big.Int)
			return tmpl
		}, false},
		{"times: UTCTime to GeneralizedTime at 2050", func(pub crypto.PublicKey) *x509.Certificate {
			tmpl := workload(pub)
			tmpl.NotBefore = time.Date(2049, 12, 31, 23, 59, 59, 0, time.UTC)
			tmpl.NotAfter = time.Date(2050, 1, 1, 0, 0, 0, 0, time.UTC)
			return tmpl
		}, false},
		{"times: before 1950", func(pub crypto.PublicKey) *x509.Certificate {
			tmpl := workload(pub)
			tmpl.NotBefore = time.Date(1949, 12, 31, 23, 59, 59, 0, time.UTC)
			tmpl.NotAfter = time.Date(1950, 1, 1, 0, 0, 0, 0, time.UTC)
			return tmpl
		}, false},
		{"no subject key id, authority key id in the template", func(pub crypto.PublicKey) *x509.Certificate {
			tmpl := workload(pub)
			tmpl.SubjectKeyId, tmpl.AuthorityKeyId = nil, []byte{1, 2, 3}
			return tmpl
		}, true},
		{"no basic constraints, no usages", func(pub crypto.PublicKey) *x509.Certificate {
			tmpl := workload(pub)
			tmpl.BasicConstraintsValid, tmpl.KeyUsage, tmpl.ExtKeyUsage = false, 0, nil
			return tmpl
		}, false},
		{"nothing asked: no names, key ids, usages or constraints", func(pub crypto.PublicKey) *x509.Certificate {
			// Under the nameless issuer the certificate has no extension at
			// all, and CreateCertificate then omits the [3] field (found by
			// FuzzLeafEncoding in CI).
			tmpl := workload(pub)
			tmpl.URIs, tmpl.SubjectKeyId, tmpl.BasicConstraintsValid, tmpl.KeyUsage, tmpl.ExtKeyUsage = nil, nil, false, 0, nil
			return tmpl
		}, true},
		{"key usage spanning two bytes, MaxPathLen -1", func(pub crypto.PublicKey) *x509.Certificate {
			tmpl := workload(pub)
			tmpl.KeyUsage, tmpl.MaxPathLen = x509.KeyUsageDigitalSignature|x509.KeyUsageDecipherOnly, -1
			return tmpl
		}, false},
	}
	iss := issuers(t)
	for _, issuer := range iss {
		for _, k := range workloadKeys() {
			for _, v := range variants {
				// Every variant under the P-256 issuer and under the two
				// deterministic signers (full DER compared); the others
				// differ only in the algorithm and issuer fields, so the two
				// leaf profiles suffice (RSA 3072/4096 signing is slow under -race).
				full := strings.HasSuffix(issuer.Cert.Subject.CommonName, "ecdsa-p256") || strings.HasSuffix(issuer.Cert.Subject.CommonName, "rsa-2048") ||
					strings.HasSuffix(issuer.Cert.Subject.CommonName, "ed25519")
				if !full && !v.everyIssuer {
					continue
				}
				t.Run(issuer.Cert.Subject.CommonName+"/"+k.name+"/"+v.name, func(t *testing.T) {
					checkIdentical(t, v.tmpl(k.key.Public()), issuer, k.key.Public())
				})
			}
		}
	}
}

// Templates outside the profile are not encoded here: CreateCertificate signs
// them (or refuses them) as before.
func TestLeafEncodingDeclines(t *testing.T) {
	issuer := signertest.NewRoot(t, "issuer", signertest.CertOptions{})
	pub := signertest.Key(1).Public()
	sp, _ := fastSigParams(issuer.Key)
	base := func() *x509.Certificate {
		return ca.LeafTemplate(testID, pub, big.NewInt(1), time.Now(), time.Now().Add(time.Hour))
	}
	for _, tc := range []struct {
		name   string
		modify func(*x509.Certificate)
	}{
		{"no serial", func(c *x509.Certificate) { c.SerialNumber = nil }},
		{"negative serial", func(c *x509.Certificate) { c.SerialNumber = big.NewInt(-1) }},
		{"subject", func(c *x509.Certificate) { c.Subject.CommonName = "app" }},
		{"raw subject", func(c *x509.Certificate) { c.RawSubject = []byte{0x30, 0} }},
		{"CA", func(c *x509.Certificate) { c.IsCA = true }},
		{"path length", func(c *x509.Certificate) { c.MaxPathLen = 1 }},
		{"path length zero", func(c *x509.Certificate) { c.MaxPathLenZero = true }},
		{"signature algorithm", func(c *x509.Certificate) { c.SignatureAlgorithm = x509.ECDSAWithSHA384 }},
		{"other extended key usage", func(c *x509.Certificate) { c.ExtKeyUsage = append(c.ExtKeyUsage, x509.ExtKeyUsageCodeSigning) }},
		{"unknown extended key usage", func(c *x509.Certificate) { c.UnknownExtKeyUsage = []asn1.ObjectIdentifier{{1, 2, 3}} }},
		{"extra extension", func(c *x509.Certificate) {
			c.ExtraExtensions = []pkix.Extension{{Id: asn1.ObjectIdentifier{1, 2, 3}, Value: []byte{5, 0}}}
		}},
		{"OCSP server", func(c *x509.Certificate) { c.OCSPServer = []string{"http://ocsp.example"} }},
		{"CRL distribution point", func(c *x509.Certificate) { c.CRLDistributionPoints = []string{"http://crl.example"} }},
		{"policy", func(c *x509.Certificate) { c.PolicyIdentifiers = []asn1.ObjectIdentifier{{2, 5, 29, 32, 0}} }},
		{"name constraints", func(c *x509.Certificate) { c.PermittedDNSDomains = []string{"example.com"} }},
		{"non-IA5 DNS name", func(c *x509.Certificate) { c.DNSNames = []string{"bücher.example"} }},
		{"invalid UTF-8 in a DNS name", func(c *x509.Certificate) { c.DNSNames = []string{"a\xffb"} }},
		{"year 10000", func(c *x509.Certificate) { c.NotAfter = time.Date(10000, 1, 1, 0, 0, 0, 0, time.UTC) }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tmpl := base()
			tc.modify(tmpl)
			if _, ok := encodeTBS(tmpl, issuer.Cert, pub, sp); ok {
				t.Fatal("encodeTBS encoded a template outside the profile")
			}
			// createLeaf answers exactly as CreateCertificate does.
			der, err := createLeaf(rand.Reader, tmpl, issuer.Cert, pub, issuer.Key, sp, true)
			_, refErr := x509.CreateCertificate(rand.Reader, tmpl, issuer.Cert, pub, issuer.Key)
			if (err == nil) != (refErr == nil) {
				t.Fatalf("createLeaf err %v, CreateCertificate err %v", err, refErr)
			}
			if err == nil {
				leaf, perr := x509.ParseCertificate(der)
				if perr != nil || leaf.CheckSignatureFrom(issuer.Cert) != nil {
					t.Fatalf("fallback certificate: parse %v", perr)
				}
			}
		})
	}
}

// faultyKey is a CA key outside the standard library (as an HSM's) whose
// signatures are corrupt.
type faultyKey struct{ crypto.Signer }

func (k faultyKey) Sign(r io.Reader, digest []byte, opts crypto.SignerOpts) ([]byte, error) {
	sig, err := k.Signer.Sign(r, digest, opts)
	if err == nil {
		sig[len(sig)-1] ^= 1
	}
	return sig, err
}

// A key the encoder does not know keeps x509.CreateCertificate and its check
// of the signature it made: a faulty signer yields an error, not a leaf.
func TestSignerOutsideTheStandardLibraryKeepsTheCheck(t *testing.T) {
	root := signertest.NewRoot(t, "root", signertest.CertOptions{Key: ed25519Key(t)})
	for _, tc := range []struct {
		name    string
		key     crypto.Signer
		wantErr bool
	}{
		{"standard library key: fast path", root.Key, false},
		{"wrapped key that signs correctly", struct{ crypto.Signer }{root.Key}, false},
		{"wrapped key that signs wrongly", faultyKey{root.Key}, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s, err := New(Config{Cert: root.Cert, Key: tc.key, Roots: []*x509.Certificate{root.Cert}})
			if err != nil {
				t.Fatal(err)
			}
			_, std := tc.key.(ed25519.PrivateKey)
			if s.fast != std {
				t.Fatalf("fast path %v for %T, want %v", s.fast, tc.key, std)
			}
			pub := signertest.Key(2).Public()
			tmpl := ca.LeafTemplate(testID, pub, big.NewInt(42), time.Now().Add(-time.Minute), time.Now().Add(time.Hour))
			chain, err := s.Sign(t.Context(), signer.SignRequest{Template: tmpl, PublicKey: pub, Identity: testID, TTL: time.Hour})
			if tc.wantErr {
				if err == nil {
					t.Fatal("a corrupt signature was returned as a certificate")
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if err := chain.Leaf.CheckSignatureFrom(root.Cert); err != nil || !chain.SignatureChecked {
				t.Fatalf("leaf signature: %v, SignatureChecked %v", err, chain.SignatureChecked)
			}
			if len(chain.Leaf.URIs) != 1 || chain.Leaf.URIs[0].String() != testURI.String() {
				t.Fatalf("leaf URIs %v", chain.Leaf.URIs)
			}
		})
	}
}

func ed25519Key(t testing.TB) crypto.Signer {
	t.Helper()
	for _, k := range leafTestKeys() {
		if k.name == "ed25519" {
			return k.key
		}
	}
	t.Fatal("no Ed25519 test key")
	return nil
}

// FuzzLeafEncoding: for any serial, validity, names, key usages and key
// types, the encoder's TBSCertificate is x509.CreateCertificate's byte for
// byte, and where CreateCertificate refuses the inputs the encoder declines.
func FuzzLeafEncoding(f *testing.F) {
	f.Add(uint8(0), uint8(0), []byte{0x80, 1, 2, 3}, false, int64(1_790_000_000), int64(86400), "spiffe://cluster.local/ns/default/sa/app", "", uint16(x509.KeyUsageDigitalSignature), uint8(0xff), []byte(nil))
	f.Add(uint8(3), uint8(4), []byte{1}, false, int64(2_524_607_999), int64(1), "spiffe://td/a\nhttps://x.example/y", "a.example\nb.example", uint16(5), uint8(0x0f), []byte{10, 0, 0, 1})
	f.Add(uint8(6), uint8(6), []byte{}, true, int64(-631_152_001), int64(-5), "", "localhost", uint16(0x1ff), uint8(0x01), []byte{0x20, 1, 0xd, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1})
	f.Add(uint8(1), uint8(1), []byte{0xff}, false, int64(253_402_300_799), int64(10), "spiffe://td/\xff", "b\xfcx", uint16(1<<15), uint8(0x80), []byte{1, 2, 3})
	// The nameless issuer (the last) with nothing asked: no extension at all.
	f.Add(uint8(len(leafTestKeys())), uint8(1), []byte{}, false, int64(1_790_000_000), int64(86400), "", "", uint16(0), uint8(0), []byte(nil))
	keys := leafTestKeys()
	iss := issuers(f)
	f.Fuzz(func(t *testing.T, issuerIdx, keyIdx uint8, serial []byte, negative bool, notBefore, lifetime int64, uris, dns string, ku uint16, flags uint8, ip []byte) {
		issuer := iss[int(issuerIdx)%len(iss)]
		pub := keys[int(keyIdx)%len(keys)].key.Public()
		tmpl := &x509.Certificate{
			SerialNumber: new(big.Int).SetBytes(serial),
			NotBefore:    time.Unix(notBefore, int64(flags)*1_000_000),
			NotAfter:     time.Unix(notBefore, 0).Add(time.Duration(lifetime) * time.Second),
			KeyUsage:     x509.KeyUsage(ku),
		}
		if negative {
			tmpl.SerialNumber.Neg(tmpl.SerialNumber)
		}
		for _, s := range strings.Split(uris, "\n") {
			if u, err := url.Parse(s); err == nil && s != "" {
				tmpl.URIs = append(tmpl.URIs, u)
			}
		}
		if dns != "" {
			tmpl.DNSNames = strings.Split(dns, "\n")
		}
		if len(ip) == net.IPv4len || len(ip) == net.IPv6len {
			tmpl.IPAddresses = []net.IP{ip}
		}
		if flags&1 != 0 {
			tmpl.ExtKeyUsage = append(tmpl.ExtKeyUsage, x509.ExtKeyUsageServerAuth)
		}
		if flags&2 != 0 {
			tmpl.ExtKeyUsage = append(tmpl.ExtKeyUsage, x509.ExtKeyUsageClientAuth)
		}
		tmpl.BasicConstraintsValid = flags&4 != 0
		if flags&8 != 0 {
			tmpl.SubjectKeyId = serial
		}
		if flags&16 != 0 {
			tmpl.AuthorityKeyId = []byte{flags}
		}
		if flags&32 != 0 {
			tmpl.MaxPathLen = -1
		}
		sp, fast := fastSigParams(issuer.Key)
		if !fast {
			t.Fatalf("issuer key %T not on the fast path", issuer.Key)
		}
		tbs, ok := encodeTBS(tmpl, issuer.Cert, pub, sp)
		der, refErr := x509.CreateCertificate(rand.Reader, tmpl, issuer.Cert, pub, issuer.Key)
		if refErr != nil {
			if ok {
				t.Fatalf("CreateCertificate refuses (%v), the encoder encoded", refErr)
			}
			return
		}
		ref, err := x509.ParseCertificate(der)
		if err != nil {
			// CreateCertificate wrote what x509 cannot parse back (a
			// name Go refuses on parsing): compare the bytes regardless.
			var tbsOnly struct {
				TBS asn1.RawValue
			}
			if _, uerr := asn1.Unmarshal(der, &tbsOnly); uerr != nil {
				t.Fatalf("reference certificate: %v / %v", err, uerr)
			}
			ref = &x509.Certificate{RawTBSCertificate: tbsOnly.TBS.FullBytes}
		}
		if !ok {
			t.Fatal("encoder declined inputs CreateCertificate signs")
		}
		if !bytes.Equal(tbs, ref.RawTBSCertificate) {
			t.Fatalf("TBSCertificate differs\n got %x\nwant %x", tbs, ref.RawTBSCertificate)
		}
		cert, err := createLeaf(rand.Reader, tmpl, issuer.Cert, pub, issuer.Key, sp, fast)
		if err != nil {
			t.Fatalf("createLeaf: %v", err)
		}
		var parsed struct {
			TBS    asn1.RawValue
			Alg    asn1.RawValue
			Signed asn1.BitString
		}
		if _, err := asn1.Unmarshal(cert, &parsed); err != nil || !bytes.Equal(parsed.TBS.FullBytes, tbs) {
			t.Fatalf("certificate does not carry the TBSCertificate: %v", err)
		}
		if err := issuer.Cert.CheckSignature(ref.SignatureAlgorithm, tbs, parsed.Signed.Bytes); ref.SignatureAlgorithm != 0 && err != nil {
			t.Fatalf("signature does not verify with the issuer's key: %v", err)
		}
	})
}
