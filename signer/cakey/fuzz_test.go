package cakey_test

import (
	"strings"
	"testing"

	"go.step.sm/crypto/kms/uri"

	"github.com/castellan-ca/castellan/signer/cakey"
)

// FuzzCheckURI: whatever the provider URI, CheckURI does not panic, and an
// accepted one has a known scheme and never carries a PIN or a prompt.
func FuzzCheckURI(f *testing.F) {
	for _, s := range []string{
		"pkcs11:module-path=/m.so;token=t?pin-source=/p", "pkcs11:slot-id=1?pin-source=/p&pin-value=1",
		"awskms:region=eu-west-1", "cloudkms:key-ring=projects/p/locations/l/keyRings/r;protection-level=HSM",
		"pkcs11:token=t;pin-value=1?pin-source=/p", "PKCS11:token=%74?pin-source=/p", "cloudkms:", ":", "",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		if cakey.CheckURI(s) != nil {
			return
		}
		u, err := uri.Parse(s)
		if err != nil {
			t.Fatalf("CheckURI accepted %q, which does not parse: %v", s, err)
		}
		if kind := strings.ToLower(u.Scheme); kind != cakey.PKCS11 && kind != cakey.AWSKMS && kind != cakey.CloudKMS {
			t.Errorf("CheckURI accepted scheme %q", u.Scheme)
		}
		v := uri.Values(u)
		if v.Has("pin-value") || v.Has("pin-prompt") {
			t.Errorf("CheckURI accepted a PIN or prompt in %q", s)
		}
	})
}
