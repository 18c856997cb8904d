package cakey

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/rsa"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"os"
	"sync/atomic"
	"time"

	"go.step.sm/crypto/kms/apiv1"

	"github.com/castellan-ca/castellan/internal/keyfile"
	"github.com/castellan-ca/castellan/signer/local"
)

// Key is a CA private key held by a Provider: a crypto.Signer whose Sign
// asks the provider. Its public key is known without the provider (from
// the CA certificate, or from creation), so a CA can be set up while the
// provider is down; a key at the URI that is not this public key's fails
// every signature with local.ErrKeyMismatch.
type Key struct {
	p   *Provider
	uri string
	pub crypto.PublicKey
	id  []byte

	lastOK atomic.Int64 // unix nanoseconds of the last successful signature
}

// CreateKey makes a new key pair of keyType (keyfile.KeyType*) inside the
// provider, named for id, the key id its CA certificate will carry as
// SubjectKeyId: a PKCS#11 object with CKA_ID id and label hex(id), or a
// cloud KMS key called castellan-<hex(id)>. The private key is made
// unextractable and never leaves the provider.
func (p *Provider) CreateKey(ctx context.Context, id []byte, keyType string) (*Key, error) {
	if len(id) == 0 {
		return nil, errors.New("key provider: a new key needs an id")
	}
	req, err := createRequest(keyType)
	if err != nil {
		return nil, err
	}
	if req.Name, err = p.c.newKeyName(id); err != nil {
		return nil, err
	}
	req.ProtectionLevel = p.c.protection
	c, err := p.conn(ctx)
	if err != nil {
		return nil, err
	}
	// No OpTimeout: an RSA-4096 key pair may take an HSM many seconds.
	resp, err := run(ctx, maxCreateTime, func() (*apiv1.CreateKeyResponse, error) { return c.km.CreateKey(req) })
	switch {
	case errors.Is(err, apiv1.AlreadyExistsError{}):
		return nil, fmt.Errorf("key provider %s: %w", p.c.kind, err)
	case err != nil:
		p.failed(c, err)
		return nil, p.unavailable("create key "+req.Name, err)
	}
	if err := checkKeyURI(p.c.kind, resp.Name); err != nil {
		return nil, fmt.Errorf("key provider %s returned an unusable key name: %w", p.c.kind, err)
	}
	return &Key{p: p, uri: resp.Name, pub: resp.PublicKey, id: bytes.Clone(id)}, nil
}

// maxCreateTime bounds a key pair generation.
const maxCreateTime = 2 * time.Minute

// createRequest maps a CA key type to the library's request.
func createRequest(keyType string) (*apiv1.CreateKeyRequest, error) {
	if err := keyfile.CheckKeyType(keyType); err != nil {
		return nil, err
	}
	switch keyType {
	case "", keyfile.KeyTypeECDSAP256:
		return &apiv1.CreateKeyRequest{SignatureAlgorithm: apiv1.ECDSAWithSHA256}, nil
	case keyfile.KeyTypeECDSAP384:
		return &apiv1.CreateKeyRequest{SignatureAlgorithm: apiv1.ECDSAWithSHA384}, nil
	case keyfile.KeyTypeRSA2048:
		return &apiv1.CreateKeyRequest{SignatureAlgorithm: apiv1.SHA256WithRSA, Bits: 2048}, nil
	case keyfile.KeyTypeRSA3072:
		return &apiv1.CreateKeyRequest{SignatureAlgorithm: apiv1.SHA256WithRSA, Bits: 3072}, nil
	default:
		return &apiv1.CreateKeyRequest{SignatureAlgorithm: apiv1.SHA256WithRSA, Bits: 4096}, nil
	}
}

// Key returns the key at keyURI, whose public key is pub (its CA
// certificate's). It checks the URI but does not reach the provider: a key
// missing there fails at first use, as Unavailable.
func (p *Provider) Key(keyURI string, pub crypto.PublicKey) (*Key, error) {
	if err := checkKeyURI(p.c.kind, keyURI); err != nil {
		return nil, err
	}
	switch pub.(type) {
	case *ecdsa.PublicKey, *rsa.PublicKey:
	default:
		return nil, fmt.Errorf("key %s: public key of type %T is not supported in a key provider", keyURI, pub)
	}
	return &Key{p: p, uri: keyURI, pub: pub}, nil
}

// URI returns where the key is: what the CA state stores instead of the key.
func (k *Key) URI() string { return k.uri }

// ID returns the id the key was created for (CreateKey), nil for a key
// opened by URI.
func (k *Key) ID() []byte { return bytes.Clone(k.id) }

// Public returns the public key.
func (k *Key) Public() crypto.PublicKey { return k.pub }

// Sign signs digest in the provider, bounded by the provider's OpTimeout.
// Errors wrap signer.ErrSignerUnavailable, except a key that does not match
// its public key (local.ErrKeyMismatch).
func (k *Key) Sign(_ io.Reader, digest []byte, opts crypto.SignerOpts) ([]byte, error) {
	return k.sign(context.Background(), digest, opts)
}

// WithContext returns k as a crypto.Signer whose signatures also end with
// ctx (a request's), since crypto.Signer carries no context of its own.
func (k *Key) WithContext(ctx context.Context) crypto.Signer { return boundKey{k, ctx} }

// boundKey is a Key whose signatures honour a context.
type boundKey struct {
	*Key
	ctx context.Context
}

// Sign signs digest in the provider, giving up when the context ends.
func (b boundKey) Sign(_ io.Reader, digest []byte, opts crypto.SignerOpts) ([]byte, error) {
	return b.sign(b.ctx, digest, opts)
}

func (k *Key) sign(ctx context.Context, digest []byte, opts crypto.SignerOpts) ([]byte, error) {
	c, err := k.p.conn(ctx)
	if err != nil {
		return nil, err
	}
	s, err := c.signerFor(k.uri)
	if err != nil {
		k.p.failed(c, err)
		return nil, k.p.unavailable("open key "+k.uri, err)
	}
	if pub, ok := s.Public().(interface{ Equal(crypto.PublicKey) bool }); !ok || !pub.Equal(k.pub) {
		return nil, fmt.Errorf("key provider %s: key %s: %w", k.p.c.kind, k.uri, local.ErrKeyMismatch)
	}
	sig, err := run(ctx, k.p.cfg.OpTimeout, func() ([]byte, error) { return s.Sign(nil, digest, opts) })
	if err != nil {
		if ctx.Err() != nil {
			return nil, fmt.Errorf("key provider %s: sign with %s: %w", k.p.c.kind, k.uri, err)
		}
		k.p.failed(c, err)
		return nil, k.p.unavailable("sign with "+k.uri, err)
	}
	k.lastOK.Store(k.p.cfg.Now().UnixNano())
	return sig, nil
}

// probeDigest is what Check signs when no signature vouched for the provider lately.
var probeDigest = sha256.Sum256([]byte("castellan key provider health probe"))

// Check reports whether k can sign now: nil when one of its signatures
// succeeded within the provider's HealthTTL and no operation of the
// provider failed since, else the outcome of a probe signature (readiness). The error wraps signer.ErrSignerUnavailable or
// local.ErrKeyMismatch.
func (k *Key) Check(ctx context.Context) error {
	if k.p.healthy(k.lastOK.Load()) {
		return nil
	}
	_, err := k.sign(ctx, probeDigest[:], crypto.SHA256)
	return err
}

// readPIN reads a PIN file the way PKCS#11 tools write them: the whole file,
// trailing whitespace (a newline) removed.
func readPIN(path string) (string, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return "", fmt.Errorf("PIN file: %w", err)
	}
	pin := string(bytes.TrimRight(b, " \t\r\n"))
	if pin == "" {
		return "", fmt.Errorf("PIN file %s is empty", path)
	}
	return pin, nil
}
