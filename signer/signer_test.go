package signer_test

import (
	"bytes"
	"crypto/rand"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"strings"
	"testing"
	"testing/iotest"

	"github.com/castellan-ca/castellan/signer"
	"github.com/castellan-ca/castellan/signer/signertest"
)

func TestNewSerial(t *testing.T) {
	seen := make(map[string]bool)
	for range 1000 {
		s, err := signer.NewSerial(rand.Reader)
		if err != nil {
			t.Fatal(err)
		}
		if s.BitLen() != 128 || s.Sign() <= 0 {
			t.Fatalf("serial %x has %d bits (sign %d), want a positive 128-bit number", s, s.BitLen(), s.Sign())
		}
		if seen[s.String()] {
			t.Fatalf("serial %x repeated", s)
		}
		seen[s.String()] = true
	}

	t.Run("all-zero randomness still 128 bits", func(t *testing.T) {
		s, err := signer.NewSerial(bytes.NewReader(make([]byte, 16)))
		if err != nil {
			t.Fatal(err)
		}
		want := new(big.Int).Lsh(big.NewInt(1), 127)
		if s.Cmp(want) != 0 {
			t.Errorf("serial = %x, want %x", s, want)
		}
	})
	t.Run("short randomness is an error", func(t *testing.T) {
		if _, err := signer.NewSerial(bytes.NewReader(make([]byte, 15))); err == nil {
			t.Error("NewSerial with 15 bytes of randomness succeeded")
		}
		if _, err := signer.NewSerial(iotest.ErrReader(errors.New("no entropy"))); err == nil {
			t.Error("NewSerial with a failing reader succeeded")
		}
	})
}

func TestParseCertificatesPEM(t *testing.T) {
	a, b := signertest.NewRoot(t, "A", signertest.CertOptions{}).Cert, signertest.NewRoot(t, "B", signertest.CertOptions{}).Cert
	tests := []struct {
		name string
		in   string
		want int // certificates; 0 means an error
	}{
		{"one", signer.EncodePEM(a), 1},
		{"several roots", signer.EncodePEM(a, b), 2},
		{"surrounding whitespace", "\n" + signer.EncodePEM(a, b) + "\n\n", 2},
		{"empty", "", 0},
		{"whitespace only", " \n", 0},
		{"trailing garbage", signer.EncodePEM(a) + "junk", 0},
		{"key block", signer.EncodePEM(a) + string(pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: []byte{1}})), 0},
		{"corrupt certificate", string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: a.Raw[:100]})), 0},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := signer.ParseCertificatesPEM([]byte(tc.in))
			if tc.want == 0 {
				if err == nil {
					t.Fatalf("parsed %d certificates, want an error", len(got))
				}
				return
			}
			if err != nil || len(got) != tc.want {
				t.Fatalf("got %d certificates, %v; want %d", len(got), err, tc.want)
			}
			if signer.EncodePEM(got...) != strings.TrimSpace(tc.in)+"\n" {
				t.Error("EncodePEM does not round-trip")
			}
		})
	}
}

func TestCheckChainOrder(t *testing.T) {
	root := signertest.NewRoot(t, "root", signertest.CertOptions{})
	inter := root.NewIntermediate(t, "intermediate", signertest.CertOptions{})
	issuing := inter.NewIntermediate(t, "issuing", signertest.CertOptions{})
	other := signertest.NewRoot(t, "other root", signertest.CertOptions{})
	for _, tc := range []struct {
		name  string
		chain []*x509.Certificate
		ok    bool
	}{
		{"issuing up to the root", []*x509.Certificate{issuing.Cert, inter.Cert, root.Cert}, true},
		{"a root alone", []*x509.Certificate{root.Cert}, true},
		{"out of order", []*x509.Certificate{inter.Cert, issuing.Cert, root.Cert}, false},
		{"a gap", []*x509.Certificate{issuing.Cert, root.Cert}, false},
		{"another root on top", []*x509.Certificate{inter.Cert, other.Cert}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if err := signer.CheckChainOrder(tc.chain); (err == nil) != tc.ok {
				t.Errorf("CheckChainOrder = %v, want ok=%v", err, tc.ok)
			}
		})
	}
}

// EncodePEM writes exactly what encoding/pem writes, for every length
// around the 48-byte line boundary and for real certificates, one or several.
func TestEncodePEMMatchesEncodingPEM(t *testing.T) {
	reference := func(certs ...*x509.Certificate) string {
		var b strings.Builder
		for _, c := range certs {
			b.Write(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw}))
		}
		return b.String()
	}
	root := signertest.NewRoot(t, "PEM Root", signertest.CertOptions{})
	inter := root.NewIntermediate(t, "PEM Inter", signertest.CertOptions{})
	cases := map[string][]*x509.Certificate{
		"none":                  nil,
		"root":                  {root.Cert},
		"intermediate and root": {inter.Cert, root.Cert},
	}
	for n := range 200 {
		raw := make([]byte, n)
		if _, err := rand.Read(raw); err != nil {
			t.Fatal(err)
		}
		cases[fmt.Sprintf("%d bytes", n)] = []*x509.Certificate{{Raw: raw}}
		cases[fmt.Sprintf("%d bytes twice", n)] = []*x509.Certificate{{Raw: raw}, {Raw: raw[:n/2]}}
	}
	for name, certs := range cases {
		if got, want := signer.EncodePEM(certs...), reference(certs...); got != want {
			t.Errorf("%s: EncodePEM\n%q\nwant\n%q", name, got, want)
		}
	}
}
