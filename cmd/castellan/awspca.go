package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io/fs"
	"log/slog"
	"net/url"
	"os"
	"path/filepath"
	"time"

	"github.com/castellan-ca/castellan/ca"
	"github.com/castellan-ca/castellan/internal/atomicfile"
	"github.com/castellan-ca/castellan/signer"
	"github.com/castellan-ca/castellan/signer/awspca"
)

// AWSPCAConfig is the `awsPCA:` section, used with signer awspca.
type AWSPCAConfig struct {
	CertificateAuthorityARN string        `yaml:"certificateAuthorityARN"`
	TemplateARN             string        `yaml:"templateARN"`
	SigningAlgorithm        string        `yaml:"signingAlgorithm"`
	Region                  string        `yaml:"region"`
	Endpoint                string        `yaml:"endpoint"`
	Insecure                bool          `yaml:"insecure"`
	Timeout                 time.Duration `yaml:"timeout"`
	RefreshInterval         time.Duration `yaml:"refreshInterval"`
	RateLimit               float64       `yaml:"rateLimit"`
	MaxConcurrent           int           `yaml:"maxConcurrent"`
}

// awsPCARetainedFile, in dataDir, keeps the roots that left the CA's chain
// while leaves issued under them live, across restarts.
const awsPCARetainedFile = "awspca-retained-roots.json"

func awsPCADefaults() AWSPCAConfig {
	return AWSPCAConfig{Timeout: awspca.DefaultTimeout, RefreshInterval: awspca.DefaultRefreshInterval,
		RateLimit: awspca.DefaultRateLimit, MaxConcurrent: awspca.DefaultMaxConcurrent}
}

// bindAWSPCAFlags registers the aws-pca-* flags.
func bindAWSPCAFlags(fs *flag.FlagSet, p *AWSPCAConfig) {
	fs.StringVar(&p.CertificateAuthorityARN, "aws-pca-certificate-authority-arn", p.CertificateAuthorityARN, "AWS Private CA that signs: arn:aws:acm-pca:REGION:ACCOUNT:certificate-authority/ID")
	fs.StringVar(&p.TemplateARN, "aws-pca-template-arn", p.TemplateARN, "certificate template (default: the CA partition's "+awspca.TemplateCriticalBasicConstraints+")")
	fs.StringVar(&p.SigningAlgorithm, "aws-pca-signing-algorithm", p.SigningAlgorithm, "PCA signing algorithm, e.g. SHA256WITHECDSA (default: from the CA's key)")
	fs.StringVar(&p.Region, "aws-pca-region", p.Region, "region of the CA (default: the ARN's)")
	fs.StringVar(&p.Endpoint, "aws-pca-endpoint", p.Endpoint, "PCA endpoint URL, e.g. a VPC endpoint (default: the SDK's)")
	fs.BoolVar(&p.Insecure, "aws-pca-insecure", p.Insecure, "FOR TESTS ONLY: allow an http:// --aws-pca-endpoint")
	fs.DurationVar(&p.Timeout, "aws-pca-timeout", p.Timeout, "bound on one signing (issue, then wait for the certificate) and one CA refresh, retries included")
	fs.DurationVar(&p.RefreshInterval, "aws-pca-refresh-interval", p.RefreshInterval, "how often the CA's certificate and chain are re-read")
	fs.Float64Var(&p.RateLimit, "aws-pca-rate-limit", p.RateLimit, "most calls per second to PCA (all operations, retries and polls included)")
	fs.IntVar(&p.MaxConcurrent, "aws-pca-max-concurrent", p.MaxConcurrent, "most signings at PCA at once")
}

// validate checks the `awsPCA:` keys; only called with signer awspca.
func (p AWSPCAConfig) validate(bad func(key, format string, a ...any), trustDomain string) {
	if p.CertificateAuthorityARN == "" {
		bad("awsPCA.certificateAuthorityARN", "required with signer awspca")
	} else if err := (awspca.Config{CertificateAuthorityARN: p.CertificateAuthorityARN, TemplateARN: p.TemplateARN,
		SigningAlgorithm: p.SigningAlgorithm}).Validate(); err != nil {
		key := "awsPCA"
		var fe *awspca.FieldError
		if errors.As(err, &fe) {
			key = map[string]string{"CertificateAuthorityARN": "awsPCA.certificateAuthorityARN", "TemplateARN": "awsPCA.templateARN",
				"SigningAlgorithm": "awsPCA.signingAlgorithm"}[fe.Field]
			err = fe.Err
		}
		bad(key, "%v", err)
	}
	if p.Endpoint != "" {
		u, err := url.Parse(p.Endpoint)
		switch {
		case err != nil || u.Host == "" || (u.Scheme != "https" && u.Scheme != "http"):
			bad("awsPCA.endpoint", "%q is not an http(s) URL", p.Endpoint)
		case u.Scheme == "http" && !p.Insecure:
			bad("awsPCA.endpoint", "%q is plaintext: PCA's answers (the CA chain that becomes the trust bundle) need https", p.Endpoint)
		}
	}
	if p.Insecure && p.Endpoint == "" {
		bad("awsPCA.insecure", "needs awsPCA.endpoint (it is for a test server)")
	}
	if p.Timeout <= 0 || p.RefreshInterval <= 0 {
		bad("awsPCA.timeout", "awsPCA.timeout and awsPCA.refreshInterval must be positive")
	}
	if p.RateLimit <= 0 {
		bad("awsPCA.rateLimit", "must be positive")
	}
	if p.MaxConcurrent <= 0 {
		bad("awsPCA.maxConcurrent", "must be positive")
	}
	// Leaves carry O=<trust domain>; PCA takes at most 64 characters there.
	if len(trustDomain) > 64 {
		bad("trustDomain", "signer awspca puts it in the subject's O attribute, which holds at most 64 characters; %q has %d", trustDomain, len(trustDomain))
	}
}

// startAWSPCA signs through an AWS Private CA and keeps the trust bundle
// following its chain, in c. Roots the signer retains for live leaves are
// kept in dataDir across restarts.
func startAWSPCA(ctx context.Context, c *component, cfg Config, authority *ca.Authority, audit *ca.Auditor, logger *slog.Logger) error {
	p := cfg.AWSPCA
	retainedFile := filepath.Join(cfg.DataDir, awsPCARetainedFile)
	retained, err := loadRetainedRoots(retainedFile)
	if err != nil {
		// Losing them only shrinks the bundle to PCA's current chain.
		logger.Error("aws pca: retained roots unreadable; the trust bundle starts from the CA's current chain", "file", retainedFile, "error", err)
	}
	if p.Insecure {
		logger.Warn("aws pca: plaintext endpoint (awsPCA.insecure): for tests only", "endpoint", p.Endpoint)
	}
	var s *awspca.Signer
	s, err = awspca.New(ctx, awspca.Config{
		CertificateAuthorityARN: p.CertificateAuthorityARN, TemplateARN: p.TemplateARN, SigningAlgorithm: p.SigningAlgorithm,
		Region: p.Region, Endpoint: p.Endpoint, Timeout: p.Timeout, RefreshInterval: p.RefreshInterval,
		RateLimit: p.RateLimit, MaxConcurrent: p.MaxConcurrent, Retained: retained, Logger: logger,
		// Every certificate Castellan issues chains to the CA's root.
		MaxLeafLifetime: max(cfg.MaxTTL, cfg.OperatorCertTTL, cfg.ServingCertTTL) + cfg.ClockSkew,
		OnChange: func() {
			if err := saveRetainedRoots(retainedFile, s.Retained()); err != nil {
				logger.Error("aws pca: cannot keep the retained roots for the next start", "file", retainedFile, "error", err)
			}
			// The signer retains old roots itself, only while their leaves live.
			reuseSigner(c.ctx, authority, audit, logger, awspca.Backend, s, "AWS Private CA "+p.CertificateAuthorityARN+" chain changed", nil)
		},
	})
	if err != nil {
		return err
	}
	if err := saveRetainedRoots(retainedFile, s.Retained()); err != nil {
		logger.Error("aws pca: cannot keep the retained roots for the next start", "file", retainedFile, "error", err)
	}
	if _, err := authority.Use(awspca.Backend, s); err != nil {
		return err
	}
	c.Go(func(ctx context.Context) error { s.Run(ctx); return nil })
	return nil
}

// retainedRoot is one retained root on disk.
type retainedRoot struct {
	Root  string    `json:"root"` // PEM
	Until time.Time `json:"until"`
}

// loadRetainedRoots reads the retained roots; a missing file is none.
func loadRetainedRoots(path string) ([]awspca.RetainedRoot, error) {
	b, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var onDisk []retainedRoot
	if err := json.Unmarshal(b, &onDisk); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	out := make([]awspca.RetainedRoot, 0, len(onDisk))
	for i, r := range onDisk {
		certs, err := signer.ParseCertificatesPEM([]byte(r.Root))
		if err != nil {
			return nil, fmt.Errorf("%s: root %d: %w", path, i, err)
		}
		if len(certs) != 1 {
			return nil, fmt.Errorf("%s: root %d: want one PEM certificate, got %d", path, i, len(certs))
		}
		out = append(out, awspca.RetainedRoot{Cert: certs[0], Until: r.Until})
	}
	return out, nil
}

// saveRetainedRoots replaces the file with roots (public certificates only).
func saveRetainedRoots(path string, roots []awspca.RetainedRoot) error {
	onDisk := make([]retainedRoot, 0, len(roots))
	for _, r := range roots {
		onDisk = append(onDisk, retainedRoot{Root: signer.EncodePEM(r.Cert), Until: r.Until.UTC()})
	}
	b, err := json.MarshalIndent(onDisk, "", "  ")
	if err != nil {
		return err
	}
	return atomicfile.Write(path, append(b, '\n'), 0o644)
}
