package authn_test

import (
	"crypto/x509"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/castellan-ca/castellan/authn"
	"github.com/castellan-ca/castellan/signer/signertest"
)

// TestClientCertCache drives one authenticator through a sequence of requests
// per case and checks each outcome and the cache's hit/miss counts: a hit must
// never accept what a full verification at that moment would refuse.
func TestClientCertCache(t *testing.T) {
	t0 := time.Now().Truncate(time.Second)
	at := func(c *x509.Certificate, from, to time.Duration) { c.NotBefore, c.NotAfter = t0.Add(from), t0.Add(to) }
	root := signertest.NewRoot(t, "Cache Root", signertest.CertOptions{NotBefore: t0.Add(-time.Hour), NotAfter: t0.Add(10 * time.Hour)})
	otherRoot := signertest.NewRoot(t, "Cache Other Root", signertest.CertOptions{NotBefore: t0.Add(-time.Hour), NotAfter: t0.Add(10 * time.Hour)})
	// The intermediate expires before the leaves it signs: the path's earliest
	// NotAfter, not the leaf's, must end a cached entry.
	shortInter := root.NewIntermediate(t, "Cache Short Intermediate", signertest.CertOptions{NotBefore: t0.Add(-time.Hour), NotAfter: t0.Add(time.Hour)})
	app := []string{appID.String()}
	key := signertest.Key(3)

	leafA := issueCert(t, root, key, app, func(c *x509.Certificate) { at(c, -time.Hour, 2*time.Hour) })
	leafB := issueCert(t, root, key, app, func(c *x509.Certificate) { at(c, -time.Hour, 2*time.Hour) })
	leafC := issueCert(t, root, key, app, func(c *x509.Certificate) { at(c, -time.Hour, 2*time.Hour) })
	leafOnShort := issueCert(t, shortInter, key, app, func(c *x509.Certificate) { at(c, -time.Hour, 3*time.Hour) })
	operator := issueCert(t, root, key, []string{operatorID.String()}, func(c *x509.Certificate) { at(c, -time.Hour, 2*time.Hour) })
	foreign := issueCert(t, otherRoot, key, app, func(c *x509.Certificate) { at(c, -time.Hour, 2*time.Hour) })

	pool := func(cas ...*signertest.CA) *x509.CertPool {
		p := x509.NewCertPool()
		for _, c := range cas {
			p.AddCert(c.Cert)
		}
		return p
	}
	main, swapped, otherOnly := pool(root), pool(root), pool(otherRoot)

	type step struct {
		chain   []*x509.Certificate
		pool    *x509.CertPool // nil: main
		at      time.Duration  // clock offset from t0
		wantErr string         // empty: accepted as the chain's identity
	}
	tests := []struct {
		name        string
		size        int
		steps       []step
		wantHits    uint64
		wantMisses  uint64
		wantEntries int
	}{
		{name: "same chain twice is a hit",
			steps:    []step{{chain: []*x509.Certificate{leafA}}, {chain: []*x509.Certificate{leafA}, at: time.Minute}},
			wantHits: 1, wantMisses: 1, wantEntries: 1},
		{name: "different leaf misses",
			steps:      []step{{chain: []*x509.Certificate{leafA}}, {chain: []*x509.Certificate{leafB}}},
			wantMisses: 2, wantEntries: 2},
		{name: "same leaf with other certificates presented misses",
			steps:      []step{{chain: []*x509.Certificate{leafA}}, {chain: []*x509.Certificate{leafA, shortInter.Cert}}},
			wantMisses: 2, wantEntries: 2},
		{name: "operator credential is cached as an operator",
			steps:    []step{{chain: []*x509.Certificate{operator}}, {chain: []*x509.Certificate{operator}}},
			wantHits: 1, wantMisses: 1, wantEntries: 1},
		{name: "new pool with the same root misses, then hits",
			steps: []step{{chain: []*x509.Certificate{leafA}}, {chain: []*x509.Certificate{leafA}, pool: swapped},
				{chain: []*x509.Certificate{leafA}, pool: swapped}},
			wantHits: 1, wantMisses: 2, wantEntries: 1},
		{name: "pool without the root refuses a chain cached for the old pool",
			steps:      []step{{chain: []*x509.Certificate{leafA}}, {chain: []*x509.Certificate{leafA}, pool: otherOnly, wantErr: "unknown authority"}},
			wantMisses: 2, wantEntries: 0},
		{name: "expired leaf is refused although cached",
			steps:      []step{{chain: []*x509.Certificate{leafA}}, {chain: []*x509.Certificate{leafA}, at: 2*time.Hour + time.Second, wantErr: "expired"}},
			wantMisses: 2, wantEntries: 0},
		{name: "entry ends with the intermediate, not the leaf",
			steps: []step{{chain: []*x509.Certificate{leafOnShort, shortInter.Cert}}, {chain: []*x509.Certificate{leafOnShort, shortInter.Cert}, at: 30 * time.Minute},
				{chain: []*x509.Certificate{leafOnShort, shortInter.Cert}, at: 90 * time.Minute, wantErr: "expired"}},
			wantHits: 1, wantMisses: 2, wantEntries: 0},
		{name: "clock before the path's NotBefore misses and is refused",
			steps:      []step{{chain: []*x509.Certificate{leafA}}, {chain: []*x509.Certificate{leafA}, at: -2 * time.Hour, wantErr: "not yet valid"}},
			wantMisses: 2, wantEntries: 0},
		{name: "failures are not cached",
			steps:      []step{{chain: []*x509.Certificate{foreign}, wantErr: "unknown authority"}, {chain: []*x509.Certificate{foreign}, wantErr: "unknown authority"}},
			wantMisses: 2, wantEntries: 0},
		{name: "bounded: a full cache drops an entry and still verifies",
			size: 2,
			steps: []step{{chain: []*x509.Certificate{leafA}}, {chain: []*x509.Certificate{leafB}}, {chain: []*x509.Certificate{leafC}},
				{chain: []*x509.Certificate{leafC}}},
			wantHits: 1, wantMisses: 3, wantEntries: 2},
		{name: "disabled cache verifies every time",
			size:  -1,
			steps: []step{{chain: []*x509.Certificate{leafA}}, {chain: []*x509.Certificate{leafA}}},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			now := t0
			a := &authn.ClientCert{TrustDomain: td, Operators: []spiffeid.ID{operatorID}, CacheSize: tc.size, Now: func() time.Time { return now }}
			var cur *x509.CertPool
			a.Roots = func() *x509.CertPool { return cur }
			for i, s := range tc.steps {
				now, cur = t0.Add(s.at), s.pool
				if cur == nil {
					cur = main
				}
				got, err := a.Authenticate(tlsPeer(s.chain...))
				if s.wantErr != "" {
					if err == nil || !strings.Contains(err.Error(), s.wantErr) {
						t.Fatalf("step %d: Authenticate = %+v, %v; want an error mentioning %q", i, got, err, s.wantErr)
					}
					continue
				}
				if err != nil {
					t.Fatalf("step %d: Authenticate: %v", i, err)
				}
				want := authn.Caller{Method: authn.MethodMTLS, Identity: appID, Name: appID.String()}
				if s.chain[0] == operator {
					want = authn.Caller{Method: authn.MethodOperator, Name: operatorID.String(), Operator: true}
				}
				if *got != want {
					t.Fatalf("step %d: caller = %+v, want %+v", i, *got, want)
				}
				got.Name, got.Operator = "tampered", true // a later hit must not see this
			}
			st := a.CacheStats()
			if st.Hits != tc.wantHits || st.Misses != tc.wantMisses || st.Entries != tc.wantEntries {
				t.Errorf("cache stats = %+v, want hits %d misses %d entries %d", st, tc.wantHits, tc.wantMisses, tc.wantEntries)
			}
		})
	}
}
