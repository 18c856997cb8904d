package ca_test

import (
	"context"
	"crypto"
	"crypto/x509"
	"fmt"
	"net/url"
	"testing"
	"time"

	"github.com/castellan-ca/castellan/authn"
	"github.com/castellan-ca/castellan/ca"
	"github.com/castellan-ca/castellan/internal/certlint"
	"github.com/castellan-ca/castellan/internal/keyfile"
	"github.com/castellan-ca/castellan/signer/local"
	"github.com/castellan-ca/castellan/signer/selfsigned"
	"github.com/castellan-ca/castellan/signer/signertest"
)

// callerAuthn authenticates every request as one workload.
type callerAuthn struct{ caller authn.Caller }

func (c callerAuthn) Authenticate(context.Context) (*authn.Caller, error) {
	caller := c.caller
	return &caller, nil
}

// TestCertificatesLint has Castellan make every kind of certificate it makes
// (generated roots and intermediates of every CA key type, workload leaves
// of every accepted key type and from both agents' CSR shapes, the serving
// certificate, istiod's serving certificate, the bundle endpoint's SVID and
// the operator credential) and lints each with zlint's RFC 5280, RFC 5480 and RFC 8813 lints.
func TestCertificatesLint(t *testing.T) {
	if testing.Short() {
		t.Skip("generates RSA keys up to 4096 bits")
	}
	caKeys := map[string]crypto.Signer{}
	for _, kt := range []string{keyfile.KeyTypeECDSAP256, keyfile.KeyTypeECDSAP384, keyfile.KeyTypeRSA2048, keyfile.KeyTypeRSA3072, keyfile.KeyTypeRSA4096} {
		k, err := keyfile.GenerateKey(kt)
		if err != nil {
			t.Fatal(err)
		}
		caKeys[kt] = k
	}
	leafKeys := signertest.LeafKeys() // ECDSA P-256, P-384, RSA-2048, Ed25519
	// RSA-3072 and 4096 leaves: the CA keys of that size serve, as leaf keys
	// of their own certificates.
	leafKeys["rsa-3072"], leafKeys["rsa-4096"] = caKeys[keyfile.KeyTypeRSA3072], caKeys[keyfile.KeyTypeRSA4096]

	now := time.Now().UTC().Truncate(time.Second)
	for caType, caKey := range caKeys {
		t.Run("CA "+caType, func(t *testing.T) {
			g, err := selfsigned.NewGenerator(selfsigned.Options{TrustDomain: td, KeyType: caType})
			if err != nil {
				t.Fatal(err)
			}
			root, err := g.NewRoot(caKey, now.Add(-2*time.Minute), now.Add(10*365*24*time.Hour))
			if err != nil {
				t.Fatal(err)
			}
			certlint.Check(t, "root", root)
			interKey, err := g.NewKey(context.Background())
			if err != nil {
				t.Fatal(err)
			}
			inter, err := g.NewIntermediate(interKey, root, caKey, now.Add(-2*time.Minute), now.Add(365*24*time.Hour))
			if err != nil {
				t.Fatal(err)
			}
			certlint.Check(t, "intermediate", inter)

			// Leaves from the root itself (no intermediate layer) and from
			// the intermediate, through the real pipeline.
			for _, issuing := range []struct {
				name string
				cert *x509.Certificate
				key  crypto.Signer
			}{{"root", root, caKey}, {"intermediate", inter, interKey}} {
				s, err := local.New(local.Config{Cert: issuing.cert, Key: issuing.key, Roots: []*x509.Certificate{root}})
				if err != nil {
					t.Fatal(err)
				}
				authority := ca.NewAuthority()
				if _, err := authority.Use(selfsigned.Backend, s); err != nil {
					t.Fatal(err)
				}
				issuer, err := ca.NewIssuer(ca.Config{TrustDomain: td, Audit: &countingAudit{}, Authority: authority,
					Authenticator: callerAuthn{authn.Caller{Method: "test", Identity: appID, Name: appID.String()}}})
				if err != nil {
					t.Fatal(err)
				}
				for leafType, key := range leafKeys {
					for shape, csr := range map[string]string{"ztunnel": ztunnelCSR(t, key, appID), "pilot-agent": pilotAgentCSR(t, key, appID)} {
						out, err := issuer.Issue(context.Background(), ca.Request{CSR: csr})
						if err != nil {
							t.Fatalf("%s leaf: %v", leafType, err)
						}
						certlint.Check(t, fmt.Sprintf("workload leaf (%s key, %s CSR) under the %s", leafType, shape, issuing.name), out.Chain.Leaf)
					}
				}
				serving := &ca.ServingCert{Issuer: issuer, DNSNames: []string{"istiod.istio-system.svc", "localhost"}}
				svid := &ca.ServingCert{Issuer: issuer, URIs: []*url.URL{td.ID().URL()}} // the bundle endpoint's
				for what, sc := range map[string]*ca.ServingCert{"serving certificate": serving, "bundle endpoint SVID": svid} {
					c, err := sc.Current(context.Background())
					if err != nil {
						t.Fatalf("%s: %v", what, err)
					}
					certlint.Check(t, what+" under the "+issuing.name, c.Leaf)
				}
				opKey := signertest.Key(4)
				chain, _, err := issuer.IssueInternal(context.Background(), "operator credential", ca.ClientTemplate(operatorID.URL()), opKey, time.Hour)
				if err != nil {
					t.Fatal(err)
				}
				certlint.Check(t, "operator credential under the "+issuing.name, chain.Leaf)
				// istiod's serving certificate as ca/publish.IstiodCert issues it.
				istiodNames := []string{"istiod.istio-system.svc", "istiod.istio-system.svc.cluster.local",
					"istiod-canary.istio-system.svc", "istiod-canary.istio-system.svc.cluster.local"}
				chain, _, err = issuer.IssueInternal(context.Background(), "istiod serving certificate", ca.ServingTemplate(istiodNames), signertest.Key(5), 24*time.Hour)
				if err != nil {
					t.Fatal(err)
				}
				certlint.Check(t, "istiod serving certificate under the "+issuing.name, chain.Leaf)
			}
		})
	}
}

// TestCertlintFindsProblems keeps the lint helper honest: a certificate
// with a known RFC 5280 defect fails it.
func TestCertlintFindsProblems(t *testing.T) {
	root := newRoot(t, "Lint Root", time.Time{})
	leaf := signLeaf(t, root, signertest.Key(5), nil, func(c *x509.Certificate) { c.URIs = nil }) // empty subject, no SAN
	problems, _, err := certlint.Problems(leaf.Raw)
	if err != nil {
		t.Fatal(err)
	}
	if len(problems) == 0 {
		t.Fatal("a leaf with neither subject nor SAN passes every lint")
	}
}
