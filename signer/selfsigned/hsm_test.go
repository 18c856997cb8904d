package selfsigned_test

import (
	"bytes"
	"crypto/x509"
	"fmt"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/castellan-ca/castellan/internal/certlint"
	"github.com/castellan-ca/castellan/signer/cakey"
	"github.com/castellan-ca/castellan/signer/cakey/softhsmtest"
	"github.com/castellan-ca/castellan/signer/selfsigned"
)

func TestMain(m *testing.M) { os.Exit(softhsmtest.Main(m)) }

// TestGeneratorKeyProvider: with a key provider, NewKey makes the key in the
// token, its CA certificate's SubjectKeyId is the key's id (the key id the
// state and the audit log know the CA by, and the key's label), and OpenKey
// finds it again by its URI.
func TestGeneratorKeyProvider(t *testing.T) {
	tk := softhsmtest.Get(t)
	p := tk.Provider(t)
	g, err := selfsigned.NewGenerator(selfsigned.Options{TrustDomain: td, Keys: p})
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	rootKey, err := g.NewKey(t.Context())
	if err != nil {
		t.Fatalf("NewKey: %v", err)
	}
	k, ok := rootKey.(*cakey.Key)
	if !ok {
		t.Fatalf("NewKey returned %T, want a key in the provider", rootKey)
	}
	root, err := g.NewRoot(rootKey, now, now.Add(time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	interKey, err := g.NewKey(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	inter, err := g.NewIntermediate(interKey, root, rootKey, now, now.Add(time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	if len(root.SubjectKeyId) != 16 || !bytes.Equal(root.SubjectKeyId, k.ID()) {
		t.Errorf("root SubjectKeyId = %x, want the key's id %x", root.SubjectKeyId, k.ID())
	}
	if !bytes.Equal(inter.SubjectKeyId, interKey.(*cakey.Key).ID()) || !bytes.Equal(inter.AuthorityKeyId, root.SubjectKeyId) {
		t.Errorf("intermediate SKID %x / AKID %x, want its key's id and the root's", inter.SubjectKeyId, inter.AuthorityKeyId)
	}
	if err := inter.CheckSignatureFrom(root); err != nil {
		t.Errorf("intermediate not signed by the root's key in the token: %v", err)
	}
	// Each CA's subject is its own, ending in its key id (the key's id in
	// the token), and both certificates pass the lints every CA passes.
	for _, c := range []struct {
		cert *x509.Certificate
		cn   string
	}{{root, selfsigned.RootCommonName}, {inter, selfsigned.IntermediateCommonName}} {
		if want := fmt.Sprintf("%s %x", c.cn, c.cert.SubjectKeyId[:8]); c.cert.Subject.CommonName != want {
			t.Errorf("CN = %q, want %q", c.cert.Subject.CommonName, want)
		}
		certlint.Check(t, c.cn+" with its key in SoftHSM2", c.cert)
	}
	if root.Subject.String() == inter.Subject.String() {
		t.Errorf("root and intermediate share the subject %q", root.Subject)
	}
	opened, err := g.OpenKey(k.URI(), root.PublicKey)
	if err != nil {
		t.Fatal(err)
	}
	again, err := g.NewIntermediate(interKey, root, opened, now, now.Add(time.Hour))
	if err != nil || again.CheckSignatureFrom(root) != nil {
		t.Errorf("signing with the root key opened by URI: %v", err)
	}

	software, err := selfsigned.NewGenerator(selfsigned.Options{TrustDomain: td})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := software.OpenKey(k.URI(), root.PublicKey); err == nil || !strings.Contains(err.Error(), "keyProvider") {
		t.Errorf("OpenKey without a key provider: err = %v, want one naming keyProvider", err)
	}
}
