//go:build cgo && !nopkcs11

package cakey

import (
	"errors"

	"github.com/miekg/pkcs11"
)

// pkcs11Supported: this build reaches PKCS#11 modules (it needs cgo).
const pkcs11Supported = true

// pinRefused reports whether err is the token refusing the user PIN: wrong,
// or the user locked after too many wrong ones.
func pinRefused(err error) bool {
	var e pkcs11.Error
	return errors.As(err, &e) && (e == pkcs11.CKR_PIN_INCORRECT || e == pkcs11.CKR_PIN_LOCKED || e == pkcs11.CKR_PIN_INVALID)
}
