package keyfile_test

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/rsa"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"strconv"
	"strings"
	"testing"

	"github.com/castellan-ca/castellan/internal/keyfile"
	"github.com/castellan-ca/castellan/signer/signertest"
)

// keyShape names a private key's family and size, for table comparisons.
func keyShape(k crypto.Signer) string {
	switch k := k.(type) {
	case *ecdsa.PrivateKey:
		return "ecdsa-p" + strconv.Itoa(k.Curve.Params().BitSize)
	case *rsa.PrivateKey:
		return "rsa-" + strconv.Itoa(k.N.BitLen())
	default:
		return fmt.Sprintf("%T", k)
	}
}

func TestKeys(t *testing.T) {
	tests := []struct {
		keyType string
		want    string
	}{
		{"", "ecdsa-p256"},
		{keyfile.KeyTypeECDSAP384, "ecdsa-p384"},
		{keyfile.KeyTypeRSA2048, "rsa-2048"},
	}
	for _, tc := range tests {
		t.Run("type "+tc.keyType, func(t *testing.T) {
			key, err := keyfile.GenerateKey(tc.keyType)
			if err != nil {
				t.Fatal(err)
			}
			if got := keyShape(key); got != tc.want {
				t.Fatalf("GenerateKey(%q) = %s, want %s", tc.keyType, got, tc.want)
			}
			pemBytes, err := keyfile.MarshalPrivateKeyPEM(key)
			if err != nil {
				t.Fatal(err)
			}
			back, err := keyfile.ParsePrivateKeyPEM(pemBytes)
			if err != nil {
				t.Fatal(err)
			}
			if !back.Public().(interface{ Equal(crypto.PublicKey) bool }).Equal(key.Public()) {
				t.Error("PKCS#8 round trip changed the key")
			}
		})
	}
	if _, err := keyfile.GenerateKey("dsa-1024"); err == nil || !strings.Contains(err.Error(), "dsa-1024") {
		t.Errorf("GenerateKey(dsa-1024) err = %v, want one naming the type", err)
	}
}

func TestParsePrivateKeyPEM(t *testing.T) {
	ec := signertest.Key(0).(*ecdsa.PrivateKey)
	rsaKey := signertest.LeafKeys()["rsa-2048"].(*rsa.PrivateKey)
	sec1, err := x509.MarshalECPrivateKey(ec)
	if err != nil {
		t.Fatal(err)
	}
	ed := signertest.LeafKeys()["ed25519"].(ed25519.PrivateKey)
	pkcs8ed, err := x509.MarshalPKCS8PrivateKey(ed)
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name    string
		block   *pem.Block
		wantErr bool
	}{
		{"SEC1", &pem.Block{Type: "EC PRIVATE KEY", Bytes: sec1}, false},
		{"PKCS#1", &pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(rsaKey)}, false},
		{"PKCS#8 ed25519", &pem.Block{Type: "PRIVATE KEY", Bytes: pkcs8ed}, false},
		{"certificate block", &pem.Block{Type: "CERTIFICATE", Bytes: []byte{1}}, true},
		{"corrupt SEC1", &pem.Block{Type: "EC PRIVATE KEY", Bytes: []byte("garbage")}, true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := keyfile.ParsePrivateKeyPEM(pem.EncodeToMemory(tc.block))
			if (err != nil) != tc.wantErr {
				t.Fatalf("err = %v, want error %v", err, tc.wantErr)
			}
		})
	}
	if _, err := keyfile.ParsePrivateKeyPEM([]byte("not pem")); err == nil {
		t.Error("non-PEM input accepted")
	}
}

func TestPublicKeyPEM(t *testing.T) {
	ed := signertest.LeafKeys()["ed25519"].(ed25519.PrivateKey)
	b, err := keyfile.MarshalPublicKeyPEM(ed.Public())
	if err != nil {
		t.Fatal(err)
	}
	pub, err := keyfile.ParsePublicKeyPEM(b)
	if err != nil || !ed.Public().(ed25519.PublicKey).Equal(pub) {
		t.Fatalf("round trip = %v, %v", pub, err)
	}
	private, err := keyfile.MarshalPrivateKeyPEM(ed)
	if err != nil {
		t.Fatal(err)
	}
	for name, in := range map[string][]byte{"not PEM": []byte("x"), "private key": private,
		"corrupt": pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: []byte("garbage")})} {
		if _, err := keyfile.ParsePublicKeyPEM(in); err == nil {
			t.Errorf("%s accepted", name)
		}
	}
}
