package pcatest

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha1"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"net/url"
	"strings"
	"testing"
	"time"
	"unicode"
)

// IssueRequest is an IssueCertificate request, field for field as PCA's API
// reference names them. The fake decodes strictly: a field it does not
// model is an error, not silently ignored.
type IssueRequest struct {
	CertificateAuthorityArn string
	Csr                     []byte
	SigningAlgorithm        string
	TemplateArn             string
	Validity                *Validity
	ValidityNotBefore       *Validity
	IdempotencyToken        string
	APIPassthrough          *APIPassthrough `json:"ApiPassthrough"`
}

// Validity is PCA's Validity: Type ABSOLUTE (Unix seconds), END_DATE
// (YYYYMMDDHHMMSS), DAYS, MONTHS or YEARS.
type Validity struct {
	Type  string
	Value int64
}

// APIPassthrough is IssueCertificate's ApiPassthrough.
type APIPassthrough struct {
	Subject    *Subject
	Extensions *Extensions
}

// Subject is PCA's ASN1Subject (the attributes the fake models).
type Subject struct {
	CommonName, Country, Organization, OrganizationalUnit, State, Locality, SerialNumber string
}

// Extensions is PCA's Extensions (CertificatePolicies is not modeled).
type Extensions struct {
	KeyUsage                *KeyUsage
	ExtendedKeyUsage        []ExtendedKeyUsage
	SubjectAlternativeNames []GeneralName
	CustomExtensions        []CustomExtension
}

// KeyUsage is PCA's KeyUsage.
type KeyUsage struct {
	DigitalSignature, NonRepudiation, KeyEncipherment, DataEncipherment, KeyAgreement,
	KeyCertSign, CRLSign, EncipherOnly, DecipherOnly bool
}

// ExtendedKeyUsage is PCA's ExtendedKeyUsage.
type ExtendedKeyUsage struct {
	ExtendedKeyUsageType             string
	ExtendedKeyUsageObjectIdentifier string
}

// GeneralName is PCA's GeneralName (the name forms the fake models).
type GeneralName struct {
	DNSName                   string `json:"DnsName"`
	UniformResourceIdentifier string
	Rfc822Name                string
	IPAddress                 string `json:"IpAddress"`
}

// CustomExtension is PCA's CustomExtension: an OID, a base64 DER value and
// the critical flag.
type CustomExtension struct {
	ObjectIdentifier string
	Value            string
	Critical         bool
}

// templateDef is what a certificate template decides itself (PCA's
// "template definitions"); the rest comes from API passthrough or the CSR.
type templateDef struct {
	apiPassthrough bool // ApiPassthrough is honoured
	blank          bool // no key usage or extended key usage of its own
	criticalBC     bool // basic constraints CA:FALSE marked critical
}

// templates are the end-entity templates the fake models, by name.
var templates = map[string]templateDef{
	"EndEntityCertificate/V1":                                              {},
	"EndEntityCertificate_APIPassthrough/V1":                               {apiPassthrough: true},
	"BlankEndEntityCertificate_APIPassthrough/V1":                          {apiPassthrough: true, blank: true},
	"BlankEndEntityCertificate_CriticalBasicConstraints_APIPassthrough/V1": {apiPassthrough: true, blank: true, criticalBC: true},
}

var (
	oidSubjectAltName    = asn1.ObjectIdentifier{2, 5, 29, 17}
	oidKeyUsage          = asn1.ObjectIdentifier{2, 5, 29, 15}
	oidExtKeyUsage       = asn1.ObjectIdentifier{2, 5, 29, 37}
	oidBasicConstraints  = asn1.ObjectIdentifier{2, 5, 29, 19}
	emptyRDNSequenceDER  = []byte{0x30, 0x00}
	nonCriticalCAFalseBC = pkix.Extension{Id: oidBasicConstraints, Value: []byte{0x30, 0x00}}
)

func decodeStrict(body []byte, v any) error {
	dec := json.NewDecoder(bytes.NewReader(body))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return errorf("SerializationException", "%v", err)
	}
	return nil
}

func (s *Server) issueCertificate(body []byte) (any, error) {
	var req IssueRequest
	if err := decodeStrict(body, &req); err != nil {
		return nil, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.issues = append(s.issues, req)
	now := s.now()
	switch {
	case req.CertificateAuthorityArn != s.CAARN:
		return nil, errorf("ResourceNotFoundException", "Could not find certificate authority %s", req.CertificateAuthorityArn)
	case len(req.IdempotencyToken) > 36:
		return nil, errorf("ValidationException", "IdempotencyToken must be at most 36 characters")
	}
	key := req.CertificateAuthorityArn + "\x00" + req.IdempotencyToken
	if e, ok := s.tokens[key]; ok && req.IdempotencyToken != "" && now.Sub(e.at) < idempotencyWindow {
		return map[string]string{"CertificateArn": e.arn}, nil
	}
	tmpl, err := s.build(&req, now)
	if err != nil {
		return nil, err
	}
	if s.mutate != nil {
		s.mutate(tmpl)
	}
	csr, _ := x509.ParseCertificateRequest(pemBlock(req.Csr))
	der, err := x509.CreateCertificate(rand.Reader, tmpl, s.ca.cert, csr.PublicKey, s.ca.key)
	if err != nil {
		return nil, fmt.Errorf("sign: %w", err)
	}
	arn := s.CAARN + "/certificate/" + hex.EncodeToString(tmpl.SerialNumber.Bytes())
	s.certs[arn] = &issuedCert{der: der, chain: s.chainPEM(), readyAt: now.Add(s.pending)}
	if req.IdempotencyToken != "" {
		s.tokens[key] = tokenEntry{arn: arn, at: now}
	}
	return map[string]string{"CertificateArn": arn}, nil
}

func (s *Server) getCertificate(ctx context.Context, body []byte) (any, error) {
	var req struct{ CertificateArn, CertificateAuthorityArn string }
	if err := decodeStrict(body, &req); err != nil {
		return nil, err
	}
	s.mu.Lock()
	delay := s.getDelay
	s.mu.Unlock()
	if delay > 0 {
		select {
		case <-time.After(delay):
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	c, ok := s.certs[req.CertificateArn]
	switch {
	case req.CertificateAuthorityArn != s.CAARN:
		return nil, errorf("ResourceNotFoundException", "Could not find certificate authority %s", req.CertificateAuthorityArn)
	case !ok || !strings.HasPrefix(req.CertificateArn, s.CAARN+"/certificate/"):
		return nil, errorf("ResourceNotFoundException", "Could not find certificate %s", req.CertificateArn)
	case s.now().Before(c.readyAt):
		return nil, errorf("RequestInProgressException", "The request %s is still in progress", req.CertificateArn)
	}
	return map[string]string{"Certificate": pemString(c.der), "CertificateChain": string(c.chain)}, nil
}

func (s *Server) getCACertificate(body []byte) (any, error) {
	var req struct{ CertificateAuthorityArn string }
	if err := decodeStrict(body, &req); err != nil {
		return nil, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if req.CertificateAuthorityArn != s.CAARN {
		return nil, errorf("ResourceNotFoundException", "Could not find certificate authority %s", req.CertificateAuthorityArn)
	}
	out := map[string]string{"Certificate": pemString(s.ca.cert.Raw)}
	if s.ca != s.root {
		// The chain above the CA; a root CA has none.
		out["CertificateChain"] = pemString(s.root.cert.Raw)
	}
	return out, nil
}

// build turns a request into the certificate PCA would sign, checking what
// PCA's documentation says it checks. Sources, in PCA's order of priority:
// the template definition, then API passthrough (API-passthrough templates
// only), then the CSR (whose subject and SAN every template copies when
// nothing above supplies them).
func (s *Server) build(req *IssueRequest, now time.Time) (*x509.Certificate, error) {
	tdef, err := templateFor(req.TemplateArn)
	if err != nil {
		return nil, err
	}
	alg, err := signatureAlgorithm(req.SigningAlgorithm, s.ca.key)
	if err != nil {
		return nil, err
	}
	csr, err := parseCSR(req.Csr)
	if err != nil {
		return nil, err
	}
	notBefore, notAfter, err := validity(req, now, s.ca.cert)
	if err != nil {
		return nil, err
	}
	serial, err := newSerial()
	if err != nil {
		return nil, err
	}
	spki, _ := x509.MarshalPKIXPublicKey(csr.PublicKey)
	ski := sha1.Sum(subjectPublicKeyBits(spki))
	tmpl := &x509.Certificate{SerialNumber: serial, NotBefore: notBefore, NotAfter: notAfter, SignatureAlgorithm: alg,
		RawSubject: csr.RawSubject, SubjectKeyId: ski[:]}
	if !tdef.blank {
		tmpl.KeyUsage = x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment
		tmpl.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth}
	}
	if tdef.criticalBC {
		tmpl.BasicConstraintsValid = true // crypto/x509 marks it critical
	} else {
		tmpl.ExtraExtensions = append(tmpl.ExtraExtensions, nonCriticalCAFalseBC)
	}
	var api *APIPassthrough
	if tdef.apiPassthrough {
		api = req.APIPassthrough
	}
	if api != nil && api.Subject != nil && *api.Subject != (Subject{}) {
		tmpl.RawSubject, tmpl.Subject = nil, api.Subject.name()
	}
	emptySubject := len(tmpl.RawSubject) > 0 && bytes.Equal(tmpl.RawSubject, emptyRDNSequenceDER) ||
		tmpl.RawSubject == nil && len(tmpl.Subject.ToRDNSequence()) == 0
	if api != nil && api.Extensions != nil {
		if err := applyExtensions(tmpl, tdef, api.Extensions); err != nil {
			return nil, err
		}
	}
	san := findExtension(tmpl.ExtraExtensions, oidSubjectAltName)
	if san == nil && len(tmpl.DNSNames)+len(tmpl.URIs)+len(tmpl.EmailAddresses)+len(tmpl.IPAddresses) > 0 {
		// Typed API SANs: crypto/x509 marks them critical exactly when the subject is empty.
		san = &pkix.Extension{Id: oidSubjectAltName, Critical: emptySubject}
	}
	if san == nil {
		for _, e := range csr.Extensions {
			if e.Id.Equal(oidSubjectAltName) {
				tmpl.ExtraExtensions = append(tmpl.ExtraExtensions, e)
				san = &e
			}
		}
	}
	switch {
	case emptySubject && san == nil:
		return nil, errorf("MalformedCSRException", "A CSR must provide either a subject name or a subject alternative name.")
	case emptySubject && !san.Critical:
		return nil, errorf("MalformedCSRException", "CSR must mark the SAN extension critical when it has an empty subject.")
	case san != nil && san.Value != nil:
		if err := checkSAN(san.Value); err != nil {
			return nil, err
		}
	}
	return tmpl, nil
}

// applyExtensions adds ApiPassthrough.Extensions below what the template
// defines: a value the template sets wins, and one extension given twice
// through the API is refused.
func applyExtensions(tmpl *x509.Certificate, tdef templateDef, ext *Extensions) error {
	typed := map[string]bool{}
	if ku := ext.KeyUsage; ku != nil && tdef.blank {
		for i, b := range []bool{ku.DigitalSignature, ku.NonRepudiation, ku.KeyEncipherment, ku.DataEncipherment,
			ku.KeyAgreement, ku.KeyCertSign, ku.CRLSign, ku.EncipherOnly, ku.DecipherOnly} {
			if b {
				tmpl.KeyUsage |= 1 << i
			}
		}
		typed[oidKeyUsage.String()] = true
	}
	if len(ext.ExtendedKeyUsage) > 0 && tdef.blank {
		for _, e := range ext.ExtendedKeyUsage {
			switch e.ExtendedKeyUsageType {
			case "SERVER_AUTH":
				tmpl.ExtKeyUsage = append(tmpl.ExtKeyUsage, x509.ExtKeyUsageServerAuth)
			case "CLIENT_AUTH":
				tmpl.ExtKeyUsage = append(tmpl.ExtKeyUsage, x509.ExtKeyUsageClientAuth)
			default:
				return errorf("ValidationException", "the fake PCA models SERVER_AUTH and CLIENT_AUTH, not %+v", e)
			}
		}
		typed[oidExtKeyUsage.String()] = true
	}
	for _, n := range ext.SubjectAlternativeNames {
		switch {
		case n.DNSName != "":
			tmpl.DNSNames = append(tmpl.DNSNames, n.DNSName)
		case n.UniformResourceIdentifier != "":
			u, err := url.Parse(n.UniformResourceIdentifier)
			if err != nil {
				return errorf("ValidationException", "UniformResourceIdentifier %q: %v", n.UniformResourceIdentifier, err)
			}
			tmpl.URIs = append(tmpl.URIs, u)
		case n.Rfc822Name != "":
			tmpl.EmailAddresses = append(tmpl.EmailAddresses, n.Rfc822Name)
		case n.IPAddress != "":
			tmpl.IPAddresses = append(tmpl.IPAddresses, net.ParseIP(n.IPAddress))
		default:
			return errorf("ValidationException", "empty GeneralName")
		}
		typed[oidSubjectAltName.String()] = true
	}
	for _, c := range ext.CustomExtensions {
		oid, err := parseOID(c.ObjectIdentifier)
		if err != nil {
			return err
		}
		val, err := base64.StdEncoding.DecodeString(c.Value)
		if err != nil || len(val) == 0 || len(c.Value) > 4096 {
			return errorf("ValidationException", "CustomExtension %s: Value must be 1 to 4096 characters of base64", c.ObjectIdentifier)
		}
		switch {
		case typed[oid.String()] || findExtension(tmpl.ExtraExtensions, oid) != nil:
			return errorf("ValidationException", "extension %s is given more than once", oid)
		case !tdef.blank && (oid.Equal(oidKeyUsage) || oid.Equal(oidExtKeyUsage)), oid.Equal(oidBasicConstraints):
			continue // the template defines it, and the template wins
		}
		tmpl.ExtraExtensions = append(tmpl.ExtraExtensions, pkix.Extension{Id: oid, Critical: c.Critical, Value: val})
	}
	return nil
}

func templateFor(arn string) (templateDef, error) {
	if arn == "" {
		return templates["EndEntityCertificate/V1"], nil
	}
	name, ok := strings.CutPrefix(arn, "arn:aws:acm-pca:::template/")
	if !ok {
		return templateDef{}, errorf("InvalidArgsException", "template ARN %q is not arn:aws:acm-pca:::template/NAME/VERSION", arn)
	}
	t, ok := templates[name]
	if !ok {
		return templateDef{}, errorf("InvalidArgsException", "the fake PCA does not model template %q", name)
	}
	return t, nil
}

// signatureAlgorithm maps PCA's SigningAlgorithm, whose family must match the CA key's.
func signatureAlgorithm(name string, caKey crypto.Signer) (x509.SignatureAlgorithm, error) {
	algs := map[string]x509.SignatureAlgorithm{
		"SHA256WITHECDSA": x509.ECDSAWithSHA256, "SHA384WITHECDSA": x509.ECDSAWithSHA384, "SHA512WITHECDSA": x509.ECDSAWithSHA512,
		"SHA256WITHRSA": x509.SHA256WithRSA, "SHA384WITHRSA": x509.SHA384WithRSA, "SHA512WITHRSA": x509.SHA512WithRSA,
	}
	alg, ok := algs[name]
	if !ok {
		return 0, errorf("ValidationException", "SigningAlgorithm %q is not one the fake PCA models", name)
	}
	_, caIsRSA := caKey.Public().(*rsa.PublicKey)
	if isRSA := strings.HasSuffix(name, "RSA"); isRSA != caIsRSA {
		return 0, errorf("InvalidArgsException", "SigningAlgorithm %s does not match the CA's key family", name)
	}
	return alg, nil
}

// parseCSR verifies the CSR and its key: PCA certifies RSA 2048/3072/4096 and
// ECDSA P-256/P-384/P-521 keys only.
func parseCSR(blob []byte) (*x509.CertificateRequest, error) {
	der := pemBlock(blob)
	if der == nil {
		return nil, errorf("MalformedCSRException", "CSR is not a PEM CERTIFICATE REQUEST")
	}
	csr, err := x509.ParseCertificateRequest(der)
	if err != nil {
		return nil, errorf("MalformedCSRException", "parse CSR: %v", err)
	}
	if err := csr.CheckSignature(); err != nil {
		return nil, errorf("MalformedCSRException", "CSR signature does not verify: %v", err)
	}
	switch k := csr.PublicKey.(type) {
	case *rsa.PublicKey:
		if n := k.N.BitLen(); n == 2048 || n == 3072 || n == 4096 {
			return csr, nil
		}
	case *ecdsa.PublicKey:
		if k.Curve == elliptic.P256() || k.Curve == elliptic.P384() || k.Curve == elliptic.P521() {
			return csr, nil
		}
	}
	return nil, errorf("MalformedCSRException", "unsupported public key %T in CSR", csr.PublicKey)
}

func validity(req *IssueRequest, now time.Time, ca *x509.Certificate) (notBefore, notAfter time.Time, err error) {
	if req.Validity == nil {
		return time.Time{}, time.Time{}, errorf("ValidationException", "Validity is required")
	}
	v := req.Validity
	switch v.Type {
	case "ABSOLUTE":
		notAfter = time.Unix(v.Value, 0)
	case "DAYS":
		notAfter = now.AddDate(0, 0, int(v.Value))
	default:
		return time.Time{}, time.Time{}, errorf("ValidationException", "the fake PCA models Validity ABSOLUTE and DAYS, not %s", v.Type)
	}
	notBefore = now.Add(-time.Hour) // PCA's default backdating
	if nb := req.ValidityNotBefore; nb != nil {
		if nb.Type != "ABSOLUTE" {
			return time.Time{}, time.Time{}, errorf("ValidationException", "ValidityNotBefore must be ABSOLUTE")
		}
		notBefore = time.Unix(nb.Value, 0)
	}
	switch {
	case !notAfter.After(now) || !notAfter.After(notBefore):
		return time.Time{}, time.Time{}, errorf("ValidationException", "Validity ends before it starts or in the past")
	case notAfter.After(ca.NotAfter):
		return time.Time{}, time.Time{}, errorf("ValidationException", "The validity period of the CA certificate ends before the validity period of the requested certificate")
	}
	return notBefore.UTC(), notAfter.UTC(), nil
}

// checkSAN applies PCA's certificate request validation to a SAN value: no
// empty, whitespace-only or control-character entries, IPs of 4 or 16 bytes.
func checkSAN(value []byte) error {
	var names []asn1.RawValue
	if rest, err := asn1.Unmarshal(value, &names); err != nil || len(rest) != 0 || len(names) == 0 {
		return errorf("MalformedCSRException", "SAN extension cannot be parsed or is empty")
	}
	for _, n := range names {
		if n.Tag == 7 {
			if len(n.Bytes) != 4 && len(n.Bytes) != 16 {
				return errorf("MalformedCSRException", "SAN IP address of %d bytes", len(n.Bytes))
			}
			continue
		}
		if strings.TrimSpace(string(n.Bytes)) == "" || strings.ContainsFunc(string(n.Bytes), unicode.IsControl) {
			return errorf("MalformedCSRException", "SAN entry is empty, blank or holds a control character")
		}
	}
	return nil
}

func (n *Subject) name() pkix.Name {
	one := func(s string) []string {
		if s == "" {
			return nil
		}
		return []string{s}
	}
	return pkix.Name{CommonName: n.CommonName, Country: one(n.Country), Organization: one(n.Organization),
		OrganizationalUnit: one(n.OrganizationalUnit), Province: one(n.State), Locality: one(n.Locality), SerialNumber: n.SerialNumber}
}

func parseOID(s string) (asn1.ObjectIdentifier, error) {
	var oid asn1.ObjectIdentifier
	for _, p := range strings.Split(s, ".") {
		var n int
		if _, err := fmt.Sscanf(p, "%d", &n); err != nil || n < 0 || fmt.Sprint(n) != p {
			return nil, errorf("ValidationException", "ObjectIdentifier %q is not an OID", s)
		}
		oid = append(oid, n)
	}
	if len(oid) < 2 {
		return nil, errorf("ValidationException", "ObjectIdentifier %q is not an OID", s)
	}
	return oid, nil
}

func findExtension(exts []pkix.Extension, oid asn1.ObjectIdentifier) *pkix.Extension {
	for i := range exts {
		if exts[i].Id.Equal(oid) {
			return &exts[i]
		}
	}
	return nil
}

func subjectPublicKeyBits(spki []byte) []byte {
	var info struct {
		Algorithm pkix.AlgorithmIdentifier
		PublicKey asn1.BitString
	}
	if _, err := asn1.Unmarshal(spki, &info); err != nil {
		return spki
	}
	return info.PublicKey.Bytes
}

// newSerial returns a positive random serial of 127 or 128 bits, the size
// PCA's certificate ARNs show.
func newSerial() (*big.Int, error) {
	var b [16]byte
	if _, err := rand.Read(b[:]); err != nil {
		return nil, err
	}
	b[0] = b[0]&0x7f | 0x40
	return new(big.Int).SetBytes(b[:]), nil
}

func pemBlock(blob []byte) []byte {
	block, _ := pem.Decode(blob)
	if block == nil || (block.Type != "CERTIFICATE REQUEST" && block.Type != "NEW CERTIFICATE REQUEST") {
		return nil
	}
	return block.Bytes
}

// pemString is one PEM certificate without the final newline, as PCA returns it.
func pemString(der []byte) string {
	return strings.TrimSuffix(string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})), "\n")
}

// keyPair is a CA certificate and its key.
type keyPair struct {
	cert *x509.Certificate
	key  crypto.Signer
}

// newHierarchy makes the CA (and its root, unless the CA is the root).
func (s *Server) newHierarchy() error {
	life := s.opts.CALifetime
	if life <= 0 {
		life = 365 * 24 * time.Hour
	}
	rootKey, err := s.newKey()
	if err != nil {
		return err
	}
	if s.opts.RootIssues {
		root, err := s.newCA("Castellan fake PCA root CA", rootKey, life, nil)
		if err != nil {
			return err
		}
		s.root, s.ca = root, root
		return nil
	}
	root, err := s.newCA("Castellan fake PCA root", rootKey, 2*life, nil)
	if err != nil {
		return err
	}
	caKey, err := s.newKey()
	if err != nil {
		return err
	}
	ca, err := s.newCA("Castellan fake PCA subordinate CA", caKey, life, root)
	if err != nil {
		return err
	}
	s.root, s.ca = root, ca
	return nil
}

func (s *Server) newKey() (crypto.Signer, error) {
	if s.opts.RSA {
		return rsa.GenerateKey(rand.Reader, 2048)
	}
	return ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
}

// newCA certifies key as a CA named cn for life, signed by parent (nil: self-signed).
func (s *Server) newCA(cn string, key crypto.Signer, life time.Duration, parent *keyPair) (*keyPair, error) {
	serial, err := newSerial()
	if err != nil {
		return nil, err
	}
	now := s.now().Truncate(time.Second)
	tmpl := &x509.Certificate{SerialNumber: serial, Subject: pkix.Name{Organization: []string{"Castellan test"}, CommonName: cn},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(life), IsCA: true, BasicConstraintsValid: true,
		KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature}
	issuer, issuerKey := tmpl, key
	if parent != nil {
		issuer, issuerKey = parent.cert, parent.key
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, issuer, key.Public(), issuerKey)
	if err != nil {
		return nil, fmt.Errorf("fake PCA CA %q: %w", cn, err)
	}
	cert, err := x509.ParseCertificate(der)
	return &keyPair{cert: cert, key: key}, err
}

// Rotate gives a subordinate CA a new root: a new root key and certificate,
// and a new certificate for the CA's same key under it (PCA's
// ImportCertificateAuthorityCertificate after the parent changed). Leaves
// issued before keep verifying through the old CA certificate to the old
// root. A root CA, whose key PCA never changes, gets a renewed certificate
// for the same key (a new serial and validity), as PCA renews a root CA.
func (s *Server) Rotate(t testing.TB) {
	t.Helper()
	if err := s.RotateCA(); err != nil {
		t.Fatal(err)
	}
}

// RotateCA is Rotate for a caller without a test (the fakepca command).
func (s *Server) RotateCA() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.ca == s.root {
		renewed, err := s.newCA(s.root.cert.Subject.CommonName, s.root.key, s.root.cert.NotAfter.Sub(s.root.cert.NotBefore)-time.Hour, nil)
		if err != nil {
			return err
		}
		s.root, s.ca = renewed, renewed
		return nil
	}
	rootKey, err := s.newKey()
	if err != nil {
		return err
	}
	life := s.ca.cert.NotAfter.Sub(s.ca.cert.NotBefore) - time.Hour
	root, err := s.newCA("Castellan fake PCA root (rotated)", rootKey, 2*life, nil)
	if err != nil {
		return err
	}
	ca, err := s.newCA(s.ca.cert.Subject.CommonName, s.ca.key, life, root)
	if err != nil {
		return err
	}
	s.root, s.ca = root, ca
	return nil
}

// chainPEM is the CA certificate up to the root, as GetCertificate returns
// it beside a leaf. The caller holds s.mu.
func (s *Server) chainPEM() []byte {
	out := pemString(s.ca.cert.Raw)
	if s.ca != s.root {
		out += "\n" + pemString(s.root.cert.Raw)
	}
	return []byte(out)
}

// Root returns the current root certificate.
func (s *Server) Root() *x509.Certificate {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.root.cert
}

// CACertificate returns the CA's current certificate (the root for a root CA).
func (s *Server) CACertificate() *x509.Certificate {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.ca.cert
}
