package e2e

import (
	"context"
	"crypto"
	"crypto/rand"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	certv1 "k8s.io/api/certificates/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/utils/ptr"

	"github.com/castellan-ca/castellan/e2e/internal/kubeenv"
)

// The CSR signer names of the istiod tests: workload certificates for
// istiod's RA mode (K8S_SIGNER) and istiod's own DNS certificate
// (PILOT_CERT_PROVIDER=k8s.io/<name>).
const (
	raSigner  = "castellan.io/istiod-ra"
	dnsSigner = "castellan.io/istiod-dns"
	istiodDNS = "istiod.istio-system.svc"
)

// csrRequesterRules are what istiod's RA mode needs on the CSR API
// (Istio's chart grants the same): create, approve its own, read and delete.
func csrRequesterRules(signers ...string) []rbacv1.PolicyRule {
	certs := func(res []string, verbs ...string) rbacv1.PolicyRule {
		return rbacv1.PolicyRule{APIGroups: []string{"certificates.k8s.io"}, Resources: res, Verbs: verbs}
	}
	approve := certs([]string{"signers"}, "approve")
	approve.ResourceNames = signers
	return []rbacv1.PolicyRule{
		certs([]string{"certificatesigningrequests"}, "create", "get", "list", "watch", "delete"),
		certs([]string{"certificatesigningrequests/approval"}, "update"),
		approve,
	}
}

// csrRequester returns a client authenticated as the service account
// ns/name, allowed to create and approve CSRs of signers, and its token.
func csrRequester(t *testing.T, env *kubeenv.Env, ns, name string, signers ...string) (kubernetes.Interface, string) {
	t.Helper()
	ctx := t.Context()
	env.CreateServiceAccount(t, ns, name)
	rbac := env.Client.RbacV1()
	role := "csr-requester-" + ns + "-" + name
	if _, err := rbac.ClusterRoles().Create(ctx, &rbacv1.ClusterRole{ObjectMeta: metav1.ObjectMeta{Name: role},
		Rules: csrRequesterRules(signers...)}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := rbac.ClusterRoleBindings().Create(ctx, &rbacv1.ClusterRoleBinding{ObjectMeta: metav1.ObjectMeta{Name: role},
		RoleRef:  rbacv1.RoleRef{APIGroup: rbacv1.GroupName, Kind: "ClusterRole", Name: role},
		Subjects: []rbacv1.Subject{{Kind: "ServiceAccount", Name: name, Namespace: ns}}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	token := env.Token(t, ns, name, kubeenv.TokenOptions{ExpirationSeconds: 3600})
	c, err := kubernetes.NewForConfig(&rest.Config{Host: env.URL, BearerToken: token, TLSClientConfig: rest.TLSClientConfig{CAData: env.CAPEM},
		QPS: env.Config.QPS, Burst: env.Config.Burst})
	if err != nil {
		t.Fatal(err)
	}
	return c, token
}

// csrPEM makes a PEM CSR for key with the given SANs.
func csrPEM(t *testing.T, key crypto.Signer, uri string, dns ...string) []byte {
	t.Helper()
	tmpl := &x509.CertificateRequest{DNSNames: dns}
	if uri != "" {
		u, err := url.Parse(uri)
		if err != nil {
			t.Fatal(err)
		}
		tmpl.URIs = []*url.URL{u}
	}
	der, err := x509.CreateCertificateRequest(rand.Reader, tmpl, key)
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der})
}

// createCSR creates a CSR for signer through client, approving it when approve is set.
func createCSR(ctx context.Context, client kubernetes.Interface, signer string, req []byte, expSeconds int32, approve bool) (*certv1.CertificateSigningRequest, error) {
	api := client.CertificatesV1().CertificateSigningRequests()
	csr, err := api.Create(ctx, &certv1.CertificateSigningRequest{
		ObjectMeta: metav1.ObjectMeta{GenerateName: "csr-workload-"},
		Spec: certv1.CertificateSigningRequestSpec{Request: req, SignerName: signer, ExpirationSeconds: ptr.To(expSeconds),
			Usages: []certv1.KeyUsage{certv1.UsageDigitalSignature, certv1.UsageKeyEncipherment, certv1.UsageServerAuth, certv1.UsageClientAuth}},
	}, metav1.CreateOptions{})
	if err != nil || !approve {
		return csr, err
	}
	csr.Status.Conditions = append(csr.Status.Conditions, certv1.CertificateSigningRequestCondition{
		Type: certv1.CertificateApproved, Status: corev1.ConditionTrue, Reason: "IstiodRAApprove", Message: "approved by the requester"})
	return api.UpdateApproval(ctx, csr.Name, csr, metav1.UpdateOptions{})
}

// errCSRFailed is a CSR that got a Failed condition.
var errCSRFailed = errors.New("CSR failed")

// awaitCSR polls the CSR until it has a certificate or a Failed condition.
func awaitCSR(ctx context.Context, client kubernetes.Interface, name string) (*certv1.CertificateSigningRequest, error) {
	for {
		csr, err := client.CertificatesV1().CertificateSigningRequests().Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			return nil, err
		}
		if len(csr.Status.Certificate) > 0 {
			return csr, nil
		}
		for _, c := range csr.Status.Conditions {
			if c.Type == certv1.CertificateFailed {
				return csr, fmt.Errorf("%w: %s: %s", errCSRFailed, c.Reason, c.Message)
			}
		}
		select {
		case <-ctx.Done():
			return csr, fmt.Errorf("CSR %s not answered: %w", name, ctx.Err())
		case <-time.After(eventualPoll):
		}
	}
}

// istiodRASign does what istiod does in RA mode (EXTERNAL_CA=
// ISTIOD_RA_KUBERNETES_API): create the CSR, approve it itself, wait up to
// 60 s for the certificate, delete the CSR, and return the chain.
func istiodRASign(ctx context.Context, client kubernetes.Interface, signer string, req []byte, expSeconds int32) ([]*x509.Certificate, *certv1.CertificateSigningRequest, error) {
	csr, err := createCSR(ctx, client, signer, req, expSeconds, true)
	if err != nil {
		return nil, nil, err
	}
	defer func() {
		// Best effort, as istiod: the answer is in hand either way.
		_ = client.CertificatesV1().CertificateSigningRequests().Delete(context.WithoutCancel(ctx), csr.Name, metav1.DeleteOptions{})
	}()
	wctx, cancel := context.WithTimeout(ctx, 60*time.Second)
	defer cancel()
	got, err := awaitCSR(wctx, client, csr.Name)
	if err != nil {
		return nil, got, err
	}
	chain, err := parseCerts(got.Status.Certificate)
	return chain, got, err
}

// csrPeer is how the audit log names a CSR.
func csrPeer(csr *certv1.CertificateSigningRequest) string {
	return fmt.Sprintf("csr/%s/%s", csr.Name, csr.UID)
}

// TestCSRSigner runs Castellan's certificates.k8s.io/v1 signer against a
// real kube-apiserver 1.37, with istiod's RA calls (create, approve, wait,
// delete) reproduced by a client with istiod's service account: workload
// certificates and istiod's DNS certificate signed for istiod, with
// expirationSeconds honoured; refused with Failed for another requester
// and a forbidden SAN; unapproved CSRs and kubernetes.io signers left
// alone; one audit record per answer.
func TestCSRSigner(t *testing.T) {
	env := kubeenv.Start(t)
	const leaseNS = "csr-lease"
	kc := castellanKubeconfigFor(t, env, signerRBAC{podSigners: []string{defaultPodSigner}, csrSigners: []string{raSigner, dnsSigner}}, leaseNS)
	env.CreateNamespace(t, "istio-system", nil)
	env.CreateNamespace(t, "other", nil)
	istiod, _ := csrRequester(t, env, "istio-system", "istiod", raSigner, dnsSigner)
	other, _ := csrRequester(t, env, "other", "intruder", raSigner, dnsSigner)

	dir := t.TempDir()
	cfgFile := filepath.Join(dir, "castellan.yaml")
	cfgYAML := fmt.Sprintf(`csrSigners:
- signerName: %s
  requesters: [system:serviceaccount:istio-system:istiod]
  identities: workload
- signerName: %s
  requesters: [system:serviceaccount:istio-system:istiod]
  identities: none
  dnsNames: [%s]
`, raSigner, dnsSigner, istiodDNS)
	if err := os.WriteFile(cfgFile, []byte(cfgYAML), 0o600); err != nil {
		t.Fatal(err)
	}
	srv := startServer(t, serverConfig{signer: "selfsigned", configFile: cfgFile, extraArgs: kubeArgs(kc, "tokenreview", "--root-configmaps=false",
		"--leader-election-namespace", leaseNS)})
	roots, err := parseCerts(srv.ctl(t, "bundle"))
	if err != nil {
		t.Fatal(err)
	}
	key := testKey(t, "csr-workload")
	workload := "spiffe://" + trustDomain + "/ns/app/sa/web"
	answered := map[string]string{} // peer → outcome

	// verify returns the leaf and its issuer.
	verify := func(t *testing.T, chain []*x509.Certificate, usage x509.ExtKeyUsage) (leaf, issuer *x509.Certificate) {
		t.Helper()
		pool, inter := x509.NewCertPool(), x509.NewCertPool()
		for _, r := range roots {
			pool.AddCert(r)
		}
		for _, c := range chain[1:] {
			inter.AddCert(c)
		}
		verified, err := chain[0].Verify(x509.VerifyOptions{Roots: pool, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{usage}})
		if err != nil {
			t.Fatalf("certificate does not chain to Castellan's bundle: %v", err)
		}
		return chain[0], verified[0][1]
	}

	t.Run("istiod RA workload certificate", func(t *testing.T) {
		chain, got, err := istiodRASign(t.Context(), istiod, raSigner, csrPEM(t, key, workload), 3600)
		if err != nil {
			t.Fatal(err)
		}
		leaf, issuer := verify(t, chain, x509.ExtKeyUsageClientAuth)
		checkProfile(t, leaf, issuer, workload, key.Public(), 128, "")
		if life := leaf.NotAfter.Sub(leaf.NotBefore); life > time.Hour+clockSkew || life < time.Hour {
			t.Errorf("lifetime %s, want expirationSeconds (1h) plus at most the clock-skew backdating", life)
		}
		if _, err := istiod.CertificatesV1().CertificateSigningRequests().Get(t.Context(), got.Name, metav1.GetOptions{}); err == nil {
			t.Errorf("CSR %s still exists after the RA deleted it", got.Name)
		}
		recs := recordsByPeer(srv.auditList(t), "kubernetes.csr")[csrPeer(got)]
		if len(recs) != 1 || recs[0].Outcome != "issued" || recs[0].GrantedIdentity != workload || recordsWithSerial(t, recs, leaf.SerialNumber) == nil ||
			recs[0].Caller != "system:serviceaccount:istio-system:istiod" {
			t.Errorf("audit records = %+v, want one issuance of serial %x to istiod", recs, leaf.SerialNumber)
		}
		answered[csrPeer(got)] = "issued"
	})

	t.Run("istiod DNS certificate", func(t *testing.T) {
		chain, got, err := istiodRASign(t.Context(), istiod, dnsSigner, csrPEM(t, key, "", istiodDNS), 86400)
		if err != nil {
			t.Fatal(err)
		}
		leaf, _ := verify(t, chain, x509.ExtKeyUsageServerAuth)
		if len(leaf.DNSNames) != 1 || leaf.DNSNames[0] != istiodDNS || len(leaf.URIs) != 0 {
			t.Errorf("SANs DNS %v URI %v, want exactly DNS %s", leaf.DNSNames, leaf.URIs, istiodDNS)
		}
		answered[csrPeer(got)] = "issued"
	})

	refusals := []struct {
		name, reason string
		client       kubernetes.Interface
		signer       string
		req          []byte
	}{
		{"another requester", "authz.requester", other, raSigner, csrPEM(t, key, workload)},
		{"forbidden DNS SAN", "csr.forbidden_san", istiod, raSigner, csrPEM(t, key, workload, "evil.example.com")},
		{"SPIFFE ID of another trust domain", "csr.forbidden_san", istiod, raSigner, csrPEM(t, key, "spiffe://evil.example/ns/app/sa/web")},
		{"DNS name not in the signer's list", "csr.forbidden_san", istiod, dnsSigner, csrPEM(t, key, "", "istiod.evil.svc")},
	}
	for _, tc := range refusals {
		t.Run("refused: "+tc.name, func(t *testing.T) {
			_, got, err := istiodRASign(t.Context(), tc.client, tc.signer, tc.req, 3600)
			if !errors.Is(err, errCSRFailed) {
				t.Fatalf("got %v, want a Failed condition", err)
			}
			if len(got.Status.Certificate) != 0 {
				t.Errorf("a failed CSR carries a certificate")
			}
			recs := recordsByPeer(srv.auditList(t), "kubernetes.csr")[csrPeer(got)]
			if len(recs) != 1 || recs[0].Outcome != "refused" || recs[0].Reason != tc.reason || recs[0].Serial != "" {
				t.Errorf("audit records = %+v, want one refusal (%s)", recs, tc.reason)
			}
			answered[csrPeer(got)] = "refused"
		})
	}

	t.Run("left alone: unapproved and kubernetes.io signers", func(t *testing.T) {
		ctx := t.Context()
		unapproved, err := createCSR(ctx, istiod, raSigner, csrPEM(t, key, workload), 3600, false)
		if err != nil {
			t.Fatal(err)
		}
		// An admin approves one for a kubernetes.io signer: no
		// kube-controller-manager runs, so only Castellan could answer it.
		builtin, err := createCSR(ctx, env.Client, "kubernetes.io/kube-apiserver-client", csrPEM(t, key, "", "client.example"), 3600, true)
		if err != nil {
			t.Fatal(err)
		}
		// A request made after both is answered after both were seen.
		_, marker, err := istiodRASign(ctx, istiod, raSigner, csrPEM(t, key, workload), 3600)
		if err != nil {
			t.Fatal(err)
		}
		answered[csrPeer(marker)] = "issued"
		recs := recordsByPeer(srv.auditList(t), "kubernetes.csr")
		for _, c := range []*certv1.CertificateSigningRequest{unapproved, builtin} {
			got, err := env.Client.CertificatesV1().CertificateSigningRequests().Get(ctx, c.Name, metav1.GetOptions{})
			if err != nil {
				t.Fatal(err)
			}
			if len(got.Status.Certificate) != 0 || len(got.Status.Conditions) != len(c.Status.Conditions) {
				t.Errorf("CSR %s (%s) was answered: %+v", c.Name, c.Spec.SignerName, got.Status)
			}
			if r := recs[csrPeer(got)]; len(r) != 0 {
				t.Errorf("CSR %s (%s) audited: %+v", c.Name, c.Spec.SignerName, r)
			}
		}
	})

	t.Run("one audit record per answer", func(t *testing.T) {
		recs := recordsByPeer(srv.auditList(t), "kubernetes.csr")
		if len(recs) != len(answered) {
			t.Errorf("audit holds records of %d CSRs, %d were answered", len(recs), len(answered))
		}
		for peer, outcome := range answered {
			if r := recs[peer]; len(r) != 1 || r[0].Outcome != outcome || !strings.HasPrefix(r[0].Caller, "system:serviceaccount:") {
				t.Errorf("records of %s = %+v, want one %s", peer, r, outcome)
			}
		}
	})
}
