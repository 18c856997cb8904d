package ca

import (
	"bytes"
	"crypto/x509"
	"errors"
	"sync"
	"sync/atomic"
	"time"

	"github.com/castellan-ca/castellan/signer"
)

// State is one immutable snapshot of the CA: the active signer and the trust
// bundle. Requests read it once, so a swap never mixes two CAs in one response.
type State struct {
	// Signer is the active signing backend.
	Signer signer.Signer
	// Backend names the signer in audit records ("selfsigned", "intermediate", …).
	Backend string
	// Roots is the trust bundle: the signer's roots plus any retained ones.
	Roots []*x509.Certificate
	// Pool holds Roots for verification.
	Pool *x509.CertPool
	// BundlePEM is Roots as concatenated PEM: the last element of every response.
	BundlePEM string
	// Generation increases with every swap; caches compare it to notice changes.
	Generation uint64
}

// Authority holds the current State and lets the active signer be swapped
// atomically at run time (hot reload, rotation).
type Authority struct {
	mu      sync.Mutex // serialises Use; readers never take it
	cur     atomic.Pointer[State]
	changed chan struct{}
}

// NewAuthority returns an Authority with no signer yet: it cannot issue until Use.
func NewAuthority() *Authority {
	return &Authority{changed: make(chan struct{})}
}

// Use makes s the active signer. The trust bundle becomes s's roots plus
// retained (roots that must stay trusted while certificates chaining to them
// live), deduplicated. Waiters on Changed are woken.
func (a *Authority) Use(backend string, s signer.Signer, retained ...*x509.Certificate) (*State, error) {
	roots := dedupe(append(append([]*x509.Certificate(nil), s.TrustBundle()...), retained...))
	if len(roots) == 0 {
		return nil, errors.New("signer has an empty trust bundle")
	}
	pool := x509.NewCertPool()
	for _, r := range roots {
		pool.AddCert(r)
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	var gen uint64 = 1
	if old := a.cur.Load(); old != nil {
		gen = old.Generation + 1
	}
	st := &State{Signer: s, Backend: backend, Roots: roots, Pool: pool, BundlePEM: signer.EncodePEM(roots...), Generation: gen}
	a.cur.Store(st)
	close(a.changed)
	a.changed = make(chan struct{})
	return st, nil
}

// Current returns the active state, or nil before the first Use.
func (a *Authority) Current() *State { return a.cur.Load() }

// Changed returns a channel closed at the next Use.
func (a *Authority) Changed() <-chan struct{} {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.changed
}

// Roots returns the current trust pool (empty before the first Use).
func (a *Authority) Roots() *x509.CertPool {
	if st := a.Current(); st != nil {
		return st.Pool
	}
	return x509.NewCertPool()
}

// EarliestRootExpiry returns the soonest NotAfter among the roots, for metrics.
func (s *State) EarliestRootExpiry() time.Time {
	var t time.Time
	for _, r := range s.Roots {
		if t.IsZero() || r.NotAfter.Before(t) {
			t = r.NotAfter
		}
	}
	return t
}

func dedupe(certs []*x509.Certificate) []*x509.Certificate {
	out := certs[:0:0]
	for _, c := range certs {
		dup := false
		for _, o := range out {
			if bytes.Equal(o.Raw, c.Raw) {
				dup = true
				break
			}
		}
		if !dup {
			out = append(out, c)
		}
	}
	return out
}
