package main

import (
	"context"
	"crypto/x509"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net/url"
	"time"

	"google.golang.org/api/option"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/castellan-ca/castellan/ca"
	"github.com/castellan-ca/castellan/signer"
	"github.com/castellan-ca/castellan/signer/googlecas"
	"github.com/castellan-ca/castellan/signer/vault"
)

// VaultConfig is the `vault:` section, used with signer vault.
type VaultConfig struct {
	Address         string        `yaml:"address"`
	Mount           string        `yaml:"mount"`
	Role            string        `yaml:"role"`
	RSARole         string        `yaml:"rsaRole"`
	Verbatim        bool          `yaml:"verbatim"`
	Issuer          string        `yaml:"issuer"`
	AuthMethod      string        `yaml:"authMethod"`
	AuthMount       string        `yaml:"authMount"`
	TokenFile       string        `yaml:"tokenFile"`
	KubernetesRole  string        `yaml:"kubernetesRole"`
	JWTFile         string        `yaml:"jwtFile"`
	RoleID          string        `yaml:"roleID"`
	SecretIDFile    string        `yaml:"secretIDFile"`
	CAFile          string        `yaml:"caFile"`
	ServerName      string        `yaml:"serverName"`
	Timeout         time.Duration `yaml:"timeout"`
	RefreshInterval time.Duration `yaml:"refreshInterval"`
}

// GoogleCASConfig is the `googleCAS:` section, used with signer googlecas.
type GoogleCASConfig struct {
	CAPool               string        `yaml:"caPool"`
	CertificateAuthority string        `yaml:"certificateAuthority"`
	Endpoint             string        `yaml:"endpoint"`
	Insecure             bool          `yaml:"insecure"`
	Timeout              time.Duration `yaml:"timeout"`
	RefreshInterval      time.Duration `yaml:"refreshInterval"`
}

func vaultDefaults() VaultConfig {
	return VaultConfig{Mount: vault.DefaultMount, Issuer: vault.DefaultIssuer, AuthMethod: vault.AuthKubernetes,
		JWTFile: vault.DefaultJWTFile, Timeout: vault.DefaultTimeout, RefreshInterval: vault.DefaultRefreshInterval}
}

func googleCASDefaults() GoogleCASConfig {
	return GoogleCASConfig{Timeout: googlecas.DefaultTimeout, RefreshInterval: googlecas.DefaultRefreshInterval}
}

// bindRemoteSignerFlags registers the vault-* and google-cas-* flags.
func bindRemoteSignerFlags(fs *flag.FlagSet, v *VaultConfig, g *GoogleCASConfig) {
	fs.StringVar(&v.Address, "vault-address", v.Address, "Vault (or OpenBao) URL, e.g. https://vault.vault.svc:8200")
	fs.StringVar(&v.Mount, "vault-mount", v.Mount, "path of the PKI secrets engine")
	fs.StringVar(&v.Role, "vault-role", v.Role, "PKI role for sign/:role (with --vault-verbatim: optional)")
	fs.StringVar(&v.RSARole, "vault-rsa-role", v.RSARole, "PKI role for RSA keys (adds keyEncipherment); default --vault-role")
	fs.BoolVar(&v.Verbatim, "vault-verbatim", v.Verbatim, "sign with sign-verbatim (only CSRs already matching the grant)")
	fs.StringVar(&v.Issuer, "vault-issuer", v.Issuer, "issuer reference whose chain gives the trust bundle (the role's issuer)")
	fs.StringVar(&v.AuthMethod, "vault-auth-method", v.AuthMethod, "token | kubernetes | approle")
	fs.StringVar(&v.AuthMount, "vault-auth-mount", v.AuthMount, "path of the auth method (default: the method's name)")
	fs.StringVar(&v.TokenFile, "vault-token-file", v.TokenFile, "file holding the Vault token (auth method token)")
	fs.StringVar(&v.KubernetesRole, "vault-kubernetes-role", v.KubernetesRole, "Vault role to log in as (auth method kubernetes)")
	fs.StringVar(&v.JWTFile, "vault-jwt-file", v.JWTFile, "service-account token to log in with (auth method kubernetes)")
	fs.StringVar(&v.RoleID, "vault-role-id", v.RoleID, "AppRole role ID (auth method approle)")
	fs.StringVar(&v.SecretIDFile, "vault-secret-id-file", v.SecretIDFile, "file holding the AppRole secret ID (auth method approle)")
	fs.StringVar(&v.CAFile, "vault-ca-file", v.CAFile, "PEM roots for Vault's TLS certificate (default: system roots)")
	fs.StringVar(&v.ServerName, "vault-server-name", v.ServerName, "name checked in Vault's TLS certificate (default: the address's host)")
	fs.DurationVar(&v.Timeout, "vault-timeout", v.Timeout, "bound on each call to Vault, retries included")
	fs.DurationVar(&v.RefreshInterval, "vault-refresh-interval", v.RefreshInterval, "how often the issuer's chain is re-read from Vault")

	fs.StringVar(&g.CAPool, "google-cas-ca-pool", g.CAPool, "CA pool: projects/PROJECT/locations/LOCATION/caPools/POOL")
	fs.StringVar(&g.CertificateAuthority, "google-cas-certificate-authority", g.CertificateAuthority, "CA ID in the pool to pin issuance to (default: CAS picks)")
	fs.StringVar(&g.Endpoint, "google-cas-endpoint", g.Endpoint, "CAS API endpoint (default: Google's)")
	fs.BoolVar(&g.Insecure, "google-cas-insecure", g.Insecure, "FOR TESTS ONLY: plaintext gRPC without credentials to --google-cas-endpoint")
	fs.DurationVar(&g.Timeout, "google-cas-timeout", g.Timeout, "bound on each call to CAS, retries included")
	fs.DurationVar(&g.RefreshInterval, "google-cas-refresh-interval", g.RefreshInterval, "how often the pool's CA certificates are re-read")
}

// validate checks the `vault:` keys; only called with signer vault.
func (v VaultConfig) validate(bad func(key, format string, a ...any)) {
	if u, err := url.Parse(v.Address); err != nil || (u.Scheme != "https" && u.Scheme != "http") || u.Host == "" {
		bad("vault.address", "%q is not an http(s) URL", v.Address)
	}
	if v.Role == "" && !v.Verbatim {
		bad("vault.role", "required unless vault.verbatim is set")
	}
	switch v.AuthMethod {
	case vault.AuthToken:
		if v.TokenFile == "" {
			bad("vault.tokenFile", "required with vault.authMethod token")
		}
	case vault.AuthKubernetes:
		if v.KubernetesRole == "" {
			bad("vault.kubernetesRole", "required with vault.authMethod kubernetes")
		}
	case vault.AuthAppRole:
		if v.RoleID == "" || v.SecretIDFile == "" {
			bad("vault.roleID", "vault.roleID and vault.secretIDFile are required with vault.authMethod approle")
		}
	default:
		bad("vault.authMethod", "%q is not one of token, kubernetes, approle", v.AuthMethod)
	}
	if v.Timeout <= 0 || v.RefreshInterval <= 0 {
		bad("vault.timeout", "vault.timeout and vault.refreshInterval must be positive")
	}
}

// validate checks the `googleCAS:` keys; only called with signer googlecas.
func (g GoogleCASConfig) validate(bad func(key, format string, a ...any)) {
	if g.CAPool == "" {
		bad("googleCAS.caPool", "required with signer googlecas")
	}
	if g.Insecure && g.Endpoint == "" {
		bad("googleCAS.insecure", "needs googleCAS.endpoint (it is for a test server)")
	}
	if g.Timeout <= 0 || g.RefreshInterval <= 0 {
		bad("googleCAS.timeout", "googleCAS.timeout and googleCAS.refreshInterval must be positive")
	}
}

// startVault signs through Vault and keeps the trust bundle following Vault's
// issuer, in c.
func startVault(ctx context.Context, c *component, cfg Config, authority *ca.Authority, audit *ca.Auditor, logger *slog.Logger) error {
	v := cfg.Vault
	auth := vault.Auth{Method: v.AuthMethod, Mount: v.AuthMount, TokenFile: v.TokenFile, JWTFile: v.JWTFile, SecretIDFile: v.SecretIDFile}
	switch v.AuthMethod {
	case vault.AuthKubernetes:
		auth.Role = v.KubernetesRole
	case vault.AuthAppRole:
		auth.Role = v.RoleID
	}
	var s *vault.Signer
	s, err := vault.New(ctx, vault.Config{
		Address: v.Address, Mount: v.Mount, Role: v.Role, RSARole: v.RSARole, Verbatim: v.Verbatim, Issuer: v.Issuer,
		Auth: auth, CAFile: v.CAFile, ServerName: v.ServerName, Timeout: v.Timeout, RefreshInterval: v.RefreshInterval,
		Logger: logger,
		OnChange: func() {
			// Vault reports only its current chain: keep every root seen.
			reuseSigner(c.ctx, authority, audit, logger, vault.Backend, s, "Vault issuer "+v.Mount+"/"+v.Issuer+" changed", authority.Current().Roots)
		},
	})
	if err != nil {
		return err
	}
	if _, err := authority.Use(vault.Backend, s); err != nil {
		return err
	}
	c.Go(func(ctx context.Context) error { s.Run(ctx); return nil })
	return nil
}

// startGoogleCAS signs through a CAS pool and keeps the trust bundle
// following the pool's CAs, in c.
func startGoogleCAS(ctx context.Context, c *component, cfg Config, authority *ca.Authority, audit *ca.Auditor, logger *slog.Logger) error {
	g := cfg.GoogleCAS
	var opts []option.ClientOption
	if g.Endpoint != "" {
		opts = append(opts, option.WithEndpoint(g.Endpoint))
	}
	if g.Insecure {
		logger.Warn("google CAS: plaintext and unauthenticated connection (googleCAS.insecure): for tests only", "endpoint", g.Endpoint)
		opts = append(opts, option.WithoutAuthentication(), option.WithGRPCDialOption(grpc.WithTransportCredentials(insecure.NewCredentials())))
	}
	var s *googlecas.Signer
	s, err := googlecas.New(ctx, googlecas.Config{
		CAPool: g.CAPool, CertificateAuthority: g.CertificateAuthority, Timeout: g.Timeout, RefreshInterval: g.RefreshInterval,
		ClientOptions: opts, Logger: logger,
		OnChange: func() {
			// CAS reports only the pool's current CAs: keep every root seen.
			reuseSigner(c.ctx, authority, audit, logger, googlecas.Backend, s, "Google CAS pool "+g.CAPool+" changed", authority.Current().Roots)
		},
	})
	if err != nil {
		return err
	}
	if _, err := authority.Use(googlecas.Backend, s); err != nil {
		return errors.Join(err, s.Close())
	}
	c.Go(func(ctx context.Context) error {
		s.Run(ctx)
		return s.Close()
	})
	return nil
}

// reuseSigner re-installs s after its trust bundle changed, keeping retained
// roots beside it (certificates issued under them are still live), and
// audits it.
func reuseSigner(ctx context.Context, authority *ca.Authority, audit *ca.Auditor, logger *slog.Logger, backend string, s signer.Signer, detail string,
	retained []*x509.Certificate) {
	act := ca.Action{Signer: backend, Detail: detail}
	if st, err := authority.Use(backend, s, retained...); err != nil {
		act.Err, act.Detail = err, fmt.Sprintf("%s: %v", detail, err)
		logger.Error("trust bundle update failed", "signer", backend, "error", err)
	} else {
		logger.Info("trust bundle updated", "signer", backend, "roots", len(st.Roots), "generation", st.Generation)
	}
	_, _ = audit.Record(ctx, act) // a failure is logged there; the bundle change stands
}
