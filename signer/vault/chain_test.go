package vault_test

import (
	"crypto/rand"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"math/big"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/castellan-ca/castellan/ca"
	"github.com/castellan-ca/castellan/ca/catest"
	"github.com/castellan-ca/castellan/internal/keyfile"
	"github.com/castellan-ca/castellan/signer"
	"github.com/castellan-ca/castellan/signer/signertest"
	"github.com/castellan-ca/castellan/signer/vault"
	"github.com/castellan-ca/castellan/signer/vault/vaulttest"
)

// TestTrustBundleFollowsIssuer switches the mount's default issuer to a new
// root and shows the signer's trust bundle following, both by polling and
// as soon as a signature comes back from an issuer it did not know.
func TestTrustBundleFollowsIssuer(t *testing.T) {
	srv := vaulttest.Start(t)
	srv.SetupPKI(t, trustDomain)
	newRoot := func(t *testing.T, name string) *x509.Certificate {
		p := srv.Write(t, vaulttest.RootMount+"/root/generate/internal", map[string]any{
			"common_name": "Castellan test Vault " + name, "key_type": "ec", "ttl": "8760h", "issuer_name": name,
		}).Data["certificate"].(string)
		srv.Write(t, vaulttest.RootMount+"/config/issuers", map[string]any{"default": name})
		block, _ := pem.Decode([]byte(p))
		c, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	for _, tc := range []struct {
		name    string
		refresh time.Duration
		sign    bool // sign after the switch, before waiting
	}{
		{"poll", 100 * time.Millisecond, false},
		{"signature from an unknown issuer", time.Hour, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			changed := make(chan struct{}, 1)
			s := newSigner(t, srv, vault.Config{Mount: vaulttest.RootMount, Role: vaulttest.Role, RefreshInterval: tc.refresh,
				OnChange: func() { changed <- struct{}{} }})
			root := newRoot(t, "root-"+filepath.Base(t.Name()))
			if tc.sign {
				key := signertest.Key(11)
				tmpl := ca.LeafTemplate(workload, key.Public(), big.NewInt(1), time.Now().Add(-time.Minute), time.Now().Add(time.Hour))
				chain, err := s.Sign(t.Context(), signertest.Request(t, tmpl, workload, key))
				if err != nil {
					t.Fatal(err)
				}
				if err := chain.Leaf.CheckSignatureFrom(root); err != nil {
					t.Fatalf("leaf not signed by the new default issuer: %v", err)
				}
			}
			select {
			case <-changed:
			case <-time.After(30 * time.Second):
				t.Fatal("OnChange not called after the issuer changed")
			}
			if got := s.TrustBundle(); len(got) != 1 || !got[0].Equal(root) {
				t.Fatalf("TrustBundle = %d certificates, want the new root only", len(got))
			}
			if res := catest.IssueThrough(t, vault.Backend, s, workload, signertest.Key(12), catest.CSROptions{}); res.Err != nil {
				t.Fatalf("issue under the new root: %v", res.Err)
			}
		})
	}
}

// TestTLS talks to OpenBao over TLS with a private CA: the CA file and the
// server name are both needed, and a TLS failure is an outage (Unavailable).
func TestTLS(t *testing.T) {
	dir := t.TempDir()
	caFile, certFile, keyFile := serverCert(t, dir, "vault.test")
	srv := vaulttest.StartWith(t, vaulttest.Options{TLSCertFile: certFile, TLSKeyFile: keyFile, CAFile: caFile, ServerName: "vault.test"})
	srv.SetupPKI(t, trustDomain)
	token := vault.Auth{Method: vault.AuthToken, TokenFile: writeFile(t, "token", srv.RootToken)}
	for _, tc := range []struct {
		name               string
		caFile, serverName string
		wantErr            bool
	}{
		{"CA file and server name", caFile, "vault.test", false},
		{"no server name", caFile, "", true},
		{"no CA file", "", "vault.test", true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s, err := vault.New(t.Context(), vault.Config{Address: srv.Addr, Mount: vaulttest.IntMount, Role: vaulttest.Role,
				Auth: token, CAFile: tc.caFile, ServerName: tc.serverName, Timeout: 3 * time.Second})
			switch {
			case tc.wantErr && !errors.Is(err, signer.ErrSignerUnavailable):
				t.Fatalf("New: %v, want an error wrapping ErrSignerUnavailable", err)
			case !tc.wantErr && err != nil:
				t.Fatalf("New: %v", err)
			case !tc.wantErr:
				if res := catest.IssueThrough(t, vault.Backend, s, workload, signertest.Key(13), catest.CSROptions{}); res.Err != nil {
					t.Fatalf("issue: %v", res.Err)
				}
			}
		})
	}
}

// serverCert writes a test CA and a serving certificate for name (and no IP
// SAN, so the server name matters) signed by it.
func serverCert(t *testing.T, dir, name string) (caFile, certFile, keyFile string) {
	t.Helper()
	root := signertest.NewRoot(t, "Vault TLS test CA", signertest.CertOptions{})
	key := signertest.Key(14)
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(2), DNSNames: []string{name},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, root.Cert, key.Public(), root.Key)
	if err != nil {
		t.Fatal(err)
	}
	keyPEM, err := keyfile.MarshalPrivateKeyPEM(key)
	if err != nil {
		t.Fatal(err)
	}
	write := func(name string, data []byte) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, data, 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	leaf, _ := x509.ParseCertificate(der)
	return write("ca.pem", []byte(signer.EncodePEM(root.Cert))), write("tls.crt", []byte(signer.EncodePEM(leaf))), write("tls.key", keyPEM)
}
