package e2e

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"os"
	"slices"
	"testing"
	"time"
)

// testCA is a root CA, an intermediate CA under it, and a second, unrelated
// root: what an operator brings in Istio's cacerts layout.
type testCA struct {
	root, intermediate, otherRoot *x509.Certificate
	intermediateKey               *ecdsa.PrivateKey
}

// newTestCA creates the test CA hierarchy. Keys are derived from fixed
// labels, so every run signs with the same keys; only the validity window
// follows the clock.
func newTestCA(t *testing.T) *testCA {
	t.Helper()
	now := time.Now()
	rootKey := testKey(t, "root")
	otherKey := testKey(t, "other-root")
	intKey := testKey(t, "intermediate")

	root := createCert(t, &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{Organization: []string{"castellan-e2e"}, CommonName: "castellan e2e root"},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(10 * 365 * 24 * time.Hour),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}, nil, &rootKey.PublicKey, rootKey)
	other := createCert(t, &x509.Certificate{
		SerialNumber:          big.NewInt(2),
		Subject:               pkix.Name{Organization: []string{"castellan-e2e"}, CommonName: "castellan e2e unrelated root"},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(10 * 365 * 24 * time.Hour),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}, nil, &otherKey.PublicKey, otherKey)
	intermediate := createCert(t, &x509.Certificate{
		SerialNumber:          big.NewInt(3),
		Subject:               pkix.Name{Organization: []string{"castellan-e2e"}, CommonName: "castellan e2e intermediate"},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(5 * 365 * 24 * time.Hour),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
		MaxPathLenZero:        true,
	}, root, &intKey.PublicKey, rootKey)

	return &testCA{root: root, intermediate: intermediate, otherRoot: other, intermediateKey: intKey}
}

// roots returns the roots the CA must serve as its trust bundle.
func (ca *testCA) roots() []*x509.Certificate {
	return []*x509.Certificate{ca.root, ca.otherRoot}
}

// writeCACerts writes Istio's cacerts layout into a new directory and
// returns it: ca-cert.pem (the intermediate), ca-key.pem (its SEC 1 key,
// mode 0600), cert-chain.pem (intermediate, then root) and root-cert.pem
// (both roots).
func (ca *testCA) writeCACerts(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	keyDER, err := x509.MarshalECPrivateKey(ca.intermediateKey)
	if err != nil {
		t.Fatal(err)
	}
	writeFile(t, dir, "ca-cert.pem", encodeCerts(ca.intermediate), 0o644)
	writeFile(t, dir, "ca-key.pem", pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: keyDER}), 0o600)
	writeFile(t, dir, "cert-chain.pem", encodeCerts(ca.intermediate, ca.root), 0o644)
	writeFile(t, dir, "root-cert.pem", encodeCerts(ca.roots()...), 0o644)
	return dir
}

// testKey derives a P-256 key from label. crypto/ecdsa ignores custom
// randomness since Go 1.26, so the scalar is built from a hash instead.
func testKey(t *testing.T, label string) *ecdsa.PrivateKey {
	t.Helper()
	for i := range 16 {
		seed := sha256.Sum256(fmt.Appendf(nil, "castellan-e2e/%s/%d", label, i))
		if k, err := ecdsa.ParseRawPrivateKey(elliptic.P256(), seed[:]); err == nil {
			return k
		}
	}
	t.Fatalf("no valid P-256 scalar for %q", label)
	return nil
}

// createCert signs tmpl with signerKey; a nil parent makes it self-signed.
func createCert(t *testing.T, tmpl, parent *x509.Certificate, pub any, signerKey *ecdsa.PrivateKey) *x509.Certificate {
	t.Helper()
	if parent == nil {
		parent = tmpl
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, pub, signerKey)
	if err != nil {
		t.Fatalf("creating %q: %v", tmpl.Subject.CommonName, err)
	}
	c, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// encodeCerts returns certs as concatenated PEM CERTIFICATE blocks.
func encodeCerts(certs ...*x509.Certificate) []byte {
	var b bytes.Buffer
	for _, c := range certs {
		_ = pem.Encode(&b, &pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})
	}
	return b.Bytes()
}

// parseCerts parses PEM data that must hold only CERTIFICATE blocks (at
// least one) and nothing but whitespace around them.
func parseCerts(data []byte) ([]*x509.Certificate, error) {
	var certs []*x509.Certificate
	rest := data
	for {
		var block *pem.Block
		block, rest = pem.Decode(rest)
		if block == nil {
			break
		}
		if block.Type != "CERTIFICATE" {
			return nil, fmt.Errorf("PEM block %d is %q, want CERTIFICATE", len(certs)+1, block.Type)
		}
		c, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			return nil, fmt.Errorf("certificate %d: %w", len(certs)+1, err)
		}
		certs = append(certs, c)
	}
	if len(bytes.TrimSpace(rest)) != 0 {
		return nil, fmt.Errorf("%d bytes of non-PEM data after certificate %d", len(bytes.TrimSpace(rest)), len(certs))
	}
	if len(certs) == 0 {
		return nil, fmt.Errorf("no PEM certificate in %d bytes", len(data))
	}
	return certs, nil
}

// readCerts parses the PEM certificates in the file at path.
func readCerts(t *testing.T, path string) []*x509.Certificate {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	certs, err := parseCerts(data)
	if err != nil {
		t.Fatalf("%s: %v", path, err)
	}
	return certs
}

// sameCertSet reports whether a and b hold the same certificates, in any
// order, each as often.
func sameCertSet(a, b []*x509.Certificate) bool {
	if len(a) != len(b) {
		return false
	}
	key := func(cs []*x509.Certificate) []string {
		out := make([]string, len(cs))
		for i, c := range cs {
			out[i] = string(c.Raw)
		}
		slices.Sort(out)
		return out
	}
	return slices.Equal(key(a), key(b))
}

// sameCerts reports whether a and b hold the same certificates in the same
// order.
func sameCerts(a, b []*x509.Certificate) bool {
	return slices.EqualFunc(a, b, func(x, y *x509.Certificate) bool { return x.Equal(y) })
}

// describeCerts names certificates by subject and serial for failure
// messages.
func describeCerts(certs []*x509.Certificate) string {
	var b bytes.Buffer
	for i, c := range certs {
		if i > 0 {
			b.WriteString(", ")
		}
		fmt.Fprintf(&b, "%q#%x", c.Subject.String(), c.SerialNumber)
	}
	return "[" + b.String() + "]"
}
