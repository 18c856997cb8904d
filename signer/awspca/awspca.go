// Package awspca signs workload certificates with AWS Private CA (PCA),
// through the AWS SDK for Go v2 and its standard credential chain (IRSA or
// EKS Pod Identity, environment, shared configuration, instance role).
//
// The identity comes from the grant, never from the CSR. PCA signs the
// caller's CSR (proof of possession) with an API-passthrough template,
// BlankEndEntityCertificate_CriticalBasicConstraints_APIPassthrough/V1 by
// default: the template itself contributes only basic constraints
// (critical, CA:FALSE), and the request's ApiPassthrough states the rest:
//   - Subject O=<trust domain>, from the granted identity (see LeafSubject):
//     without it PCA copies the CSR's subject (pilot-agent's "O=");
//   - the SAN, as a custom extension 2.5.29.17 holding exactly the granted
//     URI (and DNS names for Castellan's own serving certificate), marked
//     critical only when the subject is empty (RFC 5280 4.2.1.6);
//   - key usage, as a critical custom extension 2.5.29.15, and extended key
//     usage (serverAuth, clientAuth).
//
// With the SAN and subject supplied by the API, the CSR's own SAN and subject
// are not copied, which is how a ztunnel CSR (empty subject, non-critical
// SAN; istio#56191) is issued: PCA refuses an empty subject beside a SAN
// that is not critical, and the certificate it signs here has neither. (This
// reading of AWS's documentation is verified against pcatest only; the README
// says what else is.) The issuer re-checks whatever PCA returns
// (ca.CheckIssued).
//
// Issuance is asynchronous in PCA: IssueCertificate returns the
// certificate's ARN, and GetCertificate answers RequestInProgressException
// until it is signed, so Sign polls with the SDK's CertificateIssued waiter
// within Config.Timeout. Each Sign sends an idempotency token derived from
// the issuer's serial, so the SDK's retries issue at most one certificate.
package awspca

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"encoding/base64"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/aws/arn"
	"github.com/aws/aws-sdk-go-v2/service/acmpca"
	"github.com/aws/aws-sdk-go-v2/service/acmpca/types"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/castellan-ca/castellan/signer"
)

// Backend names this signer in audit records and configuration.
const Backend = "awspca"

// Templates Castellan can issue with: blank end-entity API-passthrough
// templates, the only ones that take key usage, extended key usage, subject
// and SAN from the API alone (the EndEntity* templates fix keyEncipherment
// for every key; CSR-passthrough templates would copy the CSR's extensions).
const (
	// TemplateCriticalBasicConstraints marks basic constraints critical, as
	// Castellan's profile does (the default).
	TemplateCriticalBasicConstraints = "BlankEndEntityCertificate_CriticalBasicConstraints_APIPassthrough/V1"
	// TemplateBlank leaves basic constraints non-critical.
	TemplateBlank = "BlankEndEntityCertificate_APIPassthrough/V1"
)

// Defaults of Config.
const (
	DefaultTimeout         = 10 * time.Second
	DefaultRefreshInterval = time.Minute
	DefaultRateLimit       = 20 // calls per second to PCA, every operation counted
	DefaultMaxConcurrent   = 16
	DefaultMaxAttempts     = 3
	// DefaultRetryMaxBackoff caps the SDK's backoff (its own default is
	// 20 s): PCA's quotas are per second, and a client is waiting.
	DefaultRetryMaxBackoff = time.Second
	DefaultPollMinDelay    = 250 * time.Millisecond
	DefaultPollMaxDelay    = 2 * time.Second
)

// Config says which CA signs and how to reach PCA. Zero values get the defaults.
type Config struct {
	// CertificateAuthorityARN is the issuing CA:
	// arn:PARTITION:acm-pca:REGION:ACCOUNT:certificate-authority/ID.
	CertificateAuthorityARN string
	// TemplateARN is the certificate template; empty means
	// TemplateCriticalBasicConstraints in the CA's partition.
	TemplateARN string
	// SigningAlgorithm is PCA's name of the signature algorithm; empty
	// derives it from the CA's key (its family must match the key's).
	SigningAlgorithm string
	// Region is where the CA lives; empty means the ARN's region.
	Region string
	// Endpoint overrides PCA's endpoint URL (a VPC endpoint, tests); empty
	// means the SDK's resolution (AWS_ENDPOINT_URL_ACM_PCA included).
	Endpoint string
	// Timeout bounds one Sign (queueing, issuance, waiting for the
	// certificate) and one refresh, the SDK's retries included.
	Timeout time.Duration
	// RefreshInterval is how often the CA's certificate and chain are re-read.
	RefreshInterval time.Duration
	// RateLimit is the most calls per second to PCA this signer makes
	// (retries and polls included), with a burst of as many; PCA's quotas
	// are per account and region, shared with its other clients.
	RateLimit float64
	// MaxConcurrent is the most Sign calls at PCA at once; more wait for a
	// slot within Timeout, then fail as unavailable.
	MaxConcurrent int
	// MaxLeafLifetime bounds how long a leaf issued under a root may live
	// (the issuer's longest TTL plus its clock skew): a root that left the
	// CA's chain stays in the trust bundle at least that long after.
	MaxLeafLifetime time.Duration
	// Retained are roots kept from an earlier run (see Signer.Retained).
	Retained []RetainedRoot
	// MaxAttempts is the SDK's attempts per call (throttling and outages are retried).
	MaxAttempts int
	// RetryMaxBackoff caps the SDK's backoff between attempts.
	RetryMaxBackoff time.Duration
	// PollMinDelay and PollMaxDelay bound the waiter's GetCertificate polling.
	PollMinDelay, PollMaxDelay time.Duration
	// Credentials replace the SDK's default chain (tests); nil uses it.
	Credentials aws.CredentialsProvider
	// OnChange is called (from Run's goroutine) after TrustBundle changed.
	OnChange func()
	// Logger gets refresh and rotation events.
	Logger *slog.Logger
	// Now is the clock that ages retained roots; nil means time.Now.
	Now func() time.Time
}

// RetainedRoot is a root no longer in the CA's chain, kept in the trust
// bundle until leaves issued under it have expired.
type RetainedRoot struct {
	Cert  *x509.Certificate
	Until time.Time
}

// Signer is a signer.Signer backed by one PCA certificate authority; safe
// for concurrent use. Run keeps its trust bundle current.
type Signer struct {
	cfg      Config
	client   *acmpca.Client
	template string
	log      *slog.Logger
	slots    chan struct{}
	refreshc chan struct{}

	mu       sync.RWMutex
	state    caState
	retained []RetainedRoot       // roots that left the chain, while their leaves live
	lastLeaf map[string]time.Time // latest NotAfter issued under each current root, by DER
}

var (
	_ signer.Signer    = (*Signer)(nil)
	_ signer.Subjecter = (*Signer)(nil)
)

// New checks cfg, builds the client and reads the CA's certificate and chain,
// so that a wrong ARN, region or missing permission fails at start-up.
// Call Run to keep the trust bundle current.
func New(ctx context.Context, cfg Config) (*Signer, error) {
	tmpl, err := cfg.fill()
	if err != nil {
		return nil, fmt.Errorf("aws pca signer: %w", err)
	}
	client, err := newClient(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("aws pca signer: %w", err)
	}
	s := &Signer{cfg: cfg, client: client, template: tmpl, log: cfg.Logger,
		slots: make(chan struct{}, cfg.MaxConcurrent), refreshc: make(chan struct{}, 1),
		lastLeaf: map[string]time.Time{}}
	now := cfg.Now()
	for _, r := range cfg.Retained {
		if r.Cert != nil && r.Until.After(now) {
			s.retain(r.Cert, r.Until)
		}
	}
	if _, err := s.refresh(ctx); err != nil {
		return nil, fmt.Errorf("aws pca signer: %w", err)
	}
	return s, nil
}

// FieldError is a Config check that failed, naming the field.
type FieldError struct {
	Field string
	Err   error
}

// Error names the field and says what is wrong with it.
func (e *FieldError) Error() string { return e.Field + ": " + e.Err.Error() }

// Unwrap returns the check's own error.
func (e *FieldError) Unwrap() error { return e.Err }

// Validate checks the fields that name PCA's resources and algorithms (no
// network): the CA ARN, the template ARN and the signing algorithm. The
// error is a *FieldError.
func (c Config) Validate() error {
	_, err := c.template()
	return err
}

// template checks cfg's names and returns the template ARN to issue with.
func (c Config) template() (string, error) {
	caARN, err := arn.Parse(c.CertificateAuthorityARN)
	if id, ok := strings.CutPrefix(caARN.Resource, "certificate-authority/"); err != nil || caARN.Service != "acm-pca" ||
		caARN.Region == "" || caARN.AccountID == "" || !ok || id == "" || strings.Contains(id, "/") {
		return "", &FieldError{"CertificateAuthorityARN", fmt.Errorf("%q is not a CA ARN (arn:PARTITION:acm-pca:REGION:ACCOUNT:certificate-authority/ID)", c.CertificateAuthorityARN)}
	}
	prefix := "arn:" + caARN.Partition + ":acm-pca:::template/"
	tmpl := c.TemplateARN
	if tmpl == "" {
		tmpl = prefix + TemplateCriticalBasicConstraints
	}
	if name, ok := strings.CutPrefix(tmpl, prefix); !ok || (name != TemplateCriticalBasicConstraints && name != TemplateBlank) {
		return "", &FieldError{"TemplateARN", fmt.Errorf("%q: want %s%s (or %s): only blank API-passthrough end-entity templates let the grant, not the CSR or the template, decide subject, SAN and key usages",
			tmpl, prefix, TemplateCriticalBasicConstraints, TemplateBlank)}
	}
	if c.SigningAlgorithm != "" && !slices.Contains(types.SigningAlgorithm("").Values(), types.SigningAlgorithm(c.SigningAlgorithm)) {
		return "", &FieldError{"SigningAlgorithm", fmt.Errorf("%q is not one of PCA's %v", c.SigningAlgorithm, types.SigningAlgorithm("").Values())}
	}
	return tmpl, nil
}

// fill checks cfg and applies defaults; it returns the template ARN.
func (c *Config) fill() (string, error) {
	tmpl, err := c.template()
	if err != nil {
		return "", err
	}
	if c.Region == "" {
		caARN, _ := arn.Parse(c.CertificateAuthorityARN) // checked by template
		c.Region = caARN.Region
	}
	setDefault := func(v *time.Duration, d time.Duration) {
		if *v <= 0 {
			*v = d
		}
	}
	setDefault(&c.Timeout, DefaultTimeout)
	setDefault(&c.RefreshInterval, DefaultRefreshInterval)
	setDefault(&c.PollMinDelay, DefaultPollMinDelay)
	setDefault(&c.PollMaxDelay, DefaultPollMaxDelay)
	setDefault(&c.RetryMaxBackoff, DefaultRetryMaxBackoff)
	if c.PollMaxDelay < c.PollMinDelay {
		c.PollMaxDelay = c.PollMinDelay
	}
	if c.RateLimit <= 0 {
		c.RateLimit = DefaultRateLimit
	}
	if c.MaxConcurrent <= 0 {
		c.MaxConcurrent = DefaultMaxConcurrent
	}
	if c.MaxAttempts <= 0 {
		c.MaxAttempts = DefaultMaxAttempts
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	if c.Now == nil {
		c.Now = time.Now
	}
	return tmpl, nil
}

// LeafSubject is the subject of workload leaves: O=<trust domain>. It
// replaces whatever subject the CSR carries (PCA would copy it), and makes
// the certificate's subject non-empty, so PCA's rule that an empty subject
// needs a critical SAN never depends on the caller's CSR.
func (s *Signer) LeafSubject(id spiffeid.ID) pkix.Name {
	return pkix.Name{Organization: []string{id.TrustDomain().Name()}}
}

// Sign issues a certificate for exactly the template's subject, SANs, usages
// and validity (NotAfter clamped to the CA's), waits until PCA has signed it
// and returns it with its chain; Chain.BackendRef is its ARN. Throttling,
// outages, PCA's 5xx and running out of Timeout wrap
// signer.ErrSignerUnavailable; PCA's refusals do not, and a key PCA cannot
// certify wraps signer.ErrUnsupportedKey.
func (s *Signer) Sign(ctx context.Context, req signer.SignRequest) (*signer.Chain, error) {
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("aws pca signer: %w", err)
	}
	if req.Template == nil || req.PublicKey == nil || len(req.CSR) == 0 {
		return nil, errors.New("aws pca signer: template, public key and CSR are required")
	}
	if err := supportedKey(req.PublicKey); err != nil {
		return nil, fmt.Errorf("aws pca signer: %w", err)
	}
	in, err := s.issueInput(req)
	if err != nil {
		return nil, fmt.Errorf("aws pca signer: %w", err)
	}
	cctx, cancel := context.WithTimeout(ctx, s.cfg.Timeout)
	defer cancel()
	select {
	case s.slots <- struct{}{}:
		defer func() { <-s.slots }()
	case <-cctx.Done():
		return nil, fmt.Errorf("aws pca signer: %d requests already at PCA: %w", cap(s.slots), classify(ctx, cctx.Err()))
	}
	out, err := s.client.IssueCertificate(cctx, in)
	if err != nil {
		return nil, fmt.Errorf("aws pca signer: issue certificate: %w", classify(ctx, err))
	}
	certARN := aws.ToString(out.CertificateArn)
	chain, root, err := s.await(cctx, certARN)
	if err != nil {
		// Named, so the audit record shows which certificate PCA may still
		// sign without it ever reaching a client.
		return nil, fmt.Errorf("aws pca signer: certificate %s: %w", certARN, classify(ctx, err))
	}
	if !s.observeLeaf(root, chain.Leaf.NotAfter) {
		s.wakeRefresh()
		return nil, fmt.Errorf("aws pca signer: certificate %s chains to root %q, which is not in the trust bundle yet (the CA's chain is being re-read): %w",
			certARN, root.Subject.String(), signer.ErrSignerUnavailable)
	}
	chain.BackendRef = certARN
	return chain, nil
}

// issueInput translates req into an IssueCertificate request: the caller's
// CSR for its key, and the whole profile through ApiPassthrough.
func (s *Signer) issueInput(req signer.SignRequest) (*acmpca.IssueCertificateInput, error) {
	tmpl := req.Template
	st := s.current()
	notAfter := tmpl.NotAfter
	if notAfter.After(st.issuing.NotAfter) {
		notAfter = st.issuing.NotAfter
	}
	ext, err := extensions(tmpl)
	if err != nil {
		return nil, err
	}
	api := &types.ApiPassthrough{Extensions: ext}
	if len(tmpl.Subject.ToRDNSequence()) > 0 {
		if api.Subject, err = asn1Subject(tmpl.Subject); err != nil {
			return nil, err
		}
	}
	// Unique per request (the issuer's serial is random) and the same on the
	// SDK's retries: PCA issues once per token within five minutes.
	token := sha256.Sum256(tmpl.SerialNumber.Bytes())
	return &acmpca.IssueCertificateInput{
		CertificateAuthorityArn: aws.String(s.cfg.CertificateAuthorityARN),
		Csr:                     pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: req.CSR}),
		SigningAlgorithm:        st.sigAlg,
		TemplateArn:             aws.String(s.template),
		Validity:                &types.Validity{Type: types.ValidityPeriodTypeAbsolute, Value: aws.Int64(notAfter.Unix())},
		ValidityNotBefore:       &types.Validity{Type: types.ValidityPeriodTypeAbsolute, Value: aws.Int64(tmpl.NotBefore.Unix())},
		IdempotencyToken:        aws.String(hex.EncodeToString(token[:16])),
		ApiPassthrough:          api,
	}, nil
}

var (
	oidSubjectAltName = asn1.ObjectIdentifier{2, 5, 29, 17}
	oidKeyUsage       = asn1.ObjectIdentifier{2, 5, 29, 15}
)

// extensions states the template's SAN, key usage and extended key usage.
func extensions(tmpl *x509.Certificate) (*types.Extensions, error) {
	if len(tmpl.IPAddresses)+len(tmpl.EmailAddresses) > 0 || len(tmpl.DNSNames)+len(tmpl.URIs) == 0 {
		return nil, errors.New("the profile must name DNS or URI SANs only")
	}
	var names []asn1.RawValue
	for _, n := range tmpl.DNSNames {
		names = append(names, asn1.RawValue{Class: asn1.ClassContextSpecific, Tag: 2, Bytes: []byte(n)})
	}
	for _, u := range tmpl.URIs {
		names = append(names, asn1.RawValue{Class: asn1.ClassContextSpecific, Tag: 6, Bytes: []byte(u.String())})
	}
	san, err := asn1.Marshal(names)
	if err != nil {
		return nil, fmt.Errorf("encode SAN: %w", err)
	}
	ku, err := keyUsageValue(tmpl.KeyUsage)
	if err != nil {
		return nil, err
	}
	var ekus []types.ExtendedKeyUsage
	for _, u := range tmpl.ExtKeyUsage {
		switch u {
		case x509.ExtKeyUsageServerAuth:
			ekus = append(ekus, types.ExtendedKeyUsage{ExtendedKeyUsageType: types.ExtendedKeyUsageTypeServerAuth})
		case x509.ExtKeyUsageClientAuth:
			ekus = append(ekus, types.ExtendedKeyUsage{ExtendedKeyUsageType: types.ExtendedKeyUsageTypeClientAuth})
		default:
			return nil, fmt.Errorf("extended key usage %v is not part of Castellan's profiles", u)
		}
	}
	emptySubject := len(tmpl.Subject.ToRDNSequence()) == 0
	return &types.Extensions{
		ExtendedKeyUsage: ekus,
		CustomExtensions: []types.CustomExtension{
			{ObjectIdentifier: aws.String(oidSubjectAltName.String()), Value: aws.String(base64.StdEncoding.EncodeToString(san)), Critical: aws.Bool(emptySubject)},
			{ObjectIdentifier: aws.String(oidKeyUsage.String()), Value: aws.String(base64.StdEncoding.EncodeToString(ku)), Critical: aws.Bool(true)},
		},
	}, nil
}

// keyUsageValue encodes a KeyUsage extension's value: a BIT STRING whose bit
// i is usage 1<<i, without trailing zero bits (DER).
func keyUsageValue(ku x509.KeyUsage) ([]byte, error) {
	if ku == 0 || ku >= 1<<9 {
		return nil, fmt.Errorf("key usage %b is not encodable", ku)
	}
	var b [2]byte
	bits := 0
	for i := range 9 {
		if ku&(1<<i) != 0 {
			b[i/8] |= 0x80 >> (i % 8)
			bits = i + 1
		}
	}
	return asn1.Marshal(asn1.BitString{Bytes: b[:(bits+7)/8], BitLength: bits})
}

// asn1Subject translates the subject attributes Castellan sets.
func asn1Subject(n pkix.Name) (*types.ASN1Subject, error) {
	one := func(attr string, vs []string) (*string, error) {
		switch len(vs) {
		case 0:
			return nil, nil
		case 1:
			if len(vs[0]) == 0 || len(vs[0]) > 64 {
				return nil, fmt.Errorf("subject %s %q must be 1 to 64 characters", attr, vs[0])
			}
			return aws.String(vs[0]), nil
		}
		return nil, fmt.Errorf("subject has %d %s attributes, PCA takes one", len(vs), attr)
	}
	if len(n.ExtraNames)+len(n.Country)+len(n.Province)+len(n.Locality)+len(n.StreetAddress)+len(n.PostalCode) > 0 || n.SerialNumber != "" {
		return nil, fmt.Errorf("subject %q has attributes beyond O, OU and CN", n)
	}
	var out types.ASN1Subject
	var err error
	if out.Organization, err = one("O", n.Organization); err != nil {
		return nil, err
	}
	if out.OrganizationalUnit, err = one("OU", n.OrganizationalUnit); err != nil {
		return nil, err
	}
	if n.CommonName != "" {
		if out.CommonName, err = one("CN", []string{n.CommonName}); err != nil {
			return nil, err
		}
	}
	return &out, nil
}

// supportedKey accepts the keys PCA certifies: RSA 2048/3072/4096 and ECDSA
// P-256/P-384/P-521 (its supported key algorithms). Castellan also accepts
// Ed25519 and other RSA sizes, which this backend must refuse.
func supportedKey(pub crypto.PublicKey) error {
	switch k := pub.(type) {
	case *rsa.PublicKey:
		if n := k.N.BitLen(); n == 2048 || n == 3072 || n == 4096 {
			return nil
		}
		return fmt.Errorf("%w: RSA-%d (AWS Private CA certifies RSA 2048, 3072 and 4096)", signer.ErrUnsupportedKey, k.N.BitLen())
	case *ecdsa.PublicKey:
		if k.Curve == elliptic.P256() || k.Curve == elliptic.P384() || k.Curve == elliptic.P521() {
			return nil
		}
		return fmt.Errorf("%w: ECDSA %s", signer.ErrUnsupportedKey, k.Curve.Params().Name)
	}
	return fmt.Errorf("%w: %T (AWS Private CA certifies RSA and ECDSA keys only)", signer.ErrUnsupportedKey, pub)
}
