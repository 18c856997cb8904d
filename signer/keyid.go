package signer

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"fmt"
)

// KeyID returns the key identifier of pub as RFC 7093, section 2, method 1
// defines it, which is also what crypto/x509 writes into CA certificates: the
// leftmost 160 bits of the SHA-256 of the subjectPublicKey BIT STRING's value.
// It hashes the key's encoding directly, without building a
// SubjectPublicKeyInfo, so it is cheap enough for every leaf.
func KeyID(pub crypto.PublicKey) ([]byte, error) {
	var bits []byte
	switch k := pub.(type) {
	case *ecdsa.PublicKey:
		b, err := k.Bytes() // the uncompressed point, as in the BIT STRING
		if err != nil {
			return nil, fmt.Errorf("key id: %w", err)
		}
		bits = b
	case ed25519.PublicKey:
		bits = k
	case *rsa.PublicKey:
		bits = x509.MarshalPKCS1PublicKey(k)
	default:
		return nil, fmt.Errorf("key id: unsupported public key %T", pub)
	}
	sum := sha256.Sum256(bits)
	return sum[:20], nil
}
