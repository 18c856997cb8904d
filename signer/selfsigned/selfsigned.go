// Package selfsigned is the default signing backend: a root CA (and, when
// configured, an intermediate under it) that Castellan generates and rotates
// itself. Generator is the backend as the CA rotation manager (ca/rotation)
// runs it, with the keys in the rotation state; Load is the stand-alone form
// of earlier versions, a root kept in a directory, which Generator imports.
package selfsigned

import (
	"crypto"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net/url"
	"os"
	"path/filepath"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/castellan-ca/castellan/internal/atomicfile"
	"github.com/castellan-ca/castellan/internal/keyfile"
	"github.com/castellan-ca/castellan/signer"
	"github.com/castellan-ca/castellan/signer/cakey"
	"github.com/castellan-ca/castellan/signer/local"
)

// Backend is the configuration name of this backend.
const Backend = "selfsigned"

// File names inside Options.Dir, the same as Istio's cacerts layout.
const (
	// KeyFile is the root's private key, PKCS#8 PEM, mode 0600.
	KeyFile = "ca-key.pem"
	// CertFile is the root certificate, PEM, mode 0644.
	CertFile = "ca-cert.pem"
)

// DefaultLifetime is the validity of a generated root.
const DefaultLifetime = 10 * 365 * 24 * time.Hour

// Subject CNs of generated CAs: the name, then a space and the first 8 bytes
// of the CA's key id in hex, so that every CA Castellan generates has a
// subject of its own. Go's chain building (and others') tries every CA whose
// subject matches the issuer name and gives up after 100 signature checks,
// which CA generations sharing one subject reach.
const (
	// RootCommonName begins the subject CN of generated roots.
	RootCommonName = "Castellan Root CA"
	// IntermediateCommonName begins the subject CN of generated intermediates.
	IntermediateCommonName = "Castellan Intermediate CA"
)

// Options configures Load.
type Options struct {
	// Dir holds the root key and certificate; created 0700 when missing.
	Dir string
	// TrustDomain names the root (O=<trust domain>, URI SAN spiffe://<trust domain>).
	TrustDomain spiffeid.TrustDomain
	// KeyType of a generated root (see keyfile.GenerateKey); an existing key is kept whatever its type.
	KeyType string
	// Lifetime of a generated root; zero means DefaultLifetime.
	Lifetime time.Duration
	// Now is the clock; nil means time.Now.
	Now func() time.Time
	// Rand supplies serials and signing randomness; nil means crypto/rand.
	Rand io.Reader
	// Keys, when set, is the HSM or KMS in which NewGenerator's Generator
	// creates every CA key; nil keeps keys in memory (sealed in the CA
	// state). Load does not use it.
	Keys *cakey.Provider
}

// Load returns a signer for the root in opts.Dir. On first start (neither file
// exists) it generates the key and root and persists them, the key 0600 in
// PKCS#8; later starts load and validate them. A missing half, a corrupt file or
// a mismatched pair is an error naming the file, never a silent regeneration
// (that would change the root every workload trusts).
func Load(opts Options) (*local.Signer, error) {
	if opts.Dir == "" {
		return nil, errors.New("selfsigned: directory is required")
	}
	if opts.TrustDomain.IsZero() {
		return nil, errors.New("selfsigned: trust domain is required")
	}
	// Checked even when a key exists, so a typo fails at every start, not only the first.
	if err := keyfile.CheckKeyType(opts.KeyType); err != nil {
		return nil, fmt.Errorf("selfsigned: %w", err)
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	if opts.Rand == nil {
		opts.Rand = rand.Reader
	}
	f, err := findRoot(opts.Dir)
	if err != nil {
		return nil, err
	}
	switch {
	case f.hasKey && f.hasCert:
		return load(opts, f.key, f.cert)
	case !f.hasKey && !f.hasCert:
		return generate(opts, f.key, f.cert)
	case f.hasKey:
		return nil, fmt.Errorf("selfsigned: %s exists but %s is missing; restore it or remove both to generate a new root", f.key, f.cert)
	default:
		return nil, fmt.Errorf("selfsigned: %s exists but %s is missing; restore it or remove both to generate a new root", f.cert, f.key)
	}
}

// rootFiles are the paths of a root's files in a directory, and which exist.
type rootFiles struct {
	key, cert       string
	hasKey, hasCert bool
}

func findRoot(dir string) (rootFiles, error) {
	f := rootFiles{key: filepath.Join(dir, KeyFile), cert: filepath.Join(dir, CertFile)}
	var err error
	if f.hasKey, err = exists(f.key); err != nil {
		return f, err
	}
	f.hasCert, err = exists(f.cert)
	return f, err
}

func exists(path string) (bool, error) {
	_, err := os.Stat(path)
	switch {
	case err == nil:
		return true, nil
	case errors.Is(err, fs.ErrNotExist):
		return false, nil
	default:
		return false, fmt.Errorf("selfsigned: %w", err)
	}
}

func load(opts Options, keyPath, certPath string) (*local.Signer, error) {
	root, key, err := readRoot(keyPath, certPath)
	if err != nil {
		return nil, fmt.Errorf("selfsigned: %w", err)
	}
	// A root made for another trust domain would sign IDs its own SAN disowns.
	want := opts.TrustDomain.ID().String()
	for _, u := range root.URIs {
		if u.Scheme == "spiffe" && u.String() != want {
			return nil, fmt.Errorf("selfsigned: %s: root belongs to %s, not the configured trust domain %s", certPath, u, want)
		}
	}
	s, err := newSigner(opts, root, key)
	if err != nil {
		return nil, fmt.Errorf("selfsigned: %s: %w", certPath, err)
	}
	return s, nil
}

// readRoot reads a root and its key from their files; errors name the file.
func readRoot(keyPath, certPath string) (*x509.Certificate, crypto.Signer, error) {
	keyPEM, err := os.ReadFile(keyPath)
	if err != nil {
		return nil, nil, err
	}
	key, err := keyfile.ParsePrivateKeyPEM(keyPEM)
	if err != nil {
		return nil, nil, fmt.Errorf("%s: %w", keyPath, err)
	}
	certPEM, err := os.ReadFile(certPath)
	if err != nil {
		return nil, nil, err
	}
	certs, err := signer.ParseCertificatesPEM(certPEM)
	if err != nil {
		return nil, nil, fmt.Errorf("%s: %w", certPath, err)
	}
	if len(certs) != 1 {
		return nil, nil, fmt.Errorf("%s: holds %d certificates, want the root only", certPath, len(certs))
	}
	if err := local.KeyMatches(certs[0], key); err != nil {
		return nil, nil, fmt.Errorf("%s does not match %s: %w", keyPath, certPath, err)
	}
	return certs[0], key, nil
}

func generate(opts Options, keyPath, certPath string) (*local.Signer, error) {
	if err := os.MkdirAll(opts.Dir, 0o700); err != nil {
		return nil, fmt.Errorf("selfsigned: create %s: %w", opts.Dir, err)
	}
	key, err := keyfile.GenerateKey(opts.KeyType)
	if err != nil {
		return nil, fmt.Errorf("selfsigned: %w", err)
	}
	lifetime := opts.Lifetime
	if lifetime <= 0 {
		lifetime = DefaultLifetime
	}
	now := opts.Now()
	root, err := NewRoot(opts.TrustDomain, key, now.Add(-signer.DefaultClockSkew), now.Add(lifetime), opts.Rand)
	if err != nil {
		return nil, fmt.Errorf("selfsigned: %w", err)
	}
	// Validate before persisting so a bad combination never reaches disk.
	s, err := newSigner(opts, root, key)
	if err != nil {
		return nil, fmt.Errorf("selfsigned: generated root: %w", err)
	}
	keyPEM, err := keyfile.MarshalPrivateKeyPEM(key)
	if err != nil {
		return nil, fmt.Errorf("selfsigned: %w", err)
	}
	// Key first: a crash between the two writes leaves a key without a
	// certificate, which Load reports instead of using a root with a lost key.
	if err := atomicfile.Write(keyPath, keyPEM, 0o600); err != nil {
		return nil, fmt.Errorf("selfsigned: %w", err)
	}
	if err := atomicfile.Write(certPath, []byte(signer.EncodePEM(root)), 0o644); err != nil {
		return nil, fmt.Errorf("selfsigned: %w", err)
	}
	return s, nil
}

func newSigner(opts Options, root *x509.Certificate, key crypto.Signer) (*local.Signer, error) {
	return local.New(local.Config{
		Cert:  root,
		Key:   key,
		Roots: []*x509.Certificate{root},
		Rand:  opts.Rand,
		Now:   opts.Now,
	})
}

// NewRoot creates a self-signed root for td with key, valid from notBefore to
// notAfter: O=<td>, CN=RootCommonName and the key id, URI SAN spiffe://<td> (the SPIFFE
// X.509-SVID CA convention), random 128-bit serial, CA:true, certSign|crlSign|
// digitalSignature and a SubjectKeyId. Rotation uses it to mint the next root.
func NewRoot(td spiffeid.TrustDomain, key crypto.Signer, notBefore, notAfter time.Time, random io.Reader) (*x509.Certificate, error) {
	return newCA(td, RootCommonName, key, nil, key, notBefore, notAfter, random)
}

// caKeyID returns the SubjectKeyId of a new CA certificate for key: the id
// a key made in a key provider was created with (it names the key there and
// must exist before the key does), else RFC 7093's of the public key. The
// subject's common name ends in its first 8 bytes either way.
func caKeyID(key crypto.Signer) ([]byte, error) {
	if k, ok := key.(*cakey.Key); ok && len(k.ID()) >= 8 {
		return k.ID(), nil
	}
	return signer.KeyID(key.Public())
}

// newCA certifies key as a CA of td named cn and its key id (a subject
// unique to the key), valid from notBefore to notAfter, signed by parent with
// parentKey; a nil parent makes a self-signed root, any other CA signs leaves
// only (path length zero). Go marks basicConstraints critical.
func newCA(td spiffeid.TrustDomain, cn string, key crypto.Signer, parent *x509.Certificate, parentKey crypto.Signer,
	notBefore, notAfter time.Time, random io.Reader) (*x509.Certificate, error) {
	if random == nil {
		random = rand.Reader
	}
	serial, err := signer.NewSerial(random)
	if err != nil {
		return nil, err
	}
	ski, err := caKeyID(key)
	if err != nil {
		return nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{Organization: []string{td.Name()}, CommonName: fmt.Sprintf("%s %x", cn, ski[:8])},
		SubjectKeyId:          ski,
		URIs:                  []*url.URL{td.ID().URL()},
		NotBefore:             notBefore.UTC(),
		NotAfter:              notAfter.UTC(),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
		MaxPathLenZero:        parent != nil,
	}
	what := "root"
	if parent == nil {
		parent = tmpl
	} else {
		what = "intermediate"
	}
	der, err := x509.CreateCertificate(random, tmpl, parent, key.Public(), parentKey)
	if err != nil {
		return nil, fmt.Errorf("create %s certificate: %w", what, err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("parse %s certificate: %w", what, err)
	}
	return cert, nil
}
