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
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"slices"
)

// KEKSize is the length of a key-encryption key: AES-256.
const KEKSize = 32

// Errors of opening or sealing a stored CA key; match them with errors.Is.
var (
	// ErrWrongKEK: the key was sealed under key-encryption keys this replica
	// does not hold, or the ciphertext does not authenticate (wrong KEK or
	// tampering).
	ErrWrongKEK = errors.New("CA key does not open with the configured key-encryption key")
	// ErrNoKEK: the key is encrypted but no key-encryption key is configured.
	ErrNoKEK = errors.New("CA key is encrypted but no key-encryption key is configured")
	// ErrUnsealed: a key-encryption key is configured but the state holds a
	// key unencrypted. Whoever can write the state could otherwise plant a
	// CA key of their own choosing.
	ErrUnsealed = errors.New("CA key is stored unencrypted although a key-encryption key is configured")
	// ErrKEKNotHeld: a key must be sealed under a key-encryption key this
	// replica does not hold (a rekey is under way and it has the old one only).
	ErrKEKNotHeld = errors.New("key-encryption key not held by this replica")
	// ErrKeyInProvider: the state holds only the URI of a key that a key
	// provider (an HSM or a KMS) holds; there is nothing to unseal or reseal.
	ErrKeyInProvider = errors.New("held by a key provider (HSM, KMS), not sealed in the state")
)

// Stored key formats, the first byte of a stored key; formatPlain and
// formatAESGCM also start each sealing within formatMultiple.
const (
	formatPlain  byte = 0 // PKCS#8 DER, no KEK configured (embedded store only)
	formatAESGCM byte = 1 // [1][8-byte KEK id][12-byte nonce][AES-256-GCM(PKCS#8 DER)]
	// formatMultiple holds the key sealed under several KEKs while a rekey
	// is under way, the rekey's target first: [2][count]([2-byte length][sealing])…
	formatMultiple byte = 2
	// formatKeyURI holds no key material, only where a key provider (an HSM
	// or a KMS) holds the key: [3][UTF-8 key URI] (keyref.go). Never sealed,
	// so never one of formatMultiple's sealings, and a rekey leaves it alone.
	formatKeyURI byte = 3
)

// maxSealings bounds the sealings of one key: a rekey started on top of
// another one that was never finished, and no more.
const maxSealings = 4

// kek is one key-encryption key.
type kek struct {
	aead cipher.AEAD
	id   string // hex of 8 bytes, as stored beside every sealing
}

// Sealer encrypts CA private keys at rest with AES-256-GCM under
// key-encryption keys (KEKs) that live outside the data they protect. It
// holds the KEK the replica is configured with and, during a rekey, others;
// it opens a key sealed under any of them. A nil *Sealer holds no KEK and
// stores keys unencrypted. A Sealer is immutable: Hold returns a new one.
type Sealer struct {
	primary *kek   // the configured KEK; nil: none, keys are stored unencrypted
	held    []*kek // every KEK held, primary first when there is one
}

// NewSealer returns a Sealer for a KEKSize-byte key, the replica's own.
func NewSealer(key []byte) (*Sealer, error) {
	k, err := newKEK(key)
	if err != nil {
		return nil, err
	}
	return &Sealer{primary: k, held: []*kek{k}}, nil
}

func newKEK(key []byte) (*kek, error) {
	if len(key) != KEKSize {
		return nil, fmt.Errorf("key-encryption key is %d bytes, want %d", len(key), KEKSize)
	}
	block, err := aes.NewCipher(key)
	if err != nil {
		return nil, fmt.Errorf("key-encryption key: %w", err)
	}
	aead, err := cipher.NewGCM(block)
	if err != nil {
		return nil, fmt.Errorf("key-encryption key: %w", err)
	}
	// The id names the KEK in stored keys so that a wrong KEK is reported as
	// such; it is a hash, so it reveals nothing usable about the key.
	sum := sha256.Sum256(append([]byte("castellan kek id\x00"), key...))
	return &kek{aead: aead, id: hex.EncodeToString(sum[:8])}, nil
}

// Hold returns a Sealer that also holds key, for opening and sealing (a
// further KEK file, or the target of a rekey), and key's id. The KEK new
// keys are sealed under by default stays the configured one.
func (s *Sealer) Hold(key []byte) (*Sealer, string, error) {
	k, err := newKEK(key)
	if err != nil {
		return nil, "", err
	}
	out := &Sealer{}
	if s != nil {
		out.primary, out.held = s.primary, slices.Clone(s.held)
	}
	if out.find(k.id) == nil {
		out.held = append(out.held, k)
	}
	return out, k.id, nil
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

// ID returns the hex id of the configured KEK, as recorded beside every key
// it seals; "" when none is configured.
func (s *Sealer) ID() string {
	if s == nil || s.primary == nil {
		return ""
	}
	return s.primary.id
}

// configured reports whether the replica has a KEK of its own, in which case
// no key may be stored unencrypted.
func (s *Sealer) configured() bool { return s != nil && s.primary != nil }

func (s *Sealer) find(id string) *kek {
	if s == nil {
		return nil
	}
	for _, k := range s.held {
		if k.id == id {
			return k
		}
	}
	return nil
}

// aad binds a ciphertext to its CA, so that sealed keys cannot be swapped
// between rows of the store.
func aad(keyID string) []byte { return []byte("castellan ca key\x00" + keyID) }

// Seal returns key in the stored format for the CA keyID: encrypted under
// the configured KEK, or plain PKCS#8 when none is configured.
func (s *Sealer) Seal(keyID string, key crypto.Signer) ([]byte, error) {
	return s.sealUnder([]string{s.ID()}, keyID, key)
}

// sealUnder seals key once under each KEK of ids ("" meaning unencrypted),
// in that order; every KEK must be held (ErrKEKNotHeld).
func (s *Sealer) sealUnder(ids []string, keyID string, key crypto.Signer) ([]byte, error) {
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, fmt.Errorf("seal CA key %s: %w", keyID, err)
	}
	defer clear(der) // the plaintext should not outlive this call
	parts := make([][]byte, 0, len(ids))
	for _, id := range ids {
		if id == "" {
			if s.configured() {
				return nil, fmt.Errorf("seal CA key %s: %w", keyID, ErrUnsealed)
			}
			parts = append(parts, append([]byte{formatPlain}, der...))
			continue
		}
		k := s.find(id)
		if k == nil {
			return nil, fmt.Errorf("seal CA key %s under KEK %s: %w", keyID, id, ErrKEKNotHeld)
		}
		idBytes, _ := hex.DecodeString(k.id)
		out := make([]byte, 0, 1+len(idBytes)+k.aead.NonceSize()+len(der)+k.aead.Overhead())
		out = append(append(out, formatAESGCM), idBytes...)
		nonce := make([]byte, k.aead.NonceSize())
		if _, err := rand.Read(nonce); err != nil {
			return nil, fmt.Errorf("seal CA key %s: %w", keyID, err)
		}
		parts = append(parts, k.aead.Seal(append(out, nonce...), nonce, der, aad(keyID)))
	}
	return joinSealings(parts)
}

// Open returns the private key stored for the CA keyID, from the first
// sealing under a KEK this Sealer holds. With a KEK configured, a key stored
// unencrypted is ErrUnsealed, even beside encrypted sealings.
func (s *Sealer) Open(keyID string, blob []byte) (crypto.Signer, error) {
	parts, err := splitSealings(blob)
	if err != nil {
		return nil, fmt.Errorf("CA key %s: %w", keyID, err)
	}
	var plain []byte
	for _, p := range parts {
		if sealingKEK(p) == "" {
			plain = p[1:]
		}
	}
	if plain != nil && s.configured() {
		return nil, fmt.Errorf("CA %s: %w", keyID, ErrUnsealed)
	}
	var others []string
	for _, p := range parts {
		if id := sealingKEK(p); id != "" {
			if k := s.find(id); k != nil {
				return k.open(keyID, p)
			}
			others = append(others, id)
		}
	}
	switch {
	case plain != nil:
		return parsePKCS8(keyID, plain)
	case s == nil || len(s.held) == 0:
		return nil, fmt.Errorf("CA %s: %w", keyID, ErrNoKEK)
	}
	return nil, fmt.Errorf("CA %s: sealed under KEK %v, this replica holds %v: %w", keyID, others, s.ids(), ErrWrongKEK)
}

// ids lists the ids of the KEKs held.
func (s *Sealer) ids() []string {
	var out []string
	for _, k := range s.held {
		out = append(out, k.id)
	}
	return out
}

// open decrypts one formatAESGCM sealing.
func (k *kek) open(keyID string, p []byte) (crypto.Signer, error) {
	rest := p[1+8:]
	nonce, ct := rest[:k.aead.NonceSize()], rest[k.aead.NonceSize():]
	der, err := k.aead.Open(nil, nonce, ct, aad(keyID))
	if err != nil {
		return nil, fmt.Errorf("CA %s: %w", keyID, ErrWrongKEK)
	}
	defer clear(der)
	return parsePKCS8(keyID, der)
}

func parsePKCS8(keyID string, der []byte) (crypto.Signer, error) {
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

// sealingKEK is the id of the KEK one well-formed sealing is under; "" for
// an unencrypted key.
func sealingKEK(p []byte) string {
	if p[0] == formatPlain {
		return ""
	}
	return hex.EncodeToString(p[1 : 1+8])
}

// splitSealings returns the sealings of a stored key, each checked to be
// long enough for its format: one, or those of a formatMultiple blob.
func splitSealings(blob []byte) ([][]byte, error) {
	if len(blob) == 0 {
		return nil, errors.New("none stored")
	}
	if uri, ok := refURI(blob); ok {
		return nil, fmt.Errorf("%w: %s", ErrKeyInProvider, uri)
	}
	if blob[0] != formatMultiple {
		return [][]byte{blob}, checkSealing(blob)
	}
	if len(blob) < 2 || blob[1] < 2 || blob[1] > maxSealings {
		return nil, fmt.Errorf("sealed key truncated or with a bad count: %w", ErrWrongKEK)
	}
	var parts [][]byte
	rest := blob[2:]
	for range int(blob[1]) {
		if len(rest) < 2 || len(rest)-2 < int(binary.BigEndian.Uint16(rest)) {
			return nil, fmt.Errorf("sealed key truncated: %w", ErrWrongKEK)
		}
		n := int(binary.BigEndian.Uint16(rest))
		p := rest[2 : 2+n]
		if len(p) > 0 && p[0] == formatMultiple {
			return nil, fmt.Errorf("nested sealings: %w", ErrWrongKEK)
		}
		if err := checkSealing(p); err != nil {
			return nil, err
		}
		parts, rest = append(parts, p), rest[2+n:]
	}
	if len(rest) != 0 {
		return nil, fmt.Errorf("data after the last sealing: %w", ErrWrongKEK)
	}
	return parts, nil
}

// checkSealing checks one sealing's format byte and minimal length.
func checkSealing(p []byte) error {
	switch {
	case len(p) == 0:
		return fmt.Errorf("empty sealing: %w", ErrWrongKEK)
	case p[0] == formatPlain:
		return nil
	case p[0] == formatAESGCM && len(p) >= 1+8+12+16:
		return nil
	case p[0] == formatAESGCM:
		return fmt.Errorf("sealed key truncated: %w", ErrWrongKEK)
	}
	return fmt.Errorf("unknown format %d", p[0])
}

// joinSealings is the inverse of splitSealings.
func joinSealings(parts [][]byte) ([]byte, error) {
	switch {
	case len(parts) == 1:
		return parts[0], nil
	case len(parts) == 0 || len(parts) > maxSealings:
		return nil, fmt.Errorf("a key is sealed under 1 to %d KEKs, not %d: finish the rekey under way first", maxSealings, len(parts))
	}
	out := []byte{formatMultiple, byte(len(parts))}
	for _, p := range parts {
		if len(p) > 0xffff {
			return nil, errors.New("sealed key too large")
		}
		out = binary.BigEndian.AppendUint16(out, uint16(len(p)))
		out = append(out, p...)
	}
	return out, nil
}

// sealedUnder returns the ids of the KEKs blob is sealed under, in stored
// order ("" for an unencrypted copy).
func sealedUnder(blob []byte) ([]string, error) {
	parts, err := splitSealings(blob)
	if err != nil {
		return nil, err
	}
	ids := make([]string, len(parts))
	for i, p := range parts {
		ids[i] = sealingKEK(p)
	}
	return ids, nil
}
