package main

import (
	"bytes"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"strings"
	"time"

	"github.com/castellan-ca/castellan/authn"
	"github.com/castellan-ca/castellan/ca"
	"github.com/castellan-ca/castellan/ca/rotation"
	"github.com/castellan-ca/castellan/cmd/internal/datadir"
	"github.com/castellan-ca/castellan/internal/keyfile"
	"github.com/castellan-ca/castellan/signer"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"gopkg.in/yaml.v3"
)

// Config is everything `castellan serve` can be told, as YAML keys (--config)
// and flags of the same meaning. Flags override the file; defaults run without either.
type Config struct {
	TrustDomain      string        `yaml:"trustDomain"`
	Listen           string        `yaml:"listen"`
	MonitoringListen string        `yaml:"monitoringListen"`
	DataDir          string        `yaml:"dataDir"`
	ServingDNSNames  []string      `yaml:"servingDNSNames"`
	ServingCertTTL   time.Duration `yaml:"servingCertTTL"`
	Signer           string        `yaml:"signer"`
	CACertsDir       string        `yaml:"cacertsDir"`
	CACertsPoll      time.Duration `yaml:"cacertsPollInterval"`
	RootKeyType      string        `yaml:"rootKeyType"`
	RootLifetime     time.Duration `yaml:"rootLifetime"`
	DefaultTTL       time.Duration `yaml:"defaultTTL"`
	MaxTTL           time.Duration `yaml:"maxTTL"`
	TTLPolicy        string        `yaml:"ttlPolicy"`
	ClockSkew        time.Duration `yaml:"clockSkew"`
	MaxInFlight      int           `yaml:"maxInFlight"`
	MaxRecvBytes     int           `yaml:"maxRecvBytes"`
	AuditTimeout     time.Duration `yaml:"auditTimeout"`
	OperatorCertTTL  time.Duration `yaml:"operatorCertTTL"`
	LogLevel         string        `yaml:"logLevel"`
	LogFormat        string        `yaml:"logFormat"`
	// DebugPprof serves net/http/pprof on the monitoring listener (off by default).
	DebugPprof bool `yaml:"debugPprof"`
	// OIDC lists the token issuers accepted besides Kubernetes; file only (no flags).
	OIDC authn.OIDCConfig `yaml:"oidc"`
	// KubeConfig holds the Kubernetes keys (kube.go), at the top level of the file.
	KubeConfig `yaml:",inline"`
	// AuditConfig holds the audit store keys (audit.go), at the top level of the file.
	AuditConfig `yaml:",inline"`
	// RotationConfig holds the CA rotation keys (rotation.go), at the top level of the file.
	RotationConfig `yaml:",inline"`
	// LimitsConfig holds the limits on peers and callers (limits.go), at the top level of the file.
	LimitsConfig `yaml:",inline"`
	// KeysConfig holds the key provider keys (keys.go), at the top level of the file.
	KeysConfig `yaml:",inline"`
	// Vault, GoogleCAS and AWSPCA configure those signers (remote_signers.go, awspca.go).
	Vault     VaultConfig     `yaml:"vault"`
	GoogleCAS GoogleCASConfig `yaml:"googleCAS"`
	AWSPCA    AWSPCAConfig    `yaml:"awsPCA"`
}

// defaults returns the configuration used when nothing is set.
func defaults() Config {
	return Config{
		TrustDomain:      "cluster.local",
		Listen:           ":15012",
		MonitoringListen: ":15014",
		DataDir:          datadir.Default(),
		ServingDNSNames:  []string{"istiod.istio-system.svc", "castellan.castellan-system.svc", "localhost"},
		ServingCertTTL:   24 * time.Hour,
		Signer:           "selfsigned",
		CACertsPoll:      5 * time.Second,
		RootKeyType:      "ecdsa-p256",
		RootLifetime:     rotation.DefaultRootLifetime,
		DefaultTTL:       ca.DefaultTTL,
		MaxTTL:           ca.DefaultMaxTTL,
		TTLPolicy:        string(ca.TTLRefuse),
		ClockSkew:        signer.DefaultClockSkew,
		MaxInFlight:      512,
		MaxRecvBytes:     64 << 10,
		AuditTimeout:     5 * time.Second,
		OperatorCertTTL:  365 * 24 * time.Hour,
		LogLevel:         "info",
		LogFormat:        "text",
		KubeConfig:       kubeDefaults(),
		AuditConfig:      auditDefaults(),
		RotationConfig:   rotationDefaults(),
		LimitsConfig:     limitsDefaults(),
		Vault:            vaultDefaults(),
		GoogleCAS:        googleCASDefaults(),
		AWSPCA:           awsPCADefaults(),
	}
}

// listFlag is a comma-separated string list flag.
type listFlag struct{ p *[]string }

func (l listFlag) String() string {
	if l.p == nil {
		return ""
	}
	return strings.Join(*l.p, ",")
}

func (l listFlag) Set(s string) error {
	*l.p = nil
	for _, v := range strings.Split(s, ",") {
		if v = strings.TrimSpace(v); v != "" {
			*l.p = append(*l.p, v)
		}
	}
	return nil
}

// bindFlags registers one flag per key, writing into c.
func bindFlags(fs *flag.FlagSet, c *Config) {
	fs.String("config", "", "YAML configuration file (keys as in the README); flags override it")
	fs.StringVar(&c.TrustDomain, "trust-domain", c.TrustDomain, "SPIFFE trust domain of issued identities")
	fs.StringVar(&c.Listen, "listen", c.Listen, "gRPC (TLS) listen address")
	fs.StringVar(&c.MonitoringListen, "monitoring-listen", c.MonitoringListen, "HTTP listen address for /metrics, /healthz, /readyz")
	fs.StringVar(&c.DataDir, "data-dir", c.DataDir, "directory for everything the server persists")
	fs.Var(listFlag{&c.ServingDNSNames}, "serving-dns-names", "comma-separated DNS SANs of the serving certificate")
	fs.DurationVar(&c.ServingCertTTL, "serving-cert-ttl", c.ServingCertTTL, "lifetime of the serving certificate (renewed at two thirds)")
	fs.StringVar(&c.Signer, "signer", c.Signer, "signing backend: selfsigned | intermediate | vault | googlecas | awspca | kubernetes")
	fs.StringVar(&c.CACertsDir, "cacerts-dir", c.CACertsDir, "intermediate CA directory (Istio cacerts or kubernetes.io/tls layout)")
	fs.DurationVar(&c.CACertsPoll, "cacerts-poll-interval", c.CACertsPoll, "how often --cacerts-dir is checked for changes")
	fs.StringVar(&c.RootKeyType, "root-key-type", c.RootKeyType, "key type of a generated self-signed root: ecdsa-p256 | ecdsa-p384 | rsa-2048 | rsa-3072 | rsa-4096")
	fs.DurationVar(&c.RootLifetime, "root-lifetime", c.RootLifetime, "lifetime of a generated self-signed root")
	fs.DurationVar(&c.DefaultTTL, "default-ttl", c.DefaultTTL, "workload certificate lifetime when the client asks for none")
	fs.DurationVar(&c.MaxTTL, "max-ttl", c.MaxTTL, "longest workload certificate lifetime")
	fs.StringVar(&c.TTLPolicy, "ttl-policy", c.TTLPolicy, "requests above --max-ttl: refuse | clamp")
	fs.DurationVar(&c.ClockSkew, "clock-skew", c.ClockSkew, "NotBefore backdating allowed for clock skew")
	fs.IntVar(&c.MaxInFlight, "max-in-flight", c.MaxInFlight, "concurrent CSRs before new ones get ResourceExhausted")
	fs.IntVar(&c.MaxRecvBytes, "max-recv-bytes", c.MaxRecvBytes, "largest gRPC request accepted")
	fs.DurationVar(&c.AuditTimeout, "audit-timeout", c.AuditTimeout, "how long an audit write may take before the request fails with Unavailable")
	fs.DurationVar(&c.OperatorCertTTL, "operator-cert-ttl", c.OperatorCertTTL, "lifetime of the castellanctl operator credential")
	fs.StringVar(&c.LogLevel, "log-level", c.LogLevel, "debug | info | warn | error")
	fs.StringVar(&c.LogFormat, "log-format", c.LogFormat, "text | json")
	fs.BoolVar(&c.DebugPprof, "debug-pprof", c.DebugPprof, "serve Go's /debug/pprof/ profiles on the monitoring listener (keep it off where that listener is reachable by others)")
	bindKubeFlags(fs, &c.KubeConfig)
	bindAuditFlags(fs, &c.AuditConfig)
	bindRotationFlags(fs, &c.RotationConfig)
	bindLimitFlags(fs, &c.LimitsConfig)
	bindKeyFlags(fs, &c.KeysConfig)
	bindRemoteSignerFlags(fs, &c.Vault, &c.GoogleCAS)
	bindAWSPCAFlags(fs, &c.AWSPCA)
}

// loadConfig applies defaults, then the --config file (strict: unknown keys
// fail), then flags, then validates.
func loadConfig(args []string) (Config, error) {
	c := defaults()
	if path := configPath(args); path != "" {
		b, err := os.ReadFile(path) //nolint:gosec // G703: the path is the operator's own --config flag, read with the operator's rights; no request reaches it
		if err != nil {
			return c, fmt.Errorf("config: %w", err)
		}
		dec := yaml.NewDecoder(bytes.NewReader(b))
		dec.KnownFields(true)
		// An empty file (io.EOF) means all defaults.
		if err := dec.Decode(&c); err != nil && !errors.Is(err, io.EOF) {
			return c, fmt.Errorf("config %s: %w", path, err)
		}
	}
	fs := flag.NewFlagSet("castellan serve", flag.ContinueOnError)
	bindFlags(fs, &c)
	if err := fs.Parse(args); err != nil {
		return c, err
	}
	if fs.NArg() > 0 {
		return c, fmt.Errorf("unexpected arguments: %v", fs.Args())
	}
	return c, c.Validate()
}

// configPath finds --config before the flag set exists, since the file's
// values must be in place before flags override them.
func configPath(args []string) string {
	for i, a := range args {
		for _, p := range []string{"--config", "-config"} {
			if a == p && i+1 < len(args) {
				return args[i+1]
			}
			if v, ok := strings.CutPrefix(a, p+"="); ok {
				return v
			}
		}
	}
	return ""
}

// Validate checks every key, naming the one that is wrong.
func (c Config) Validate() error {
	var errs []error
	bad := func(key string, format string, a ...any) {
		errs = append(errs, fmt.Errorf("%s: %s", key, fmt.Sprintf(format, a...)))
	}
	if _, err := spiffeid.TrustDomainFromString(c.TrustDomain); err != nil {
		bad("trustDomain", "%v", err)
	}
	for key, addr := range map[string]string{"listen": c.Listen, "monitoringListen": c.MonitoringListen} {
		if _, _, err := net.SplitHostPort(addr); err != nil {
			bad(key, "%v", err)
		}
	}
	if c.DataDir == "" {
		bad("dataDir", "must be set")
	}
	if len(c.ServingDNSNames) == 0 {
		bad("servingDNSNames", "at least one name is required")
	}
	switch c.Signer {
	case "selfsigned":
		if err := keyfile.CheckKeyType(c.RootKeyType); err != nil {
			bad("rootKeyType", "%v", err)
		}
	case "intermediate":
		if c.CACertsDir == "" {
			bad("cacertsDir", "required with signer intermediate")
		}
	case "vault":
		c.Vault.validate(bad)
	case "googlecas":
		c.GoogleCAS.validate(bad)
	case "awspca":
		c.AWSPCA.validate(bad, c.TrustDomain)
	case "kubernetes":
		c.KubernetesSigner.validate(bad)
	default:
		bad("signer", "%q is not one of selfsigned, intermediate, vault, googlecas, awspca, kubernetes", c.Signer)
	}
	switch ca.TTLMode(c.TTLPolicy) {
	case ca.TTLRefuse, ca.TTLClamp:
	default:
		bad("ttlPolicy", "%q is not refuse or clamp", c.TTLPolicy)
	}
	for key, d := range map[string]time.Duration{"servingCertTTL": c.ServingCertTTL, "rootLifetime": c.RootLifetime,
		"defaultTTL": c.DefaultTTL, "maxTTL": c.MaxTTL, "auditTimeout": c.AuditTimeout, "operatorCertTTL": c.OperatorCertTTL,
		"cacertsPollInterval": c.CACertsPoll} {
		if d <= 0 {
			bad(key, "must be positive, got %s", d)
		}
	}
	if c.DefaultTTL > c.MaxTTL {
		bad("defaultTTL", "%s is above maxTTL %s", c.DefaultTTL, c.MaxTTL)
	}
	if c.ClockSkew < 0 || c.ClockSkew > time.Hour {
		bad("clockSkew", "must be between 0 and 1h")
	}
	if c.MaxInFlight <= 0 {
		bad("maxInFlight", "must be positive")
	}
	if c.MaxRecvBytes < 4<<10 {
		bad("maxRecvBytes", "must be at least 4096")
	}
	switch c.LogLevel {
	case "debug", "info", "warn", "error":
	default:
		bad("logLevel", "%q is not debug, info, warn or error", c.LogLevel)
	}
	if c.LogFormat != "text" && c.LogFormat != "json" {
		bad("logFormat", "%q is not text or json", c.LogFormat)
	}
	c.KubeConfig.validate(bad)
	c.AuditConfig.validate(bad)
	c.RotationConfig.validate(bad, c)
	c.LimitsConfig.validate(bad, c)
	c.KeysConfig.validate(bad, c)
	if err := c.OIDC.Validate(); err != nil {
		errs = append(errs, err) // names its own keys (oidc.issuers[i].…)
	}
	return errors.Join(errs...)
}
