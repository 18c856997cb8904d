package e2e

import (
	"context"
	"crypto/x509"
	"path/filepath"
	"sync"
	"testing"
	"time"

	certv1 "k8s.io/api/certificates/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/watch"

	"github.com/castellan-ca/castellan/e2e/internal/kubeenv"
)

// istiodSA is the Kubernetes user of istiod's ServiceAccount.
const istiodSA = "system:serviceaccount:istio-system:istiod"

// testIstiodRA runs istiod as a registration authority for Castellan's CSR
// signer (README, "CertificateSigningRequest signer (istiod RA mode)"):
// pilot-agent asks istiod, istiod (under its chart's ServiceAccount and
// RBAC) creates and approves a CertificateSigningRequest for raSigner,
// Castellan signs it, and istiod returns the chain and deletes the CSR.
func testIstiodRA(t *testing.T) {
	env := kubeenv.Start(t)
	dir := t.TempDir()
	castellanValues := writeFile(t, dir, "castellan-ra-values.yaml", []byte(`config:
  csrSigners:
  - signerName: `+raSigner+`
    requesters: [`+istiodSA+`]
    identities: workload
`), 0o600)
	istiodValues := writeFile(t, dir, "istiod-ra-values.yaml", []byte(`env:
  ENABLE_CA_SERVER: "true"
  EXTERNAL_CA: ISTIOD_RA_KUBERNETES_API
  K8S_SIGNER: `+raSigner+`
global:
  certSigners: [`+raSigner+`]
`), 0o600)
	csrs := watchCSRs(t, env)
	m := startIstioMesh(t, env, meshOptions{raValues: istiodValues}, serverConfig{signer: "selfsigned"}, castellanValues)
	if failures := m.watch.halt(); len(failures) > 0 {
		t.Errorf("xDS failures (want none): %v", failures)
	}

	// The agent's certificate: Castellan's profile, under Castellan's root.
	agentID := "spiffe://" + trustDomain + "/ns/" + appNS + "/sa/" + appSA
	chain, err := parseCerts(readOrEmpty(filepath.Join(m.outputDir(), "cert-chain.pem")))
	if err != nil || len(chain) == 0 {
		t.Fatalf("the agent's cert-chain.pem: %d certificates, %v", len(chain), err)
	}
	roots, inter := x509.NewCertPool(), x509.NewCertPool()
	for _, r := range m.bundle(t) {
		roots.AddCert(r)
	}
	for _, c := range chain[1:] {
		inter.AddCert(c)
	}
	verified, err := chain[0].Verify(x509.VerifyOptions{Roots: roots, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}})
	if err != nil {
		t.Fatalf("the agent's certificate does not chain to Castellan's bundle: %v", err)
	}
	keys := privateKeysIn(readOrEmpty(filepath.Join(m.outputDir(), "key.pem")))
	if len(keys) != 1 {
		t.Fatalf("the agent's key.pem holds %d keys, want 1", len(keys))
	}
	leaf := chain[0]
	checkProfile(t, leaf, verified[0][1], agentID, keys[0].Public(), 128, "")

	// Its audit record: issued through the CSR API, asked for by istiod.
	recs := m.srv.auditList(t)
	for _, r := range recs {
		if r.GrantedIdentity == agentID && r.AuthMethod != "kubernetes.csr" {
			t.Errorf("audit record seq %d: %s for the agent by %s, want every one through the CSR API", r.Seq, r.Outcome, r.AuthMethod)
		}
	}
	var viaCSR []auditRecord
	for _, byPeer := range recordsByPeer(recs, "kubernetes.csr") {
		viaCSR = append(viaCSR, byPeer...)
	}
	issued := recordsWithSerial(t, viaCSR, leaf.SerialNumber)
	if len(issued) != 1 || issued[0].Outcome != "issued" || issued[0].GrantedIdentity != agentID || issued[0].Caller != istiodSA {
		t.Fatalf("audit records of serial %x = %+v, want one kubernetes.csr issuance of %s to %s", leaf.SerialNumber, issued, agentID, istiodSA)
	}

	// The CSRs: each created by istiod for raSigner and deleted by it,
	// the agent's among them.
	deadline := time.Now().Add(istioWait)
	for !csrs.allDeleted() && time.Now().Before(deadline) {
		time.Sleep(200 * time.Millisecond)
	}
	csrs.mu.Lock()
	defer csrs.mu.Unlock()
	found := false
	for name, c := range csrs.created {
		found = found || csrPeer(c) == issued[0].Peer
		if c.Spec.Username != istiodSA || c.Spec.SignerName != raSigner {
			t.Errorf("CSR %s: created by %s for %s, want by %s for %s", name, c.Spec.Username, c.Spec.SignerName, istiodSA, raSigner)
		}
		if !csrs.deleted[name] {
			t.Errorf("CSR %s was not deleted within %v", name, istioWait)
		}
	}
	t.Logf("the agent's certificate %x: issued for %s through %s; %d CSRs seen, each made and deleted by istiod", leaf.SerialNumber, issued[0].Caller, issued[0].Peer, len(csrs.created))
	if !found {
		t.Errorf("no CSR seen for the audit record's %s (seen: %d)", issued[0].Peer, len(csrs.created))
	}
}

// csrWatch records the CertificateSigningRequests the apiserver reports
// created and deleted.
type csrWatch struct {
	mu      sync.Mutex
	created map[string]*certv1.CertificateSigningRequest
	deleted map[string]bool
}

// watchCSRs watches every CSR from now until the test ends.
func watchCSRs(t *testing.T, env *kubeenv.Env) *csrWatch {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	w, err := env.Client.CertificatesV1().CertificateSigningRequests().Watch(ctx, metav1.ListOptions{})
	if err != nil {
		t.Fatal(err)
	}
	cw := &csrWatch{created: map[string]*certv1.CertificateSigningRequest{}, deleted: map[string]bool{}}
	go func() {
		defer w.Stop()
		for ev := range w.ResultChan() {
			c, ok := ev.Object.(*certv1.CertificateSigningRequest)
			if !ok {
				continue
			}
			cw.mu.Lock()
			switch ev.Type {
			case watch.Added:
				cw.created[c.Name] = c
			case watch.Deleted:
				cw.deleted[c.Name] = true
			}
			cw.mu.Unlock()
		}
	}()
	return cw
}

// allDeleted reports whether at least one CSR was created and every one was deleted.
func (w *csrWatch) allDeleted() bool {
	w.mu.Lock()
	defer w.mu.Unlock()
	for name := range w.created {
		if !w.deleted[name] {
			return false
		}
	}
	return len(w.created) > 0
}
