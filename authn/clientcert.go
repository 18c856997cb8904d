package authn

import (
	"context"
	"crypto/sha256"
	"crypto/x509"
	"encoding/binary"
	"fmt"
	"time"

	"github.com/castellan-ca/castellan/internal/poolcache"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/peer"
)

// DefaultClientCertCacheSize bounds the verified chains a ClientCert remembers.
const DefaultClientCertCacheSize = 4096

// ClientCert authenticates a caller by the TLS client certificate it presented:
// the chain must verify to our current trust bundle for client auth, and the leaf
// must carry exactly one URI SAN, a workload ID of our trust domain (which the
// caller may then renew) or one of the operator IDs.
//
// The TLS layer only requests the certificate; verifying here means a bad
// certificate becomes an audited Unauthenticated refusal, not an opaque handshake error.
//
// Successful verifications are cached (poolcache, per trust pool), because a client
// sends the same chain on every request of a connection and path building with
// its signature checks would otherwise cost as much as signing the certificate.
type ClientCert struct {
	TrustDomain spiffeid.TrustDomain
	// Roots returns the current trust bundle; called per request so rotation applies at once.
	// The pool's identity keys the cache, so a new bundle must come as a new pool.
	Roots func() *x509.CertPool
	// Operators are the IDs of operator credentials (castellanctl).
	Operators []spiffeid.ID
	// CacheSize bounds cached verifications: 0 means DefaultClientCertCacheSize,
	// negative disables the cache.
	CacheSize int
	// Now is the clock (tests); default time.Now.
	Now func() time.Time

	cache poolcache.Cache[*Caller] // the caller derived with this authenticator's fixed trust domain and operators
}

// ClientCertCacheStats counts cache use, for tests and metrics.
type ClientCertCacheStats struct {
	Hits, Misses uint64
	Entries      int
}

// Method names this authenticator in audit records.
func (a *ClientCert) Method() string { return MethodMTLS }

// Authenticate implements Authenticator.
func (a *ClientCert) Authenticate(ctx context.Context) (*Caller, error) {
	p, ok := peer.FromContext(ctx)
	if !ok {
		return nil, ErrNoCredentials
	}
	info, ok := p.AuthInfo.(credentials.TLSInfo)
	if !ok || len(info.State.PeerCertificates) == 0 {
		return nil, ErrNoCredentials
	}
	certs := info.State.PeerCertificates
	now := time.Now()
	if a.Now != nil {
		now = a.Now()
	}
	roots := a.Roots()
	if a.CacheSize < 0 {
		c, _, err := a.verify(certs, roots, now)
		return c, err
	}
	key := chainKey(certs)
	if cached, ok := a.cache.Get(key, roots, now); ok {
		caller := *cached // callers may not share one Caller
		return &caller, nil
	}
	c, validity, err := a.verify(certs, roots, now)
	if err != nil {
		return nil, err // failures are never cached: the next attempt is checked in full
	}
	size := a.CacheSize
	if size == 0 {
		size = DefaultClientCertCacheSize
	}
	stored := *c
	a.cache.Put(key, roots, &stored, validity.notBefore, validity.notAfter, size)
	return c, nil
}

// CacheStats reports how the verification cache has been used.
func (a *ClientCert) CacheStats() ClientCertCacheStats {
	hits, misses, entries := a.cache.Stats()
	return ClientCertCacheStats{Hits: hits, Misses: misses, Entries: entries}
}

// verify checks a presented chain (leaf first) at now and returns the caller it
// proves and the period in which every certificate of the verified path is valid.
func (a *ClientCert) verify(certs []*x509.Certificate, roots *x509.CertPool, now time.Time) (*Caller, validity, error) {
	leaf := certs[0]
	inter := x509.NewCertPool()
	for _, c := range certs[1:] {
		inter.AddCert(c)
	}
	chains, err := leaf.Verify(x509.VerifyOptions{
		Roots:         roots,
		Intermediates: inter,
		CurrentTime:   now,
		KeyUsages:     []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	})
	if err != nil {
		return nil, validity{}, fmt.Errorf("client certificate: %w", err)
	}
	if leaf.IsCA {
		return nil, validity{}, fmt.Errorf("client certificate is a CA certificate")
	}
	if len(leaf.URIs) != 1 || len(leaf.DNSNames)+len(leaf.IPAddresses)+len(leaf.EmailAddresses) != 0 {
		return nil, validity{}, fmt.Errorf("client certificate must carry exactly one URI SAN and no other SAN")
	}
	id, err := spiffeid.FromURI(leaf.URIs[0])
	if err != nil {
		return nil, validity{}, fmt.Errorf("client certificate URI SAN: %w", err)
	}
	var v validity
	v.notBefore, v.notAfter = poolcache.Window(chains[0])
	for _, op := range a.Operators {
		if id == op {
			return &Caller{Method: MethodOperator, Name: id.String(), Operator: true}, v, nil
		}
	}
	if id, err = CheckWorkloadID(a.TrustDomain, id); err != nil {
		return nil, validity{}, fmt.Errorf("client certificate: %w", err)
	}
	return &Caller{Method: MethodMTLS, Identity: id, Name: id.String()}, v, nil
}

// validity is the intersection of the validity periods of a verified path.
type validity struct{ notBefore, notAfter time.Time }

// chainKey is the SHA-256 of a presented chain, each certificate's DER length
// prefixed so that no two different chains hash the same input.
func chainKey(certs []*x509.Certificate) [32]byte {
	h := sha256.New()
	var n [8]byte
	for _, c := range certs {
		binary.BigEndian.PutUint64(n[:], uint64(len(c.Raw)))
		h.Write(n[:])
		h.Write(c.Raw)
	}
	var sum [32]byte
	h.Sum(sum[:0])
	return sum
}
