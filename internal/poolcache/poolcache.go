// Package poolcache remembers results that were verified against one trust
// pool and hold only inside a validity window: client-chain verifications
// (authn) and issuer paths (ca) on the CSR hot path.
package poolcache

import (
	"crypto/x509"
	"sync"
	"sync/atomic"
	"time"
)

// Cache maps a key to a value verified against a trust pool. The first lookup
// or store with another pool (a CA swap builds a new one) empties it, so
// nothing verified against an old bundle survives a rotation; an entry serves
// only while now is inside its window. The zero value is ready to use.
type Cache[V any] struct {
	mu           sync.RWMutex   // read-locked on the hit path, which every request takes
	pool         *x509.CertPool // held, so its address cannot be reused by a new pool
	entries      map[[32]byte]entry[V]
	hits, misses atomic.Uint64
}

type entry[V any] struct {
	v                   V
	notBefore, notAfter time.Time
}

// Get returns the value stored for key with pool, if now is inside its window.
func (c *Cache[V]) Get(key [32]byte, pool *x509.CertPool, now time.Time) (V, bool) {
	c.mu.RLock()
	e, ok := c.entries[key]
	samePool := pool == c.pool
	c.mu.RUnlock()
	if !samePool { // a new trust bundle: nothing remembered for the old one applies
		c.mu.Lock()
		if pool != c.pool {
			c.pool, c.entries = pool, nil
		}
		c.mu.Unlock()
		ok = false
	}
	if ok && (now.Before(e.notBefore) || now.After(e.notAfter)) {
		c.mu.Lock()
		if pool == c.pool {
			delete(c.entries, key)
		}
		c.mu.Unlock()
		ok = false
	}
	if !ok {
		c.misses.Add(1)
		var zero V
		return zero, false
	}
	c.hits.Add(1)
	return e.v, true
}

// Put stores v for key, verified against pool and valid from notBefore to
// notAfter, keeping at most size entries (when full an arbitrary one is dropped, O(1)).
func (c *Cache[V]) Put(key [32]byte, pool *x509.CertPool, v V, notBefore, notAfter time.Time, size int) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if pool != c.pool {
		c.pool, c.entries = pool, nil
	}
	if c.entries == nil {
		c.entries = make(map[[32]byte]entry[V])
	}
	if _, ok := c.entries[key]; !ok && len(c.entries) >= max(size, 1) {
		for k := range c.entries {
			delete(c.entries, k)
			break
		}
	}
	c.entries[key] = entry[V]{v: v, notBefore: notBefore, notAfter: notAfter}
}

// Stats reports lookups that hit and missed, and the entries held.
func (c *Cache[V]) Stats() (hits, misses uint64, entries int) {
	c.mu.RLock()
	defer c.mu.RUnlock()
	return c.hits.Load(), c.misses.Load(), len(c.entries)
}

// Window is the intersection of the validity periods of path: when Verify
// would accept every certificate of it.
func Window(path []*x509.Certificate) (notBefore, notAfter time.Time) {
	notBefore, notAfter = path[0].NotBefore, path[0].NotAfter
	for _, c := range path[1:] {
		if c.NotBefore.After(notBefore) {
			notBefore = c.NotBefore
		}
		if c.NotAfter.Before(notAfter) {
			notAfter = c.NotAfter
		}
	}
	return notBefore, notAfter
}
