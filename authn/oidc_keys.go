package authn

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"sync"
	"time"

	jose "github.com/go-jose/go-jose/v4"
)

// maxJWKSBytes bounds a fetched key set; real ones are a few kilobytes.
const maxJWKSBytes = 1 << 20

// errUnknownKey means no cached key verifies the token's signature (unknown kid or bad signature).
var errUnknownKey = errors.New("signature does not verify with any key of the issuer")

// keySet is an issuer's signing keys, fetched from its JWKS (URL or file).
//
// go-oidc's RemoteKeySet refetches on every unknown kid (it only merges
// concurrent fetches), so anyone can make us hit the issuer once per forged
// token. Here a token with an unknown kid triggers at most one fetch per
// minRefresh, and keys older than maxAge are refetched before use, so a key
// the issuer retired stops working within maxAge even if no new kid appears.
//
// keySet implements oidc.KeySet over the cached keys only; callers run
// ensure first, which is where fetching happens.
type keySet struct {
	fetch      func(ctx context.Context) ([]jose.JSONWebKey, error)
	algs       []jose.SignatureAlgorithm
	now        func() time.Time
	minRefresh time.Duration
	maxAge     time.Duration

	// sem serialises fetches; a waiter that finds gen moved on uses the result.
	sem chan struct{}

	mu          sync.Mutex // guards the fields below
	keys        []jose.JSONWebKey
	fetched     time.Time // last successful fetch; zero before the first
	gen         uint64    // incremented by every successful fetch
	lastAttempt time.Time
	lastErr     error
}

func newKeySet(fetch func(context.Context) ([]jose.JSONWebKey, error), algs []jose.SignatureAlgorithm, now func() time.Time, minRefresh, maxAge time.Duration) *keySet {
	return &keySet{fetch: fetch, algs: algs, now: now, minRefresh: minRefresh, maxAge: maxAge, sem: make(chan struct{}, 1)}
}

// load fetches the keys now, whatever the rate limit (start-up and background retries).
func (k *keySet) load(ctx context.Context) error {
	select {
	case k.sem <- struct{}{}:
	case <-ctx.Done():
		return ctx.Err()
	}
	defer func() { <-k.sem }()
	return k.fetchLocked(ctx)
}

// fetchLocked fetches and stores the keys; the caller holds sem.
func (k *keySet) fetchLocked(ctx context.Context) error {
	k.mu.Lock()
	k.lastAttempt = k.now()
	k.mu.Unlock()
	keys, err := k.fetch(ctx)
	k.mu.Lock()
	defer k.mu.Unlock()
	k.lastErr = err
	if err != nil {
		return err
	}
	k.keys, k.fetched = keys, k.now()
	k.gen++
	return nil
}

// ensure makes sure the cache can judge a token with key ID kid: it refetches
// when kid is unknown or the keys are older than maxAge, at most once per
// minRefresh. It returns an error wrapping ErrUnavailable only when the keys
// could not be fetched and the cache cannot judge the token; an unknown kid
// that a permitted refresh did not bring is left for verification to refuse.
func (k *keySet) ensure(ctx context.Context, kid string) error {
	k.mu.Lock()
	gen, known := k.gen, k.knowsLocked(kid)
	fresh := !k.fetched.IsZero() && k.now().Sub(k.fetched) < k.maxAge
	k.mu.Unlock()
	if known && fresh {
		return nil
	}

	select {
	case k.sem <- struct{}{}:
	case <-ctx.Done():
		return fmt.Errorf("%w: waiting for key refresh: %w", ErrUnavailable, ctx.Err())
	}
	defer func() { <-k.sem }()
	k.mu.Lock()
	moved := k.gen != gen
	limited := !k.lastAttempt.IsZero() && k.now().Sub(k.lastAttempt) < k.minRefresh
	lastErr := k.lastErr
	k.mu.Unlock()
	var err error
	switch {
	case moved:
		// Another request refreshed while we waited: judge with its result.
	case limited:
		err = lastErr
	default:
		err = k.fetchLocked(ctx)
	}
	if err == nil {
		return nil
	}
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.knowsLocked(kid) {
		// Stale but usable: an issuer outage must not stop issuance for keys we hold.
		return nil
	}
	return fmt.Errorf("%w: fetching signing keys: %w", ErrUnavailable, err)
}

// knowsLocked reports whether a cached key has ID kid (any key when kid is
// empty, since such tokens are tried against every key).
func (k *keySet) knowsLocked(kid string) bool {
	for _, key := range k.keys {
		if kid == "" || key.KeyID == kid {
			return true
		}
	}
	return false
}

// VerifySignature implements oidc.KeySet over the cached keys.
func (k *keySet) VerifySignature(_ context.Context, jwt string) ([]byte, error) {
	jws, err := jose.ParseSignedCompact(jwt, k.algs)
	if err != nil {
		return nil, fmt.Errorf("malformed token: %w", err)
	}
	if len(jws.Signatures) != 1 {
		return nil, errors.New("token must carry exactly one signature")
	}
	kid, alg := jws.Signatures[0].Header.KeyID, jws.Signatures[0].Header.Algorithm
	k.mu.Lock()
	keys := k.keys
	k.mu.Unlock()
	for i := range keys {
		// A key that names its algorithm is used with that one only.
		if kid != "" && keys[i].KeyID != kid || keys[i].Algorithm != "" && keys[i].Algorithm != alg {
			continue
		}
		if payload, err := jws.Verify(&keys[i]); err == nil {
			return payload, nil
		}
	}
	return nil, errUnknownKey
}

// fetchJWKSURL returns a fetch function for a JWKS served at url.
func fetchJWKSURL(client *http.Client, url string) func(context.Context) ([]jose.JSONWebKey, error) {
	return func(ctx context.Context) ([]jose.JSONWebKey, error) {
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
		if err != nil {
			return nil, err
		}
		// No Accept header: issuers differ in the media type they serve (the
		// kube-apiserver answers 406 to application/json, serving application/jwk-set+json).
		req.Header.Set("Cache-Control", "no-cache")
		resp, err := client.Do(req)
		if err != nil {
			return nil, fmt.Errorf("GET %s: %w", url, err)
		}
		defer resp.Body.Close()
		body, err := io.ReadAll(io.LimitReader(resp.Body, maxJWKSBytes+1))
		if err != nil {
			return nil, fmt.Errorf("GET %s: %w", url, err)
		}
		if resp.StatusCode != http.StatusOK {
			return nil, fmt.Errorf("GET %s: %s", url, resp.Status)
		}
		return parseJWKS(body)
	}
}

// fetchJWKSFile returns a fetch function reading a JWKS file, re-read on every
// refresh so that an operator can rotate keys by replacing the file.
func fetchJWKSFile(path string) func(context.Context) ([]jose.JSONWebKey, error) {
	return func(context.Context) ([]jose.JSONWebKey, error) {
		b, err := os.ReadFile(path)
		if err != nil {
			return nil, err
		}
		return parseJWKS(b)
	}
}

// parseJWKS decodes a JWK set, keeping only public signature keys: a
// symmetric or private key published by mistake is never used to verify.
func parseJWKS(b []byte) ([]jose.JSONWebKey, error) {
	if len(b) > maxJWKSBytes {
		return nil, fmt.Errorf("key set larger than %d bytes", maxJWKSBytes)
	}
	var raw struct {
		Keys []json.RawMessage `json:"keys"`
	}
	if err := json.Unmarshal(b, &raw); err != nil {
		return nil, fmt.Errorf("decode key set: %w", err)
	}
	var keys []jose.JSONWebKey
	for _, r := range raw.Keys {
		var key jose.JSONWebKey
		// Keys of types go-jose does not know are skipped, as RFC 7517 §5 asks.
		if err := key.UnmarshalJSON(r); err != nil || !key.Valid() || !key.IsPublic() || key.Use == "enc" {
			continue
		}
		keys = append(keys, key)
	}
	if len(keys) == 0 {
		return nil, errors.New("key set holds no usable public signing key")
	}
	return keys, nil
}
