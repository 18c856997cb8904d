//go:build !cgo || nopkcs11

package cakey

// pkcs11Supported: without cgo there is no PKCS#11 (go.step.sm/crypto's
// pkcs11 refuses to start), so New refuses a pkcs11 provider up front.
const pkcs11Supported = false

// pinRefused is never true: without PKCS#11 there is no PIN.
func pinRefused(error) bool { return false }
