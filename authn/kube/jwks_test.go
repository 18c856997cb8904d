package kube

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/castellan-ca/castellan/authn"
	jose "github.com/go-jose/go-jose/v4"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/client-go/kubernetes/fake"
)

const testIssuer = "https://kubernetes.default.svc"

// fixedKey derives a P-256 key from label: deterministic test crypto.
func fixedKey(t testing.TB, label string) *ecdsa.PrivateKey {
	t.Helper()
	for i := byte(0); i < 16; i++ {
		seed := sha256.Sum256(append([]byte("castellan/authn/kube/"+label), i))
		if k, err := ecdsa.ParseRawPrivateKey(elliptic.P256(), seed[:]); err == nil {
			return k
		}
	}
	t.Fatalf("no key for %q", label)
	return nil
}

// signToken signs claims with key under key ID kid (alg ES256).
func signToken(t testing.TB, key *ecdsa.PrivateKey, kid string, claims map[string]any) string {
	t.Helper()
	s, err := jose.NewSigner(jose.SigningKey{Algorithm: jose.ES256, Key: key}, (&jose.SignerOptions{}).WithHeader("kid", kid).WithType("JWT"))
	if err != nil {
		t.Fatal(err)
	}
	payload, err := json.Marshal(claims)
	if err != nil {
		t.Fatal(err)
	}
	jws, err := s.Sign(payload)
	if err != nil {
		t.Fatal(err)
	}
	out, err := jws.CompactSerialize()
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// saTokenClaims are the claims the apiserver puts in a pod-bound token.
func saTokenClaims(now time.Time) map[string]any {
	return map[string]any{
		"iss": testIssuer, "sub": "system:serviceaccount:app:sleep", "aud": []string{"istio-ca"},
		"iat": now.Add(-time.Minute).Unix(), "nbf": now.Add(-time.Minute).Unix(), "exp": now.Add(time.Hour).Unix(),
		"kubernetes.io": map[string]any{
			"namespace":      "app",
			"serviceaccount": map[string]any{"name": "sleep", "uid": "sa-uid"},
			"pod":            map[string]any{"name": "sleep-1", "uid": "pod-uid"},
			"node":           map[string]any{"name": "node-a", "uid": "node-uid"},
		},
	}
}

// staticFetch serves the public keys of keys (by kid), counting fetches.
func staticFetch(keys map[string]*ecdsa.PrivateKey, fetches *atomic.Int64) func(context.Context) (*issuerKeys, error) {
	return func(context.Context) (*issuerKeys, error) {
		fetches.Add(1)
		set := jose.JSONWebKeySet{}
		for kid, k := range keys {
			set.Keys = append(set.Keys, jose.JSONWebKey{Key: &k.PublicKey, KeyID: kid, Algorithm: "ES256", Use: "sig"})
		}
		return &issuerKeys{issuer: testIssuer, keys: set}, nil
	}
}

// jwksFixture is a jwksVerifier whose issuer signs with "key-1", whose pod
// cache holds app/sleep-1 and whose apiserver also has app/fresh-1.
func jwksFixture(t testing.TB, now time.Time) (*jwksVerifier, *ecdsa.PrivateKey) {
	t.Helper()
	key := fixedKey(t, "issuer-1")
	var fetches atomic.Int64
	pods, err := newPods(NewPodsFactory(fake.NewClientset()))
	if err != nil {
		t.Fatal(err)
	}
	slim, _ := slimPod(pod("app", "sleep-1", "pod-uid", "sleep", "node-a", corev1.PodRunning))
	if err := pods.informer.GetIndexer().Add(slim); err != nil {
		t.Fatal(err)
	}
	api := fake.NewClientset(pod("app", "fresh-1", "fresh-uid", "sleep", "node-a", corev1.PodRunning),
		pod("app", "sleep-1", "pod-uid", "sleep", "node-a", corev1.PodRunning))
	clock := func() time.Time { return now }
	return &jwksVerifier{
		keys: &keySet{fetch: staticFetch(map[string]*ecdsa.PrivateKey{"key-1": key}, &fetches), minRefresh: time.Minute,
			maxAge: time.Hour, timeout: time.Second, now: clock},
		audiences: []string{"istio-ca"}, pods: pods, client: api,
		calls: &apiCalls{slots: make(chan struct{}, 2), timeout: time.Second}, now: clock,
	}, key
}

func TestJWKSVerify(t *testing.T) {
	now := time.Date(2026, 6, 1, 12, 0, 0, 0, time.UTC)
	v, key := jwksFixture(t, now)
	other := fixedKey(t, "attacker")
	kube := func(c map[string]any) map[string]any { return c["kubernetes.io"].(map[string]any) }
	for _, tc := range []struct {
		name    string
		edit    func(c map[string]any)
		key     *ecdsa.PrivateKey
		kid     string
		wantErr string // "" = accepted
		wantPod string
	}{
		{name: "pod-bound token", wantPod: "sleep-1"},
		{name: "pod only the apiserver has yet", wantPod: "fresh-1", edit: func(c map[string]any) {
			kube(c)["pod"] = map[string]any{"name": "fresh-1", "uid": "fresh-uid"}
		}},
		{name: "expired", edit: func(c map[string]any) { c["exp"] = now.Add(-time.Minute).Unix() }, wantErr: "expired"},
		{name: "not valid yet", edit: func(c map[string]any) { c["nbf"] = now.Add(time.Hour).Unix() }, wantErr: "not valid yet"},
		{name: "no exp", edit: func(c map[string]any) { delete(c, "exp") }, wantErr: "no exp"},
		{name: "wrong audience", edit: func(c map[string]any) { c["aud"] = []string{"api"} }, wantErr: "audience"},
		{name: "wrong issuer", edit: func(c map[string]any) { c["iss"] = "https://evil.example" }, wantErr: "issuer"},
		{name: "not pod-bound", edit: func(c map[string]any) { delete(kube(c), "pod") }, wantErr: "not bound to a pod"},
		{name: "no kubernetes.io claims", edit: func(c map[string]any) { delete(c, "kubernetes.io") }, wantErr: "no kubernetes.io"},
		{name: "subject disagrees with claims", edit: func(c map[string]any) { c["sub"] = "system:serviceaccount:app:admin" }, wantErr: "disagrees"},
		{name: "bound pod deleted", edit: func(c map[string]any) {
			kube(c)["pod"] = map[string]any{"name": "gone-1", "uid": "gone-uid"}
		}, wantErr: "does not exist"},
		{name: "bound pod replaced", edit: func(c map[string]any) {
			kube(c)["pod"] = map[string]any{"name": "sleep-1", "uid": "old-uid"}
		}, wantErr: "is bound to UID old-uid"},
		{name: "signed by an unpublished key", key: other, kid: "key-2", wantErr: "does not publish"},
		{name: "forged with a published key id", key: other, kid: "key-1", wantErr: "does not verify"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			claims := saTokenClaims(now)
			if tc.edit != nil {
				tc.edit(claims)
			}
			k, kid := key, "key-1"
			if tc.key != nil {
				k, kid = tc.key, tc.kid
			}
			info, err := v.verify(context.Background(), signToken(t, k, kid, claims))
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) || errors.Is(err, authn.ErrUnavailable) {
					t.Fatalf("verify = %+v, %v; want a refusal containing %q", info, err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if info.Namespace != "app" || info.ServiceAccount != "sleep" || info.Pod.Name != tc.wantPod || info.Pod.NodeName != "node-a" {
				t.Errorf("verify = %+v (pod %+v)", info, info.Pod)
			}
		})
	}
	t.Run("HMAC token refused", func(t *testing.T) {
		s, _ := jose.NewSigner(jose.SigningKey{Algorithm: jose.HS256, Key: []byte("secret-secret-secret-secret-3232")}, nil)
		payload, _ := json.Marshal(saTokenClaims(now))
		jws, _ := s.Sign(payload)
		tok, _ := jws.CompactSerialize()
		if _, err := v.verify(context.Background(), tok); err == nil {
			t.Fatal("an HS256 token was accepted")
		}
	})
}

// The key set refetches for an unknown key at most once per minRefresh, picks
// up a rotated key, and reports a fetch failure as ErrUnavailable.
func TestKeySetRefresh(t *testing.T) {
	now := time.Date(2026, 6, 1, 12, 0, 0, 0, time.UTC)
	keys := map[string]*ecdsa.PrivateKey{"key-1": fixedKey(t, "issuer-1")}
	var fetches atomic.Int64
	var failing atomic.Bool
	fetch := staticFetch(keys, &fetches)
	ks := &keySet{minRefresh: time.Minute, maxAge: time.Hour, timeout: time.Second, now: func() time.Time { return now },
		fetch: func(ctx context.Context) (*issuerKeys, error) {
			if failing.Load() {
				fetches.Add(1)
				return nil, errors.New("connection refused")
			}
			return fetch(ctx)
		}}
	lookup := func(kid string) error { _, _, err := ks.lookup(context.Background(), kid); return err }

	if err := ks.ready(); err == nil {
		t.Fatal("ready before the first fetch")
	}
	if err := lookup("key-1"); err != nil || fetches.Load() != 1 {
		t.Fatalf("first lookup: %v after %d fetches, want success after 1", err, fetches.Load())
	}
	for range 5 {
		if err := lookup("forged"); err == nil || errors.Is(err, authn.ErrUnavailable) {
			t.Fatalf("unknown kid: %v, want a refusal", err)
		}
	}
	if got := fetches.Load(); got != 1 {
		t.Errorf("fetches after 5 unknown-kid lookups within minRefresh = %d, want 1 (no refetch)", got)
	}

	keys["key-2"] = fixedKey(t, "issuer-2") // the apiserver rotates
	now = now.Add(2 * time.Minute)
	if err := lookup("key-2"); err != nil || fetches.Load() != 2 {
		t.Errorf("rotated kid: %v after %d fetches, want success after 2", err, fetches.Load())
	}

	failing.Store(true)
	now = now.Add(2 * time.Hour) // past maxAge: known keys are refreshed, and the failure keeps the old set
	if err := lookup("key-1"); err != nil {
		t.Errorf("known kid with the issuer down: %v, want the previous keys used", err)
	}
	now = now.Add(2 * time.Minute)
	if err := lookup("key-3"); !errors.Is(err, authn.ErrUnavailable) {
		t.Errorf("unknown kid with the issuer down: %v, want ErrUnavailable", err)
	}
}

// FuzzJWKSVerify: whatever the token, verification never panics and never
// yields an identity other than the one the issuer signed.
func FuzzJWKSVerify(f *testing.F) {
	now := time.Date(2026, 6, 1, 12, 0, 0, 0, time.UTC)
	v, key := jwksFixture(f, now)
	valid := signToken(f, key, "key-1", saTokenClaims(now))
	for _, s := range []string{valid, valid[:len(valid)/2], "a.b.c", "", strings.Replace(valid, ".", "..", 1)} {
		f.Add(s)
	}
	v.keys.minRefresh = time.Hour // unknown key IDs must not make the fuzzer fetch
	f.Fuzz(func(t *testing.T, token string) {
		info, err := v.verify(context.Background(), token)
		if err != nil {
			return
		}
		if info.Namespace != "app" || info.ServiceAccount != "sleep" || info.Pod == nil || info.Pod.Name != "sleep-1" || info.Pod.UID != "pod-uid" {
			t.Errorf("token %q verified as %+v (pod %+v)", token, info, info.Pod)
		}
	})
}
