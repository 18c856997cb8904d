package vault

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/vault/api"
)

func (a *Auth) fill() error {
	switch a.Method {
	case AuthToken:
		if a.TokenFile == "" {
			return errors.New("auth: token file is required for the token method")
		}
	case AuthKubernetes:
		if a.Role == "" {
			return errors.New("auth: role is required for the kubernetes method")
		}
		if a.JWTFile == "" {
			a.JWTFile = DefaultJWTFile
		}
	case AuthAppRole:
		if a.Role == "" || a.SecretIDFile == "" {
			return errors.New("auth: role ID and secret ID file are required for the approle method")
		}
	default:
		return fmt.Errorf("auth: method %q is not one of %s, %s, %s", a.Method, AuthToken, AuthKubernetes, AuthAppRole)
	}
	if a.Mount = strings.Trim(a.Mount, "/"); a.Mount == "" {
		a.Mount = a.Method
	}
	return nil
}

// authState serialises logins and tells Run's renewal loop about a login
// that happened elsewhere (a 403 during Sign), so it watches the new token.
type authState struct {
	mu      sync.Mutex // one login at a time
	secret  *api.Secret
	relogin chan *api.Secret
}

func (a *authState) init() { a.relogin = make(chan *api.Secret, 1) }

func (a *authState) set(secret *api.Secret) {
	a.mu.Lock()
	a.secret = secret
	a.mu.Unlock()
}

func (a *authState) current() *api.Secret {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.secret
}

// login authenticates with the configured method, installs the token on the
// client and returns the secret describing it (lease, renewability).
func (s *Signer) login(ctx context.Context) (*api.Secret, error) {
	a := s.cfg.Auth
	var secret *api.Secret
	switch a.Method {
	case AuthToken:
		token, err := readSecretFile(a.TokenFile)
		if err != nil {
			return nil, fmt.Errorf("token: %w", err)
		}
		s.client.SetToken(token)
		self, err := s.call(ctx, "token lookup-self", func(c context.Context) (*api.Secret, error) {
			return s.client.Auth().Token().LookupSelfWithContext(c)
		})
		if err != nil {
			return nil, err
		}
		var ttl int64
		if n, ok := self.Data["ttl"].(json.Number); ok {
			ttl, _ = n.Int64()
		}
		renewable, _ := self.Data["renewable"].(bool)
		return &api.Secret{Auth: &api.SecretAuth{ClientToken: token, Renewable: renewable, LeaseDuration: int(ttl)}}, nil
	case AuthKubernetes:
		jwt, err := readSecretFile(a.JWTFile)
		if err != nil {
			return nil, fmt.Errorf("kubernetes login: %w", err)
		}
		secret, err = s.loginWith(ctx, map[string]any{"role": a.Role, "jwt": jwt})
		if err != nil {
			return nil, err
		}
	case AuthAppRole:
		secretID, err := readSecretFile(a.SecretIDFile)
		if err != nil {
			return nil, fmt.Errorf("approle login: %w", err)
		}
		secret, err = s.loginWith(ctx, map[string]any{"role_id": a.Role, "secret_id": secretID})
		if err != nil {
			return nil, err
		}
	}
	if secret.Auth == nil || secret.Auth.ClientToken == "" {
		return nil, fmt.Errorf("%s login returned no token", a.Method)
	}
	s.client.SetToken(secret.Auth.ClientToken)
	return secret, nil
}

func (s *Signer) loginWith(ctx context.Context, body map[string]any) (*api.Secret, error) {
	path := "auth/" + s.cfg.Auth.Mount + "/login"
	return s.call(ctx, path, func(c context.Context) (*api.Secret, error) {
		return s.client.Logical().WriteWithContext(c, path, body)
	})
}

// reauth logs in again after Vault refused stale, unless another caller
// already replaced that token.
func (s *Signer) reauth(ctx context.Context, stale string) error {
	s.auth.mu.Lock()
	defer s.auth.mu.Unlock()
	if s.client.Token() != stale {
		return nil
	}
	secret, err := s.login(ctx)
	if err != nil {
		return err
	}
	s.auth.secret = secret
	select {
	case <-s.auth.relogin: // drop an older notice Run has not read yet
	default:
	}
	s.auth.relogin <- secret
	s.log.Info("vault: logged in again after a refused request", "method", s.cfg.Auth.Method)
	return nil
}

// Run keeps the token alive (Vault's LifetimeWatcher renews it; at its max TTL
// or when renewal fails it logs in again) and re-reads the issuer's chain every
// RefreshInterval, calling OnChange when the trust bundle changed. It returns
// when ctx ends.
func (s *Signer) Run(ctx context.Context) {
	var wg sync.WaitGroup
	wg.Go(func() { s.refreshLoop(ctx) })
	s.renewLoop(ctx)
	wg.Wait()
}

func (s *Signer) renewLoop(ctx context.Context) {
	secret := s.auth.current()
	for {
		if secret.Auth.LeaseDuration == 0 {
			// A token without TTL (e.g. a root token) never needs renewal;
			// only a login elsewhere can replace it.
			select {
			case <-ctx.Done():
				return
			case secret = <-s.auth.relogin:
				continue
			}
		}
		w, err := s.client.NewLifetimeWatcher(&api.LifetimeWatcherInput{Secret: secret})
		if err != nil {
			s.log.Error("vault: cannot watch the token", "error", err)
			return
		}
		go w.Start()
		next, done := s.watch(ctx, w)
		w.Stop()
		if done {
			return
		}
		if next == nil {
			// The token reached its max TTL or could not be renewed.
			if next = s.loginUntilDone(ctx, secret.Auth.ClientToken); next == nil {
				return
			}
		}
		secret = next
	}
}

// watch follows w until the token needs replacing. It returns the secret of a
// login made elsewhere, or nil when a new login is due; done when ctx ended.
func (s *Signer) watch(ctx context.Context, w *api.LifetimeWatcher) (next *api.Secret, done bool) {
	for {
		select {
		case <-ctx.Done():
			return nil, true
		case secret := <-s.auth.relogin:
			return secret, false
		case r := <-w.RenewCh():
			s.log.Debug("vault: token renewed", "lease_seconds", r.Secret.Auth.LeaseDuration)
			if s.cfg.OnTokenRenewed != nil {
				s.cfg.OnTokenRenewed()
			}
		case err := <-w.DoneCh():
			if err != nil {
				s.log.Warn("vault: token renewal failed; logging in again", "error", err)
			} else {
				s.log.Info("vault: token at the end of its life; logging in again", "method", s.cfg.Auth.Method)
			}
			return nil, false
		}
	}
}

// loginUntilDone logs in, backing off between failures, until it succeeds
// with a token other than expiring (returning the new secret) or ctx ends (nil).
func (s *Signer) loginUntilDone(ctx context.Context, expiring string) *api.Secret {
	wait := time.Second
	for {
		s.auth.mu.Lock()
		secret, err := s.login(ctx)
		switch {
		case err == nil && secret.Auth.ClientToken == expiring:
			// Only the token method can get the same token back: the file
			// has not been rotated yet.
			err = fmt.Errorf("%s still holds the expiring token", s.cfg.Auth.TokenFile)
		case err == nil:
			s.auth.secret = secret
		}
		s.auth.mu.Unlock()
		if err == nil {
			return secret
		}
		s.log.Error("vault: login failed", "method", s.cfg.Auth.Method, "error", err, "retry_in", wait)
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(wait):
		}
		wait = min(2*wait, 30*time.Second)
	}
}

// readSecretFile reads a credential file, trimmed: files written by
// `echo` or Kubernetes secrets often end in a newline.
func readSecretFile(path string) (string, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return "", err
	}
	v := strings.TrimSpace(string(b))
	if v == "" {
		return "", fmt.Errorf("%s is empty", path)
	}
	return v, nil
}
