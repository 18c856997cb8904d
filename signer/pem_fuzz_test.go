package signer_test

import (
	"bytes"
	"encoding/pem"
	"testing"

	"github.com/castellan-ca/castellan/signer"
	"github.com/castellan-ca/castellan/signer/signertest"
)

// FuzzParseCertificatesPEM feeds arbitrary bytes to the bundle parser, which
// reads operator files and remote backends' answers (Vault, Google CAS).
// Property: no panic, and on success every certificate is a CERTIFICATE block
// of the input, re-encoded exactly, in order.
func FuzzParseCertificatesPEM(f *testing.F) {
	root := signertest.NewRoot(f, "Fuzz Root", signertest.CertOptions{})
	inter := root.NewIntermediate(f, "Fuzz Inter", signertest.CertOptions{})
	f.Add([]byte(signer.EncodePEM(root.Cert)))
	f.Add([]byte(signer.EncodePEM(inter.Cert, root.Cert)))
	f.Add([]byte(signer.EncodePEM(root.Cert) + "trailing"))
	f.Add([]byte("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"))
	f.Add([]byte("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"))
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, data []byte) {
		certs, err := signer.ParseCertificatesPEM(data)
		if err != nil {
			if certs != nil {
				t.Fatalf("error %v returned certificates too", err)
			}
			return
		}
		if len(certs) == 0 {
			t.Fatal("success without a certificate")
		}
		rest := data
		for i, c := range certs {
			var block *pem.Block
			block, rest = pem.Decode(rest)
			if block == nil || block.Type != "CERTIFICATE" || !bytes.Equal(block.Bytes, c.Raw) {
				t.Fatalf("certificate %d is not the input's block %d", i, i)
			}
		}
		if len(bytes.TrimSpace(rest)) != 0 {
			t.Fatal("accepted input with data after the last certificate")
		}
	})
}
