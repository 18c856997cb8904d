package vault_test

import (
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc/codes"

	"github.com/castellan-ca/castellan/ca"
	"github.com/castellan-ca/castellan/ca/catest"
	"github.com/castellan-ca/castellan/signer"
	"github.com/castellan-ca/castellan/signer/signertest"
	"github.com/castellan-ca/castellan/signer/vault"
	"github.com/castellan-ca/castellan/signer/vault/vaulttest"
)

const trustDomain = "cluster.local"

var workload = spiffeid.RequireFromString("spiffe://cluster.local/ns/vault/sa/workload")

// writeFile writes a credential file for the signer to read.
func writeFile(t *testing.T, name, content string) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), name)
	if err := os.WriteFile(path, []byte(content+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// newSigner returns a signer for mount with the root token, stopped at the
// end of the test.
func newSigner(t *testing.T, srv *vaulttest.Server, cfg vault.Config) *vault.Signer {
	t.Helper()
	cfg.Address = srv.Addr
	if cfg.Auth.Method == "" {
		cfg.Auth = vault.Auth{Method: vault.AuthToken, TokenFile: writeFile(t, "token", srv.RootToken)}
	}
	s, err := vault.New(t.Context(), cfg)
	if err != nil {
		t.Fatalf("vault.New: %v", err)
	}
	signertest.RunUntilCleanup(t, s.Run)
	return s
}

// TestConformance runs the shared signer suite against a real OpenBao, signing
// from an intermediate mounted under a root (the usual layout) and from the
// root itself; its outage stops the server process and restarts it.
func TestConformance(t *testing.T) {
	srv := vaulttest.Start(t)
	pki := srv.SetupPKI(t, trustDomain)
	for _, tc := range []struct {
		name      string
		cfg       vault.Config
		wantChain []*x509.Certificate
	}{
		{"intermediate", vault.Config{Mount: vaulttest.IntMount, Role: vaulttest.Role, RSARole: vaulttest.RSARole}, []*x509.Certificate{pki.Intermediate}},
		{"root", vault.Config{Mount: vaulttest.RootMount, Role: vaulttest.Role, RSARole: vaulttest.RSARole}, nil},
		// sign-verbatim takes key usages per request, so one role serves every key type.
		{"intermediate verbatim", vault.Config{Mount: vaulttest.IntMount, Role: vaulttest.Role, Verbatim: true}, []*x509.Certificate{pki.Intermediate}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			newS := func(t *testing.T) signer.Signer {
				cfg := tc.cfg
				cfg.Timeout = 5 * time.Second
				return newSigner(t, srv, cfg)
			}
			signertest.Run(t, signertest.Factory{
				New: newS,
				Outage: func(t *testing.T, _ signer.Signer) func() {
					srv.Stop(t)
					return func() { srv.Restart(t) }
				},
				ServerSerial:   true,
				Remote:         true,
				NotBeforeSlack: time.Minute,
			})
			t.Run("ChainFromMount", func(t *testing.T) {
				s := newS(t)
				if got := s.TrustBundle(); len(got) != 1 || !got[0].Equal(pki.Root) {
					t.Errorf("TrustBundle = %d certificates, want exactly the Vault root", len(got))
				}
				key := signertest.Key(5)
				res := catest.IssueThrough(t, vault.Backend, s, workload, key, catest.CSROptions{})
				if res.Err != nil {
					t.Fatalf("Issue: %v", res.Err)
				}
				got := res.Result.Chain.Intermediates
				if len(got) != len(tc.wantChain) || (len(got) == 1 && !got[0].Equal(tc.wantChain[0])) {
					t.Errorf("intermediates = %d certificates, want %d (the Vault intermediate)", len(got), len(tc.wantChain))
				}
			})
		})
	}
}

// TestIssuerChecksVaultResult shows that what a misconfigured role returns
// never reaches a client: the issuer refuses it with Internal and audits it as
// signer.bad_result, while a correct role serves pilot-agent's and ztunnel's CSRs.
func TestIssuerChecksVaultResult(t *testing.T) {
	srv := vaulttest.Start(t)
	srv.SetupPKI(t, trustDomain)
	copiesCN := vaulttest.RoleParams(trustDomain, "DigitalSignature")
	copiesCN["use_csr_common_name"] = true
	srv.Write(t, vaulttest.IntMount+"/roles/copies-cn", copiesCN)
	csrSANs := vaulttest.RoleParams(trustDomain, "DigitalSignature")
	csrSANs["use_csr_sans"] = true
	srv.Write(t, vaulttest.IntMount+"/roles/csr-sans", csrSANs)

	pilotAgent := catest.CSROptions{Subject: pkix.Name{Organization: []string{""}}}
	for _, tc := range []struct {
		name       string
		role       string
		verbatim   bool
		csr        catest.CSROptions
		wantCode   codes.Code
		wantReason string
	}{
		{"pilot-agent CSR (O=, URI SAN)", vaulttest.Role, false, pilotAgent, codes.OK, ""},
		{"CSR without SAN", vaulttest.Role, false, catest.CSROptions{NoSAN: true}, codes.OK, ""},
		{"role copies the CSR's CN into the subject", "copies-cn", false, catest.CSROptions{Subject: pkix.Name{CommonName: "localhost"}}, codes.Internal, ca.ReasonSignerBadChain},
		{"role takes SANs from a CSR without SAN", "csr-sans", false, catest.CSROptions{NoSAN: true}, codes.Internal, ca.ReasonSignerBadChain},
		{"verbatim, ztunnel CSR", vaulttest.Role, true, catest.CSROptions{}, codes.OK, ""},
		// Vault would copy O= into the certificate: refused before asking it.
		{"verbatim, pilot-agent CSR", vaulttest.Role, true, pilotAgent, codes.Internal, ca.ReasonSignerError},
		{"verbatim, CSR without SAN", vaulttest.Role, true, catest.CSROptions{NoSAN: true}, codes.Internal, ca.ReasonSignerError},
		{"verbatim, non-critical SAN", vaulttest.Role, true, catest.CSROptions{NonCriticalSAN: true}, codes.Internal, ca.ReasonSignerError},
		{"role, non-critical SAN in the CSR", vaulttest.Role, false, catest.CSROptions{NonCriticalSAN: true}, codes.OK, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := newSigner(t, srv, vault.Config{Mount: vaulttest.IntMount, Role: tc.role, Verbatim: tc.verbatim})
			res := catest.IssueThrough(t, vault.Backend, s, workload, signertest.Key(6), tc.csr)
			if got := ca.Status(res.Err).Code(); got != tc.wantCode {
				t.Fatalf("code = %v, want %v (error: %v)", got, tc.wantCode, res.Err)
			}
			if got := ca.ReasonOf(res.Err); got != tc.wantReason {
				t.Errorf("reason = %q, want %q", got, tc.wantReason)
			}
			if tc.wantCode != codes.OK {
				if res.Result != nil {
					t.Error("a refused request returned a certificate")
				}
				if res.Record.Reason != tc.wantReason || res.Record.Code != tc.wantCode.String() || res.Record.Serial != "" {
					t.Errorf("audit record reason %q code %q serial %q, want %q %q and no serial", res.Record.Reason, res.Record.Code, res.Record.Serial, tc.wantReason, tc.wantCode)
				}
				return
			}
			leaf := res.Result.Chain.Leaf
			if len(leaf.Subject.Names) != 0 || len(leaf.URIs) != 1 || leaf.URIs[0].String() != workload.String() {
				t.Errorf("leaf subject %q URIs %v, want empty subject and %s", leaf.Subject, leaf.URIs, workload)
			}
		})
	}
}

// TestVaultRefusalIsNotRetryable: a request Vault refuses (4xx, here a role
// that does not exist) is a configuration error, not an outage.
func TestVaultRefusalIsNotRetryable(t *testing.T) {
	srv := vaulttest.Start(t)
	srv.SetupPKI(t, trustDomain)
	s := newSigner(t, srv, vault.Config{Mount: vaulttest.IntMount, Role: "no-such-role"})
	res := catest.IssueThrough(t, vault.Backend, s, workload, signertest.Key(7), catest.CSROptions{})
	if errors.Is(res.Err, signer.ErrSignerUnavailable) || ca.Status(res.Err).Code() != codes.Internal || ca.ReasonOf(res.Err) != ca.ReasonSignerError {
		t.Errorf("unknown role: code %v reason %q (%v), want Internal %s", ca.Status(res.Err).Code(), ca.ReasonOf(res.Err), res.Err, ca.ReasonSignerError)
	}
}

// TestOutageThroughIssuer: with the server stopped, the client gets
// Unavailable (which Istio's agents retry), audited as signer.unavailable.
func TestOutageThroughIssuer(t *testing.T) {
	srv := vaulttest.Start(t)
	srv.SetupPKI(t, trustDomain)
	s := newSigner(t, srv, vault.Config{Mount: vaulttest.IntMount, Role: vaulttest.Role, Timeout: 3 * time.Second})
	srv.Stop(t)
	res := catest.IssueThrough(t, vault.Backend, s, workload, signertest.Key(8), catest.CSROptions{})
	if ca.Status(res.Err).Code() != codes.Unavailable || res.Record.Reason != ca.ReasonSignerDown {
		t.Errorf("during outage: code %v, audited reason %q (%v); want Unavailable, %s", ca.Status(res.Err).Code(), res.Record.Reason, res.Err, ca.ReasonSignerDown)
	}
	srv.Restart(t)
	if res := catest.IssueThrough(t, vault.Backend, s, workload, signertest.Key(8), catest.CSROptions{}); res.Err != nil {
		t.Errorf("after restart: %v", res.Err)
	}
}
