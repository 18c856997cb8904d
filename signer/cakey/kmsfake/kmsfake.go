// Package kmsfake holds in-process fakes of the cloud KMSs that
// signer/cakey reaches through go.step.sm/crypto/kms, for tests of that
// integration with the real client libraries: AWS KMS as an HTTP server
// speaking its JSON protocol (the AWS SDK for Go v2 is the client), and
// Google Cloud KMS as a gRPC server on the real kmspb service definition
// (cloud.google.com/go/kms is the client). Neither cloud can run here. The
// fakes make real keys and real signatures; they implement what the library
// calls for creating, finding and signing with asymmetric keys, and can be
// told to fail like an outage.
package kmsfake

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
)

// errNotFound: no key of that name.
var errNotFound = errors.New("key not found")

// keyring holds the fakes' keys by name.
type keyring struct {
	mu   sync.Mutex
	keys map[string]crypto.Signer
	// down makes every request fail, as an outage.
	down atomic.Bool
	// signs counts signatures made.
	signs atomic.Int64
}

// newKey makes a key of curve or RSA bits (curve nil).
func newKey(curve elliptic.Curve, bits int) (crypto.Signer, error) {
	if curve != nil {
		return ecdsa.GenerateKey(curve, rand.Reader)
	}
	return rsa.GenerateKey(rand.Reader, bits)
}

func (r *keyring) add(name string, k crypto.Signer) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.keys == nil {
		r.keys = map[string]crypto.Signer{}
	}
	if _, ok := r.keys[name]; ok {
		return fmt.Errorf("key %s already exists", name)
	}
	r.keys[name] = k
	return nil
}

func (r *keyring) get(name string) (crypto.Signer, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	k, ok := r.keys[name]
	if !ok {
		return nil, fmt.Errorf("%w: %s", errNotFound, name)
	}
	return k, nil
}

// publicDER is k's public key as PKIX DER.
func publicDER(k crypto.Signer) ([]byte, error) { return x509.MarshalPKIXPublicKey(k.Public()) }

// signDigest signs a digest made with hash, PKCS#1 v1.5 or PSS (salt as
// long as the hash, as both clouds do) for RSA keys.
func (r *keyring) signDigest(k crypto.Signer, digest []byte, hash crypto.Hash, pss bool) ([]byte, error) {
	if len(digest) != hash.Size() {
		return nil, fmt.Errorf("digest of %d bytes for %v", len(digest), hash)
	}
	var opts crypto.SignerOpts = hash
	if _, isRSA := k.(*rsa.PrivateKey); isRSA && pss {
		opts = &rsa.PSSOptions{SaltLength: rsa.PSSSaltLengthEqualsHash, Hash: hash}
	}
	r.signs.Add(1)
	return k.Sign(rand.Reader, digest, opts)
}

// Down makes every request fail (true) or succeed again (false).
func (r *keyring) Down(down bool) { r.down.Store(down) }

// Signatures returns how many signatures the fake made.
func (r *keyring) Signatures() int64 { return r.signs.Load() }
