package main

import (
	"context"
	"crypto/x509"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/castellan-ca/castellan/cmd/internal/datadir"
	"github.com/castellan-ca/castellan/cmd/internal/servetest"
	adminpb "github.com/castellan-ca/castellan/proto/castellan/admin/v1"
	"github.com/castellan-ca/castellan/signer"
	"github.com/castellan-ca/castellan/signer/awspca"
	"github.com/castellan-ca/castellan/signer/awspca/pcatest"
)

const testCAARN = "arn:aws:acm-pca:eu-west-1:111122223333:certificate-authority/0f3c9a52"

// TestAWSPCAConfig: the awsPCA: section decodes strictly, flags override
// it, and missing or wrong keys are named.
func TestAWSPCAConfig(t *testing.T) {
	runConfigCases(t, []configCase{
		{
			name: "section",
			file: "signer: awspca\nawsPCA:\n  certificateAuthorityARN: " + testCAARN + "\n  templateARN: arn:aws:acm-pca:::template/" + awspca.TemplateBlank +
				"\n  signingAlgorithm: SHA384WITHECDSA\n  region: eu-west-1\n  endpoint: https://vpce.example\n  timeout: 3s\n  refreshInterval: 30s\n  rateLimit: 2.5\n  maxConcurrent: 4\n",
			check: func(t *testing.T, c Config) {
				p := c.AWSPCA
				if p.CertificateAuthorityARN != testCAARN || p.TemplateARN != "arn:aws:acm-pca:::template/"+awspca.TemplateBlank ||
					p.SigningAlgorithm != "SHA384WITHECDSA" || p.Region != "eu-west-1" || p.Endpoint != "https://vpce.example" ||
					p.Timeout != 3*time.Second || p.RefreshInterval != 30*time.Second || p.RateLimit != 2.5 || p.MaxConcurrent != 4 {
					t.Errorf("awsPCA = %+v", p)
				}
			},
		},
		{
			name: "flags and defaults",
			args: []string{"--signer", "awspca", "--aws-pca-certificate-authority-arn", testCAARN, "--aws-pca-rate-limit", "7"},
			check: func(t *testing.T, c Config) {
				p := c.AWSPCA
				if p.CertificateAuthorityARN != testCAARN || p.RateLimit != 7 || p.Timeout != awspca.DefaultTimeout || p.MaxConcurrent != awspca.DefaultMaxConcurrent {
					t.Errorf("awsPCA = %+v", p)
				}
			},
		},
		{name: "without CA", args: []string{"--signer", "awspca"}, wantErr: "awsPCA.certificateAuthorityARN: required"},
		{name: "not a CA ARN", args: []string{"--signer", "awspca", "--aws-pca-certificate-authority-arn", "arn:aws:acm:eu-west-1:1:certificate/x"},
			wantErr: "awsPCA.certificateAuthorityARN: \"arn:aws:acm"},
		{name: "base template", args: []string{"--signer", "awspca", "--aws-pca-certificate-authority-arn", testCAARN,
			"--aws-pca-template-arn", "arn:aws:acm-pca:::template/EndEntityCertificate/V1"}, wantErr: "awsPCA.templateARN"},
		{name: "unknown signing algorithm", args: []string{"--signer", "awspca", "--aws-pca-certificate-authority-arn", testCAARN,
			"--aws-pca-signing-algorithm", "MD5WITHRSA"}, wantErr: "awsPCA.signingAlgorithm"},
		{name: "plaintext endpoint", args: []string{"--signer", "awspca", "--aws-pca-certificate-authority-arn", testCAARN,
			"--aws-pca-endpoint", "http://127.0.0.1:1"}, wantErr: "awsPCA.endpoint"},
		{name: "plaintext endpoint for tests", args: []string{"--signer", "awspca", "--aws-pca-certificate-authority-arn", testCAARN,
			"--aws-pca-endpoint", "http://127.0.0.1:1", "--aws-pca-insecure"}},
		{name: "insecure without endpoint", args: []string{"--signer", "awspca", "--aws-pca-certificate-authority-arn", testCAARN, "--aws-pca-insecure"},
			wantErr: "awsPCA.insecure"},
		{name: "zero rate limit", args: []string{"--signer", "awspca", "--aws-pca-certificate-authority-arn", testCAARN, "--aws-pca-rate-limit", "0"},
			wantErr: "awsPCA.rateLimit"},
		{name: "trust domain too long for the subject", args: []string{"--signer", "awspca", "--aws-pca-certificate-authority-arn", testCAARN,
			"--trust-domain", strings.Repeat("a", 60) + ".example"}, wantErr: "trustDomain: signer awspca"},
		{name: "unknown key", file: "signer: awspca\nawsPCA:\n  caARN: x\n", wantErr: "caARN"},
		{name: "section ignored for other signers", file: "signer: selfsigned\nawsPCA:\n  certificateAuthorityARN: nonsense\n"},
	})
}

// awsEnv gives the SDK's default chain the fake's credentials through the
// environment, as an operator's AWS_* variables would, and nothing else.
func awsEnv(t *testing.T) {
	dir := t.TempDir()
	for k, v := range map[string]string{
		"AWS_ACCESS_KEY_ID": pcatest.AccessKeyID, "AWS_SECRET_ACCESS_KEY": pcatest.SecretAccessKey, "AWS_SESSION_TOKEN": "",
		"AWS_CONFIG_FILE": filepath.Join(dir, "none"), "AWS_SHARED_CREDENTIALS_FILE": filepath.Join(dir, "none"),
		"AWS_PROFILE": "", "AWS_REGION": "", "AWS_ENDPOINT_URL": "", "AWS_ENDPOINT_URL_ACM_PCA": "", "AWS_EC2_METADATA_DISABLED": "true",
	} {
		t.Setenv(k, v)
	}
}

// TestServeAWSPCA runs serve with signer awspca against the fake PCA: the
// bundle is the CA's root and a CSR is issued; a rotation adds the new root
// while the old one stays, and a restart keeps the retained root.
func TestServeAWSPCA(t *testing.T) {
	awsEnv(t)
	fake := pcatest.Start(t, pcatest.Options{})
	dataDir := t.TempDir()
	args := []string{"--signer", "awspca", "--aws-pca-certificate-authority-arn", fake.CAARN,
		"--aws-pca-endpoint", fake.URL, "--aws-pca-insecure", "--aws-pca-refresh-interval", "50ms"}
	s := startServe(t, dataDir, args...)
	oldRoot := fake.Root()
	bundle := func() []*x509.Certificate {
		return servetest.ParseCerts(t, servetest.ReadFile(t, filepath.Join(dataDir, datadir.RootCert)))
	}
	if got := bundle(); !signer.SameCertificates(got, []*x509.Certificate{oldRoot}) {
		t.Fatalf("root-cert.pem holds %d certificates, want the fake's root", len(got))
	}

	// The serving certificate and the operator credential came from PCA;
	// so does a workload certificate, with the subject the backend sets.
	if n := fake.Issued(); n != 2 {
		t.Errorf("fake issued %d certificates at start, want 2 (serving, operator)", n)
	}
	ctx, cancel := context.WithTimeout(context.Background(), callTimeout)
	defer cancel()
	resp, err := adminpb.NewAdminServiceClient(s.conn(t, true)).IssueCertificate(ctx,
		&adminpb.IssueCertificateRequest{Csr: csrPEM(t), Identity: "spiffe://cluster.local/ns/a/sa/b", ValiditySeconds: 3600})
	if err != nil {
		t.Fatalf("IssueCertificate: %v", err)
	}
	leaf := servetest.ParseCerts(t, []byte(resp.GetCertChain()[0]))[0]
	if leaf.Subject.String() != "O=cluster.local" || leaf.URIs[0].String() != "spiffe://cluster.local/ns/a/sa/b" || fake.Issued() != 3 {
		t.Errorf("workload leaf subject %q URIs %v (fake issued %d)", leaf.Subject, leaf.URIs, fake.Issued())
	}

	fake.Rotate(t)
	want := []*x509.Certificate{fake.Root(), oldRoot}
	deadline := time.Now().Add(startTimeout)
	for !signer.SameCertificates(bundle(), want) {
		if time.Now().After(deadline) {
			t.Fatalf("root-cert.pem did not become the new root and the retained old one")
		}
		time.Sleep(20 * time.Millisecond)
	}
	retained, err := loadRetainedRoots(filepath.Join(dataDir, awsPCARetainedFile))
	if err != nil || len(retained) != 1 || !retained[0].Cert.Equal(oldRoot) || !retained[0].Until.After(time.Now().Add(24*time.Hour)) {
		t.Fatalf("retained roots on disk = %+v (%v), want the old root for at least the operator credential's life", retained, err)
	}
	if err := s.stop(); err != nil {
		t.Fatalf("stop: %v", err)
	}

	startServe(t, dataDir, args...)
	if got := bundle(); !signer.SameCertificates(got, want) {
		t.Errorf("root-cert.pem after a restart holds %d certificates, want the new root and the retained one", len(got))
	}
}

// TestRetainedRootsFile: the file round-trips, and a broken one is an error.
func TestRetainedRootsFile(t *testing.T) {
	fake := pcatest.Start(t, pcatest.Options{})
	path := filepath.Join(t.TempDir(), awsPCARetainedFile)
	if got, err := loadRetainedRoots(path); err != nil || got != nil {
		t.Fatalf("missing file: %v, %v; want none", got, err)
	}
	until := time.Now().Add(time.Hour).Truncate(time.Second).UTC()
	if err := saveRetainedRoots(path, []awspca.RetainedRoot{{Cert: fake.Root(), Until: until}}); err != nil {
		t.Fatal(err)
	}
	got, err := loadRetainedRoots(path)
	if err != nil || len(got) != 1 || !got[0].Cert.Equal(fake.Root()) || !got[0].Until.Equal(until) {
		t.Errorf("round trip = %+v, %v", got, err)
	}
	if err := os.WriteFile(path, []byte(`[{"root":"not pem","until":"2030-01-01T00:00:00Z"}]`), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := loadRetainedRoots(path); err == nil {
		t.Error("a broken file loaded without error")
	}
}
