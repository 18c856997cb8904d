package kube

import (
	"crypto/sha256"
	"time"

	"k8s.io/utils/lru"
)

// tokenKey is the cache key of a token: its SHA-256, so that the cache never
// holds a usable credential.
type tokenKey [sha256.Size]byte

func keyOf(token string) tokenKey { return sha256.Sum256([]byte(token)) }

// cacheEntry is a positive TokenReview result and when it stops counting.
type cacheEntry struct {
	info    *TokenInfo
	expires time.Time
}

// tokenCache holds positive results only, each until the token's own expiry
// (bounded by maxTTL), and at most size entries, least recently used evicted
// first. It is safe for concurrent use.
type tokenCache struct {
	lru    *lru.Cache
	maxTTL time.Duration
}

func newTokenCache(size int, maxTTL time.Duration) *tokenCache {
	return &tokenCache{lru: lru.New(size), maxTTL: maxTTL}
}

// get returns the cached result for k if it is still valid at now.
func (c *tokenCache) get(k tokenKey, now time.Time) (*TokenInfo, bool) {
	v, ok := c.lru.Get(k)
	if !ok {
		return nil, false
	}
	e := v.(cacheEntry)
	if !now.Before(e.expires) {
		c.lru.Remove(k)
		return nil, false
	}
	return e.info, true
}

// put caches info for k until tokenExp or now+maxTTL, whichever is first. A
// token without a usable expiry is not cached.
func (c *tokenCache) put(k tokenKey, info *TokenInfo, tokenExp, now time.Time) {
	exp := tokenExp
	if limit := now.Add(c.maxTTL); exp.After(limit) {
		exp = limit
	}
	if !now.Before(exp) {
		return
	}
	c.lru.Add(k, cacheEntry{info: info, expires: exp})
}

// remove forgets k (its pod is gone, so the result no longer holds).
func (c *tokenCache) remove(k tokenKey) { c.lru.Remove(k) }

// len is the number of entries, for tests.
func (c *tokenCache) len() int { return c.lru.Len() }
