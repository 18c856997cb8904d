package ca_test

import (
	"bytes"
	"crypto"
	"crypto/ecdh"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/asn1"
	"errors"
	"math"
	"math/big"
	"slices"
	"testing"
	"time"

	"github.com/castellan-ca/castellan/ca"
	"github.com/castellan-ca/castellan/signer"
)

func TestTTLPolicyGrant(t *testing.T) {
	maxSecs := int64(ca.DefaultMaxTTL / time.Second)
	tests := []struct {
		name    string
		policy  ca.TTLPolicy
		req     int64
		want    time.Duration
		wantErr error
	}{
		{name: "zero means default", req: 0, want: 24 * time.Hour},
		{name: "negative means default", req: -3600, want: 24 * time.Hour},
		{name: "min int64 means default", req: math.MinInt64, want: 24 * time.Hour},
		{name: "one second", req: 1, want: time.Second},
		{name: "one hour", req: 3600, want: time.Hour},
		{name: "exactly the default max", req: maxSecs, want: ca.DefaultMaxTTL},
		{name: "max plus one second refused", req: maxSecs + 1, wantErr: ca.ErrTTLTooLong},
		{name: "max int64 refused without overflow", req: math.MaxInt64, wantErr: ca.ErrTTLTooLong},
		{name: "explicit refuse mode", policy: ca.TTLPolicy{Mode: ca.TTLRefuse}, req: maxSecs + 1, wantErr: ca.ErrTTLTooLong},
		{name: "clamp mode max plus one", policy: ca.TTLPolicy{Mode: ca.TTLClamp}, req: maxSecs + 1, want: ca.DefaultMaxTTL},
		{name: "clamp mode max int64", policy: ca.TTLPolicy{Mode: ca.TTLClamp}, req: math.MaxInt64, want: ca.DefaultMaxTTL},
		{name: "clamp mode below max unchanged", policy: ca.TTLPolicy{Mode: ca.TTLClamp}, req: 7200, want: 2 * time.Hour},
		{name: "custom default", policy: ca.TTLPolicy{Default: time.Hour, Max: 2 * time.Hour}, req: 0, want: time.Hour},
		{name: "custom max exactly", policy: ca.TTLPolicy{Default: time.Hour, Max: 2 * time.Hour}, req: 7200, want: 2 * time.Hour},
		{name: "custom max plus one refused", policy: ca.TTLPolicy{Default: time.Hour, Max: 2 * time.Hour}, req: 7201, wantErr: ca.ErrTTLTooLong},
		{name: "custom max clamp", policy: ca.TTLPolicy{Max: 2 * time.Hour, Mode: ca.TTLClamp}, req: 7201, want: 2 * time.Hour},
		{name: "default above max is capped", policy: ca.TTLPolicy{Default: 48 * time.Hour, Max: 24 * time.Hour}, req: 0, want: 24 * time.Hour},
		{name: "default above default max is capped", policy: ca.TTLPolicy{Default: 100 * 24 * time.Hour}, req: 0, want: ca.DefaultMaxTTL},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := tc.policy.Grant(tc.req)
			if tc.wantErr != nil {
				if !errors.Is(err, tc.wantErr) {
					t.Fatalf("Grant(%d) error = %v, want %v", tc.req, err, tc.wantErr)
				}
				if got != 0 {
					t.Errorf("Grant(%d) = %s with an error, want 0", tc.req, got)
				}
				return
			}
			if err != nil {
				t.Fatalf("Grant(%d): %v", tc.req, err)
			}
			if got != tc.want {
				t.Errorf("Grant(%d) = %s, want %s", tc.req, got, tc.want)
			}
		})
	}
}

// rsaPublicKey returns an RSA public key whose modulus has exactly bits bits.
// CheckPublicKey only looks at the modulus size, so sizes whose generation is
// slow (4096, 8192) or impossible with crypto/rsa (2047, 4097) need no real key.
func rsaPublicKey(bits int) *rsa.PublicKey {
	n := new(big.Int).Lsh(big.NewInt(1), uint(bits-1))
	n.SetBit(n, 0, 1)
	return &rsa.PublicKey{N: n, E: 65537}
}

func TestCheckPublicKey(t *testing.T) {
	x25519, err := ecdh.X25519().GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name string
		pub  crypto.PublicKey
		ok   bool
	}{
		{"ecdsa P-256", leafKey("ecdsa-p256").Public(), true},
		{"ecdsa P-384", leafKey("ecdsa-p384").Public(), true},
		{"ecdsa P-224", moreKeys().p224.Public(), false},
		{"ecdsa P-521", moreKeys().p521.Public(), false},
		{"rsa 1024 real", moreKeys().rsa1024.Public(), false},
		{"rsa 1024", rsaPublicKey(1024), false},
		{"rsa 2047", rsaPublicKey(2047), false},
		{"rsa 2048 real", leafKey("rsa-2048").Public(), true},
		{"rsa 2048", rsaPublicKey(2048), true},
		{"rsa 3072", rsaPublicKey(3072), true},
		{"rsa 4096", rsaPublicKey(4096), true},
		{"rsa 4097", rsaPublicKey(4097), false},
		{"rsa 8192", rsaPublicKey(8192), false},
		{"ed25519", leafKey("ed25519").Public(), true},
		{"x25519 ecdh", x25519.PublicKey(), false},
		{"ecdh P-256 (not ecdsa)", mustECDH(t, leafKey("ecdsa-p256").(*ecdsa.PrivateKey)), false},
		{"nil", nil, false},
		{"private key instead of public", leafKey("ecdsa-p256"), false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			err := ca.CheckPublicKey(tc.pub)
			if tc.ok && err != nil {
				t.Fatalf("CheckPublicKey: %v, want accepted", err)
			}
			if !tc.ok && !errors.Is(err, ca.ErrKeyType) {
				t.Fatalf("CheckPublicKey error = %v, want ErrKeyType", err)
			}
		})
	}
}

func mustECDH(t *testing.T, k *ecdsa.PrivateKey) crypto.PublicKey {
	t.Helper()
	pub, err := k.PublicKey.ECDH()
	if err != nil {
		t.Fatal(err)
	}
	return pub
}

var (
	oidKeyUsage         = asn1.ObjectIdentifier{2, 5, 29, 15}
	oidBasicConstraints = asn1.ObjectIdentifier{2, 5, 29, 19}
	oidExtKeyUsage      = asn1.ObjectIdentifier{2, 5, 29, 37}
)

// extension returns the extension oid of c, failing the test unless exactly one exists.
func extension(t *testing.T, c *x509.Certificate, oid asn1.ObjectIdentifier) (critical bool) {
	t.Helper()
	n := 0
	for _, e := range c.Extensions {
		if e.Id.Equal(oid) {
			n++
			critical = e.Critical
		}
	}
	if n != 1 {
		t.Fatalf("certificate has %d extensions %v, want 1", n, oid)
	}
	return critical
}

func TestLeafTemplateSigned(t *testing.T) {
	root := newRoot(t, "Profile Test Root", time.Time{})
	notBefore := testNow.Add(-signer.DefaultClockSkew)
	notAfter := testNow.Add(ca.DefaultTTL)
	for _, name := range []string{"ecdsa-p256", "ecdsa-p384", "rsa-2048", "ed25519"} {
		t.Run(name, func(t *testing.T) {
			key := leafKey(name)
			serial, err := signer.NewSerial(rand.Reader)
			if err != nil {
				t.Fatal(err)
			}
			// A non-UTC location must not leak into the certificate.
			tmpl := ca.LeafTemplate(appID, key.Public(), serial, notBefore.In(time.FixedZone("X", 5*3600)), notAfter)
			der, err := x509.CreateCertificate(rand.Reader, tmpl, root.Cert, key.Public(), root.Key)
			if err != nil {
				t.Fatalf("sign template: %v", err)
			}
			c, err := x509.ParseCertificate(der)
			if err != nil {
				t.Fatal(err)
			}

			if !extension(t, c, oidSAN) {
				t.Error("SAN extension is not critical")
			}
			if len(c.URIs) != 1 || c.URIs[0].String() != appID.String() {
				t.Errorf("URIs = %v, want exactly [%s]", c.URIs, appID)
			}
			if len(c.DNSNames)+len(c.IPAddresses)+len(c.EmailAddresses) != 0 {
				t.Errorf("unexpected SANs: dns %v ip %v email %v", c.DNSNames, c.IPAddresses, c.EmailAddresses)
			}
			if !bytes.Equal(c.RawSubject, []byte{0x30, 0x00}) {
				t.Errorf("RawSubject = %x, want an empty SEQUENCE 3000", c.RawSubject)
			}
			if !extension(t, c, oidKeyUsage) {
				t.Error("KeyUsage is not critical")
			}
			wantKU := x509.KeyUsageDigitalSignature
			if name == "rsa-2048" {
				wantKU |= x509.KeyUsageKeyEncipherment
			}
			if c.KeyUsage != wantKU {
				t.Errorf("KeyUsage = %b, want %b", c.KeyUsage, wantKU)
			}
			extension(t, c, oidExtKeyUsage)
			if want := []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth}; !slices.Equal(c.ExtKeyUsage, want) || len(c.UnknownExtKeyUsage) != 0 {
				t.Errorf("ExtKeyUsage = %v (unknown %v), want %v", c.ExtKeyUsage, c.UnknownExtKeyUsage, want)
			}
			if !extension(t, c, oidBasicConstraints) {
				t.Error("BasicConstraints is not critical")
			}
			if !c.BasicConstraintsValid || c.IsCA {
				t.Errorf("BasicConstraintsValid=%v IsCA=%v, want true/false", c.BasicConstraintsValid, c.IsCA)
			}
			if len(root.Cert.SubjectKeyId) == 0 || !bytes.Equal(c.AuthorityKeyId, root.Cert.SubjectKeyId) {
				t.Errorf("AuthorityKeyId = %x, want the CA's SubjectKeyId %x", c.AuthorityKeyId, root.Cert.SubjectKeyId)
			}
			if c.SerialNumber.Cmp(serial) != 0 {
				t.Errorf("serial = %x, want %x", c.SerialNumber, serial)
			}
			if !c.NotBefore.Equal(notBefore) || !c.NotAfter.Equal(notAfter) {
				t.Errorf("validity %s..%s, want %s..%s", c.NotBefore, c.NotAfter, notBefore, notAfter)
			}
			if tmpl.NotBefore.Location() != time.UTC || tmpl.NotAfter.Location() != time.UTC {
				t.Errorf("template times are not UTC: %s, %s", tmpl.NotBefore, tmpl.NotAfter)
			}
			if err := c.CheckSignatureFrom(root.Cert); err != nil {
				t.Errorf("leaf does not verify against its CA: %v", err)
			}
		})
	}
}
