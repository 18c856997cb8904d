// Package keyfile makes, reads and writes private keys: CA key generation by
// configured type, and PEM parsing and PKCS#8 encoding for the key files
// operators and Castellan keep (CA keys, the operator credential, the audit
// checkpoint key).
package keyfile

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"strings"
)

// CA key types accepted by GenerateKey (configuration values).
const (
	// KeyTypeECDSAP256 is ECDSA on NIST P-256, the default.
	KeyTypeECDSAP256 = "ecdsa-p256"
	// KeyTypeECDSAP384 is ECDSA on NIST P-384.
	KeyTypeECDSAP384 = "ecdsa-p384"
	// KeyTypeRSA2048 is RSA with a 2048-bit modulus.
	KeyTypeRSA2048 = "rsa-2048"
	// KeyTypeRSA3072 is RSA with a 3072-bit modulus.
	KeyTypeRSA3072 = "rsa-3072"
	// KeyTypeRSA4096 is RSA with a 4096-bit modulus.
	KeyTypeRSA4096 = "rsa-4096"
	// DefaultKeyType is used when the key type is empty.
	DefaultKeyType = KeyTypeECDSAP256
)

var keyTypes = []string{KeyTypeECDSAP256, KeyTypeECDSAP384, KeyTypeRSA2048, KeyTypeRSA3072, KeyTypeRSA4096}

// CheckKeyType returns an error naming the accepted values unless name is a
// known CA key type or empty (the default), for configuration validation.
func CheckKeyType(name string) error {
	if name == "" {
		return nil
	}
	for _, k := range keyTypes {
		if name == k {
			return nil
		}
	}
	return fmt.Errorf("unknown CA key type %q (want one of %s)", name, strings.Join(keyTypes, ", "))
}

// GenerateKey returns a new CA private key of the named type ("" means
// DefaultKeyType). Randomness always comes from crypto/rand: since Go 1.26 the
// standard library ignores any other reader for key generation.
func GenerateKey(keyType string) (crypto.Signer, error) {
	if err := CheckKeyType(keyType); err != nil {
		return nil, err
	}
	var (
		key crypto.Signer
		err error
	)
	switch keyType {
	case "", KeyTypeECDSAP256:
		key, err = ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	case KeyTypeECDSAP384:
		key, err = ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	case KeyTypeRSA2048:
		key, err = rsa.GenerateKey(rand.Reader, 2048)
	case KeyTypeRSA3072:
		key, err = rsa.GenerateKey(rand.Reader, 3072)
	case KeyTypeRSA4096:
		key, err = rsa.GenerateKey(rand.Reader, 4096)
	}
	if err != nil {
		return nil, fmt.Errorf("generate %s key: %w", keyType, err)
	}
	return key, nil
}

// ParsePrivateKeyPEM parses the first PEM block of data as a PKCS#8 "PRIVATE KEY",
// PKCS#1 "RSA PRIVATE KEY" or SEC1 "EC PRIVATE KEY". Encrypted keys are refused.
func ParsePrivateKeyPEM(data []byte) (crypto.Signer, error) {
	block, _ := pem.Decode(data)
	if block == nil {
		return nil, errors.New("no PEM block found")
	}
	var (
		key any
		err error
	)
	switch block.Type {
	case "PRIVATE KEY":
		key, err = x509.ParsePKCS8PrivateKey(block.Bytes)
	case "RSA PRIVATE KEY":
		key, err = x509.ParsePKCS1PrivateKey(block.Bytes)
	case "EC PRIVATE KEY":
		key, err = x509.ParseECPrivateKey(block.Bytes)
	default:
		return nil, fmt.Errorf("unsupported PEM block %q (want PRIVATE KEY, RSA PRIVATE KEY or EC PRIVATE KEY)", block.Type)
	}
	if err != nil {
		return nil, fmt.Errorf("parse %s: %w", block.Type, err)
	}
	s, ok := key.(crypto.Signer)
	if !ok {
		return nil, fmt.Errorf("key of type %T cannot sign", key)
	}
	return s, nil
}

// MarshalPrivateKeyPEM encodes key as a PKCS#8 "PRIVATE KEY" PEM block.
func MarshalPrivateKeyPEM(key crypto.Signer) ([]byte, error) {
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, fmt.Errorf("marshal private key: %w", err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), nil
}

// MarshalPublicKeyPEM encodes pub as a PKIX "PUBLIC KEY" PEM block.
func MarshalPublicKeyPEM(pub crypto.PublicKey) ([]byte, error) {
	der, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		return nil, fmt.Errorf("marshal public key: %w", err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der}), nil
}

// ParsePublicKeyPEM parses the first PEM block of data as a PKIX "PUBLIC KEY".
func ParsePublicKeyPEM(data []byte) (crypto.PublicKey, error) {
	block, _ := pem.Decode(data)
	switch {
	case block == nil:
		return nil, errors.New("no PEM block found")
	case block.Type != "PUBLIC KEY":
		return nil, fmt.Errorf("unsupported PEM block %q (want PUBLIC KEY)", block.Type)
	}
	pub, err := x509.ParsePKIXPublicKey(block.Bytes)
	if err != nil {
		return nil, fmt.Errorf("parse PUBLIC KEY: %w", err)
	}
	return pub, nil
}
