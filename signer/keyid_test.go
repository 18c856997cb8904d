package signer_test

import (
	"bytes"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"math/big"
	"testing"
	"time"

	"github.com/castellan-ca/castellan/signer"
	"github.com/castellan-ca/castellan/signer/signertest"
)

// TestKeyID pins KeyID to the identifier crypto/x509 derives for a CA
// certificate (RFC 7093 method 1), for every key type Castellan certifies.
func TestKeyID(t *testing.T) {
	for name, key := range signertest.LeafKeys() {
		t.Run(name, func(t *testing.T) {
			tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: name},
				NotBefore: time.Now(), NotAfter: time.Now().Add(time.Hour), IsCA: true, BasicConstraintsValid: true,
				KeyUsage: x509.KeyUsageCertSign}
			der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
			if err != nil {
				t.Fatal(err)
			}
			cert, err := x509.ParseCertificate(der)
			if err != nil {
				t.Fatal(err)
			}
			got, err := signer.KeyID(key.Public())
			if err != nil {
				t.Fatal(err)
			}
			if len(got) != 20 || !bytes.Equal(got, cert.SubjectKeyId) {
				t.Errorf("KeyID = %x, crypto/x509 derives %x", got, cert.SubjectKeyId)
			}
		})
	}
	if _, err := signer.KeyID("not a key"); err == nil {
		t.Error("KeyID accepted an unsupported key")
	}
}
