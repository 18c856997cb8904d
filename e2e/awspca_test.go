package e2e

import (
	"bufio"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"io"
	"net/url"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"istio.io/istio/security/pkg/nodeagent/caclient/providers/citadel"
	"istio.io/istio/security/pkg/pki/util"
)

// fakePCA is the fakepca process (signer/awspca/pcatest) and the remote PKI
// it stands for; do sends it a control command.
type fakePCA struct {
	pki       *remotePKI
	chainFile string

	mu    sync.Mutex
	stdin io.WriteCloser
	out   *bufio.Reader
}

// startFakePCA runs the fake AWS Private CA as a process; castellan reaches
// it through --aws-pca-endpoint and the test-only --aws-pca-insecure, with
// the fake's access key in the environment, which the AWS SDK's default
// credential chain reads.
func startFakePCA(t *testing.T) *fakePCA {
	f := &fakePCA{chainFile: filepath.Join(t.TempDir(), "chain.pem")}
	var line string
	f.stdin, f.out, line = startFake(t, fakePCABin, "-chain-out", f.chainFile)
	var endpoint, caARN, key, secret string
	if _, err := fmt.Sscanf(strings.TrimSpace(line), "listening on %s ca %s key %s secret %s", &endpoint, &caARN, &key, &secret); err != nil {
		t.Fatalf("fakepca printed %q: %v", line, err)
	}
	chain := readCerts(t, f.chainFile) // CA, root
	noFile := filepath.Join(t.TempDir(), "none")
	f.pki = &remotePKI{
		args: []string{"--aws-pca-certificate-authority-arn", caARN, "--aws-pca-endpoint", endpoint, "--aws-pca-insecure",
			"--aws-pca-refresh-interval", "200ms"},
		roots: chain[1:], intermediates: chain[:1],
		// Only the fake's key: no profile, shared file or instance metadata of the machine.
		env: []string{"AWS_ACCESS_KEY_ID=" + key, "AWS_SECRET_ACCESS_KEY=" + secret, "AWS_SESSION_TOKEN=", "AWS_PROFILE=",
			"AWS_CONFIG_FILE=" + noFile, "AWS_SHARED_CREDENTIALS_FILE=" + noFile, "AWS_EC2_METADATA_DISABLED=true",
			"AWS_ENDPOINT_URL=", "AWS_ENDPOINT_URL_ACM_PCA=", "AWS_REGION="},
		leafSubject: "O=" + trustDomain,
	}
	return f
}

// do sends one control command and returns its answer after "ok".
func (f *fakePCA) do(t *testing.T, command string) string {
	t.Helper()
	f.mu.Lock()
	defer f.mu.Unlock()
	if _, err := io.WriteString(f.stdin, command+"\n"); err != nil {
		t.Fatalf("fakepca %q: %v", command, err)
	}
	line, err := f.out.ReadString('\n')
	if err != nil {
		t.Fatalf("fakepca %q: %v", command, err)
	}
	rest, ok := strings.CutPrefix(strings.TrimSpace(line), "ok")
	if !ok {
		t.Fatalf("fakepca %q: %s", command, line)
	}
	return strings.TrimSpace(rest)
}

// TestAWSPCA runs Castellan with signer awspca against the fake PCA process
// and Istio's real CA client: a ztunnel-style CSR is issued, throttling and a
// certificate still in progress at the deadline reach the client as
// Unavailable with every attempt audited and nothing issued, and a CA
// rotation reaches the bundle while the old root stays.
func TestAWSPCA(t *testing.T) {
	t.Parallel()
	pca := startFakePCA(t)
	b := &backend{signer: "awspca", remote: pca.pki, wantIntermediates: pca.pki.intermediates, tempDir: t.TempDir}
	b.srv = startServer(t, serverConfig{signer: "awspca", env: pca.pki.env,
		extraArgs: append(slices.Clone(pca.pki.args), "--aws-pca-timeout", "2s")})
	rootFile := filepath.Join(b.srv.dataDir, "root-cert.pem")
	b.bundle = readCerts(t, rootFile)
	if !sameCerts(b.bundle, pca.pki.roots) {
		t.Fatalf("root-cert.pem = %s, want the fake's root %s", describeCerts(b.bundle), describeCerts(pca.pki.roots))
	}
	cred := bootstrap(t, b)
	client := func(t *testing.T) *citadel.CitadelClient {
		return newClient(t, b.srv, &citadel.TLSOptions{RootCert: rootFile, Key: cred.keyFile, Cert: cred.chainFile})
	}

	t.Run("ztunnel CSR: empty subject, non-critical SAN, P-256", func(t *testing.T) {
		key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			t.Fatal(err)
		}
		id, _ := url.Parse(workloadID)
		der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{URIs: []*url.URL{id}}, key) // Go: SAN not critical
		if err != nil {
			t.Fatal(err)
		}
		csr, _ := x509.ParseCertificateRequest(der)
		if len(csr.Subject.Names) != 0 || len(csr.Extensions) != 1 || csr.Extensions[0].Critical {
			t.Fatalf("test CSR is not ztunnel-style: subject %q, extensions %+v", csr.Subject, csr.Extensions)
		}
		requested := time.Now()
		resp, err := csrSign(t, client(t), pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der}))
		done := time.Now()
		if err != nil {
			t.Fatalf("CSRSign: %v", err)
		}
		certs := mustParse(t, strings.Join(resp[:len(resp)-1], "\n"))
		issuer := verifyLeaf(t, b, certs[0], certs[1:])
		checkLeaf(t, b, certs[0], issuer, key.Public(), requested, done)
		rec := issuedRecord(t, b, certs[0], issuer)
		if !strings.HasPrefix(rec.Detail, "backend_ref=arn:aws:acm-pca:") || !strings.Contains(rec.Detail, "/certificate/") {
			t.Errorf("audit record detail = %q, want the certificate's ARN", rec.Detail)
		}
	})

	// unavailable asserts that a CSR fails with Unavailable after Istio's
	// client retried, each attempt audited as failed, none with a
	// certificate; it returns the number of attempts.
	unavailable := func(t *testing.T, wantDetail ...string) int {
		t.Helper()
		csrPEM, _, err := util.GenCSR(util.CertOptions{Host: workloadID, ECSigAlg: util.EcdsaSigAlg, ECCCurve: util.P256Curve})
		if err != nil {
			t.Fatal(err)
		}
		n := len(b.srv.auditList(t))
		chain, err := csrSign(t, client(t), csrPEM)
		if err == nil || grpcCode(err) != "Unavailable" {
			t.Fatalf("CSRSign = %d elements, %v; want Unavailable", len(chain), err)
		}
		recs := csrRecords(b.srv.auditList(t)[n:])
		if len(recs) < 2 {
			t.Errorf("%d audit records, want one per attempt of Istio's retrying client", len(recs))
		}
		for _, r := range recs {
			checkFields(t, "audit record", []field{{"outcome", r.Outcome, "failed"}, {"code", r.Code, "Unavailable"},
				{"reason", r.Reason, "signer.unavailable"}, {"serial", r.Serial, ""}, {"cert_sha256", r.CertSHA256, ""}})
			if !slices.ContainsFunc(wantDetail, func(d string) bool { return strings.Contains(r.Detail, d) }) {
				t.Errorf("audit detail %q contains none of %q", r.Detail, wantDetail)
			}
		}
		return len(recs)
	}
	t.Run("throttled on every attempt", func(t *testing.T) {
		issued, calls := pca.do(t, "issued"), pca.do(t, "calls IssueCertificate")
		pca.do(t, "throttle IssueCertificate 100000")
		defer pca.do(t, "throttle IssueCertificate 0")
		// The SDK retries until its attempts or the signing timeout run out.
		attempts := unavailable(t, "ThrottlingException", "context deadline exceeded")
		var before, after int
		if _, err := fmt.Sscan(calls, &before); err != nil {
			t.Fatalf("calls before: %v", err)
		}
		if _, err := fmt.Sscan(pca.do(t, "calls IssueCertificate"), &after); err != nil {
			t.Fatalf("calls after: %v", err)
		}
		if after-before < 2*attempts {
			t.Errorf("IssueCertificate reached the fake %d times for %d requests, want each retried", after-before, attempts)
		}
		if pca.do(t, "issued") != issued {
			t.Error("throttled requests issued certificates")
		}
	})
	t.Run("certificate still in progress at the deadline", func(t *testing.T) {
		pca.do(t, "pending 1h")
		defer pca.do(t, "pending 0s")
		unavailable(t, "certificate arn:aws:acm-pca:")
	})

	t.Run("CA rotation", func(t *testing.T) {
		oldRoot, oldCA := pca.pki.roots[0], pca.pki.intermediates[0]
		pca.do(t, "rotate")
		chain := readCerts(t, pca.chainFile) // CA (re-certified), new root
		newCA, newRoot := chain[0], chain[1]
		deadline := time.Now().Add(readyTimeout)
		for want := []*x509.Certificate{newRoot, oldRoot}; !sameCerts(readCerts(t, rootFile), want); {
			if time.Now().After(deadline) {
				t.Fatalf("root-cert.pem = %s, want the new root and the old one", describeCerts(readCerts(t, rootFile)))
			}
			time.Sleep(pollInterval)
		}
		b.bundle = readCerts(t, rootFile)
		b.wantIntermediates = []*x509.Certificate{newCA}
		newCred := renew(t, b, cred, util.CertOptions{Host: workloadID, RSAKeySize: 2048})
		if leaf := readCerts(t, newCred.chainFile); leaf[1].Equal(oldCA) || leaf[1].CheckSignatureFrom(newRoot) != nil {
			t.Errorf("new leaf's intermediate is not the CA re-certified under the new root")
		}
		// The credential issued before the rotation still verifies.
		old := readCerts(t, cred.chainFile)
		verifyLeaf(t, b, old[0], old[1:])
	})
}
