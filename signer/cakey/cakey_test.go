package cakey_test

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"os"
	"strings"
	"testing"
	"time"

	"go.step.sm/crypto/kms/apiv1"

	"github.com/castellan-ca/castellan/internal/keyfile"
	"github.com/castellan-ca/castellan/signer"
	"github.com/castellan-ca/castellan/signer/cakey"
	"github.com/castellan-ca/castellan/signer/cakey/softhsmtest"
	"github.com/castellan-ca/castellan/signer/local"
)

func TestMain(m *testing.M) { os.Exit(softhsmtest.Main(m)) }

// retry is the reconnect interval of test providers: short, so that
// recovery tests do not wait.
const retry = softhsmtest.RetryInterval

// newProvider opens a provider on uri, closed at the end of the test.
func newProvider(t *testing.T, uri string) *cakey.Provider {
	t.Helper()
	p, err := cakey.New(t.Context(), cakey.Config{URI: uri, RetryInterval: retry})
	if err != nil {
		t.Fatalf("cakey.New: %v", err)
	}
	t.Cleanup(func() { _ = p.Close() })
	return p
}

// newID returns a random CA key id.
func newID(t *testing.T) []byte {
	t.Helper()
	id := make([]byte, 16)
	if _, err := rand.Read(id); err != nil {
		t.Fatal(err)
	}
	return id
}

// checkSigns signs a digest with s and verifies it with want.
func checkSigns(t *testing.T, s crypto.Signer, want crypto.PublicKey) {
	t.Helper()
	digest := sha256.Sum256([]byte(t.Name()))
	sig, err := s.Sign(rand.Reader, digest[:], crypto.SHA256)
	if err != nil {
		t.Fatalf("Sign: %v", err)
	}
	switch pub := want.(type) {
	case *ecdsa.PublicKey:
		if !ecdsa.VerifyASN1(pub, digest[:], sig) {
			t.Fatal("ECDSA signature does not verify with the key's public key")
		}
	case *rsa.PublicKey:
		if err := rsa.VerifyPKCS1v15(pub, crypto.SHA256, digest[:], sig); err != nil {
			t.Fatalf("RSA signature does not verify with the key's public key: %v", err)
		}
	default:
		t.Fatalf("unexpected public key %T", want)
	}
}

func TestCreateKeyPKCS11(t *testing.T) {
	tk := softhsmtest.Get(t)
	p := tk.Provider(t)
	for _, tc := range []struct {
		keyType string
		check   func(crypto.PublicKey) bool
	}{
		{keyfile.KeyTypeECDSAP256, func(k crypto.PublicKey) bool { e, ok := k.(*ecdsa.PublicKey); return ok && e.Curve == elliptic.P256() }},
		{keyfile.KeyTypeECDSAP384, func(k crypto.PublicKey) bool { e, ok := k.(*ecdsa.PublicKey); return ok && e.Curve == elliptic.P384() }},
		{keyfile.KeyTypeRSA2048, func(k crypto.PublicKey) bool { r, ok := k.(*rsa.PublicKey); return ok && r.N.BitLen() == 2048 }},
	} {
		t.Run(tc.keyType, func(t *testing.T) {
			id := newID(t)
			before := tk.Objects(t)
			k, err := p.CreateKey(t.Context(), id, tc.keyType)
			if err != nil {
				t.Fatalf("CreateKey: %v", err)
			}
			h := hex.EncodeToString(id)
			if want := "pkcs11:id=" + h + ";object=" + h; k.URI() != want {
				t.Errorf("URI = %q, want %q (CKA_ID the key id, labelled with it)", k.URI(), want)
			}
			if !tc.check(k.Public()) {
				t.Errorf("public key %T is not a %s key", k.Public(), tc.keyType)
			}
			if got := tk.Objects(t) - before; got != 2 {
				t.Errorf("token objects rose by %d, want 2 (the key pair)", got)
			}
			checkSigns(t, k, k.Public())

			// Another provider finds it by its URI alone, as a restarted server does.
			other := tk.Provider(t)
			reopened, err := other.Key(k.URI(), k.Public())
			if err != nil {
				t.Fatalf("Key: %v", err)
			}
			checkSigns(t, reopened, k.Public())
			if err := reopened.Check(t.Context()); err != nil {
				t.Errorf("Check: %v", err)
			}

			if _, err := p.CreateKey(t.Context(), id, tc.keyType); !errors.Is(err, apiv1.AlreadyExistsError{}) {
				t.Errorf("CreateKey with a used id: err = %v, want AlreadyExistsError", err)
			}
		})
	}
}

// TestKeyMismatch: a key at the URI that is not the CA certificate's fails
// with local.ErrKeyMismatch, not as an outage.
func TestKeyMismatch(t *testing.T) {
	tk := softhsmtest.Get(t)
	p := tk.Provider(t)
	k, err := p.CreateKey(t.Context(), newID(t), keyfile.KeyTypeECDSAP256)
	if err != nil {
		t.Fatal(err)
	}
	other, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	wrong, err := p.Key(k.URI(), other.Public())
	if err != nil {
		t.Fatal(err)
	}
	digest := sha256.Sum256([]byte("x"))
	_, err = wrong.Sign(rand.Reader, digest[:], crypto.SHA256)
	if !errors.Is(err, local.ErrKeyMismatch) || errors.Is(err, signer.ErrSignerUnavailable) {
		t.Errorf("Sign with a mismatched key: err = %v, want local.ErrKeyMismatch only", err)
	}
}

// TestMissingKey: a URI naming no key in the token is Unavailable (the
// token cannot tell a deleted key from one it cannot see right now).
func TestMissingKey(t *testing.T) {
	tk := softhsmtest.Get(t)
	p := tk.Provider(t)
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	h := hex.EncodeToString(newID(t))
	k, err := p.Key("pkcs11:id="+h+";object="+h, key.Public())
	if err != nil {
		t.Fatal(err)
	}
	if err := k.Check(t.Context()); !errors.Is(err, signer.ErrSignerUnavailable) {
		t.Errorf("Check of a missing key: err = %v, want ErrSignerUnavailable", err)
	}
}

// TestTokenRemoved: while the token is out every signature and Check is
// Unavailable; once it is back the provider reconnects by itself.
func TestTokenRemoved(t *testing.T) {
	tk := softhsmtest.Get(t)
	p := tk.Provider(t)
	k, err := p.CreateKey(t.Context(), newID(t), keyfile.KeyTypeECDSAP256)
	if err != nil {
		t.Fatal(err)
	}
	checkSigns(t, k, k.Public())

	restore := tk.Remove(t)
	digest := sha256.Sum256([]byte("x"))
	for i := range 3 { // the first fails on the session, the next on reconnecting
		if _, err := k.Sign(rand.Reader, digest[:], crypto.SHA256); !errors.Is(err, signer.ErrSignerUnavailable) {
			t.Fatalf("Sign %d without the token: err = %v, want ErrSignerUnavailable", i, err)
		}
		time.Sleep(retry)
	}
	if err := k.Check(t.Context()); !errors.Is(err, signer.ErrSignerUnavailable) {
		t.Errorf("Check without the token: err = %v, want ErrSignerUnavailable", err)
	}
	restore()
	waitRecovered(t, k)
}

// TestWrongPIN: a refused PIN is Unavailable and ErrPINRefused, is not
// tried again while the file is unchanged, and a corrected file recovers.
func TestWrongPIN(t *testing.T) {
	tk := softhsmtest.Get(t)
	p := tk.Provider(t)
	k, err := p.CreateKey(t.Context(), newID(t), keyfile.KeyTypeECDSAP256)
	if err != nil {
		t.Fatal(err)
	}
	if err := p.Close(); err != nil {
		t.Fatal(err)
	}

	tk.SetPIN(t, "0000")
	t.Cleanup(func() { tk.SetPIN(t, softhsmtest.PIN) })
	bad := tk.Provider(t)
	key, err := bad.Key(k.URI(), k.Public())
	if err != nil {
		t.Fatal(err)
	}
	for i := range 2 {
		err := key.Check(t.Context())
		if !errors.Is(err, signer.ErrSignerUnavailable) || !errors.Is(err, cakey.ErrPINRefused) {
			t.Fatalf("Check %d with a wrong PIN: err = %v, want ErrSignerUnavailable and ErrPINRefused", i, err)
		}
		if i == 1 && !strings.Contains(err.Error(), "not tried again") {
			t.Errorf("second attempt with the same wrong PIN reached the token: %v", err)
		}
		time.Sleep(2 * retry)
	}
	tk.SetPIN(t, softhsmtest.PIN)
	waitRecovered(t, key)
}

// waitRecovered waits until k signs again: recovery is eventual (the retry
// interval), and until then every failure must stay Unavailable.
func waitRecovered(t *testing.T, k *cakey.Key) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		err := k.Check(t.Context())
		if err == nil {
			break
		}
		if !errors.Is(err, signer.ErrSignerUnavailable) {
			t.Fatalf("Check while recovering: err = %v, want nil or ErrSignerUnavailable", err)
		}
		if time.Now().After(deadline) {
			t.Fatalf("no recovery within 10s: %v", err)
		}
		time.Sleep(retry)
	}
	checkSigns(t, k, k.Public())
}

// TestContextEndsSign: a signature bound to a cancelled context gives up
// with the context's error.
func TestContextEndsSign(t *testing.T) {
	tk := softhsmtest.Get(t)
	p := tk.Provider(t)
	k, err := p.CreateKey(t.Context(), newID(t), keyfile.KeyTypeECDSAP256)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	digest := sha256.Sum256([]byte("x"))
	if _, err := k.WithContext(ctx).Sign(rand.Reader, digest[:], crypto.SHA256); !errors.Is(err, context.Canceled) {
		t.Errorf("Sign with a cancelled context: err = %v, want context.Canceled", err)
	}
}

func TestCheckURI(t *testing.T) {
	for _, tc := range []struct {
		uri, wantErr string
	}{
		{"pkcs11:module-path=/m.so;token=t?pin-source=/p", ""},
		{"pkcs11:module-path=/m.so;slot-id=3;max-sessions=8?pin-source=/p", ""},
		{"pkcs11:module-path=/m.so;serial=0a1b?pin-source=/p", ""},
		{"awskms:region=eu-west-1", ""},
		{"awskms:", ""},
		{"cloudkms:key-ring=projects/p/locations/global/keyRings/r", ""},
		{"cloudkms:key-ring=projects/p/locations/global/keyRings/r;protection-level=software", ""},
		{"pkcs11:module-path=/m.so;token=t?pin-value=1234", "pin-value is not accepted"},
		{"pkcs11:module-path=/m.so;token=t?pin-prompt", "pin-prompt is not accepted"},
		{"pkcs11:module-path=/m.so;token=t", "needs pin-source"},
		{"pkcs11:module-path=/m.so?pin-source=/p", "exactly one of token"},
		{"pkcs11:module-path=/m.so;token=t;slot-id=1?pin-source=/p", "exactly one of token"},
		{"pkcs11:module-path=/m.so;token=t;tokne=x?pin-source=/p", `unknown attribute "tokne"`},
		{"awskms:region=eu-west-1;endpoint=http://x", `unknown attribute "endpoint"`},
		{"cloudkms:protection-level=external", "protection-level"},
		{"cloudkms:key-ring=projects/p/keyRings/r", "is not projects/"},
		{"yubikey:slot-id=9c", "unknown scheme"},
		{"/etc/castellan/ca-key.pem", "scheme is missing"},
	} {
		t.Run(tc.uri, func(t *testing.T) {
			err := cakey.CheckURI(tc.uri)
			switch {
			case tc.wantErr == "" && err != nil:
				t.Errorf("CheckURI: %v", err)
			case tc.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tc.wantErr)):
				t.Errorf("CheckURI: err = %v, want one saying %q", err, tc.wantErr)
			}
		})
	}
}

func TestKeyURIChecked(t *testing.T) {
	tk := softhsmtest.Get(t)
	p := tk.Provider(t)
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		uri, wantErr string
	}{
		{"pkcs11:id=01;object=ca", ""},
		{"pkcs11:object=ca", ""},
		{"pkcs11:id=01;object=ca?pin-value=1234", `"pin-value" does not belong`},
		{"pkcs11:token=other;object=ca", `"token" does not belong`},
		{"pkcs11:", "names no key"},
		{"awskms:key-id=1234abcd", `must start with "pkcs11:"`},
	} {
		t.Run(tc.uri, func(t *testing.T) {
			_, err := p.Key(tc.uri, key.Public())
			switch {
			case tc.wantErr == "" && err != nil:
				t.Errorf("Key: %v", err)
			case tc.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tc.wantErr)):
				t.Errorf("Key: err = %v, want one saying %q", err, tc.wantErr)
			}
		})
	}
}
