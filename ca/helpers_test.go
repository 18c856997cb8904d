package ca_test

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"encoding/pem"
	"net"
	"net/url"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/peer"

	"github.com/castellan-ca/castellan/authn"
	"github.com/castellan-ca/castellan/ca"
	"github.com/castellan-ca/castellan/signer"
	"github.com/castellan-ca/castellan/signer/local"
	"github.com/castellan-ca/castellan/signer/signertest"
	"github.com/castellan-ca/castellan/storage"
	"github.com/castellan-ca/castellan/storage/embedded"
)

// Fixed test identities.
var (
	td         = spiffeid.RequireTrustDomainFromString("cluster.local")
	appID      = spiffeid.RequireFromPath(td, "/ns/default/sa/app")
	otherID    = spiffeid.RequireFromPath(td, "/ns/prod/sa/db")
	foreignID  = spiffeid.RequireFromString("spiffe://evil.example/ns/default/sa/app")
	operatorID = spiffeid.RequireFromPath(td, "/castellan/operator")
)

// testNow is the injected clock's start: one instant for the whole binary, so
// expected NotBefore/NotAfter values are exact. It is the real time at start-up
// because crypto/tls and authn.ClientCert verify against the wall clock.
var testNow = time.Now().UTC().Truncate(time.Second)

// clock is an injectable, advanceable clock.
type clock struct{ ns atomic.Int64 }

func newClock() *clock {
	c := &clock{}
	c.ns.Store(testNow.UnixNano())
	return c
}

func (c *clock) Now() time.Time          { return time.Unix(0, c.ns.Load()).UTC() }
func (c *clock) Advance(d time.Duration) { c.ns.Add(int64(d)) }

// extraKeys are the key types signertest does not pre-generate, made once.
type extraKeys struct {
	rsa1024 *rsa.PrivateKey
	p224    *ecdsa.PrivateKey
	p521    *ecdsa.PrivateKey
}

var moreKeys = sync.OnceValue(func() *extraKeys {
	k := &extraKeys{}
	var err error
	if k.rsa1024, err = rsa.GenerateKey(rand.Reader, 1024); err != nil {
		panic(err)
	}
	if k.p224, err = ecdsa.GenerateKey(elliptic.P224(), rand.Reader); err != nil {
		panic(err)
	}
	if k.p521, err = ecdsa.GenerateKey(elliptic.P521(), rand.Reader); err != nil {
		panic(err)
	}
	return k
})

func leafKey(name string) crypto.Signer { return signertest.LeafKeys()[name] }

var oidSAN = asn1.ObjectIdentifier{2, 5, 29, 17}

// csrSpec describes a CSR to build with the real x509 encoder.
type csrSpec struct {
	key     crypto.Signer
	subject pkix.Name
	uris    []string
	dns     []string
	ips     []net.IP
	emails  []string
	// criticalSAN encodes the SAN extension by hand and marks it critical, as
	// Istio's pilot-agent does (Go's encoder never marks a CSR's SAN critical).
	criticalSAN bool
}

func makeCSRDER(t testing.TB, s csrSpec) []byte {
	t.Helper()
	tmpl := &x509.CertificateRequest{Subject: s.subject, DNSNames: s.dns, IPAddresses: s.ips, EmailAddresses: s.emails}
	if s.criticalSAN {
		var names []asn1.RawValue
		for _, u := range s.uris {
			names = append(names, asn1.RawValue{Class: asn1.ClassContextSpecific, Tag: 6, Bytes: []byte(u)})
		}
		for _, d := range s.dns {
			names = append(names, asn1.RawValue{Class: asn1.ClassContextSpecific, Tag: 2, Bytes: []byte(d)})
		}
		val, err := asn1.Marshal(names)
		if err != nil {
			t.Fatal(err)
		}
		tmpl.DNSNames = nil
		tmpl.ExtraExtensions = []pkix.Extension{{Id: oidSAN, Critical: true, Value: val}}
	} else {
		for _, u := range s.uris {
			pu, err := url.Parse(u)
			if err != nil {
				t.Fatal(err)
			}
			tmpl.URIs = append(tmpl.URIs, pu)
		}
	}
	der, err := x509.CreateCertificateRequest(rand.Reader, tmpl, s.key)
	if err != nil {
		t.Fatalf("create CSR: %v", err)
	}
	return der
}

func makeCSR(t testing.TB, s csrSpec) string {
	t.Helper()
	return string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: makeCSRDER(t, s)}))
}

// ztunnelCSR is what ztunnel sends: ECDSA P-256, empty subject, one URI SAN.
func ztunnelCSR(t testing.TB, key crypto.Signer, id spiffeid.ID) string {
	t.Helper()
	return makeCSR(t, csrSpec{key: key, uris: []string{id.String()}})
}

// pilotAgentCSR is what pilot-agent sends: subject O= (empty org), one critical URI SAN.
func pilotAgentCSR(t testing.TB, key crypto.Signer, id spiffeid.ID) string {
	t.Helper()
	return makeCSR(t, csrSpec{key: key, subject: pkix.Name{Organization: []string{""}}, uris: []string{id.String()}, criticalSAN: true})
}

// newRoot makes a test root valid around testNow.
func newRoot(t testing.TB, cn string, notAfter time.Time) *signertest.CA {
	t.Helper()
	if notAfter.IsZero() {
		notAfter = testNow.Add(365 * 24 * time.Hour)
	}
	return signertest.NewRoot(t, cn, signertest.CertOptions{NotBefore: testNow.Add(-time.Hour), NotAfter: notAfter})
}

// newLocalSigner is the real local backend over a test CA.
func newLocalSigner(t testing.TB, issuing *signertest.CA, roots []*x509.Certificate, inter []*x509.Certificate, now func() time.Time) *local.Signer {
	t.Helper()
	s, err := local.New(local.Config{Cert: issuing.Cert, Key: issuing.Key, Roots: roots, Intermediates: inter, Now: now})
	if err != nil {
		t.Fatalf("local.New: %v", err)
	}
	return s
}

// signLeaf signs a certificate with caCert/caKey directly (client credentials
// presented to the authenticator), starting from ca.LeafTemplate.
func signLeaf(t testing.TB, issuing *signertest.CA, key crypto.Signer, id *url.URL, modify func(*x509.Certificate)) *x509.Certificate {
	t.Helper()
	serial, err := signer.NewSerial(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		NotBefore:             testNow.Add(-time.Hour),
		NotAfter:              testNow.Add(24 * time.Hour),
		KeyUsage:              x509.KeyUsageDigitalSignature,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		BasicConstraintsValid: true,
	}
	if id != nil {
		tmpl.URIs = []*url.URL{id}
	}
	if modify != nil {
		modify(tmpl)
	}
	return issuing.Sign(t, tmpl, key.Public())
}

// peerCtx is the context gRPC gives a handler for a TLS connection on which the
// client presented certs (none: TLS without a client certificate).
func peerCtx(certs ...*x509.Certificate) context.Context {
	return peerCtxFrom(context.Background(), certs...)
}

// peerCtxFrom is peerCtx derived from parent.
func peerCtxFrom(parent context.Context, certs ...*x509.Certificate) context.Context {
	return peer.NewContext(parent, &peer.Peer{
		Addr:     &net.TCPAddr{IP: net.IPv4(10, 1, 2, 3), Port: 40000},
		AuthInfo: credentials.TLSInfo{State: tls.ConnectionState{Version: tls.VersionTLS13, PeerCertificates: certs}},
	})
}

// harness is the issuance pipeline built from real components: the local
// signer over a test root, the embedded audit store and authn.ClientCert.
type harness struct {
	clock     *clock
	root      *signertest.CA
	signer    signer.Signer
	authority *ca.Authority
	store     *embedded.Store
	authn     *authn.ClientCert
	issuer    *ca.Issuer
	cfg       ca.Config
}

type harnessOpts struct {
	// wrapSigner replaces the active signer (faults, blocking).
	wrapSigner func(signer.Signer) signer.Signer
	// wrapAudit replaces the audit log given to the issuer (faults).
	wrapAudit func(ca.AuditLog) ca.AuditLog
	// config adjusts the issuer configuration before NewIssuer.
	config func(*ca.Config)
	// rootNotAfter shortens the root's life (zero: one year).
	rootNotAfter time.Time
}

func newHarness(t testing.TB, o harnessOpts) *harness {
	t.Helper()
	h := &harness{clock: newClock()}
	h.root = newRoot(t, "Castellan Test Root", o.rootNotAfter)
	h.signer = newLocalSigner(t, h.root, []*x509.Certificate{h.root.Cert}, nil, h.clock.Now)
	if o.wrapSigner != nil {
		h.signer = o.wrapSigner(h.signer)
	}
	h.authority = ca.NewAuthority()
	if _, err := h.authority.Use("selfsigned", h.signer); err != nil {
		t.Fatal(err)
	}
	store, err := embedded.Open(context.Background(), filepath.Join(t.TempDir(), "audit.db"), embedded.Options{Writer: "test"})
	if err != nil {
		t.Fatalf("embedded.Open: %v", err)
	}
	t.Cleanup(func() { _ = store.Close() })
	h.store = store
	h.authn = &authn.ClientCert{TrustDomain: td, Roots: h.authority.Roots, Operators: []spiffeid.ID{operatorID}}
	var audit ca.AuditLog = store
	if o.wrapAudit != nil {
		audit = o.wrapAudit(store)
	}
	h.cfg = ca.Config{
		TrustDomain:   td,
		Authenticator: authn.Chain{h.authn}, // as serve builds it
		Audit:         audit,
		Authority:     h.authority,
		Now:           h.clock.Now,
	}
	if o.config != nil {
		o.config(&h.cfg)
	}
	h.issuer, err = ca.NewIssuer(h.cfg)
	if err != nil {
		t.Fatalf("NewIssuer: %v", err)
	}
	return h
}

// workloadCert is a client certificate for id issued by the harness root.
func (h *harness) workloadCert(t testing.TB, id spiffeid.ID) *x509.Certificate {
	t.Helper()
	return signLeaf(t, h.root, signertest.Key(3), id.URL(), nil)
}

// operatorCert is a castellanctl credential issued by the harness root.
func (h *harness) operatorCert(t testing.TB) *x509.Certificate {
	t.Helper()
	return signLeaf(t, h.root, signertest.Key(4), operatorID.URL(), func(c *x509.Certificate) {
		c.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}
	})
}

// records returns every audit record of the store, in order.
func (h *harness) records(t testing.TB) []storage.Record {
	t.Helper()
	recs, err := h.store.List(context.Background(), storage.Query{Limit: storage.MaxLimit})
	if err != nil {
		t.Fatalf("list audit records: %v", err)
	}
	return recs
}

// onlyRecord asserts that exactly one audit record exists and returns it.
func (h *harness) onlyRecord(t testing.TB) storage.Record {
	t.Helper()
	recs := h.records(t)
	if len(recs) != 1 {
		t.Fatalf("audit log holds %d records, want exactly 1: %+v", len(recs), recs)
	}
	return recs[0]
}
