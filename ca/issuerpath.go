package ca

import (
	"crypto/sha256"
	"crypto/x509"
	"encoding/binary"
	"time"

	"github.com/castellan-ca/castellan/internal/poolcache"
	"github.com/castellan-ca/castellan/signer"
)

// issuerPathCacheSize bounds the remembered issuer paths; a CA has one issuer
// per active signer, a few more during rotation.
const issuerPathCacheSize = 64

// issuerPathCache remembers, per trust pool, the verified path from a leaf's
// issuer to the bundle, so that checking the next leaf of the same issuer costs
// one signature check instead of path building with a signature check per link.
//
// The first leaf of an issuer (by its Issuer name, AuthorityKeyId and the
// intermediates presented) is verified in full with x509 Verify; its path
// [issuer, …, root] is kept while the pool is the same (a CA swap builds a new
// pool, which empties the cache) and now lies inside every certificate of the
// path. A later leaf must then carry a valid signature by path[0]. Paths whose
// CAs carry name or policy constraints are never kept, since those constrain
// each leaf and only Verify applies them. The zero value is ready to use.
type issuerPathCache struct {
	c poolcache.Cache[[]*x509.Certificate] // issuer first, root last
}

// verify checks that chain.Leaf chains to roots at now and returns the path
// above the leaf (its issuer first).
func (c *issuerPathCache) verify(chain *signer.Chain, roots *x509.CertPool, now time.Time) ([]*x509.Certificate, error) {
	leaf := chain.Leaf
	key := issuerKey(leaf, chain.Intermediates)
	if p, ok := c.c.Get(key, roots, now); ok {
		if chain.SignatureChecked || leaf.CheckSignatureFrom(p[0]) == nil {
			return p, nil
		}
		// Not signed by the remembered issuer: decide by the full check below.
	}
	inter := x509.NewCertPool()
	for _, ic := range chain.Intermediates {
		inter.AddCert(ic)
	}
	chains, err := leaf.Verify(x509.VerifyOptions{Roots: roots, Intermediates: inter, CurrentTime: now, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}})
	if err != nil {
		return nil, err
	}
	path := chains[0][1:]
	if len(path) == 0 { // a self-signed leaf in the bundle: nothing above it to remember
		return chains[0], nil
	}
	c.put(key, roots, path)
	return path, nil
}

func (c *issuerPathCache) put(key [32]byte, pool *x509.CertPool, path []*x509.Certificate) {
	for _, p := range path {
		if constrains(p) {
			return
		}
	}
	notBefore, notAfter := poolcache.Window(path)
	c.c.Put(key, pool, path, notBefore, notAfter, issuerPathCacheSize)
}

func (c *issuerPathCache) stats() (hits, misses uint64, entries int) { return c.c.Stats() }

// constrains reports whether a CA certificate carries name or policy
// constraints, which Verify applies to every leaf below it.
func constrains(c *x509.Certificate) bool {
	return len(c.PermittedDNSDomains)+len(c.ExcludedDNSDomains)+len(c.PermittedIPRanges)+len(c.ExcludedIPRanges)+
		len(c.PermittedEmailAddresses)+len(c.ExcludedEmailAddresses)+len(c.PermittedURIDomains)+len(c.ExcludedURIDomains)+
		len(c.PolicyMappings) != 0 ||
		c.RequireExplicitPolicy > 0 || c.RequireExplicitPolicyZero ||
		c.InhibitPolicyMapping > 0 || c.InhibitPolicyMappingZero ||
		c.InhibitAnyPolicy > 0 || c.InhibitAnyPolicyZero
}

// issuerKey names the issuer a leaf claims and the intermediates it came with:
// the SHA-256 of the leaf's Issuer and AuthorityKeyId and each intermediate,
// every part length-prefixed so that different inputs never hash the same.
func issuerKey(leaf *x509.Certificate, intermediates []*x509.Certificate) [32]byte {
	h := sha256.New()
	var n [8]byte
	part := func(b []byte) {
		binary.BigEndian.PutUint64(n[:], uint64(len(b)))
		h.Write(n[:])
		h.Write(b)
	}
	part(leaf.RawIssuer)
	part(leaf.AuthorityKeyId)
	for _, c := range intermediates {
		part(c.Raw)
	}
	var sum [32]byte
	h.Sum(sum[:0])
	return sum
}
