package ca

import (
	"crypto"
	"crypto/x509"
	"time"

	"github.com/castellan-ca/castellan/signer"
)

// IssuerPathCache exposes the issuer's path cache to the external tests.
type IssuerPathCache struct{ c issuerPathCache }

// CheckIssued runs CheckIssued with the cache.
func (p *IssuerPathCache) CheckIssued(chain *signer.Chain, tmpl *x509.Certificate, pub crypto.PublicKey, roots *x509.CertPool, now time.Time) error {
	return p.c.checkIssued(chain, tmpl, pub, roots, now)
}

// Stats reports lookups that hit and missed, and the entries held.
func (p *IssuerPathCache) Stats() (hits, misses uint64, entries int) { return p.c.stats() }

// IssuerPathCacheSize is the bound on entries.
const IssuerPathCacheSize = issuerPathCacheSize
