// Package signertest holds the conformance suite every signer.Signer backend runs and
// the test PKI (keys, roots, intermediates) the signer packages share.
package signertest

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"sync"
	"testing"
	"time"

	"github.com/castellan-ca/castellan/signer"
)

// testKeys are generated once per test binary: key generation (RSA above all)
// would otherwise dominate the run time under -race, and Go ignores a seeded
// reader for key generation, so a shared pool is the practical determinism.
type testKeys struct {
	p256    []crypto.Signer
	p384    crypto.Signer
	rsa2048 crypto.Signer
	ed25519 crypto.Signer
}

const p256PoolSize = 16

var keys = sync.OnceValue(func() *testKeys {
	k := &testKeys{}
	for range p256PoolSize {
		k.p256 = append(k.p256, must(ecdsa.GenerateKey(elliptic.P256(), rand.Reader)))
	}
	k.p384 = must(ecdsa.GenerateKey(elliptic.P384(), rand.Reader))
	k.rsa2048 = must(rsa.GenerateKey(rand.Reader, 2048))
	_, edKey, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		panic(err)
	}
	k.ed25519 = edKey
	return k
})

func must[T any](v T, err error) T {
	if err != nil {
		panic(err)
	}
	return v
}

// Key returns pre-generated P-256 key number i (modulo the pool size of 16).
func Key(i int) crypto.Signer {
	return keys().p256[i%p256PoolSize]
}

// LeafKeys returns one pre-generated key of each workload key family
// (P-256, P-384, RSA-2048, Ed25519), named for subtests.
func LeafKeys() map[string]crypto.Signer {
	k := keys()
	return map[string]crypto.Signer{
		"ecdsa-p256": k.p256[0],
		"ecdsa-p384": k.p384,
		"rsa-2048":   k.rsa2048,
		"ed25519":    k.ed25519,
	}
}

// CA is a test certificate authority: its certificate and private key.
type CA struct {
	Cert *x509.Certificate
	Key  crypto.Signer
}

// CertOptions adjusts a test CA certificate; the zero value gives a valid CA
// from one hour ago to one year ahead with a fresh P-256 key.
type CertOptions struct {
	// Key is the CA's key; nil generates a fresh P-256 key (cheap, and keeps
	// SubjectKeyIds distinct between CAs).
	Key crypto.Signer
	// NotBefore and NotAfter default to now-1h and now+1y.
	NotBefore, NotAfter time.Time
	// Modify changes the template before signing, to build invalid CAs.
	Modify func(*x509.Certificate)
}

// NewRoot returns a self-signed root CA named cn.
func NewRoot(t testing.TB, cn string, opts CertOptions) *CA {
	t.Helper()
	return issue(t, cn, opts, nil)
}

// NewIntermediate returns an intermediate CA named cn signed by c.
func (c *CA) NewIntermediate(t testing.TB, cn string, opts CertOptions) *CA {
	t.Helper()
	return issue(t, cn, opts, c)
}

func issue(t testing.TB, cn string, opts CertOptions, parent *CA) *CA {
	t.Helper()
	key := opts.Key
	if key == nil {
		var err error
		if key, err = ecdsa.GenerateKey(elliptic.P256(), rand.Reader); err != nil {
			t.Fatalf("generate CA key: %v", err)
		}
	}
	now := time.Now().Truncate(time.Second)
	if opts.NotBefore.IsZero() {
		opts.NotBefore = now.Add(-time.Hour)
	}
	if opts.NotAfter.IsZero() {
		opts.NotAfter = now.Add(365 * 24 * time.Hour)
	}
	serial, err := signer.NewSerial(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{Organization: []string{"Castellan test"}, CommonName: cn},
		NotBefore:             opts.NotBefore,
		NotAfter:              opts.NotAfter,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	if opts.Modify != nil {
		opts.Modify(tmpl)
	}
	signerCert, signerKey := tmpl, key
	if parent != nil {
		signerCert, signerKey = parent.Cert, parent.Key
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, signerCert, key.Public(), signerKey)
	if err != nil {
		t.Fatalf("create CA certificate %q: %v", cn, err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return &CA{Cert: cert, Key: key}
}

// Sign issues tmpl, as it is, for pub under c and returns the parsed
// certificate; a CA whose Cert is tmpl itself signs it self-signed.
func (c *CA) Sign(t testing.TB, tmpl *x509.Certificate, pub crypto.PublicKey) *x509.Certificate {
	t.Helper()
	der, err := x509.CreateCertificate(rand.Reader, tmpl, c.Cert, pub, c.Key)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return cert
}

// RunUntilCleanup runs run (a remote signer's Run loop) in the background
// until the test ends, and waits for it to return before the test's earlier
// cleanups (closing the signer, stopping its server) run.
func RunUntilCleanup(t testing.TB, run func(context.Context)) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { run(ctx); close(done) }()
	t.Cleanup(func() { cancel(); <-done })
}
