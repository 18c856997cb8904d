package signertest

import (
	"bytes"
	"context"
	"crypto"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"errors"
	"fmt"
	"math/big"
	"net/url"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/castellan-ca/castellan/signer"
)

// Factory builds the signers under test.
type Factory struct {
	// New returns a fresh, ready signer; it is called once per subtest.
	New func(t *testing.T) signer.Signer
	// Outage makes s's backend unavailable until restore is called; nil when
	// the backend cannot have an outage (local keys).
	Outage func(t *testing.T, s signer.Signer) (restore func())
	// TrustDomain of the identities requested; zero means cluster.local.
	TrustDomain spiffeid.TrustDomain
	// ServerSerial marks a remote backend whose server picks the serial number
	// (Vault, Google CAS): the suite then requires a positive serial of 64 to
	// 159 bits (RFC 5280's 20 octets) instead of the template's.
	ServerSerial bool
	// NotBeforeSlack is how far the leaf's NotBefore may lie from the
	// template's, for a backend whose server stamps it from its own clock
	// (Vault backdates by its role's not_before_duration); zero means exact.
	NotBeforeSlack time.Duration
	// NotAfterSlack is how far before the template's NotAfter the leaf may
	// end (never after), for a backend that can only ask for a lifetime
	// which its server counts from when it signs (the Kubernetes CSR API's
	// expirationSeconds); zero means exact.
	NotAfterSlack time.Duration
	// Remote marks a backend whose server signs (Vault, Google CAS, AWS
	// Private CA): its chains must leave SignatureChecked false, so that the
	// issuer's result check verifies every leaf's signature itself.
	Remote bool
	// UnsupportedKeys names the LeafKeys families the backend cannot certify
	// (AWS Private CA has no Ed25519): Sign must refuse them with an error
	// wrapping signer.ErrUnsupportedKey, which the issuer reports to the caller.
	UnsupportedKeys []string
}

// concurrentSigners is the number of goroutines in the concurrency subtest.
const concurrentSigners = 64

var oidSubjectAltName = asn1.ObjectIdentifier{2, 5, 29, 17}

// Run is the conformance suite of signer.Signer: every backend must pass it.
func Run(t *testing.T, f Factory) {
	td := f.TrustDomain
	if td.IsZero() {
		td = spiffeid.RequireTrustDomainFromString("cluster.local")
	}
	id := spiffeid.RequireFromPath(td, "/ns/conformance/sa/workload")

	t.Run("ProfilePreserved", func(t *testing.T) {
		s := f.New(t)
		for name, key := range LeafKeys() {
			t.Run(name, func(t *testing.T) {
				tmpl := newTemplate(t, s, id, key.Public(), time.Hour)
				if slices.Contains(f.UnsupportedKeys, name) {
					chain, err := s.Sign(t.Context(), Request(t, tmpl, id, key))
					if !errors.Is(err, signer.ErrUnsupportedKey) || chain != nil {
						t.Errorf("Sign with an unsupported %s key: chain %v, err %v; want none and signer.ErrUnsupportedKey", name, chain != nil, err)
					}
					return
				}
				chain := sign(t, s, tmpl, id, key)
				checkProfile(t, f, chain, s.TrustBundle(), tmpl, id, key.Public())
			})
		}
	})

	t.Run("ChainStructure", func(t *testing.T) {
		s := f.New(t)
		key := Key(1)
		chain := sign(t, s, newTemplate(t, s, id, key.Public(), time.Hour), id, key)
		checkChain(t, chain, s.TrustBundle())
	})

	t.Run("TTLClampedToIssuer", func(t *testing.T) {
		s := f.New(t)
		key := Key(2)
		first := sign(t, s, newTemplate(t, s, id, key.Public(), time.Hour), id, key)
		issuer := issuerOf(t, first, s.TrustBundle())

		tmpl := newTemplate(t, s, id, key.Public(), time.Hour)
		tmpl.NotAfter = issuer.NotAfter.Add(5 * 365 * 24 * time.Hour)
		asked := tmpl.NotAfter
		chain := sign(t, s, tmpl, id, key)
		if !chain.Leaf.NotAfter.Equal(issuer.NotAfter) {
			t.Errorf("leaf NotAfter = %s, want the issuer's NotAfter %s", chain.Leaf.NotAfter, issuer.NotAfter)
		}
		if !tmpl.NotAfter.Equal(asked) {
			t.Errorf("Sign modified the caller's template: NotAfter %s, was %s", tmpl.NotAfter, asked)
		}
	})

	t.Run("ConcurrentSigning", func(t *testing.T) {
		s := f.New(t)
		bundle := s.TrustBundle()
		chains := make([]*signer.Chain, concurrentSigners)
		errs := make([]error, concurrentSigners)
		var wg sync.WaitGroup
		for i := range concurrentSigners {
			req := Request(t, newTemplate(t, s, id, Key(i).Public(), time.Hour), id, Key(i))
			wg.Go(func() {
				chains[i], errs[i] = s.Sign(t.Context(), req)
			})
		}
		wg.Wait()
		serials := make(map[string]bool, concurrentSigners)
		for i, c := range chains {
			if errs[i] != nil {
				t.Errorf("sign %d: %v", i, errs[i])
				continue
			}
			serial := c.Leaf.SerialNumber.String()
			if serials[serial] {
				t.Errorf("serial %s issued twice", serial)
			}
			serials[serial] = true
			if err := verify(c, bundle); err != nil {
				t.Errorf("chain %d does not verify: %v", i, err)
			}
			if !publicKeyEqual(c.Leaf.PublicKey, Key(i).Public()) {
				t.Errorf("chain %d certifies the wrong key", i)
			}
		}
	})

	t.Run("Cancelled", func(t *testing.T) {
		s := f.New(t)
		ctx, cancel := context.WithCancel(t.Context())
		cancel()
		key := Key(3)
		chain, err := s.Sign(ctx, Request(t, newTemplate(t, s, id, key.Public(), time.Hour), id, key))
		if !errors.Is(err, context.Canceled) {
			t.Errorf("Sign with a cancelled context: err = %v, want one wrapping context.Canceled", err)
		}
		if chain != nil {
			t.Errorf("Sign with a cancelled context returned a certificate")
		}
	})

	t.Run("Outage", func(t *testing.T) {
		if f.Outage == nil {
			t.Skip("backend cannot have an outage")
		}
		s := f.New(t)
		key := Key(4)
		restore := f.Outage(t, s)
		chain, err := s.Sign(t.Context(), Request(t, newTemplate(t, s, id, key.Public(), time.Hour), id, key))
		if !errors.Is(err, signer.ErrSignerUnavailable) {
			t.Errorf("Sign during an outage: err = %v, want one wrapping signer.ErrSignerUnavailable", err)
		}
		if chain != nil {
			t.Errorf("Sign during an outage returned a certificate")
		}
		restore()
		// Recovery is eventual: a remote client may still be in its reconnect
		// backoff, and until it reconnects every failure must stay retryable.
		deadline := time.Now().Add(30 * time.Second)
		for {
			chain, err := s.Sign(t.Context(), Request(t, newTemplate(t, s, id, key.Public(), time.Hour), id, key))
			if err == nil && chain != nil && chain.Leaf != nil {
				break
			}
			if !errors.Is(err, signer.ErrSignerUnavailable) {
				t.Fatalf("Sign after the outage: err = %v, want success or a retryable signer.ErrSignerUnavailable", err)
			}
			if time.Now().After(deadline) {
				t.Fatalf("Sign did not recover within 30s after the outage: %v", err)
			}
			time.Sleep(200 * time.Millisecond)
		}
	})
}

// newTemplate returns the workload profile with whole-second times, since
// certificates carry no fractions and fields are compared exactly, and with
// the subject s asks for, as the issuer builds it.
func newTemplate(t *testing.T, s signer.Signer, id spiffeid.ID, pub crypto.PublicKey, ttl time.Duration) *x509.Certificate {
	t.Helper()
	serial, err := signer.NewSerial(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now().Truncate(time.Second)
	tmpl := Template(id, pub, serial, now.Add(-signer.DefaultClockSkew), now.Add(ttl))
	if sub, ok := s.(signer.Subjecter); ok {
		tmpl.Subject = sub.LeafSubject(id)
	}
	return tmpl
}

// Template is a workload leaf as the issuer asks backends to sign it
// (DESIGN.md §4): empty subject, id as the only URI SAN, digitalSignature
// (+keyEncipherment for RSA keys), serverAuth and clientAuth, CA:false. The
// suite states the profile itself rather than importing the pipeline's, so
// that the suite, like the backends, never links package ca.
func Template(id spiffeid.ID, pub crypto.PublicKey, serial *big.Int, notBefore, notAfter time.Time) *x509.Certificate {
	usage := x509.KeyUsageDigitalSignature
	if _, isRSA := pub.(*rsa.PublicKey); isRSA {
		usage |= x509.KeyUsageKeyEncipherment
	}
	return &x509.Certificate{SerialNumber: serial, NotBefore: notBefore.UTC(), NotAfter: notAfter.UTC(),
		URIs: []*url.URL{id.URL()}, KeyUsage: usage, BasicConstraintsValid: true,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth}}
}

// Request is what the issuer passes a backend for tmpl: the key to certify and
// the verified CSR in DER, made with key as Istio's agents make it (empty
// subject, one critical URI SAN), since remote backends sign the CSR.
func Request(t testing.TB, tmpl *x509.Certificate, id spiffeid.ID, key crypto.Signer) signer.SignRequest {
	t.Helper()
	csr := CSR(t, key, pkix.Name{}, id.URL())
	return signer.SignRequest{
		Template:  tmpl,
		PublicKey: key.Public(),
		CSR:       csr,
		Identity:  id,
		TTL:       tmpl.NotAfter.Sub(tmpl.NotBefore),
	}
}

// CSR returns a DER CSR signed by key with subject and, unless uri is nil,
// a critical SAN extension holding only uri.
func CSR(t testing.TB, key crypto.Signer, subject pkix.Name, uri *url.URL) []byte {
	t.Helper()
	tmpl := &x509.CertificateRequest{Subject: subject}
	if uri != nil {
		val, err := asn1.Marshal([]asn1.RawValue{{Class: asn1.ClassContextSpecific, Tag: 6, Bytes: []byte(uri.String())}})
		if err != nil {
			t.Fatal(err)
		}
		tmpl.ExtraExtensions = []pkix.Extension{{Id: oidSubjectAltName, Critical: true, Value: val}}
	}
	csr, err := x509.CreateCertificateRequest(rand.Reader, tmpl, key)
	if err != nil {
		t.Fatalf("create CSR: %v", err)
	}
	return csr
}

func sign(t *testing.T, s signer.Signer, tmpl *x509.Certificate, id spiffeid.ID, key crypto.Signer) *signer.Chain {
	t.Helper()
	chain, err := s.Sign(t.Context(), Request(t, tmpl, id, key))
	if err != nil {
		t.Fatalf("Sign: %v", err)
	}
	if chain == nil || chain.Leaf == nil {
		t.Fatal("Sign returned no leaf")
	}
	return chain
}

// checkProfile asserts that the leaf carries exactly the template's profile.
func checkProfile(t *testing.T, f Factory, chain *signer.Chain, bundle []*x509.Certificate, tmpl *x509.Certificate, id spiffeid.ID, pub crypto.PublicKey) {
	t.Helper()
	leaf := chain.Leaf
	if len(leaf.URIs) != 1 || leaf.URIs[0].String() != id.String() {
		t.Errorf("URI SANs = %v, want exactly [%s]", leaf.URIs, id)
	}
	if len(leaf.DNSNames)+len(leaf.IPAddresses)+len(leaf.EmailAddresses) != 0 {
		t.Errorf("unexpected SANs: DNS %v, IP %v, email %v", leaf.DNSNames, leaf.IPAddresses, leaf.EmailAddresses)
	}
	sanCritical := false
	for _, ext := range leaf.Extensions {
		if ext.Id.Equal(oidSubjectAltName) {
			sanCritical = ext.Critical
		}
	}
	// RFC 5280 4.2.1.6: critical with an empty subject (MUST), else not (SHOULD).
	emptySubject := len(tmpl.Subject.ToRDNSequence()) == 0
	switch {
	case emptySubject && !sanCritical:
		t.Error("SAN extension is not critical (required with an empty subject)")
	case !emptySubject && sanCritical:
		t.Errorf("SAN extension is critical beside the subject %q (RFC 5280: non-critical)", tmpl.Subject)
	}
	if got, want := leaf.Subject.ToRDNSequence().String(), tmpl.Subject.ToRDNSequence().String(); got != want {
		t.Errorf("subject = %q, want %q", got, want)
	}
	if emptySubject && len(leaf.Subject.Names) != 0 {
		t.Errorf("subject = %q, want empty", leaf.Subject)
	}
	if leaf.KeyUsage != tmpl.KeyUsage {
		t.Errorf("KeyUsage = %b, want %b", leaf.KeyUsage, tmpl.KeyUsage)
	}
	wantEKU := []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth}
	if !slices.Equal(leaf.ExtKeyUsage, wantEKU) {
		t.Errorf("ExtKeyUsage = %v, want %v", leaf.ExtKeyUsage, wantEKU)
	}
	if !leaf.BasicConstraintsValid || leaf.IsCA {
		t.Errorf("BasicConstraints valid=%v CA=%v, want valid CA:false", leaf.BasicConstraintsValid, leaf.IsCA)
	}
	switch serial := leaf.SerialNumber; {
	case !f.ServerSerial && serial.Cmp(tmpl.SerialNumber) != 0:
		t.Errorf("serial = %s, want the template's %s", serial, tmpl.SerialNumber)
	case f.ServerSerial && (serial.Sign() <= 0 || serial.BitLen() < 64 || serial.BitLen() > 159):
		t.Errorf("serial %x has %d bits, want a positive random serial of 64 to 159 bits", serial, serial.BitLen())
	}
	short := tmpl.NotAfter.Sub(leaf.NotAfter)
	if d := leaf.NotBefore.Sub(tmpl.NotBefore).Abs(); d > f.NotBeforeSlack || short < 0 || short > f.NotAfterSlack {
		t.Errorf("validity %s..%s, want %s (± %s)..%s (- %s)", leaf.NotBefore, leaf.NotAfter, tmpl.NotBefore, f.NotBeforeSlack, tmpl.NotAfter, f.NotAfterSlack)
	}
	if !publicKeyEqual(leaf.PublicKey, pub) {
		t.Error("leaf certifies a different public key than requested")
	}
	issuer := issuerOf(t, chain, bundle)
	if len(issuer.SubjectKeyId) == 0 || !bytes.Equal(leaf.AuthorityKeyId, issuer.SubjectKeyId) {
		t.Errorf("AuthorityKeyId = %x, want the issuer's SubjectKeyId %x", leaf.AuthorityKeyId, issuer.SubjectKeyId)
	}
	if err := leaf.CheckSignatureFrom(issuer); err != nil {
		t.Errorf("leaf signature does not verify with the issuer's key: %v", err)
	}
	if f.Remote && chain.SignatureChecked {
		t.Error("a remote backend set SignatureChecked: the result check would not verify its leaves' signatures")
	}
}

// checkChain asserts the chain runs from the leaf's issuer upwards, holds no
// root, and verifies to the trust bundle.
func checkChain(t *testing.T, chain *signer.Chain, bundle []*x509.Certificate) {
	t.Helper()
	if len(bundle) == 0 {
		t.Fatal("TrustBundle is empty")
	}
	for _, r := range bundle {
		if !r.IsCA {
			t.Errorf("trust bundle holds a non-CA certificate %q", r.Subject)
		}
	}
	if err := verify(chain, bundle); err != nil {
		t.Fatalf("chain does not verify to the trust bundle: %v", err)
	}
	child := chain.Leaf
	for i, c := range chain.Intermediates {
		if err := child.CheckSignatureFrom(c); err != nil {
			t.Errorf("Intermediates[%d] (%q) did not sign %q: %v", i, c.Subject, child.Subject, err)
		}
		if inBundle(bundle, c) {
			t.Errorf("Intermediates[%d] (%q) is a root of the trust bundle", i, c.Subject)
		}
		if bytes.Equal(c.RawIssuer, c.RawSubject) && c.CheckSignatureFrom(c) == nil {
			t.Errorf("Intermediates[%d] (%q) is self-signed (a root)", i, c.Subject)
		}
		child = c
	}
	if signerInBundle(child, bundle) == nil {
		t.Errorf("the top of the chain (%q) is not signed by a root of the trust bundle", child.Subject)
	}
}

// issuerOf returns the certificate that signed the leaf: Intermediates[0], or
// the root that signed it directly.
func issuerOf(t *testing.T, chain *signer.Chain, bundle []*x509.Certificate) *x509.Certificate {
	t.Helper()
	if len(chain.Intermediates) > 0 {
		return chain.Intermediates[0]
	}
	if r := signerInBundle(chain.Leaf, bundle); r != nil {
		return r
	}
	t.Fatal("no intermediates and no root of the trust bundle signed the leaf")
	return nil
}

func signerInBundle(c *x509.Certificate, bundle []*x509.Certificate) *x509.Certificate {
	for _, r := range bundle {
		if c.CheckSignatureFrom(r) == nil {
			return r
		}
	}
	return nil
}

func inBundle(bundle []*x509.Certificate, c *x509.Certificate) bool {
	return slices.ContainsFunc(bundle, func(r *x509.Certificate) bool { return bytes.Equal(r.Raw, c.Raw) })
}

func verify(chain *signer.Chain, bundle []*x509.Certificate) error {
	roots := x509.NewCertPool()
	for _, r := range bundle {
		roots.AddCert(r)
	}
	inter := x509.NewCertPool()
	for _, c := range chain.Intermediates {
		inter.AddCert(c)
	}
	_, err := chain.Leaf.Verify(x509.VerifyOptions{
		Roots:         roots,
		Intermediates: inter,
		KeyUsages:     []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
	})
	if err != nil {
		return fmt.Errorf("verify %q: %w", chain.Leaf.URIs, err)
	}
	return nil
}

func publicKeyEqual(a, b crypto.PublicKey) bool {
	k, ok := a.(interface{ Equal(crypto.PublicKey) bool })
	return ok && k.Equal(b)
}
