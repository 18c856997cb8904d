package rotation

import (
	"context"
	"crypto"
	"crypto/x509"
	"time"

	"github.com/castellan-ca/castellan/signer/local"
)

// Backend is the local signing backend whose CAs a Manager runs. The manager
// never asks for one by name: what it may do follows from the kind of
// backend, a Generator (Castellan makes and rotates the CA keys) or an
// External (the operator supplies the CA).
type Backend interface {
	// Name names the backend in audit records and status.
	Name() string
}

// Generator is a Backend whose CAs Castellan generates and rotates
// (signer/selfsigned). The manager keeps what it makes in the shared state,
// each key sealed there (Sealer); signing goes through the key's
// crypto.Signer only.
//
// Every CA key comes from NewKey, the one seam for keys held elsewhere: a
// provider backed by an HSM or KMS creates the key inside the device and
// returns a crypto.Signer for it, and the state stores a reference to the
// key (its URI) where local keys store sealed bytes.
type Generator interface {
	Backend
	// NewKey creates the private key of a new CA. A key made inside a key
	// provider has a URI() string method: the state stores that URI.
	NewKey(ctx context.Context) (crypto.Signer, error)
	// OpenKey returns the provider's key at uri (a URI NewKey's key gave),
	// whose public key is pub.
	OpenKey(uri string, pub crypto.PublicKey) (crypto.Signer, error)
	// ProviderKeys reports whether NewKey makes keys inside a key provider:
	// stored as URIs, they need no key-encryption key.
	ProviderKeys() bool
	// NewRoot certifies key as a self-signed root valid from notBefore to notAfter.
	NewRoot(key crypto.Signer, notBefore, notAfter time.Time) (*x509.Certificate, error)
	// NewIntermediate certifies key as a CA that signs leaves, under root and
	// signed with rootKey, valid from notBefore to notAfter.
	NewIntermediate(key crypto.Signer, root *x509.Certificate, rootKey crypto.Signer, notBefore, notAfter time.Time) (*x509.Certificate, error)
	// ImportRoot returns the root that an earlier version kept outside the
	// state, with its key and where it was found, for the state's first
	// start; a nil root when there is none. An error refuses the start.
	ImportRoot() (root *x509.Certificate, key crypto.Signer, from string, err error)
	// PublishRoot keeps a copy of the active root's certificate where
	// operators look for it (never its key).
	PublishRoot(root *x509.Certificate) error
}

// External is a Backend whose CA the operator supplies (signer/intermediate):
// Start loads it and Run follows its changes, each through UseExternal.
type External interface {
	Backend
	// Load reads and validates the CA; detail describes it for the audit log.
	Load() (ca *local.Signer, detail string, err error)
	// Watch calls onChange with every new valid CA until ctx ends.
	Watch(ctx context.Context, onChange func(ca *local.Signer, detail string))
}
