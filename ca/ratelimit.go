package ca

import (
	"container/list"
	"crypto/sha256"
	"fmt"
	"sync"
	"time"

	"github.com/castellan-ca/castellan/storage"
	"golang.org/x/time/rate"
)

// DefaultRateLimitKeys bounds each table of token buckets when no bound is configured.
const DefaultRateLimitKeys = 1 << 16

// bucketKey names one token bucket: the SHA-256 of what identifies the
// caller, so that a key costs the same memory however long the names a caller
// sends.
type bucketKey [32]byte

// keyOf hashes parts, each length-prefixed so that no two lists collide.
func keyOf(parts ...string) bucketKey {
	h := sha256.New()
	for _, p := range parts {
		fmt.Fprintf(h, "%d:%s", len(p), p)
	}
	var k bucketKey
	h.Sum(k[:0])
	return k
}

// buckets is a table of token buckets (golang.org/x/time/rate), one per key,
// holding at most max keys: the least recently used key is dropped first, and
// sweep drops keys whose bucket has refilled, since a full bucket is what a
// new key starts with anyway. Times are passed in, so that tests drive the clock.
type buckets struct {
	limit rate.Limit
	burst int
	max   int

	mu   sync.Mutex
	keys map[bucketKey]*list.Element
	lru  list.List // of *bucket, most recently used first
}

type bucket struct {
	key bucketKey
	lim *rate.Limiter
}

func newBuckets(limit rate.Limit, burst, maxKeys int) *buckets {
	if maxKeys <= 0 {
		maxKeys = DefaultRateLimitKeys
	}
	return &buckets{limit: limit, burst: max(burst, 1), max: maxKeys, keys: make(map[bucketKey]*list.Element)}
}

// enabled reports whether the table limits anything (a zero rate means no limit).
func (b *buckets) enabled() bool { return b != nil && b.limit > 0 }

// get returns key's bucket, creating it (and dropping the least recently
// used one when full) if create is set; nil if absent and not created.
// b.mu must be held.
func (b *buckets) get(key bucketKey, create bool) *rate.Limiter {
	if e, ok := b.keys[key]; ok {
		b.lru.MoveToFront(e)
		return e.Value.(*bucket).lim
	}
	if !create {
		return nil
	}
	if b.lru.Len() >= b.max {
		oldest := b.lru.Back()
		b.lru.Remove(oldest)
		delete(b.keys, oldest.Value.(*bucket).key)
	}
	lim := rate.NewLimiter(b.limit, b.burst)
	b.keys[key] = b.lru.PushFront(&bucket{key: key, lim: lim})
	return lim
}

// allow takes a token from key's bucket at now, reporting whether there was one.
func (b *buckets) allow(key bucketKey, now time.Time) bool {
	if !b.enabled() {
		return true
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.get(key, true).AllowN(now, 1)
}

// hasToken reports whether key's bucket holds a token at now, without taking
// it; a key without a bucket has a full one.
func (b *buckets) hasToken(key bucketKey, now time.Time) bool {
	if !b.enabled() {
		return true
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	lim := b.get(key, false)
	return lim == nil || lim.TokensAt(now) >= 1
}

// charge takes a token from key's bucket at now even if it has none: the
// bucket goes into debt, so that every charged event is paid for by waiting,
// however many were under way at once.
func (b *buckets) charge(key bucketKey, now time.Time) {
	if !b.enabled() {
		return
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	b.get(key, true).ReserveN(now, 1)
}

// sweep drops the keys whose bucket is full again at now.
func (b *buckets) sweep(now time.Time) {
	if !b.enabled() {
		return
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	for e := b.lru.Back(); e != nil; {
		prev := e.Prev()
		bk := e.Value.(*bucket)
		if bk.lim.TokensAt(now) >= float64(b.burst) {
			b.lru.Remove(e)
			delete(b.keys, bk.key)
		}
		e = prev
	}
}

// size returns how many keys the table holds.
func (b *buckets) size() int {
	if b == nil {
		return 0
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	return len(b.keys)
}

// maxRefusalRecords bounds the audit records one summary writes: one per
// refused key, then one for all further keys together.
const maxRefusalRecords = 64

// refusal is what a summary record says about the refused calls of one key:
// who made them (sanitised when first counted), how many, and when.
type refusal struct {
	reason                          string
	method, caller, requested, peer string
	count                           int
	first, last                     time.Time
}

// refusals counts the calls refused by the admission checks between two
// summaries, so that a flood costs a bounded number of audit records
// (maxRefusalRecords+1 per summary), not one each.
type refusals struct {
	mu    sync.Mutex
	byKey map[refusalKey]*refusal
	order []refusalKey
	// overflow counts the refusals of keys beyond maxRefusalRecords, by reason.
	overflow map[string]*refusal
}

type refusalKey struct {
	reason string
	key    bucketKey
}

// add counts one call refused for reason; sample says who made it.
func (r *refusals) add(reason string, key bucketKey, sample refusal, now time.Time) {
	r.mu.Lock()
	defer r.mu.Unlock()
	k := refusalKey{reason, key}
	if s, ok := r.byKey[k]; ok {
		s.count++
		s.last = now
		return
	}
	if len(r.byKey) < maxRefusalRecords {
		if r.byKey == nil {
			r.byKey = make(map[refusalKey]*refusal)
		}
		r.byKey[k] = &refusal{reason: reason, count: 1, first: now, last: now,
			method:    storage.Sanitize(sample.method, storage.MaxCodeLen),
			caller:    storage.Sanitize(sample.caller, storage.MaxNameLen),
			requested: storage.Sanitize(sample.requested, storage.MaxNameLen),
			peer:      storage.Sanitize(sample.peer, storage.MaxNameLen)}
		r.order = append(r.order, k)
		return
	}
	if r.overflow == nil {
		r.overflow = make(map[string]*refusal)
	}
	o, ok := r.overflow[reason]
	if !ok {
		o = &refusal{reason: reason, first: now}
		r.overflow[reason] = o
	}
	o.count++
	o.last = now
}

// take returns the counted refusals, each key's in the order the keys were
// first refused, then those of further keys (one per reason, with no
// caller), and starts counting afresh.
func (r *refusals) take() (perKey, further []*refusal) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, k := range r.order {
		perKey = append(perKey, r.byKey[k])
	}
	for _, o := range r.overflow {
		further = append(further, o)
	}
	r.byKey, r.order, r.overflow = nil, nil, nil
	return perKey, further
}
