package main

import (
	"bytes"
	"context"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"time"

	"github.com/castellan-ca/castellan/ca"
	"github.com/castellan-ca/castellan/cmd/internal/datadir"
	"github.com/castellan-ca/castellan/internal/atomicfile"
	"github.com/castellan-ca/castellan/internal/keyfile"
	"github.com/castellan-ca/castellan/signer"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// ensureOperatorCredential writes castellanctl's client certificate on first
// start, and replaces it when it no longer chains to the trust bundle or is
// past two thirds of its life.
func ensureOperatorCredential(ctx context.Context, issuer *ca.Issuer, authority *ca.Authority, cfg Config, id spiffeid.ID, logger *slog.Logger) error {
	dir := filepath.Join(cfg.DataDir, datadir.OperatorDir)
	certPath, keyPath := filepath.Join(dir, datadir.OperatorCert), filepath.Join(dir, datadir.OperatorKey)
	if b, err := os.ReadFile(certPath); err == nil {
		if certs, err := signer.ParseCertificatesPEM(b); err == nil {
			leaf := certs[0]
			inter := x509.NewCertPool()
			for _, c := range certs[1:] {
				inter.AddCert(c)
			}
			_, verr := leaf.Verify(x509.VerifyOptions{Roots: authority.Roots(), Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}})
			renewAt := leaf.NotBefore.Add(leaf.NotAfter.Sub(leaf.NotBefore) * 2 / 3)
			if _, kerr := os.Stat(keyPath); verr == nil && kerr == nil && time.Now().Before(renewAt) && issuedByActive(leaf, authority) {
				return nil
			}
		}
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("operator credential dir: %w", err)
	}
	key, err := keyfile.GenerateKey("ecdsa-p256")
	if err != nil {
		return err
	}
	chain, _, err := issuer.IssueInternal(ctx, "operator credential", ca.ClientTemplate(id.URL()), key, cfg.OperatorCertTTL)
	if err != nil {
		return err
	}
	keyPEM, err := keyfile.MarshalPrivateKeyPEM(key)
	if err != nil {
		return err
	}
	if err := atomicfile.Write(keyPath, keyPEM, 0o600); err != nil {
		return fmt.Errorf("write operator key: %w", err)
	}
	if err := atomicfile.Write(certPath, []byte(signer.EncodePEM(append([]*x509.Certificate{chain.Leaf}, chain.Intermediates...)...)), 0o644); err != nil {
		return fmt.Errorf("write operator certificate: %w", err)
	}
	logger.Info("operator credential written", "identity", id.String(), "dir", dir, "not_after", chain.Leaf.NotAfter)
	return nil
}

// publishBundle keeps path equal to the current trust bundle.
func publishBundle(ctx context.Context, authority *ca.Authority, path string, logger *slog.Logger) {
	for {
		changed := authority.Changed()
		if st := authority.Current(); st != nil {
			if err := atomicfile.Write(path, []byte(st.BundlePEM), 0o644); err != nil {
				logger.Error("write trust bundle", "path", path, "error", err)
			}
		}
		select {
		case <-ctx.Done():
			return
		case <-changed:
		}
	}
}

// keepOperatorCredential reissues castellanctl's credential whenever the CA
// changes so that it is never left under a CA about to be retired.
func keepOperatorCredential(ctx context.Context, issuer *ca.Issuer, authority *ca.Authority, cfg Config, id spiffeid.ID, logger *slog.Logger) {
	for {
		changed := authority.Changed()
		select {
		case <-ctx.Done():
			return
		case <-changed:
		}
		if err := ensureOperatorCredential(ctx, issuer, authority, cfg, id, logger); err != nil && !errors.Is(err, context.Canceled) {
			logger.Error("operator credential refresh failed", "error", err)
		}
	}
}

// issuedByActive reports whether leaf was signed by the CA that issues now.
func issuedByActive(leaf *x509.Certificate, authority *ca.Authority) bool {
	c, ok := authority.Current().Signer.(interface{ Certificate() *x509.Certificate })
	if !ok {
		return true // a remote backend: its CA is not ours to compare
	}
	return bytes.Equal(leaf.AuthorityKeyId, c.Certificate().SubjectKeyId)
}

// writeServerInfo tells castellanctl where to connect.
func writeServerInfo(path string, cfg Config, addr net.Addr) error {
	host, port, err := net.SplitHostPort(addr.String())
	if err != nil {
		return err
	}
	if ip := net.ParseIP(host); ip == nil || ip.IsUnspecified() {
		host = "localhost"
	}
	b, err := json.MarshalIndent(datadir.Server{Address: net.JoinHostPort(host, port), ServerName: cfg.ServingDNSNames[0],
		TrustDomain: cfg.TrustDomain}, "", "  ")
	if err != nil {
		return err
	}
	return atomicfile.Write(path, append(b, '\n'), 0o644)
}
