package poolcache_test

import (
	"crypto/x509"
	"testing"
	"time"

	"github.com/castellan-ca/castellan/internal/poolcache"
	"github.com/castellan-ca/castellan/signer/signertest"
)

func TestCache(t *testing.T) {
	now := time.Date(2026, 11, 22, 12, 0, 0, 0, time.UTC)
	poolA, poolB := x509.NewCertPool(), x509.NewCertPool()
	k1, k2, k3 := [32]byte{1}, [32]byte{2}, [32]byte{3}
	type op struct {
		put     bool
		key     [32]byte
		pool    *x509.CertPool
		v       string
		from    time.Duration // window, for put
		to      time.Duration
		at      time.Duration // clock, for get
		want    string        // "" means a miss
		maxSize int
	}
	tests := []struct {
		name                 string
		ops                  []op
		wantHits, wantMisses uint64
		wantEntries          int
	}{
		{"hit inside the window", []op{
			{put: true, key: k1, pool: poolA, v: "a", from: -time.Hour, to: time.Hour, maxSize: 4},
			{key: k1, pool: poolA, want: "a"},
		}, 1, 0, 1},
		{"another key misses", []op{
			{put: true, key: k1, pool: poolA, v: "a", from: -time.Hour, to: time.Hour, maxSize: 4},
			{key: k2, pool: poolA},
		}, 0, 1, 1},
		{"a new pool empties it", []op{
			{put: true, key: k1, pool: poolA, v: "a", from: -time.Hour, to: time.Hour, maxSize: 4},
			{key: k1, pool: poolB},
			{key: k1, pool: poolA},
		}, 0, 2, 0},
		{"outside the window misses and drops the entry", []op{
			{put: true, key: k1, pool: poolA, v: "a", from: -time.Hour, to: time.Hour, maxSize: 4},
			{key: k1, pool: poolA, at: 2 * time.Hour},
		}, 0, 1, 0},
		{"before the window misses", []op{
			{put: true, key: k1, pool: poolA, v: "a", from: time.Hour, to: 2 * time.Hour, maxSize: 4},
			{key: k1, pool: poolA},
		}, 0, 1, 0},
		{"bounded", []op{
			{put: true, key: k1, pool: poolA, v: "a", from: -time.Hour, to: time.Hour, maxSize: 2},
			{put: true, key: k2, pool: poolA, v: "b", from: -time.Hour, to: time.Hour, maxSize: 2},
			{put: true, key: k3, pool: poolA, v: "c", from: -time.Hour, to: time.Hour, maxSize: 2},
			{key: k3, pool: poolA, want: "c"},
		}, 1, 0, 2},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var c poolcache.Cache[string]
			for i, o := range tc.ops {
				if o.put {
					c.Put(o.key, o.pool, o.v, now.Add(o.from), now.Add(o.to), o.maxSize)
					continue
				}
				got, ok := c.Get(o.key, o.pool, now.Add(o.at))
				if ok != (o.want != "") || got != o.want {
					t.Fatalf("op %d: Get = %q, %v; want %q", i, got, ok, o.want)
				}
			}
			hits, misses, entries := c.Stats()
			if hits != tc.wantHits || misses != tc.wantMisses || entries != tc.wantEntries {
				t.Errorf("stats = %d hits, %d misses, %d entries; want %d, %d, %d", hits, misses, entries, tc.wantHits, tc.wantMisses, tc.wantEntries)
			}
		})
	}
}

func TestWindow(t *testing.T) {
	base := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	root := signertest.NewRoot(t, "Window Root", signertest.CertOptions{NotBefore: base, NotAfter: base.Add(100 * time.Hour)})
	inter := root.NewIntermediate(t, "Window Inter", signertest.CertOptions{NotBefore: base.Add(time.Hour), NotAfter: base.Add(50 * time.Hour)})
	nb, na := poolcache.Window([]*x509.Certificate{inter.Cert, root.Cert})
	if !nb.Equal(base.Add(time.Hour)) || !na.Equal(base.Add(50*time.Hour)) {
		t.Errorf("Window = %s..%s, want the intersection %s..%s", nb, na, base.Add(time.Hour), base.Add(50*time.Hour))
	}
}
