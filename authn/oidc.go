package authn

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/url"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/coreos/go-oidc/v3/oidc"
	jose "github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc/metadata"
)

// MaxTokenBytes bounds a bearer token; larger ones are refused before any
// decoding (real tokens are 1–2 KiB).
const MaxTokenBytes = 16 << 10

// DefaultOIDCClockSkew is the leeway on exp, nbf and iat when an issuer sets none.
const DefaultOIDCClockSkew = time.Minute

// Defaults of OIDCOptions and limits on talking to issuers.
const (
	defaultRetryMin       = time.Second
	defaultRetryMax       = 5 * time.Minute
	defaultKeyRefreshMin  = 10 * time.Second
	defaultKeyMaxAge      = 15 * time.Minute
	issuerRequestTimeout  = 10 * time.Second
	maxIssuerResponseSize = maxJWKSBytes
)

// DefaultOIDCAlgorithms are the signing algorithms accepted when an issuer lists none.
var DefaultOIDCAlgorithms = []string{"RS256", "ES256"}

// oidcAlgorithms are the algorithms an operator may allow: asymmetric only, so
// neither `none` nor an HMAC keyed with a public key can ever verify.
var oidcAlgorithms = []string{"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}

// OIDCConfig is the `oidc:` section of the configuration file.
type OIDCConfig struct {
	// Issuers are the token issuers whose tokens are accepted, each with its own rule.
	Issuers []OIDCIssuer `yaml:"issuers"`
}

// OIDCIssuer configures one trusted token issuer.
type OIDCIssuer struct {
	// IssuerURL must equal the tokens' `iss`; discovery is read from
	// IssuerURL/.well-known/openid-configuration unless JWKSURL or JWKSFile is set.
	IssuerURL string `yaml:"issuerURL"`
	// JWKSURL skips discovery and reads the signing keys from this URL.
	JWKSURL string `yaml:"jwksURL"`
	// JWKSFile skips discovery and reads the signing keys from this file
	// (re-read when a token names an unknown key).
	JWKSFile string `yaml:"jwksFile"`
	// Audiences: a token must be issued for at least one of them. Required.
	Audiences []string `yaml:"audiences"`
	// AllowedAlgorithms are the accepted signing algorithms; default DefaultOIDCAlgorithms.
	AllowedAlgorithms []string `yaml:"allowedAlgorithms"`
	// ClockSkew is the leeway on exp, nbf and iat; zero means DefaultOIDCClockSkew.
	ClockSkew time.Duration `yaml:"clockSkew"`
	// CACert is a PEM file of the CAs trusted for HTTPS to the issuer; empty
	// means the system roots.
	CACert string `yaml:"caCert"`
	// RequiredClaims must all be present with exactly these string values
	// (e.g. repository_owner for GitHub, where any repository can mint tokens).
	RequiredClaims map[string]string `yaml:"requiredClaims"`
	// Identity maps the claims to the workload identity.
	Identity OIDCIdentity `yaml:"identity"`
}

// OIDCIdentity maps claims to spiffe://<trust domain>/ns/<namespace>/sa/<service-account>.
// Both empty: `sub` must be system:serviceaccount:<namespace>:<service-account>
// (Kubernetes tokens). Otherwise each is a template of literal text and
// {claim} references, e.g. "gh-{repository_owner_id}"; the results must be
// Kubernetes names, or the token is refused.
type OIDCIdentity struct {
	// Namespace is the template of the namespace (a DNS-1123 label).
	Namespace string `yaml:"namespace"`
	// ServiceAccount is the template of the service account (a DNS-1123 subdomain).
	ServiceAccount string `yaml:"serviceAccount"`
}

// Validate checks the section, naming each bad key as oidc.issuers[i].<key>.
func (c OIDCConfig) Validate() error {
	var errs []error
	seen := map[string]bool{}
	for i, iss := range c.Issuers {
		bad := func(key, format string, a ...any) {
			errs = append(errs, fmt.Errorf("oidc.issuers[%d].%s: %s", i, key, fmt.Sprintf(format, a...)))
		}
		if err := checkHTTPS(iss.IssuerURL); err != nil {
			bad("issuerURL", "%v", err)
		} else if seen[iss.IssuerURL] {
			bad("issuerURL", "%q is configured twice", iss.IssuerURL)
		}
		seen[iss.IssuerURL] = true
		if iss.JWKSURL != "" && iss.JWKSFile != "" {
			bad("jwksURL", "set jwksURL or jwksFile, not both")
		}
		if iss.JWKSURL != "" {
			if err := checkHTTPS(iss.JWKSURL); err != nil {
				bad("jwksURL", "%v", err)
			}
		}
		if len(iss.Audiences) == 0 {
			bad("audiences", "at least one audience is required")
		}
		for _, a := range iss.Audiences {
			if a == "" {
				bad("audiences", "an audience may not be empty")
			}
		}
		for _, a := range iss.AllowedAlgorithms {
			if !slices.Contains(oidcAlgorithms, a) {
				bad("allowedAlgorithms", "%q is not one of %s", a, strings.Join(oidcAlgorithms, ", "))
			}
		}
		if iss.ClockSkew < 0 || iss.ClockSkew > 10*time.Minute {
			bad("clockSkew", "must be between 0 and 10m")
		}
		for name, want := range iss.RequiredClaims {
			if !isClaimName(name) || want == "" {
				bad("requiredClaims", "%q: a claim name and a non-empty value are required", name)
			}
		}
		if _, err := newIdentityRule(iss.Identity); err != nil {
			bad("identity", "%v", err)
		}
	}
	return errors.Join(errs...)
}

// checkHTTPS accepts an absolute https URL without query or fragment.
func checkHTTPS(s string) error {
	u, err := url.Parse(s)
	switch {
	case s == "":
		return errors.New("required")
	case err != nil:
		return err
	case u.Scheme != "https" || u.Host == "":
		return fmt.Errorf("%q is not an https URL", s)
	case u.RawQuery != "" || u.Fragment != "" || u.User != nil:
		return fmt.Errorf("%q may not carry a query, fragment or user", s)
	}
	return nil
}

// OIDCOptions wires an OIDC authenticator; the durations are test seams
// (zero means the default).
type OIDCOptions struct {
	// TrustDomain is the trust domain of every identity granted.
	TrustDomain spiffeid.TrustDomain
	Config      OIDCConfig
	Logger      *slog.Logger
	// Now is the clock for exp, nbf, iat and key ages; nil means time.Now.
	Now func() time.Time
	// RetryMin and RetryMax bound the back-off of discovery retries (1 s, 5 min).
	RetryMin, RetryMax time.Duration
	// KeyRefreshMin is the least time between key fetches caused by unknown
	// key IDs (10 s); KeyMaxAge is how long fetched keys are used (15 min).
	KeyRefreshMin, KeyMaxAge time.Duration
}

// OIDC authenticates callers by a JWT bearer token from one of the configured
// issuers. It picks the issuer by the token's unverified `iss` and verifies
// everything else with that issuer's keys and rule; tokens of other issuers
// are left to the next authenticator (ErrNoCredentials).
type OIDC struct {
	td        spiffeid.TrustDomain
	now       func() time.Time
	issuers   map[string]*oidcIssuer
	keyMin    time.Duration
	keyMaxAge time.Duration
	logger    *slog.Logger
	discovery sync.WaitGroup // the background discovery NewOIDC starts
}

// oidcIssuer is one configured issuer; verifier is nil until its keys are known.
type oidcIssuer struct {
	cfg      OIDCIssuer
	client   *http.Client
	algs     []jose.SignatureAlgorithm
	rule     identityRule
	skew     time.Duration
	verifier atomic.Pointer[issuerVerifier]
	ready    chan struct{} // closed by publish
}

type issuerVerifier struct {
	keys     *keySet
	verifier *oidc.IDTokenVerifier
}

// NewOIDC checks the configuration and starts discovery. Bad configuration
// (including unreadable caCert or jwksFile) is an error naming the key; an
// unreachable issuer is not: discovery is retried in the background until ctx
// ends, and its tokens get ErrUnavailable meanwhile.
func NewOIDC(ctx context.Context, o OIDCOptions) (*OIDC, error) {
	if o.TrustDomain.IsZero() {
		return nil, errors.New("oidc: trust domain is required")
	}
	if err := o.Config.Validate(); err != nil {
		return nil, err
	}
	a := &OIDC{td: o.TrustDomain, now: o.Now, issuers: map[string]*oidcIssuer{}, keyMin: o.KeyRefreshMin,
		keyMaxAge: o.KeyMaxAge, logger: o.Logger}
	if a.now == nil {
		a.now = time.Now
	}
	if a.logger == nil {
		a.logger = slog.New(slog.DiscardHandler)
	}
	a.keyMin = orDefault(a.keyMin, defaultKeyRefreshMin)
	a.keyMaxAge = orDefault(a.keyMaxAge, defaultKeyMaxAge)
	retryMin, retryMax := orDefault(o.RetryMin, defaultRetryMin), orDefault(o.RetryMax, defaultRetryMax)

	var pending []*oidcIssuer
	for i, c := range o.Config.Issuers {
		iss := &oidcIssuer{cfg: c, skew: orDefault(c.ClockSkew, DefaultOIDCClockSkew), ready: make(chan struct{})}
		iss.rule, _ = newIdentityRule(c.Identity) // checked by Validate
		algs := c.AllowedAlgorithms
		if len(algs) == 0 {
			algs = DefaultOIDCAlgorithms
		}
		for _, alg := range algs {
			iss.algs = append(iss.algs, jose.SignatureAlgorithm(alg))
		}
		var err error
		if iss.client, err = issuerClient(c.CACert); err != nil {
			return nil, fmt.Errorf("oidc.issuers[%d].caCert: %w", i, err)
		}
		a.issuers[c.IssuerURL] = iss
		if c.JWKSFile != "" {
			keys := a.newKeySet(iss, fetchJWKSFile(c.JWKSFile))
			if err := keys.load(ctx); err != nil {
				return nil, fmt.Errorf("oidc.issuers[%d].jwksFile: %w", i, err)
			}
			iss.publish(keys)
			continue
		}
		pending = append(pending, iss)
	}
	// Started only once the whole configuration is known good, so a start-up
	// error leaves nothing running.
	for _, iss := range pending {
		a.discovery.Go(func() { a.discover(ctx, iss, retryMin, retryMax) })
	}
	return a, nil
}

// Stopped returns once the background discovery NewOIDC started has
// stopped: every issuer's keys are known, or NewOIDC's context has ended.
func (a *OIDC) Stopped() { a.discovery.Wait() }

func orDefault(d, def time.Duration) time.Duration {
	if d <= 0 {
		return def
	}
	return d
}

func (a *OIDC) newKeySet(iss *oidcIssuer, fetch func(context.Context) ([]jose.JSONWebKey, error)) *keySet {
	return newKeySet(fetch, iss.algs, a.now, a.keyMin, a.keyMaxAge)
}

// publish makes the issuer's tokens verifiable. go-oidc checks the signature
// (with our rate-limited key set), the algorithm and `iss`; expiry and
// audience are checked in verify, with the configured leeway and audiences.
func (iss *oidcIssuer) publish(keys *keySet) {
	algs := make([]string, len(iss.algs))
	for i, alg := range iss.algs {
		algs[i] = string(alg)
	}
	v := oidc.NewVerifier(iss.cfg.IssuerURL, keys, &oidc.Config{
		SupportedSigningAlgs: algs,
		SkipClientIDCheck:    true,
		SkipExpiryCheck:      true,
	})
	iss.verifier.Store(&issuerVerifier{keys: keys, verifier: v})
	close(iss.ready) // publish runs once per issuer: start-up or the discovery that succeeded
}

// discover fetches the issuer's discovery document (unless jwksURL is set)
// and its keys, retrying with exponential back-off until it succeeds or ctx ends.
func (a *OIDC) discover(ctx context.Context, iss *oidcIssuer, retryMin, retryMax time.Duration) {
	backoff := retryMin
	for {
		err := a.connect(ctx, iss)
		if err == nil {
			a.logger.Info("oidc issuer ready", "issuer", iss.cfg.IssuerURL)
			return
		}
		// Clipped: go-oidc quotes the issuer's whole error response.
		a.logger.Warn("oidc issuer unreachable; its tokens are refused with Unavailable until it answers",
			"issuer", iss.cfg.IssuerURL, "retry_in", backoff, "error", clipString(err.Error(), 512))
		t := time.NewTimer(backoff)
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-t.C:
		}
		backoff = min(2*backoff, retryMax)
	}
}

// connect makes one attempt at discovery and the first key fetch.
func (a *OIDC) connect(ctx context.Context, iss *oidcIssuer) error {
	jwksURL := iss.cfg.JWKSURL
	if jwksURL == "" {
		dctx, cancel := context.WithTimeout(oidc.ClientContext(ctx, iss.client), issuerRequestTimeout)
		defer cancel()
		p, err := oidc.NewProvider(dctx, iss.cfg.IssuerURL)
		if err != nil {
			return fmt.Errorf("discovery: %w", err)
		}
		var meta struct {
			JWKSURL string `json:"jwks_uri"`
		}
		if err := p.Claims(&meta); err != nil {
			return fmt.Errorf("discovery: %w", err)
		}
		if err := checkHTTPS(meta.JWKSURL); err != nil {
			return fmt.Errorf("discovery: jwks_uri: %w", err)
		}
		jwksURL = meta.JWKSURL
	}
	keys := a.newKeySet(iss, fetchJWKSURL(iss.client, jwksURL))
	if err := keys.load(ctx); err != nil {
		return fmt.Errorf("signing keys: %w", err)
	}
	iss.publish(keys)
	return nil
}

// Wait blocks until every issuer's keys have been fetched once, or ctx ends.
// Serving does not need it (tokens of a pending issuer get ErrUnavailable).
func (a *OIDC) Wait(ctx context.Context) error {
	for _, iss := range a.issuers {
		select {
		case <-iss.ready:
		case <-ctx.Done():
			return fmt.Errorf("oidc issuer %s not ready: %w", iss.cfg.IssuerURL, ctx.Err())
		}
	}
	return nil
}

// Method names this authenticator in audit records.
func (a *OIDC) Method() string { return MethodOIDC }

// Authenticate implements Authenticator.
func (a *OIDC) Authenticate(ctx context.Context) (*Caller, error) {
	raw, err := bearerToken(ctx)
	if err != nil {
		return nil, err
	}
	if len(raw) > MaxTokenBytes {
		return nil, fmt.Errorf("oidc: bearer token of %d bytes is over the %d-byte limit", len(raw), MaxTokenBytes)
	}
	// The unverified iss only selects the verifier, which checks iss again.
	iss := a.issuers[peekIssuer(raw)]
	if iss == nil {
		return nil, ErrNoCredentials
	}
	v := iss.verifier.Load()
	if v == nil {
		return nil, fmt.Errorf("oidc issuer %s: %w: signing keys not fetched yet", iss.cfg.IssuerURL, ErrUnavailable)
	}
	caller, err := a.verify(ctx, iss, v, raw)
	if err != nil {
		return nil, fmt.Errorf("oidc issuer %s: %w", iss.cfg.IssuerURL, err)
	}
	return caller, nil
}

// verify checks raw completely and maps it to a Caller.
func (a *OIDC) verify(ctx context.Context, iss *oidcIssuer, v *issuerVerifier, raw string) (*Caller, error) {
	jws, err := jose.ParseSignedCompact(raw, iss.algs)
	if err != nil {
		return nil, fmt.Errorf("malformed token or algorithm not allowed: %w", err)
	}
	if len(jws.Signatures) != 1 {
		return nil, errors.New("token must carry exactly one signature")
	}
	if err := v.keys.ensure(ctx, jws.Signatures[0].Header.KeyID); err != nil {
		return nil, err
	}
	tok, err := v.verifier.Verify(ctx, raw)
	if err != nil {
		return nil, err
	}
	var std jwt.Claims
	if err := tok.Claims(&std); err != nil {
		return nil, fmt.Errorf("claims: %w", err)
	}
	if std.Expiry == nil {
		return nil, errors.New("token has no exp claim")
	}
	if err := std.ValidateWithLeeway(jwt.Expected{Issuer: iss.cfg.IssuerURL, AnyAudience: iss.cfg.Audiences, Time: a.now()}, iss.skew); err != nil {
		return nil, fmt.Errorf("claims: %w", err)
	}
	var claims map[string]json.RawMessage
	if err := tok.Claims(&claims); err != nil {
		return nil, fmt.Errorf("claims: %w", err)
	}
	for name, want := range iss.cfg.RequiredClaims {
		if got, err := claimString(claims, name); err != nil || got != want {
			return nil, fmt.Errorf("claim %q does not have the required value", name)
		}
	}
	id, err := iss.rule.id(a.td, claims)
	if err != nil {
		return nil, err
	}
	return &Caller{Method: MethodOIDC, Identity: id, Name: iss.cfg.IssuerURL + " sub=" + clipString(std.Subject, 256)}, nil
}

// bearerToken returns the token of the `authorization: Bearer` header, or
// ErrNoCredentials when there is none.
func bearerToken(ctx context.Context) (string, error) {
	md, _ := metadata.FromIncomingContext(ctx)
	vals := md.Get("authorization")
	switch len(vals) {
	case 0:
		return "", ErrNoCredentials
	case 1:
	default:
		return "", errors.New("more than one authorization header")
	}
	scheme, tok, ok := strings.Cut(vals[0], " ")
	if tok = strings.TrimSpace(tok); !ok || !strings.EqualFold(scheme, "Bearer") || tok == "" {
		return "", ErrNoCredentials
	}
	return tok, nil
}

// peekIssuer reads the unverified `iss` of a compact JWT, or "" if there is none.
func peekIssuer(raw string) string {
	parts := strings.Split(raw, ".")
	if len(parts) != 3 {
		return ""
	}
	payload, err := base64.RawURLEncoding.DecodeString(parts[1])
	if err != nil {
		return ""
	}
	var c struct {
		Iss string `json:"iss"`
	}
	if json.Unmarshal(payload, &c) != nil {
		return ""
	}
	return c.Iss
}

// issuerClient is the HTTP client for one issuer: its own trust anchors when
// caFile is set, a timeout, and bounded response bodies.
func issuerClient(caFile string) (*http.Client, error) {
	tr := http.DefaultTransport.(*http.Transport).Clone()
	tr.TLSClientConfig = &tls.Config{MinVersion: tls.VersionTLS12}
	if caFile != "" {
		b, err := os.ReadFile(caFile)
		if err != nil {
			return nil, err
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(b) {
			return nil, fmt.Errorf("%s holds no PEM certificate", caFile)
		}
		tr.TLSClientConfig.RootCAs = pool
	}
	return &http.Client{Timeout: issuerRequestTimeout, Transport: limitedTransport{tr}}, nil
}

// limitedTransport truncates response bodies, so that a misbehaving issuer
// cannot make us buffer without bound (go-oidc reads discovery documents whole).
type limitedTransport struct{ http.RoundTripper }

func (t limitedTransport) RoundTrip(r *http.Request) (*http.Response, error) {
	resp, err := t.RoundTripper.RoundTrip(r)
	if err == nil {
		resp.Body = struct {
			io.Reader
			io.Closer
		}{io.LimitReader(resp.Body, maxIssuerResponseSize), resp.Body}
	}
	return resp, err
}

func clipString(s string, n int) string {
	if len(s) > n {
		return s[:n]
	}
	return s
}
