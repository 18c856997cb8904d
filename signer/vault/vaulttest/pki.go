package vaulttest

import (
	"crypto/x509"
	"encoding/pem"
	"strings"
	"testing"
)

// Mount and role names SetupPKI creates.
const (
	RootMount = "pki_root"
	IntMount  = "pki_int"
	// Role signs with digitalSignature only (ECDSA, Ed25519 keys).
	Role = "workload"
	// RSARole adds keyEncipherment, as Castellan's profile does for RSA keys.
	RSARole = "workload-rsa"
)

// PKI is what SetupPKI built: a root CA in RootMount and an intermediate in
// IntMount signed by it (its mount holds the root too, so its chain ends at
// the root), each mount with Role and RSARole.
type PKI struct {
	Root, Intermediate *x509.Certificate
}

// RoleParams is the PKI role Castellan needs (README: "Vault"): the granted
// URI SAN and the serving DNS names only, nothing taken from the CSR (no CN,
// no CSR SANs), CA:false present, NotBefore backdated by Castellan's default
// clock skew, leaves not stored (Castellan's audit log records them).
func RoleParams(trustDomain string, keyUsage ...string) map[string]any {
	return map[string]any{
		"allowed_uri_sans":                   "spiffe://" + trustDomain + "/*",
		"allowed_domains":                    "istiod.istio-system.svc,castellan.castellan-system.svc",
		"allow_bare_domains":                 true,
		"allow_localhost":                    true,
		"require_cn":                         false,
		"use_csr_common_name":                false,
		"use_csr_sans":                       false,
		"key_type":                           "any",
		"key_usage":                          strings.Join(keyUsage, ","),
		"server_flag":                        true,
		"client_flag":                        true,
		"basic_constraints_valid_for_non_ca": true,
		"not_before_duration":                "120s",
		"max_ttl":                            "2160h",
		"no_store":                           true,
	}
}

// SetupPKI mounts a root and an intermediate signed by it, with the roles of
// RoleParams for trustDomain in both mounts.
func (s *Server) SetupPKI(t testing.TB, trustDomain string) *PKI {
	t.Helper()
	s.Write(t, "sys/mounts/"+RootMount, map[string]any{"type": "pki", "config": map[string]any{"max_lease_ttl": "87600h"}})
	s.Write(t, "sys/mounts/"+IntMount, map[string]any{"type": "pki", "config": map[string]any{"max_lease_ttl": "43800h"}})

	root := s.Write(t, RootMount+"/root/generate/internal", map[string]any{
		"common_name": "Castellan test Vault root", "key_type": "ec", "key_bits": 256, "ttl": "87600h", "issuer_name": "root",
	})
	rootPEM := root.Data["certificate"].(string)

	csr := s.Write(t, IntMount+"/intermediate/generate/internal", map[string]any{
		"common_name": "Castellan test Vault intermediate", "key_type": "ec", "key_bits": 256,
	}).Data["csr"].(string)
	signed := s.Write(t, RootMount+"/root/sign-intermediate", map[string]any{
		"csr": csr, "format": "pem", "ttl": "43800h", "common_name": "Castellan test Vault intermediate",
	})
	intPEM := signed.Data["certificate"].(string)
	s.Write(t, IntMount+"/intermediate/set-signed", map[string]any{"certificate": intPEM + "\n" + rootPEM})

	for _, mount := range []string{RootMount, IntMount} {
		s.Write(t, mount+"/roles/"+Role, RoleParams(trustDomain, "DigitalSignature"))
		s.Write(t, mount+"/roles/"+RSARole, RoleParams(trustDomain, "DigitalSignature", "KeyEncipherment"))
	}
	// set-signed made the intermediate (the imported issuer with a key) the
	// mount's default issuer, and the root an issuer of its chain.
	return &PKI{Root: parseCert(t, rootPEM), Intermediate: parseCert(t, intPEM)}
}

func parseCert(t testing.TB, p string) *x509.Certificate {
	t.Helper()
	block, _ := pem.Decode([]byte(p))
	if block == nil {
		t.Fatalf("no PEM in %q", p)
	}
	c, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	return c
}
