package selfsigned

import (
	"bytes"
	"context"
	"crypto"
	"crypto/rand"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/castellan-ca/castellan/internal/atomicfile"
	"github.com/castellan-ca/castellan/internal/keyfile"
	"github.com/castellan-ca/castellan/signer"
	"github.com/castellan-ca/castellan/signer/cakey"
)

// ErrRootWithoutKey reports a root certificate of earlier versions whose key
// is gone with the rotation state: replacing the root silently would cut off
// every workload that trusts it.
var ErrRootWithoutKey = errors.New("root certificate without its key")

// Generator makes the CAs of the selfsigned backend for the CA rotation
// manager (it implements ca/rotation.Generator): new keys, roots and
// intermediates. The manager keeps keys and certificates in its shared state;
// Dir only holds the root of earlier versions, imported once, and a copy of
// the active root's certificate for operators and backups. With a key
// provider (Options.Keys) every new key is made inside the HSM or KMS and
// the state keeps only its URI.
type Generator struct {
	dir     string
	td      spiffeid.TrustDomain
	keyType string
	keys    *cakey.Provider
	rand    io.Reader
}

// NewGenerator returns the Generator for opts.Dir and opts.TrustDomain,
// making keys of opts.KeyType with randomness from opts.Rand. Validity is the
// rotation manager's to decide: opts.Lifetime and opts.Now are not used.
func NewGenerator(opts Options) (*Generator, error) {
	if opts.TrustDomain.IsZero() {
		return nil, errors.New("selfsigned: trust domain is required")
	}
	if err := keyfile.CheckKeyType(opts.KeyType); err != nil {
		return nil, fmt.Errorf("selfsigned: %w", err)
	}
	if opts.Rand == nil {
		opts.Rand = rand.Reader
	}
	return &Generator{dir: opts.Dir, td: opts.TrustDomain, keyType: opts.KeyType, keys: opts.Keys, rand: opts.Rand}, nil
}

// Name returns Backend.
func (g *Generator) Name() string { return Backend }

// NewKey creates the private key of a new CA, of the configured type: in
// memory, or inside the key provider when there is one. A provider key
// gets a random id of keyIDSize bytes, which names it in the provider and
// becomes its CA certificate's SubjectKeyId (the CA's key id), since the id
// must exist before the key does.
func (g *Generator) NewKey(ctx context.Context) (crypto.Signer, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if g.keys == nil {
		return keyfile.GenerateKey(g.keyType)
	}
	id := make([]byte, keyIDSize)
	if _, err := io.ReadFull(rand.Reader, id); err != nil {
		return nil, fmt.Errorf("selfsigned: key id: %w", err)
	}
	return g.keys.CreateKey(ctx, id, g.keyType)
}

// keyIDSize is the length of the key id of a key made in a key provider:
// 128 random bits never collide, and their hex (a PKCS#11 label) fits HSMs
// that allow labels of 32 characters only.
const keyIDSize = 16

// ProviderKeys reports whether NewKey makes keys in a key provider.
func (g *Generator) ProviderKeys() bool { return g.keys != nil }

// OpenKey returns the key held by the key provider at uri, whose public key
// is pub (its CA certificate's).
func (g *Generator) OpenKey(uri string, pub crypto.PublicKey) (crypto.Signer, error) {
	if g.keys == nil {
		return nil, fmt.Errorf("selfsigned: CA key %s is held by a key provider, but none is configured (keyProvider)", uri)
	}
	return g.keys.Key(uri, pub)
}

// NewRoot certifies key as a root of the trust domain (see NewRoot).
func (g *Generator) NewRoot(key crypto.Signer, notBefore, notAfter time.Time) (*x509.Certificate, error) {
	return NewRoot(g.td, key, notBefore, notAfter, g.rand)
}

// NewIntermediate certifies key as a CA under root, signed with rootKey:
// O=<trust domain>, CN=IntermediateCommonName and the key id, URI SAN spiffe://<trust
// domain> (the SPIFFE X.509 CA convention), path length zero since it signs
// leaves only.
func (g *Generator) NewIntermediate(key crypto.Signer, root *x509.Certificate, rootKey crypto.Signer, notBefore, notAfter time.Time) (*x509.Certificate, error) {
	return newCA(g.td, IntermediateCommonName, key, root, rootKey, notBefore, notAfter, g.rand)
}

// ImportRoot returns the root that earlier versions kept in Dir (CertFile and
// KeyFile) and the file it came from; a nil root when there is none. The
// certificate without its key is ErrRootWithoutKey.
func (g *Generator) ImportRoot() (*x509.Certificate, crypto.Signer, string, error) {
	if g.dir == "" {
		return nil, nil, "", nil
	}
	f, err := findRoot(g.dir)
	switch {
	case err != nil:
		return nil, nil, "", err
	case f.hasKey && f.hasCert:
		root, key, err := readRoot(f.key, f.cert)
		if err != nil {
			return nil, nil, "", fmt.Errorf("import %s: %w", g.dir, err)
		}
		return root, key, f.cert, nil
	case f.hasCert:
		return nil, nil, "", fmt.Errorf("%w: %s exists but the CA state is empty: restore the state (or remove %s to start a new root, which every workload must then learn)",
			ErrRootWithoutKey, f.cert, f.cert)
	case f.hasKey:
		return nil, nil, "", fmt.Errorf("%s exists but %s is missing: restore it, or remove both to start a new root", f.key, f.cert)
	}
	return nil, nil, "", nil
}

// PublishRoot keeps Dir's CertFile equal to root, for operators and backups
// (the key stays in the rotation state).
func (g *Generator) PublishRoot(root *x509.Certificate) error {
	if g.dir == "" {
		return nil
	}
	path := filepath.Join(g.dir, CertFile)
	want := []byte(signer.EncodePEM(root))
	if b, err := os.ReadFile(path); err == nil && bytes.Equal(b, want) {
		return nil
	}
	if err := os.MkdirAll(g.dir, 0o700); err != nil {
		return err
	}
	return atomicfile.Write(path, want, 0o644)
}
