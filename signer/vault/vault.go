// Package vault signs workload certificates through the PKI secrets engine of
// HashiCorp Vault or OpenBao (same HTTP API). Castellan still decides the
// profile: the request names only the granted SANs and NotAfter, and the issuer
// re-checks whatever Vault returns (ca.CheckIssued) before it reaches a client.
package vault

import (
	"bytes"
	"context"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"os"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/castellan-ca/castellan/signer"
	"github.com/hashicorp/vault/api"
)

// Backend names this signer in audit records and configuration.
const Backend = "vault"

// Auth methods accepted in Auth.Method.
const (
	// AuthToken reads a Vault token from Auth.TokenFile (re-read on renewal
	// failure, so a token rotated by Vault Agent is picked up).
	AuthToken = "token"
	// AuthKubernetes logs in with the pod's service-account JWT.
	AuthKubernetes = "kubernetes"
	// AuthAppRole logs in with a role ID and a secret ID.
	AuthAppRole = "approle"
)

// Defaults of Config.
const (
	DefaultMount           = "pki"
	DefaultIssuer          = "default"
	DefaultTimeout         = 10 * time.Second
	DefaultRefreshInterval = time.Minute
	DefaultJWTFile         = "/var/run/secrets/kubernetes.io/serviceaccount/token"
)

// Config says where and how to sign. Zero values get the defaults above.
type Config struct {
	// Address is Vault's URL, e.g. https://vault.vault.svc:8200.
	Address string
	// Mount is the PKI secrets engine's path.
	Mount string
	// Role is the PKI role for sign/:role; with Verbatim it is optional and
	// only lends its issuer, TTL limits and not_before_duration.
	Role string
	// RSARole, if set, signs RSA keys instead of Role, so that their leaves
	// can carry keyEncipherment (a Vault role has one key_usage for all keys).
	RSARole string
	// Verbatim uses sign-verbatim: Vault then copies the CSR's subject and
	// extensions, so only CSRs that already match the granted profile exactly
	// (empty subject, the granted SANs, no other extension) are sent.
	Verbatim bool
	// Issuer is the issuer reference whose chain and root form the trust
	// bundle; it must be the issuer the role signs with.
	Issuer string
	// Auth is how Castellan authenticates to Vault.
	Auth Auth
	// CAFile holds the PEM roots that Vault's TLS certificate chains to;
	// empty means the system roots.
	CAFile string
	// ServerName overrides the name checked in Vault's TLS certificate.
	ServerName string
	// Timeout bounds each call to Vault, retries included.
	Timeout time.Duration
	// RefreshInterval is how often the issuer's chain is re-read, so a new
	// root reaches the trust bundle without a restart.
	RefreshInterval time.Duration
	// OnChange is called (from Run's goroutine) after TrustBundle changed.
	OnChange func()
	// OnTokenRenewed, if set, is called (from Run's goroutine) after each
	// renewal of the token: an event for metrics and tests.
	OnTokenRenewed func()
	// Logger gets renewal and refresh events; never tokens or keys.
	Logger *slog.Logger
}

// Auth configures one authentication method.
type Auth struct {
	// Method is AuthToken, AuthKubernetes or AuthAppRole.
	Method string
	// Mount is the auth method's path; default the method's name.
	Mount string
	// TokenFile holds the token for AuthToken.
	TokenFile string
	// Role is the Vault role for AuthKubernetes and the role ID for AuthAppRole.
	Role string
	// JWTFile is the service-account token for AuthKubernetes.
	JWTFile string
	// SecretIDFile holds the AppRole secret ID.
	SecretIDFile string
}

// Signer is a signer.Signer backed by a Vault PKI mount. It is safe for
// concurrent use; Run keeps its token and trust bundle current.
type Signer struct {
	cfg    Config
	client *api.Client
	log    *slog.Logger

	mu     sync.RWMutex
	issuer *x509.Certificate   // the issuing CA, for clamping NotAfter
	roots  []*x509.Certificate // trust bundle: the self-signed tops of the issuer's chain

	auth     authState
	refreshc chan struct{} // asks Run for an immediate chain refresh
}

var _ signer.Signer = (*Signer)(nil)

// New checks cfg, logs in and reads the issuer's chain, so a misconfiguration
// fails at start-up. Call Run to keep the token and the chain current.
func New(ctx context.Context, cfg Config) (*Signer, error) {
	if err := cfg.fill(); err != nil {
		return nil, fmt.Errorf("vault signer: %w", err)
	}
	client, err := newClient(cfg)
	if err != nil {
		return nil, fmt.Errorf("vault signer: %w", err)
	}
	s := &Signer{cfg: cfg, client: client, log: cfg.Logger, refreshc: make(chan struct{}, 1)}
	s.auth.init()
	lctx, cancel := context.WithTimeout(ctx, cfg.Timeout)
	defer cancel()
	secret, err := s.login(lctx)
	if err != nil {
		return nil, fmt.Errorf("vault signer: %w", err)
	}
	s.auth.set(secret)
	if _, err := s.refresh(ctx); err != nil {
		return nil, fmt.Errorf("vault signer: %w", err)
	}
	return s, nil
}

func (c *Config) fill() error {
	if c.Address == "" {
		return errors.New("address is required")
	}
	if c.Role == "" && !c.Verbatim {
		return errors.New("role is required (or verbatim signing)")
	}
	if c.Mount = strings.Trim(c.Mount, "/"); c.Mount == "" {
		c.Mount = DefaultMount
	}
	if c.Issuer == "" {
		c.Issuer = DefaultIssuer
	}
	if c.Timeout <= 0 {
		c.Timeout = DefaultTimeout
	}
	if c.RefreshInterval <= 0 {
		c.RefreshInterval = DefaultRefreshInterval
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	return c.Auth.fill()
}

// newClient builds the API client from cfg alone: the library's defaults read
// VAULT_* variables (VAULT_SKIP_VERIFY among them), which must not change
// what Castellan trusts behind the operator's back.
func newClient(cfg Config) (*api.Client, error) {
	tlsConf := &tls.Config{MinVersion: tls.VersionTLS12, ServerName: cfg.ServerName}
	if cfg.CAFile != "" {
		pemBytes, err := os.ReadFile(cfg.CAFile)
		if err != nil {
			return nil, fmt.Errorf("CA file: %w", err)
		}
		tlsConf.RootCAs = x509.NewCertPool()
		if !tlsConf.RootCAs.AppendCertsFromPEM(pemBytes) {
			return nil, fmt.Errorf("CA file %s: no PEM certificate", cfg.CAFile)
		}
	}
	tr := http.DefaultTransport.(*http.Transport).Clone()
	tr.TLSClientConfig = tlsConf
	client, err := api.NewClient(&api.Config{
		Address: cfg.Address,
		HttpClient: &http.Client{
			Transport: tr,
			// The API client follows Vault's redirects itself.
			CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
		},
		// Connection failures and 5xx are retried briefly; ctx (Timeout) bounds it all.
		MaxRetries:   2,
		MinRetryWait: 200 * time.Millisecond,
		MaxRetryWait: time.Second,
	})
	if err != nil {
		return nil, err
	}
	client.ClearToken() // NewClient reads VAULT_TOKEN; only Auth decides the token
	client.ClearNamespace()
	return client, nil
}

// Sign asks Vault to sign req's CSR for exactly the granted SANs, with NotAfter
// clamped to the issuing CA's. Outages and Vault's 5xx wrap
// signer.ErrSignerUnavailable; Vault's refusals (4xx) do not, since a retry will
// not change them.
func (s *Signer) Sign(ctx context.Context, req signer.SignRequest) (*signer.Chain, error) {
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("vault signer: %w", err)
	}
	if req.Template == nil || len(req.CSR) == 0 {
		return nil, errors.New("vault signer: template and CSR are required")
	}
	path, body, err := s.request(req)
	if err != nil {
		return nil, fmt.Errorf("vault signer: %w", err)
	}
	secret, err := s.write(ctx, path, body)
	if err != nil {
		return nil, fmt.Errorf("vault signer: sign: %w", err)
	}
	chain, issuer, err := parseSigned(secret)
	if err != nil {
		return nil, fmt.Errorf("vault signer: %s: %w", path, err)
	}
	s.mu.RLock()
	known := s.issuer
	s.mu.RUnlock()
	if known == nil || !bytes.Equal(known.Raw, issuer.Raw) {
		// Vault signed with another CA than the one we know: re-read the chain
		// now rather than at the next poll.
		select {
		case s.refreshc <- struct{}{}:
		default:
		}
	}
	return chain, nil
}

// request builds the sign call for req: the path by mode and key type, and a
// body that names the granted SANs and NotAfter and nothing else.
func (s *Signer) request(req signer.SignRequest) (string, map[string]any, error) {
	tmpl := req.Template
	notAfter := tmpl.NotAfter
	s.mu.RLock()
	if s.issuer != nil && notAfter.After(s.issuer.NotAfter) {
		notAfter = s.issuer.NotAfter
	}
	s.mu.RUnlock()
	csrPEM := string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: req.CSR}))
	body := map[string]any{
		"csr":       csrPEM,
		"not_after": notAfter.UTC().Format(time.RFC3339),
		"format":    "pem",
	}
	role := s.cfg.Role
	if _, isRSA := req.PublicKey.(*rsa.PublicKey); isRSA && s.cfg.RSARole != "" {
		role = s.cfg.RSARole
	}
	if !s.cfg.Verbatim {
		uris := make([]string, len(tmpl.URIs))
		for i, u := range tmpl.URIs {
			uris[i] = u.String()
		}
		body["uri_sans"] = strings.Join(uris, ",")
		body["alt_names"] = strings.Join(tmpl.DNSNames, ",")
		// A CN in the CSR (if the role copies it) must not become a DNS SAN.
		body["exclude_cn_from_sans"] = true
		return s.cfg.Mount + "/sign/" + role, body, nil
	}
	if err := verbatimMatches(req.CSR, tmpl); err != nil {
		return "", nil, err
	}
	body["key_usage"] = keyUsageNames(tmpl.KeyUsage)
	body["ext_key_usage"] = extKeyUsageNames(tmpl.ExtKeyUsage)
	body["basic_constraints_valid_for_non_ca"] = true
	path := s.cfg.Mount + "/sign-verbatim"
	if role != "" {
		path += "/" + role
	}
	return path, body, nil
}

// verbatimMatches refuses a CSR that sign-verbatim would turn into another
// certificate than the template: Vault copies its subject and every extension.
func verbatimMatches(der []byte, tmpl *x509.Certificate) error {
	csr, err := x509.ParseCertificateRequest(der)
	if err != nil {
		return fmt.Errorf("parse CSR: %w", err)
	}
	var csrURIs, tmplURIs []string
	for _, u := range csr.URIs {
		csrURIs = append(csrURIs, u.String())
	}
	for _, u := range tmpl.URIs {
		tmplURIs = append(tmplURIs, u.String())
	}
	switch {
	case len(csr.Subject.Names) != 0:
		return fmt.Errorf("sign-verbatim would copy the CSR subject %q into the certificate; use a role", csr.Subject)
	case !slices.Equal(csrURIs, tmplURIs) || !slices.Equal(csr.DNSNames, tmpl.DNSNames) ||
		len(csr.IPAddresses) != 0 || len(csr.EmailAddresses) != 0:
		return fmt.Errorf("sign-verbatim would copy the CSR SANs (URI %v, DNS %v), not the granted ones (URI %v, DNS %v); use a role",
			csrURIs, csr.DNSNames, tmplURIs, tmpl.DNSNames)
	case len(csr.Extensions) != 1 || !csr.Extensions[0].Critical:
		// With an empty subject the SAN must be critical (RFC 5280), and
		// Vault copies the CSR's extension as it is.
		return errors.New("sign-verbatim would copy the CSR's extensions, which are not exactly one critical SAN; use a role")
	}
	return nil
}

// write performs one authenticated write under Timeout. A 403 with a login
// method means the token expired or was revoked: log in once more and retry.
func (s *Signer) write(ctx context.Context, path string, body map[string]any) (*api.Secret, error) {
	token := s.client.Token()
	secret, err := s.call(ctx, path, func(c context.Context) (*api.Secret, error) {
		return s.client.Logical().WriteWithContext(c, path, body)
	})
	var re *api.ResponseError
	if errors.As(err, &re) && re.StatusCode == http.StatusForbidden {
		if rerr := s.reauth(ctx, token); rerr != nil {
			return nil, fmt.Errorf("%w (log in again: %w)", err, rerr)
		}
		secret, err = s.call(ctx, path, func(c context.Context) (*api.Secret, error) {
			return s.client.Logical().WriteWithContext(c, path, body)
		})
	}
	return secret, err
}

// call runs fn under Timeout and classifies its error: the caller's own
// cancellation stays a context error; no answer, a timeout, 429, 412 (a
// standby not yet caught up) or 5xx wrap signer.ErrSignerUnavailable; other
// answers (4xx: Vault refused) are returned as they are.
func (s *Signer) call(ctx context.Context, what string, fn func(context.Context) (*api.Secret, error)) (*api.Secret, error) {
	cctx, cancel := context.WithTimeout(ctx, s.cfg.Timeout)
	defer cancel()
	secret, err := fn(cctx)
	switch {
	case err == nil && secret == nil:
		return nil, fmt.Errorf("%s: %w: empty response", what, signer.ErrSignerUnavailable)
	case err == nil:
		return secret, nil
	case ctx.Err() != nil:
		return nil, fmt.Errorf("%s: %w", what, ctx.Err())
	}
	var re *api.ResponseError
	if errors.As(err, &re) && re.StatusCode < 500 && re.StatusCode != http.StatusTooManyRequests && re.StatusCode != http.StatusPreconditionFailed {
		return nil, fmt.Errorf("%s: %w", what, err)
	}
	return nil, fmt.Errorf("%s: %w: %w", what, signer.ErrSignerUnavailable, err)
}

// parseSigned reads a sign response: the leaf, the chain Vault reports for
// its issuer (roots dropped: they belong to the bundle, not the chain) and the
// issuing CA.
func parseSigned(secret *api.Secret) (*signer.Chain, *x509.Certificate, error) {
	leafPEM, _ := secret.Data["certificate"].(string)
	certs, err := signer.ParseCertificatesPEM([]byte(leafPEM))
	if err != nil {
		return nil, nil, fmt.Errorf("certificate: %w", err)
	}
	if len(certs) != 1 {
		return nil, nil, fmt.Errorf("certificate holds %d certificates, want 1 (format pem)", len(certs))
	}
	issuingPEM, _ := secret.Data["issuing_ca"].(string)
	issuing, err := signer.ParseCertificatesPEM([]byte(issuingPEM))
	if err != nil {
		return nil, nil, fmt.Errorf("issuing_ca: %w", err)
	}
	chain := issuing[:1]
	if raw, ok := secret.Data["ca_chain"].([]any); ok && len(raw) > 0 {
		if chain, err = pemList(raw); err != nil {
			return nil, nil, fmt.Errorf("ca_chain: %w", err)
		}
	}
	inter, _ := signer.SplitRoots(chain)
	return &signer.Chain{Leaf: certs[0], Intermediates: inter}, issuing[0], nil
}

// pemList parses a JSON list of PEM strings, each holding certificates.
func pemList(raw []any) ([]*x509.Certificate, error) {
	pems := make([]string, len(raw))
	for i, v := range raw {
		p, ok := v.(string)
		if !ok {
			return nil, fmt.Errorf("element %d is %T, want a PEM string", i, v)
		}
		pems[i] = p
	}
	return signer.ParseCertificatesPEMList(pems)
}

// TrustBundle returns the roots of the issuer's chain, as last read from Vault.
func (s *Signer) TrustBundle() []*x509.Certificate {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return slices.Clone(s.roots)
}

// keyUsageNames spells a KeyUsage the way Vault's key_usage parameter takes it.
func keyUsageNames(ku x509.KeyUsage) []string {
	names := []string{"DigitalSignature", "ContentCommitment", "KeyEncipherment", "DataEncipherment",
		"KeyAgreement", "CertSign", "CRLSign", "EncipherOnly", "DecipherOnly"}
	var out []string
	for i, n := range names {
		if ku&(1<<i) != 0 {
			out = append(out, n)
		}
	}
	return out
}

// extKeyUsageNames spells the extended key usages Castellan issues the way
// Vault's ext_key_usage parameter takes them.
func extKeyUsageNames(ekus []x509.ExtKeyUsage) []string {
	var out []string
	for _, u := range ekus {
		switch u {
		case x509.ExtKeyUsageServerAuth:
			out = append(out, "ServerAuth")
		case x509.ExtKeyUsageClientAuth:
			out = append(out, "ClientAuth")
		}
	}
	return out
}
