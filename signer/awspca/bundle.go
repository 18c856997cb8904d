package awspca

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rsa"
	"crypto/x509"
	"fmt"
	"slices"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/acmpca"
	"github.com/aws/aws-sdk-go-v2/service/acmpca/types"

	"github.com/castellan-ca/castellan/signer"
)

// caState is what the last refresh read from PCA.
type caState struct {
	issuing *x509.Certificate   // the CA's certificate: NotAfter clamps leaves
	roots   []*x509.Certificate // the root its chain ends at
	sigAlg  types.SigningAlgorithm
}

func (s *Signer) current() caState {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.state
}

// TrustBundle returns the root of the CA's chain and the roots it had before
// that still have live leaves, as of the last refresh.
func (s *Signer) TrustBundle() []*x509.Certificate {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.bundleLocked()
}

func (s *Signer) bundleLocked() []*x509.Certificate {
	out := slices.Clone(s.state.roots)
	for _, r := range s.retained {
		if !signer.ContainsCertificate(out, r.Cert) {
			out = append(out, r.Cert)
		}
	}
	return out
}

// Retained returns the roots kept for their live leaves, with how long, for
// the caller to persist and hand to the next New (Config.Retained).
func (s *Signer) Retained() []RetainedRoot {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return slices.Clone(s.retained)
}

// refresh reads the CA's certificate and chain (GetCertificateAuthorityCertificate)
// and reports whether the trust bundle changed. A root that left the chain
// (PCA's CA was re-certified under a new root) is retained until the leaves
// issued under it have expired: the latest NotAfter this signer issued under
// it, and at least MaxLeafLifetime from now for leaves other replicas (or
// an earlier run) issued.
func (s *Signer) refresh(ctx context.Context) (changed bool, err error) {
	cctx, cancel := context.WithTimeout(ctx, s.cfg.Timeout)
	defer cancel()
	out, err := s.client.GetCertificateAuthorityCertificate(cctx, &acmpca.GetCertificateAuthorityCertificateInput{
		CertificateAuthorityArn: aws.String(s.cfg.CertificateAuthorityARN),
	})
	if err != nil {
		return false, fmt.Errorf("read the CA certificate of %s: %w", s.cfg.CertificateAuthorityARN, classify(ctx, err))
	}
	issuing, err := signer.ParseCertificatesPEM([]byte(aws.ToString(out.Certificate)))
	if err != nil || len(issuing) != 1 {
		return false, fmt.Errorf("CA certificate of %s: want one certificate (%v)", s.cfg.CertificateAuthorityARN, err)
	}
	chain := issuing
	if p := aws.ToString(out.CertificateChain); p != "" { // empty for a root CA
		above, err := signer.ParseCertificatesPEM([]byte(p))
		if err != nil {
			return false, fmt.Errorf("CA certificate chain of %s: %w", s.cfg.CertificateAuthorityARN, err)
		}
		chain = append(chain, above...)
	}
	if err := signer.CheckChainOrder(chain); err != nil {
		return false, fmt.Errorf("CA certificate chain of %s: %w", s.cfg.CertificateAuthorityARN, err)
	}
	top := chain[len(chain)-1]
	if _, roots := signer.SplitRoots([]*x509.Certificate{top}); len(roots) == 0 {
		return false, fmt.Errorf("the chain of %s ends at %q, which is not a root", s.cfg.CertificateAuthorityARN, top.Subject.String())
	}
	alg := types.SigningAlgorithm(s.cfg.SigningAlgorithm)
	if alg == "" {
		if alg, err = signingAlgorithm(issuing[0].PublicKey); err != nil {
			return false, err
		}
	}

	now := s.cfg.Now()
	s.mu.Lock()
	defer s.mu.Unlock()
	before := s.bundleLocked()
	for _, old := range s.state.roots {
		if old.Equal(top) {
			continue
		}
		until := now.Add(s.cfg.MaxLeafLifetime)
		if s.cfg.MaxLeafLifetime <= 0 {
			until = old.NotAfter // no bound known: keep it while it is valid
		}
		until = latest(until, s.lastLeaf[string(old.Raw)])
		if until.After(old.NotAfter) { // nothing under it outlives it
			until = old.NotAfter
		}
		delete(s.lastLeaf, string(old.Raw))
		s.retain(old, until)
		s.log.Info("aws pca: the CA's root changed; the old root stays in the trust bundle while its leaves live",
			"ca", s.cfg.CertificateAuthorityARN, "old_root", old.Subject.String(), "until", until, "new_root", top.Subject.String())
	}
	s.retained = slices.DeleteFunc(s.retained, func(r RetainedRoot) bool {
		if r.Cert.Equal(top) { // back in the chain (a roll-back)
			s.lastLeaf[string(top.Raw)] = latest(s.lastLeaf[string(top.Raw)], r.Until)
			return true
		}
		return !r.Until.After(now)
	})
	s.state = caState{issuing: issuing[0], roots: []*x509.Certificate{top}, sigAlg: alg}
	return !signer.SameCertificates(before, s.bundleLocked()), nil
}

// retain keeps root in the bundle until at least until. The caller holds s.mu.
func (s *Signer) retain(root *x509.Certificate, until time.Time) {
	for i, r := range s.retained {
		if r.Cert.Equal(root) {
			s.retained[i].Until = latest(r.Until, until)
			return
		}
	}
	s.retained = append(s.retained, RetainedRoot{Cert: root, Until: until})
}

// observeLeaf records that a leaf living until notAfter chains to root and
// reports whether root is in the trust bundle.
func (s *Signer) observeLeaf(root *x509.Certificate, notAfter time.Time) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if signer.ContainsCertificate(s.state.roots, root) {
		s.lastLeaf[string(root.Raw)] = latest(s.lastLeaf[string(root.Raw)], notAfter)
		return true
	}
	for i, r := range s.retained {
		if r.Cert.Equal(root) { // PCA still signs under a root we saw leave
			s.retained[i].Until = latest(r.Until, notAfter)
			return true
		}
	}
	return false
}

// wakeRefresh asks Run for an immediate refresh.
func (s *Signer) wakeRefresh() {
	select {
	case s.refreshc <- struct{}{}:
	default:
	}
}

// Run re-reads the CA's certificate and chain every RefreshInterval, or at
// once when Sign met an unknown root, and calls OnChange when the trust
// bundle changed (a new root, or a retained one whose leaves have expired).
// A failed refresh keeps what we have. It returns when ctx ends.
func (s *Signer) Run(ctx context.Context) {
	signer.RefreshLoop(ctx, s.cfg.RefreshInterval, s.refreshc, s.refresh,
		func(err error) { s.log.Warn("aws pca: CA certificate refresh failed", "error", err) },
		func() {
			s.log.Info("aws pca: trust bundle changed", "ca", s.cfg.CertificateAuthorityARN, "roots", len(s.TrustBundle()))
			if s.cfg.OnChange != nil {
				s.cfg.OnChange()
			}
		})
}

// signingAlgorithm is PCA's signature algorithm for a CA key: its family
// must match the key's, and the hash the curve's strength.
func signingAlgorithm(pub crypto.PublicKey) (types.SigningAlgorithm, error) {
	switch k := pub.(type) {
	case *ecdsa.PublicKey:
		switch k.Curve {
		case elliptic.P256():
			return types.SigningAlgorithmSha256withecdsa, nil
		case elliptic.P384():
			return types.SigningAlgorithmSha384withecdsa, nil
		case elliptic.P521():
			return types.SigningAlgorithmSha512withecdsa, nil
		}
	case *rsa.PublicKey:
		return types.SigningAlgorithmSha256withrsa, nil
	}
	return "", fmt.Errorf("CA key %T: set the signing algorithm explicitly", pub)
}

func latest(a, b time.Time) time.Time {
	if b.After(a) {
		return b
	}
	return a
}
