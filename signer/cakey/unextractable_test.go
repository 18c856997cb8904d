//go:build cgo && !nopkcs11

package cakey_test

import (
	"errors"
	"testing"

	"github.com/ThalesGroup/crypto11"
	"github.com/miekg/pkcs11"

	"github.com/castellan-ca/castellan/internal/keyfile"
	"github.com/castellan-ca/castellan/signer/cakey/softhsmtest"
)

// TestKeyUnextractable reads the attributes of a created key's private
// object straight from the token: sensitive, never extractable, and its
// value cannot be read.
func TestKeyUnextractable(t *testing.T) {
	tk := softhsmtest.Get(t)
	p := tk.Provider(t)
	id := newID(t)
	if _, err := p.CreateKey(t.Context(), id, keyfile.KeyTypeECDSAP256); err != nil {
		t.Fatal(err)
	}
	c, err := crypto11.Configure(&crypto11.Config{Path: tk.Module, TokenLabel: softhsmtest.Label, Pin: softhsmtest.PIN})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	key, err := c.FindKeyPair(id, nil)
	if err != nil || key == nil {
		t.Fatalf("FindKeyPair by the CA key id: %v", err)
	}
	attrs, err := c.GetAttributes(key, []crypto11.AttributeType{crypto11.CkaSensitive, crypto11.CkaExtractable,
		crypto11.CkaAlwaysSensitive, crypto11.CkaNeverExtractable, crypto11.CkaPrivate})
	if err != nil {
		t.Fatal(err)
	}
	for typ, want := range map[crypto11.AttributeType]byte{crypto11.CkaSensitive: 1, crypto11.CkaExtractable: 0,
		crypto11.CkaAlwaysSensitive: 1, crypto11.CkaNeverExtractable: 1, crypto11.CkaPrivate: 1} {
		a := attrs[typ]
		if a == nil || len(a.Value) != 1 || a.Value[0] != want {
			t.Errorf("attribute %#x = %v, want %d", typ, a, want)
		}
	}
	_, err = c.GetAttribute(key, crypto11.CkaValue)
	var p11 pkcs11.Error
	if !errors.As(err, &p11) || p11 != pkcs11.CKR_ATTRIBUTE_SENSITIVE {
		t.Errorf("reading the private value: err = %v, want CKR_ATTRIBUTE_SENSITIVE", err)
	}
}
