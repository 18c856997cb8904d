package vault

import (
	"context"
	"fmt"

	"github.com/castellan-ca/castellan/signer"
	"github.com/hashicorp/vault/api"
)

// refresh reads the configured issuer's certificate and chain from Vault and
// installs them; changed reports whether the trust bundle differs from before.
// The chain must reach a self-signed root, since that root is what clients
// will trust: import it into the mount with the intermediate.
func (s *Signer) refresh(ctx context.Context) (changed bool, err error) {
	path := s.cfg.Mount + "/issuer/" + s.cfg.Issuer + "/json"
	secret, err := s.call(ctx, path, func(c context.Context) (*api.Secret, error) {
		return s.client.Logical().ReadWithContext(c, path)
	})
	if err != nil {
		return false, fmt.Errorf("read issuer: %w", err)
	}
	certPEM, _ := secret.Data["certificate"].(string)
	issuing, err := signer.ParseCertificatesPEM([]byte(certPEM))
	if err != nil {
		return false, fmt.Errorf("%s: certificate: %w", path, err)
	}
	raw, _ := secret.Data["ca_chain"].([]any)
	chain, err := pemList(raw)
	if err != nil {
		return false, fmt.Errorf("%s: ca_chain: %w", path, err)
	}
	if len(chain) == 0 {
		chain = issuing[:1]
	}
	_, roots := signer.SplitRoots(chain)
	if len(roots) == 0 {
		top := chain[len(chain)-1]
		return false, fmt.Errorf("%s: the issuer's chain ends at %q, which is not a root: import the root certificate into mount %s (e.g. intermediate/set-signed with the intermediate and its root)",
			path, top.Subject.String(), s.cfg.Mount)
	}
	if err := signer.CheckChainOrder(chain); err != nil {
		return false, fmt.Errorf("%s: ca_chain: %w", path, err)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	changed = !signer.SameCertificates(s.roots, roots)
	s.issuer, s.roots = issuing[0], roots
	return changed, nil
}

// refreshLoop re-reads the chain every RefreshInterval, or at once when Sign
// saw another issuing CA, and calls OnChange when the trust bundle changed.
// A failed refresh keeps the chain we have: issuance goes on, and the next
// poll retries.
func (s *Signer) refreshLoop(ctx context.Context) {
	signer.RefreshLoop(ctx, s.cfg.RefreshInterval, s.refreshc, s.refresh,
		func(err error) { s.log.Warn("vault: issuer chain refresh failed", "error", err) },
		func() {
			s.log.Info("vault: trust bundle changed", "issuer", s.cfg.Issuer, "roots", len(s.TrustBundle()))
			if s.cfg.OnChange != nil {
				s.cfg.OnChange()
			}
		})
}
