package rotation

import (
	"bytes"
	"crypto"
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
)

// KEKSize is the length of a key-encryption key: AES-256.
const KEKSize = 32

// Errors of opening a stored CA key; match them with errors.Is.
var (
	// ErrWrongKEK: the key was sealed under another key-encryption key, or
	// the ciphertext does not authenticate (wrong KEK or tampering).
	ErrWrongKEK = errors.New("CA key does not open with the configured key-encryption key")
	// ErrNoKEK: the key is encrypted but no key-encryption key is configured.
	ErrNoKEK = errors.New("CA key is encrypted but no key-encryption key is configured")
)

// Sealed key formats, the first byte of a stored key.
const (
	formatPlain  byte = 0 // PKCS#8 DER, no KEK configured (embedded store only)
	formatAESGCM byte = 1 // [1][8-byte KEK id][12-byte nonce][AES-256-GCM(PKCS#8 DER)]
	formatKeyURI byte = 2 // [2][URI of a key held by a key provider (HSM, KMS)]: no key material (keyref.go)
)

// Sealer encrypts CA private keys at rest with AES-256-GCM under a
// key-encryption key (KEK) that lives outside the data it protects. A nil
// *Sealer stores keys unencrypted.
type Sealer struct {
	aead cipher.AEAD
	id   [8]byte
}

// NewSealer returns a Sealer for a KEKSize-byte key.
func NewSealer(kek []byte) (*Sealer, error) {
	if len(kek) != KEKSize {
		return nil, fmt.Errorf("key-encryption key is %d bytes, want %d", len(kek), KEKSize)
	}
	block, err := aes.NewCipher(kek)
	if err != nil {
		return nil, fmt.Errorf("key-encryption key: %w", err)
	}
	aead, err := cipher.NewGCM(block)
	if err != nil {
		return nil, fmt.Errorf("key-encryption key: %w", err)
	}
	s := &Sealer{aead: aead}
	// The id names the KEK in stored keys so that a wrong KEK is reported as
	// such; it is a hash, so it reveals nothing usable about the key.
	sum := sha256.Sum256(append([]byte("castellan kek id\x00"), kek...))
	copy(s.id[:], sum[:])
	return s, nil
}

// ReadKEKFile reads a KEK from path: exactly KEKSize raw bytes, or their
// standard base64 encoding (surrounding whitespace ignored), which is what a
// Kubernetes Secret mounted as a file holds in either style of creation.
func ReadKEKFile(path string) ([]byte, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("key-encryption key: %w", err)
	}
	if len(b) == KEKSize {
		return b, nil
	}
	if k, err := base64.StdEncoding.DecodeString(string(bytes.TrimSpace(b))); err == nil && len(k) == KEKSize {
		return k, nil
	}
	// Never echo the content: it is (or is close to) the secret.
	return nil, fmt.Errorf("key-encryption key %s: want %d raw bytes or their base64 encoding, got %d bytes", path, KEKSize, len(b))
}

// ID returns the hex id of the KEK, as recorded beside every key it seals.
func (s *Sealer) ID() string {
	if s == nil {
		return ""
	}
	return hex.EncodeToString(s.id[:])
}

// aad binds a ciphertext to its CA, so that sealed keys cannot be swapped
// between rows of the store.
func aad(keyID string) []byte { return []byte("castellan ca key\x00" + keyID) }

// Seal returns key in the stored format for the CA keyID: encrypted when s
// is not nil, plain PKCS#8 otherwise.
func (s *Sealer) Seal(keyID string, key crypto.Signer) ([]byte, error) {
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, fmt.Errorf("seal CA key %s: %w", keyID, err)
	}
	if s == nil {
		return append([]byte{formatPlain}, der...), nil
	}
	out := make([]byte, 0, 1+len(s.id)+s.aead.NonceSize()+len(der)+s.aead.Overhead())
	out = append(out, formatAESGCM)
	out = append(out, s.id[:]...)
	nonce := make([]byte, s.aead.NonceSize())
	if _, err := rand.Read(nonce); err != nil {
		return nil, fmt.Errorf("seal CA key %s: %w", keyID, err)
	}
	out = append(out, nonce...)
	out = s.aead.Seal(out, nonce, der, aad(keyID))
	clear(der) // the plaintext should not outlive this call
	return out, nil
}

// Open returns the private key stored for the CA keyID.
func (s *Sealer) Open(keyID string, blob []byte) (crypto.Signer, error) {
	if len(blob) == 0 {
		return nil, fmt.Errorf("CA key %s: none stored", keyID)
	}
	var der []byte
	switch blob[0] {
	case formatPlain:
		der = blob[1:]
	case formatAESGCM:
		if s == nil {
			return nil, fmt.Errorf("CA %s: %w", keyID, ErrNoKEK)
		}
		rest := blob[1:]
		if len(rest) < len(s.id)+s.aead.NonceSize() {
			return nil, fmt.Errorf("CA %s: sealed key truncated: %w", keyID, ErrWrongKEK)
		}
		if id := rest[:len(s.id)]; !bytes.Equal(id, s.id[:]) {
			return nil, fmt.Errorf("CA %s: sealed under KEK %x, the configured KEK is %s: %w", keyID, id, s.ID(), ErrWrongKEK)
		}
		rest = rest[len(s.id):]
		nonce, ct := rest[:s.aead.NonceSize()], rest[s.aead.NonceSize():]
		var err error
		if der, err = s.aead.Open(nil, nonce, ct, aad(keyID)); err != nil {
			return nil, fmt.Errorf("CA %s: %w", keyID, ErrWrongKEK)
		}
		defer clear(der)
	case formatKeyURI:
		return nil, fmt.Errorf("CA key %s is held by a key provider (%s), not sealed in the state", keyID, blob[1:])
	default:
		return nil, fmt.Errorf("CA key %s: unknown format %d", keyID, blob[0])
	}
	k, err := x509.ParsePKCS8PrivateKey(der)
	if err != nil {
		return nil, fmt.Errorf("CA key %s: %w", keyID, err)
	}
	signer, ok := k.(crypto.Signer)
	if !ok {
		return nil, fmt.Errorf("CA key %s: %T cannot sign", keyID, k)
	}
	return signer, nil
}

// sealedWith reports whether blob is in the format s writes.
func (s *Sealer) sealedWith(blob []byte) bool {
	if s == nil {
		return len(blob) > 0 && blob[0] == formatPlain
	}
	return len(blob) > 1+len(s.id) && blob[0] == formatAESGCM && bytes.Equal(blob[1:1+len(s.id)], s.id[:])
}
