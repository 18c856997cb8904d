// Package cakey keeps CA private keys outside the process: in a PKCS#11
// token (any HSM with a PKCS#11 module, or SoftHSM2) or a cloud KMS (AWS KMS,
// Google Cloud KMS), all reached through one library, go.step.sm/crypto/kms,
// and addressed by its URIs. A Key is a crypto.Signer whose private half
// never leaves the provider: keys are created inside it, unextractable, and
// only their URI is stored. Software keys, the default, do not use this
// package.
//
// A provider outage is a transient failure: an operation that cannot reach
// the provider returns an error wrapping signer.ErrSignerUnavailable, and the
// Provider reconnects by itself (a token that was removed and put back, a PIN
// file that was corrected), so issuance recovers without a restart.
//
// PKCS#11 needs cgo: a binary built with CGO_ENABLED=0 compiles and runs, and
// refuses a pkcs11 provider with a clear error.
package cakey

import (
	"context"
	"crypto"
	"crypto/sha256"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	kmsapi "cloud.google.com/go/kms/apiv1"
	"go.step.sm/crypto/kms/apiv1"
	"go.step.sm/crypto/kms/awskms"
	"go.step.sm/crypto/kms/cloudkms"
	"go.step.sm/crypto/kms/pkcs11"
	"google.golang.org/api/option"

	"github.com/castellan-ca/castellan/signer"
)

// Defaults of Config.
const (
	// DefaultRetryInterval is the least time between two connection attempts
	// after a failure: short enough that issuance resumes within seconds of
	// the provider's return, long enough not to hammer a failing module.
	DefaultRetryInterval = 2 * time.Second
	// DefaultOpTimeout bounds one signature. Istio's clients set no deadline,
	// so a hung HSM must not hold their requests forever.
	DefaultOpTimeout = 10 * time.Second
	// DefaultHealthTTL is how long a successful signature vouches for the
	// provider's health before Check signs a probe of its own.
	DefaultHealthTTL = 10 * time.Second
)

// ErrPINRefused: the token refused the PIN of the PIN file (wrong, or the
// user PIN is locked). The same PIN is not tried again until the file
// changes, since HSMs lock the user after a few wrong attempts.
var ErrPINRefused = errors.New("PKCS#11 token refused the PIN")

// Config configures a Provider.
type Config struct {
	// URI selects the provider and says how to reach it (README, "CA keys in
	// an HSM or a cloud KMS"), e.g.
	// pkcs11:module-path=/usr/lib/softhsm/libsofthsm2.so;token=castellan?pin-source=/run/secrets/hsm/pin.
	URI string
	// RetryInterval is the least time between connection attempts after a
	// failure; zero means DefaultRetryInterval.
	RetryInterval time.Duration
	// OpTimeout bounds one signature; zero means DefaultOpTimeout.
	OpTimeout time.Duration
	// HealthTTL is how long a successful signature makes Check skip its
	// probe; zero means DefaultHealthTTL.
	HealthTTL time.Duration
	// GoogleClientOptions are added to the Cloud KMS client's options (an
	// endpoint of its own; tests point it at an in-process server).
	GoogleClientOptions []option.ClientOption
	// Logger reports connection losses and recoveries; nil discards.
	Logger *slog.Logger
	// Now is the clock; nil means time.Now.
	Now func() time.Time
}

// Provider creates and opens the CA keys of one PKCS#11 token or cloud KMS.
// It is safe for concurrent use; signatures run in parallel (PKCS#11 through
// a pool of sessions, cloud KMSs as concurrent requests), so one slow
// operation never holds up the others.
type Provider struct {
	cfg Config
	c   *config

	cur atomic.Pointer[conn] // nil while disconnected

	mu      sync.Mutex // serialises connecting and the fields below
	lastErr error      // why there is no connection
	nextTry time.Time  // no connection attempt before this
	badPIN  [sha256.Size]byte
	closed  bool

	lastFail atomic.Int64 // unix nanoseconds of the last failed operation
}

// conn is one connection to the provider, with the signers opened on it.
type conn struct {
	km      apiv1.KeyManager
	opened  time.Time
	signers sync.Map // key URI → crypto.Signer
}

// New validates cfg and returns its Provider. It connects once, but a
// provider that cannot be reached yet is no error: its keys report
// Unavailable until it can (Key.Check says why).
func New(ctx context.Context, cfg Config) (*Provider, error) {
	c, err := parseProviderURI(cfg.URI)
	if err != nil {
		return nil, err
	}
	if c.kind == PKCS11 && !pkcs11Supported {
		return nil, errors.New("key provider pkcs11: this castellan binary was built without cgo (CGO_ENABLED=0), which PKCS#11 needs: use a cgo build")
	}
	if cfg.RetryInterval <= 0 {
		cfg.RetryInterval = DefaultRetryInterval
	}
	if cfg.OpTimeout <= 0 {
		cfg.OpTimeout = DefaultOpTimeout
	}
	if cfg.HealthTTL <= 0 {
		cfg.HealthTTL = DefaultHealthTTL
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	p := &Provider{cfg: cfg, c: c}
	if _, err := p.conn(ctx); err != nil {
		cfg.Logger.Warn("key provider not reachable yet; its CA keys are unavailable until it is", "provider", c.kind, "error", err)
	}
	return p, nil
}

// Kind returns the provider's kind (PKCS11, AWSKMS or CloudKMS).
func (p *Provider) Kind() string { return p.c.kind }

// Close disconnects; keys of p fail afterwards.
func (p *Provider) Close() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.closed = true
	if c := p.cur.Swap(nil); c != nil {
		return c.km.Close()
	}
	return nil
}

// unavailable wraps err as a transient provider failure.
func (p *Provider) unavailable(what string, err error) error {
	return fmt.Errorf("%w: key provider %s: %s: %w", signer.ErrSignerUnavailable, p.c.kind, what, err)
}

// conn returns the current connection, or connects when there is none and
// the retry interval has passed.
func (p *Provider) conn(ctx context.Context) (*conn, error) {
	if c := p.cur.Load(); c != nil {
		return c, nil
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if c := p.cur.Load(); c != nil {
		return c, nil
	}
	switch {
	case p.closed:
		return nil, p.unavailable("connect", errors.New("provider closed"))
	case p.cfg.Now().Before(p.nextTry) && p.lastErr != nil:
		return nil, p.lastErr
	}
	km, err := p.connect(ctx)
	if err != nil {
		p.lastErr, p.nextTry = p.unavailable("connect", err), p.cfg.Now().Add(p.cfg.RetryInterval)
		return nil, p.lastErr
	}
	c := &conn{km: km, opened: p.cfg.Now()}
	p.cur.Store(c)
	if p.lastErr != nil {
		p.cfg.Logger.Info("key provider reconnected", "provider", p.c.kind)
	}
	p.lastErr = nil
	return c, nil
}

// connect opens a new connection to the provider.
func (p *Provider) connect(ctx context.Context) (apiv1.KeyManager, error) {
	switch p.c.kind {
	case PKCS11:
		pin, err := readPIN(p.c.pinFile)
		if err != nil {
			return nil, err
		}
		sum := sha256.Sum256([]byte(pin))
		if sum == p.badPIN {
			return nil, fmt.Errorf("%w: the PIN in %s was refused before; not tried again until the file changes (HSMs lock the user after a few wrong PINs)", ErrPINRefused, p.c.pinFile)
		}
		km, err := pkcs11.New(ctx, apiv1.Options{Type: apiv1.PKCS11, URI: p.c.library, Pin: pin})
		if err != nil {
			if pinRefused(err) {
				p.badPIN = sum
				return nil, fmt.Errorf("%w (PIN file %s): %w", ErrPINRefused, p.c.pinFile, err)
			}
			return nil, err
		}
		return km, nil
	case AWSKMS:
		return awskms.New(ctx, apiv1.Options{Type: apiv1.AmazonKMS, URI: p.c.library})
	case CloudKMS:
		opts := append([]option.ClientOption(nil), p.cfg.GoogleClientOptions...)
		if p.c.credentialsFile != "" {
			opts = append(opts, option.WithAuthCredentialsFile(option.ServiceAccount, p.c.credentialsFile))
		}
		client, err := kmsapi.NewKeyManagementClient(ctx, opts...)
		if err != nil {
			return nil, err
		}
		return cloudkms.NewCloudKMS(client), nil
	}
	return nil, fmt.Errorf("unknown key provider %q", p.c.kind)
}

// failed records that an operation on c failed with err. A PKCS#11
// connection is dropped, since its sessions and object handles do not
// survive a token's removal; the next operation reconnects (at once after a
// long-lived connection, after RetryInterval after a young one). Cloud
// clients manage their own connections and are kept.
func (p *Provider) failed(c *conn, err error) {
	p.lastFail.Store(p.cfg.Now().UnixNano())
	if p.c.kind != PKCS11 || !p.cur.CompareAndSwap(c, nil) {
		return
	}
	p.cfg.Logger.Warn("key provider connection lost; reconnecting", "provider", p.c.kind, "error", err)
	p.mu.Lock()
	p.lastErr = p.unavailable("connection lost", err)
	if now := p.cfg.Now(); now.Sub(c.opened) < p.cfg.RetryInterval {
		// A connection that fails as soon as it is made (a key that is gone)
		// waits before the next one, rather than logging in for every request.
		p.nextTry = now.Add(p.cfg.RetryInterval)
	}
	p.mu.Unlock()
	// Close waits for the operations still running on c's sessions; nothing
	// waits for Close.
	go func() { _ = c.km.Close() }()
}

// healthy reports whether a signature that succeeded at ok (unix
// nanoseconds) still vouches for a key: within HealthTTL, and no operation
// of the provider failed since.
func (p *Provider) healthy(ok int64) bool {
	return ok != 0 && ok >= p.lastFail.Load() && p.cfg.Now().Sub(time.Unix(0, ok)) < p.cfg.HealthTTL
}

// signerFor returns the provider's signer for the key at keyURI on c,
// opening it on first use.
func (c *conn) signerFor(keyURI string) (crypto.Signer, error) {
	if s, ok := c.signers.Load(keyURI); ok {
		return s.(crypto.Signer), nil
	}
	s, err := c.km.CreateSigner(&apiv1.CreateSignerRequest{SigningKey: keyURI})
	if err != nil {
		return nil, err
	}
	c.signers.Store(keyURI, s)
	return s, nil
}

// run calls f in its own goroutine and waits for it, for ctx or for
// timeout, whichever comes first: a library call without a context must not
// hold its caller past either. An abandoned call finishes in the background.
func run[T any](ctx context.Context, timeout time.Duration, f func() (T, error)) (T, error) {
	type result struct {
		v   T
		err error
	}
	done := make(chan result, 1)
	go func() {
		v, err := f()
		done <- result{v, err}
	}()
	var zero T
	t := time.NewTimer(timeout)
	defer t.Stop()
	select {
	case r := <-done:
		return r.v, r.err
	case <-ctx.Done():
		return zero, ctx.Err()
	case <-t.C:
		return zero, fmt.Errorf("no answer within %s", timeout)
	}
}
