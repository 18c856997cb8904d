package e2e

import (
	"bytes"
	"crypto"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"encoding/hex"
	"encoding/pem"
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"istio.io/istio/pkg/security"
	"istio.io/istio/security/pkg/nodeagent/caclient/providers/citadel"
	"istio.io/istio/security/pkg/pki/util"
)

// What the tests ask for and what the issued certificates must show.
const (
	trustDomain  = "cluster.local"
	workloadID   = "spiffe://cluster.local/ns/e2e/sa/workload"
	otherID      = "spiffe://cluster.local/ns/e2e/sa/other"
	caServerName = "istiod.istio-system.svc" // the server's default DNS SAN; Istio's default CA name
	clusterID    = "Kubernetes"

	leafTTL       = time.Hour
	clockSkew     = 2 * time.Minute // NotBefore = now - clockSkew (server default)
	timeTolerance = time.Minute
	rpcTimeout    = 30 * time.Second // Istio's client sets no deadline; this turns a hang into a failure
)

// Certificate extension OIDs checked for criticality.
var (
	oidKeyUsage         = asn1.ObjectIdentifier{2, 5, 29, 15}
	oidSubjectAltName   = asn1.ObjectIdentifier{2, 5, 29, 17}
	oidBasicConstraints = asn1.ObjectIdentifier{2, 5, 29, 19}
)

// Prometheus metric names Istio operators have dashboards for.
const (
	metricCSRCount     = "citadel_server_csr_count"
	metricSuccessCount = "citadel_server_success_cert_issuance_count"
	metricAuthnFailure = "citadel_server_authentication_failure_count"
)

// TestIstioClient runs Castellan as a process for each signer backend and
// renews a workload certificate over mTLS with Istio's own CA client, the way
// pilot-agent on a VM does, then checks the certificate, the audit trail,
// refusals, metrics and a clean shutdown.
func TestIstioClient(t *testing.T) {
	for _, signer := range []string{"selfsigned", "intermediate", "vault", "googlecas", "awspca"} {
		t.Run(signer, func(t *testing.T) {
			t.Parallel()
			testBackend(t, signer, nil)
		})
	}
	// The self-signed root's key in a SoftHSM2 token (hsm_test.go).
	t.Run("selfsigned-hsm", func(t *testing.T) {
		t.Parallel()
		hsm := newSoftHSM(t)
		testBackend(t, "selfsigned", hsm.configure)
		if got := hsm.objects(t); got != 2 {
			t.Errorf("token holds %d key objects, want 2: the root's key pair, made there", got)
		}
	})
}

// backend is one server under test and what the tests know about its CA.
type backend struct {
	signer string
	srv    *server
	ca     *testCA // the operator's CA for the intermediate signer, else nil
	// remote is the external PKI of the vault, googlecas and awspca signers, else nil.
	remote *remotePKI
	// bundle is DIR/root-cert.pem as the server wrote it at start.
	bundle []*x509.Certificate
	// wantIntermediates are the certificates between leaf and root that
	// every response must carry, in order.
	wantIntermediates []*x509.Certificate
	// tempDir makes a directory that lives as long as the server, so that
	// credentials written in one step outlive the subtest that wrote them.
	tempDir func() string
}

// credential is a workload's key and certificate chain on disk, as
// castellanctl issue or pilot-agent writes them.
type credential struct {
	keyFile, chainFile string
}

// testBackend runs every step against one server with the given signer,
// configured further by setup unless nil. Steps depend on earlier ones, so
// a failed step ends the sequence.
func testBackend(t *testing.T, signer string, setup func(*serverConfig)) {
	b := &backend{signer: signer, tempDir: t.TempDir}
	cfg := serverConfig{signer: signer}
	if setup != nil {
		setup(&cfg)
	}
	if signer == "intermediate" {
		b.ca = newTestCA(t)
		b.wantIntermediates = []*x509.Certificate{b.ca.intermediate}
		cfg.cacertsDir = b.ca.writeCACerts(t)
	}
	if start := remoteBackends[signer]; start != nil {
		b.remote = start(t)
		b.wantIntermediates = b.remote.intermediates
		cfg.extraArgs = append(cfg.extraArgs, b.remote.args...)
		cfg.env = b.remote.env
	}
	b.srv = startServer(t, cfg)
	rootFile := filepath.Join(b.srv.dataDir, "root-cert.pem")

	if !t.Run("trust bundle", func(t *testing.T) {
		b.bundle = readCerts(t, rootFile)
		for _, c := range b.bundle {
			if !c.IsCA || c.CheckSignatureFrom(c) != nil {
				t.Errorf("root-cert.pem holds %s, which is not a self-signed CA", describeCerts([]*x509.Certificate{c}))
			}
		}
		if b.ca != nil && !sameCertSet(b.bundle, b.ca.roots()) {
			t.Errorf("root-cert.pem = %s, want the cacerts roots %s", describeCerts(b.bundle), describeCerts(b.ca.roots()))
		}
		if b.remote != nil && !sameCertSet(b.bundle, b.remote.roots) {
			t.Errorf("root-cert.pem = %s, want the %s roots %s", describeCerts(b.bundle), b.signer, describeCerts(b.remote.roots))
		}
		got, err := parseCerts(b.srv.ctl(t, "bundle"))
		if err != nil {
			t.Fatalf("castellanctl bundle: %v", err)
		}
		if !sameCerts(got, b.bundle) {
			t.Errorf("castellanctl bundle = %s, want root-cert.pem %s", describeCerts(got), describeCerts(b.bundle))
		}
	}) {
		return
	}

	var cred credential
	if !t.Run("bootstrap with castellanctl issue", func(t *testing.T) {
		cred = bootstrap(t, b)
	}) {
		return
	}

	// Each renewal authenticates with the certificate the previous step
	// got, as a VM does from one rotation to the next.
	before := b.srv.metrics(t)
	for _, tc := range []struct {
		name string
		opts util.CertOptions
	}{
		{"renew pilot-agent RSA-2048", util.CertOptions{Host: workloadID, RSAKeySize: 2048}},
		{"renew ztunnel-style ECDSA P-256", util.CertOptions{Host: workloadID, ECSigAlg: util.EcdsaSigAlg, ECCCurve: util.P256Curve}},
	} {
		if !t.Run(tc.name, func(t *testing.T) {
			cred = renew(t, b, cred, tc.opts)
		}) {
			return
		}
	}

	for _, tc := range []struct {
		name     string
		tlsOpts  *citadel.TLSOptions
		csrID    string
		wantCode string
		// wantCaller is the audited caller; "" for an anonymous one.
		wantCaller, wantAuthMethod string
	}{
		{
			name:           "refuse CSR for another identity",
			tlsOpts:        &citadel.TLSOptions{RootCert: rootFile, Key: cred.keyFile, Cert: cred.chainFile},
			csrID:          otherID,
			wantCode:       "InvalidArgument",
			wantCaller:     workloadID,
			wantAuthMethod: "mtls",
		},
		{
			name:     "refuse caller without certificate or token",
			tlsOpts:  &citadel.TLSOptions{RootCert: rootFile},
			csrID:    workloadID,
			wantCode: "Unauthenticated",
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			csrPEM, _, err := util.GenCSR(util.CertOptions{Host: tc.csrID, ECSigAlg: util.EcdsaSigAlg, ECCCurve: util.P256Curve})
			if err != nil {
				t.Fatal(err)
			}
			n := len(b.srv.auditList(t))
			chain, err := csrSign(t, newClient(t, b.srv, tc.tlsOpts), csrPEM)
			if err == nil {
				t.Fatalf("CSRSign succeeded with %d elements, want code %s", len(chain), tc.wantCode)
			}
			if got := grpcCode(err); got != tc.wantCode {
				t.Errorf("CSRSign error code = %q, want %q (error: %v)", got, tc.wantCode, err)
			}

			// Exactly one record: also proves the client did not retry.
			recs := csrRecords(b.srv.auditList(t)[n:])
			if len(recs) != 1 {
				t.Fatalf("new csr audit records = %d, want 1: %+v", len(recs), recs)
			}
			r := recs[0]
			checkFields(t, "audit record", []field{
				{"outcome", r.Outcome, "refused"},
				{"code", r.Code, tc.wantCode},
				{"cluster_id", r.ClusterID, clusterID},
				{"caller", r.Caller, tc.wantCaller},
				{"serial", r.Serial, ""},
				{"cert_sha256", r.CertSHA256, ""},
			})
			if tc.wantAuthMethod != "" && r.AuthMethod != tc.wantAuthMethod {
				t.Errorf("audit record auth_method = %q, want %q", r.AuthMethod, tc.wantAuthMethod)
			}
			if tc.wantCaller == "" && r.GrantedIdentity != "" {
				t.Errorf("audit record granted_identity = %q for an unauthenticated caller, want empty", r.GrantedIdentity)
			}
			if r.Reason == "" {
				t.Errorf("audit record of a refusal has no reason: %+v", r)
			}
		})
	}

	t.Run("metrics", func(t *testing.T) {
		after := b.srv.metrics(t)
		for _, m := range []struct {
			name  string
			delta float64
		}{
			{metricCSRCount, 4}, // two renewals, two refusals
			{metricSuccessCount, 2},
			{metricAuthnFailure, 1},
		} {
			if _, ok := after[m.name]; !ok {
				t.Errorf("/metrics has no %s", m.name)
				continue
			}
			if got := after[m.name] - before[m.name]; got != m.delta {
				t.Errorf("%s rose by %v, want %v", m.name, got, m.delta)
			}
		}
	})

	t.Run("audit verify", func(t *testing.T) {
		recs := b.srv.auditList(t)
		for _, r := range recs {
			if r.Hash == "" {
				t.Errorf("audit record seq %d has no hash", r.Seq)
			}
		}
		if r := b.srv.runCtl(t, "audit", "verify"); r.err != nil {
			t.Errorf("castellanctl audit verify on an untouched log: %v\nstdout:\n%s\nstderr:\n%s", r.err, r.stdout, r.stderr)
		}
	})

	t.Run("SIGTERM", func(t *testing.T) {
		state, took := b.srv.stop(t)
		if !state.Exited() || state.ExitCode() != 0 {
			t.Errorf("castellan serve after SIGTERM: %v, want exit status 0", state)
		}
		t.Logf("exited %v after SIGTERM", took.Round(time.Millisecond))
	})
}

// bootstrap issues the workload's first certificate with castellanctl and
// checks it and its audit record.
func bootstrap(t *testing.T, b *backend) credential {
	out := b.tempDir()
	requested := time.Now()
	b.srv.ctl(t, "issue", "--identity", workloadID, "--out-dir", out, "--ttl", leafTTL.String())
	done := time.Now()

	cred := credential{keyFile: filepath.Join(out, "key.pem"), chainFile: filepath.Join(out, "cert-chain.pem")}
	fi, err := os.Stat(cred.keyFile)
	if err != nil {
		t.Fatal(err)
	}
	if perm := fi.Mode().Perm(); perm != 0o600 {
		t.Errorf("key.pem mode = %v, want 0600", perm)
	}
	keyPEM, err := os.ReadFile(cred.keyFile)
	if err != nil {
		t.Fatal(err)
	}
	chainPEM, err := os.ReadFile(cred.chainFile)
	if err != nil {
		t.Fatal(err)
	}
	pair, err := tls.X509KeyPair(chainPEM, keyPEM)
	if err != nil {
		t.Fatalf("cert-chain.pem and key.pem do not form a key pair: %v", err)
	}

	chain := readCerts(t, cred.chainFile)
	if want := 1 + len(b.wantIntermediates); len(chain) != want {
		t.Fatalf("cert-chain.pem holds %d certificates %s, want %d (leaf, then intermediates)", len(chain), describeCerts(chain), want)
	}
	if !sameCerts(chain[1:], b.wantIntermediates) {
		t.Errorf("cert-chain.pem intermediates = %s, want %s", describeCerts(chain[1:]), describeCerts(b.wantIntermediates))
	}
	if roots := readCerts(t, filepath.Join(out, "root-cert.pem")); !sameCerts(roots, b.bundle) {
		t.Errorf("issued root-cert.pem = %s, want the trust bundle %s", describeCerts(roots), describeCerts(b.bundle))
	}

	leaf := chain[0]
	issuer := verifyLeaf(t, b, leaf, chain[1:])
	checkLeaf(t, b, leaf, issuer, pair.Leaf.PublicKey, requested, done)

	rec := issuedRecord(t, b, leaf, issuer)
	checkFields(t, "audit record", []field{{"auth_method", rec.AuthMethod, "operator"}})
	if rec.Kind != "csr" && rec.Kind != "operator" {
		t.Errorf("audit record kind = %q, want csr or operator", rec.Kind)
	}
	return cred
}

// renew gets a certificate for a CSR made with opts from Istio's CA client,
// authenticated by cred's client certificate, checks the response field by
// field and the audit record, and returns the new key and chain on disk.
func renew(t *testing.T, b *backend, cred credential, opts util.CertOptions) credential {
	csrPEM, keyPEM, err := util.GenCSR(opts)
	if err != nil {
		t.Fatal(err)
	}
	csrBlock, _ := pem.Decode(csrPEM)
	if csrBlock == nil {
		t.Fatal("GenCSR returned no PEM")
	}
	csr, err := x509.ParseCertificateRequest(csrBlock.Bytes)
	if err != nil {
		t.Fatal(err)
	}

	client := newClient(t, b.srv, &citadel.TLSOptions{
		RootCert: filepath.Join(b.srv.dataDir, "root-cert.pem"),
		Key:      cred.keyFile,
		Cert:     cred.chainFile,
	})
	n := len(b.srv.auditList(t))
	requested := time.Now()
	resp, err := csrSign(t, client, csrPEM)
	done := time.Now()
	if err != nil {
		t.Fatalf("CSRSign: %v", err)
	}

	// Response shape: [leaf, intermediates..., root bundle].
	if len(resp) < 2 {
		t.Fatalf("response has %d elements, want at least 2", len(resp))
	}
	var certs []*x509.Certificate
	for i, elem := range resp[:len(resp)-1] {
		c, err := parseCerts([]byte(elem))
		if err != nil {
			t.Fatalf("response element %d: %v", i, err)
		}
		if len(c) != 1 {
			t.Fatalf("response element %d holds %d certificates %s, want exactly 1", i, len(c), describeCerts(c))
		}
		certs = append(certs, c[0])
	}
	leaf, intermediates := certs[0], certs[1:]
	gotBundle, err := parseCerts([]byte(resp[len(resp)-1]))
	if err != nil {
		t.Fatalf("last response element (root bundle): %v", err)
	}
	if !sameCerts(gotBundle, b.bundle) {
		t.Errorf("last response element = %s, want root-cert.pem unsplit %s", describeCerts(gotBundle), describeCerts(b.bundle))
	}
	if b.ca != nil && !sameCertSet(gotBundle, b.ca.roots()) {
		t.Errorf("last response element = %s, want both cacerts roots %s", describeCerts(gotBundle), describeCerts(b.ca.roots()))
	}
	if !sameCerts(intermediates, b.wantIntermediates) {
		t.Errorf("response elements 1..%d = %s, want intermediates %s", len(resp)-2, describeCerts(intermediates), describeCerts(b.wantIntermediates))
	}

	// pilot-agent serves all elements joined, with the CSR's key.
	if _, err := tls.X509KeyPair(concatCerts(resp), keyPEM); err != nil {
		t.Errorf("response chain and the CSR's key do not form a key pair: %v", err)
	}

	issuer := verifyLeaf(t, b, leaf, intermediates)
	checkLeaf(t, b, leaf, issuer, csr.PublicKey, requested, done)

	recs := csrRecords(b.srv.auditList(t)[n:])
	if len(recs) != 1 {
		t.Errorf("new csr audit records = %d, want 1: %+v", len(recs), recs)
	}
	rec := issuedRecord(t, b, leaf, issuer)
	checkFields(t, "audit record", []field{
		{"kind", rec.Kind, "csr"},
		{"auth_method", rec.AuthMethod, "mtls"},
		{"caller", rec.Caller, workloadID},
		{"cluster_id", rec.ClusterID, clusterID},
	})

	dir := b.tempDir()
	return credential{
		keyFile:   writeFile(t, dir, "key.pem", keyPEM, 0o600),
		chainFile: writeFile(t, dir, "cert-chain.pem", concatCerts(resp[:len(resp)-1]), 0o644),
	}
}

// newClient returns Istio's CA client for srv, configured as pilot-agent on
// a VM is: the mesh root as trust anchor, the CA's DNS name checked
// (ISTIOD_SAN, since the address dialled is an IP), cluster ID "Kubernetes",
// no token, and a client certificate only when tlsOpts names one.
func newClient(t *testing.T, srv *server, tlsOpts *citadel.TLSOptions) *citadel.CitadelClient {
	t.Helper()
	c, err := citadel.NewCitadelClient(&security.Options{
		CAEndpoint:    srv.grpcAddr,
		CAEndpointSAN: caServerName,
		ClusterID:     clusterID,
	}, tlsOpts)
	if err != nil {
		t.Fatalf("NewCitadelClient: %v", err)
	}
	t.Cleanup(c.Close)
	return c
}

// csrSign calls client.CSRSign for leafTTL, failing the test if it does not
// return within rpcTimeout (Istio's client sets no deadline of its own).
func csrSign(t *testing.T, client *citadel.CitadelClient, csrPEM []byte) ([]string, error) {
	t.Helper()
	type result struct {
		chain []string
		err   error
	}
	ch := make(chan result, 1)
	go func() {
		chain, err := client.CSRSign(csrPEM, int64(leafTTL/time.Second))
		ch <- result{chain, err}
	}()
	select {
	case r := <-ch:
		return r.chain, r.err
	case <-time.After(rpcTimeout):
		t.Fatalf("CSRSign did not return within %v", rpcTimeout)
		return nil, nil
	}
}

// grpcCodeRE finds the status code in a gRPC error's text. Istio's client
// wraps the status error with %v, so its code survives only as text.
var grpcCodeRE = regexp.MustCompile(`rpc error: code = (\w+)`)

// grpcCode returns the gRPC code name in err's text, or "" if none.
func grpcCode(err error) string {
	if m := grpcCodeRE.FindStringSubmatch(err.Error()); m != nil {
		return m[1]
	}
	return ""
}

// concatCerts joins PEM elements the way pilot-agent does before serving
// them (a newline between elements that lack one).
func concatCerts(elems []string) []byte {
	var b bytes.Buffer
	for i, e := range elems {
		b.WriteString(e)
		if i < len(elems)-1 && !strings.HasSuffix(e, "\n") {
			b.WriteByte('\n')
		}
	}
	return b.Bytes()
}

// verifyLeaf checks that leaf chains to the trust bundle through
// intermediates, for both server and client authentication, and returns the
// certificate that issued it.
func verifyLeaf(t *testing.T, b *backend, leaf *x509.Certificate, intermediates []*x509.Certificate) *x509.Certificate {
	t.Helper()
	roots, inter := x509.NewCertPool(), x509.NewCertPool()
	for _, c := range b.bundle {
		roots.AddCert(c)
	}
	for _, c := range intermediates {
		inter.AddCert(c)
	}
	var chain []*x509.Certificate
	for _, usage := range []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth} {
		chains, err := leaf.Verify(x509.VerifyOptions{Roots: roots, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{usage}})
		if err != nil {
			t.Fatalf("leaf does not verify against the trust bundle (usage %v): %v", usage, err)
		}
		chain = chains[0]
	}
	if len(chain) < 2 {
		t.Fatalf("verified chain %s has no issuer", describeCerts(chain))
	}
	if b.ca != nil {
		want := []*x509.Certificate{leaf, b.ca.intermediate, b.ca.root}
		if !sameCerts(chain, want) {
			t.Errorf("verified chain = %s, want %s", describeCerts(chain), describeCerts(want))
		}
	}
	return chain[1]
}

// checkLeaf checks a workload leaf against the certificate profile. pub is
// the key the certificate must certify; requested and done bracket the
// issuing call.
func checkLeaf(t *testing.T, b *backend, leaf, issuer *x509.Certificate, pub crypto.PublicKey, requested, done time.Time) {
	t.Helper()

	wantURI, _ := url.Parse(workloadID)
	if len(leaf.URIs) != 1 || leaf.URIs[0].String() != wantURI.String() {
		t.Errorf("leaf URI SANs = %v, want exactly [%s]", leaf.URIs, workloadID)
	}
	if len(leaf.DNSNames)+len(leaf.IPAddresses)+len(leaf.EmailAddresses) != 0 {
		t.Errorf("leaf has DNS %v, IP %v, email %v SANs, want none", leaf.DNSNames, leaf.IPAddresses, leaf.EmailAddresses)
	}
	// Castellan's profile: an empty subject, so a critical SAN (RFC 5280);
	// a backend that sets a subject (AWS PCA) marks the SAN non-critical.
	wantSubject := ""
	if b.remote != nil {
		wantSubject = b.remote.leafSubject
	}
	for _, ext := range []struct {
		name     string
		oid      asn1.ObjectIdentifier
		critical bool
	}{
		{"subjectAltName", oidSubjectAltName, wantSubject == ""},
		{"keyUsage", oidKeyUsage, true},
		{"basicConstraints", oidBasicConstraints, true},
	} {
		i := slices.IndexFunc(leaf.Extensions, func(e pkix.Extension) bool { return e.Id.Equal(ext.oid) })
		switch {
		case i < 0:
			t.Errorf("leaf has no %s extension", ext.name)
		case leaf.Extensions[i].Critical != ext.critical:
			t.Errorf("leaf %s extension critical = %v, want %v", ext.name, leaf.Extensions[i].Critical, ext.critical)
		}
	}
	switch {
	case wantSubject != "" && leaf.Subject.String() != wantSubject:
		t.Errorf("leaf subject = %q, want %q", leaf.Subject.String(), wantSubject)
	case wantSubject == "" && !bytes.Equal(leaf.RawSubject, []byte{0x30, 0x00}): // an empty Name is an empty SEQUENCE
		t.Errorf("leaf subject = %q, want empty", leaf.Subject.String())
	}

	wantKU := x509.KeyUsageDigitalSignature
	if _, ok := pub.(*rsa.PublicKey); ok {
		wantKU |= x509.KeyUsageKeyEncipherment
	}
	if leaf.KeyUsage != wantKU {
		t.Errorf("leaf KeyUsage = %s, want %s", keyUsageNames(leaf.KeyUsage), keyUsageNames(wantKU))
	}
	gotEKU := slices.Clone(leaf.ExtKeyUsage)
	slices.Sort(gotEKU)
	if want := []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth}; !slices.Equal(gotEKU, want) || len(leaf.UnknownExtKeyUsage) != 0 {
		t.Errorf("leaf ExtKeyUsage = %v (+ unknown %v), want exactly %v", leaf.ExtKeyUsage, leaf.UnknownExtKeyUsage, want)
	}
	if !leaf.BasicConstraintsValid || leaf.IsCA {
		t.Errorf("leaf BasicConstraintsValid = %v, IsCA = %v; want true, false", leaf.BasicConstraintsValid, leaf.IsCA)
	}
	if len(issuer.SubjectKeyId) == 0 || !bytes.Equal(leaf.AuthorityKeyId, issuer.SubjectKeyId) {
		t.Errorf("leaf AuthorityKeyId = %x, want issuer SubjectKeyId %x", leaf.AuthorityKeyId, issuer.SubjectKeyId)
	}
	// Castellan's own signers use 128-bit serials; Vault and CAS pick up to 20 octets.
	maxBits := 128
	if b.remote != nil {
		maxBits = 159
	}
	if s := leaf.SerialNumber; s.Sign() <= 0 || s.BitLen() <= 64 || s.BitLen() > maxBits {
		t.Errorf("leaf serial %x has %d bits, want a positive random number of 65 to %d bits", s, s.BitLen(), maxBits)
	}

	checkTime(t, "NotBefore", leaf.NotBefore, requested.Add(-clockSkew), done.Add(-clockSkew))
	checkTime(t, "NotAfter", leaf.NotAfter, requested.Add(leafTTL), done.Add(leafTTL))
	if got, want := leaf.NotAfter.Sub(leaf.NotBefore), leafTTL+clockSkew; got < want-timeTolerance || got > want+timeTolerance {
		t.Errorf("leaf validity = %v, want %v ± %v", got, want, timeTolerance)
	}
	if leaf.NotAfter.After(issuer.NotAfter) {
		t.Errorf("leaf NotAfter %v is after the issuer's %v", leaf.NotAfter, issuer.NotAfter)
	}

	k, ok := pub.(interface{ Equal(crypto.PublicKey) bool })
	if !ok || !k.Equal(leaf.PublicKey) {
		t.Errorf("leaf public key (%T) is not the requested one (%T)", leaf.PublicKey, pub)
	}
}

// keyUsageNames spells out the bits of a KeyUsage for failure messages.
func keyUsageNames(ku x509.KeyUsage) string {
	names := []string{"digitalSignature", "contentCommitment", "keyEncipherment", "dataEncipherment",
		"keyAgreement", "keyCertSign", "cRLSign", "encipherOnly", "decipherOnly"}
	var out []string
	for i, n := range names {
		if ku&(1<<i) != 0 {
			out = append(out, n)
		}
	}
	return "[" + strings.Join(out, " ") + "]"
}

// checkTime checks that got lies in [earliest, latest] widened by
// timeTolerance and truncated to the second, as certificates carry it.
func checkTime(t *testing.T, name string, got, earliest, latest time.Time) {
	t.Helper()
	lo := earliest.Add(-timeTolerance).Truncate(time.Second)
	hi := latest.Add(timeTolerance)
	if got.Before(lo) || got.After(hi) {
		t.Errorf("leaf %s = %v, want within [%v, %v]", name, got.UTC(), lo.UTC(), hi.UTC())
	}
}

// issuedRecord finds the one audit record of leaf and checks the fields
// every issuance record carries.
func issuedRecord(t *testing.T, b *backend, leaf, issuer *x509.Certificate) auditRecord {
	t.Helper()
	recs := recordsWithSerial(t, b.srv.auditList(t), leaf.SerialNumber)
	if len(recs) != 1 {
		t.Fatalf("audit records with serial %x = %d, want 1: %+v", leaf.SerialNumber, len(recs), recs)
	}
	r := recs[0]
	sum := sha256.Sum256(leaf.Raw)
	checkFields(t, "audit record", []field{
		{"outcome", r.Outcome, "issued"},
		{"code", r.Code, "OK"},
		{"granted_identity", r.GrantedIdentity, workloadID},
		{"cert_sha256", r.CertSHA256, hex.EncodeToString(sum[:])},
		{"signer", r.Signer, b.signer},
		{"not_before", normTime(r.NotBefore), leaf.NotBefore.UTC().Format(time.RFC3339)},
		{"not_after", normTime(r.NotAfter), leaf.NotAfter.UTC().Format(time.RFC3339)},
	})
	if kid, err := hex.DecodeString(r.IssuerKeyID); err != nil || !bytes.Equal(kid, issuer.SubjectKeyId) {
		t.Errorf("audit record issuer_key_id = %q, want hex of %x", r.IssuerKeyID, issuer.SubjectKeyId)
	}
	return r
}

// normTime re-renders an RFC 3339 timestamp in UTC to whole seconds, so
// that equal instants compare equal whatever the zone or precision. A value
// that does not parse comes back marked as such, so it never matches.
func normTime(s string) string {
	tm, err := time.Parse(time.RFC3339Nano, s)
	if err != nil {
		return fmt.Sprintf("unparseable %q", s)
	}
	return tm.UTC().Truncate(time.Second).Format(time.RFC3339)
}

// field is one expected value in a record.
type field struct {
	name, got, want string
}

// checkFields reports every field whose value differs from the expected one.
func checkFields(t *testing.T, what string, fields []field) {
	t.Helper()
	for _, f := range fields {
		if f.got != f.want {
			t.Errorf("%s %s = %q, want %q", what, f.name, f.got, f.want)
		}
	}
}
