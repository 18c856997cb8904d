package main

import (
	"strings"
	"testing"
	"time"
)

// configCase is one loadConfig run: a file and flags in; an error naming a
// key, or a configuration to check, out.
type configCase struct {
	name    string
	file    string
	args    []string
	wantErr string // substring naming the key; "" means success
	check   func(t *testing.T, c Config)
}

// runConfigCases runs each case with a fresh data directory.
func runConfigCases(t *testing.T, cases []configCase) {
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			args := append([]string{"--data-dir", t.TempDir()}, tc.args...)
			if tc.file != "" {
				args = append(args, "--config", writeConfig(t, tc.file))
			}
			c, err := loadConfig(args)
			switch {
			case tc.wantErr == "" && err != nil:
				t.Fatalf("loadConfig: %v", err)
			case tc.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tc.wantErr)):
				t.Fatalf("loadConfig error = %v, want one naming %q", err, tc.wantErr)
			case tc.check != nil:
				tc.check(t, c)
			}
		})
	}
}

// TestRemoteSignerConfig: the vault: and googleCAS: sections decode strictly,
// flags override them, and missing or wrong keys are named.
func TestRemoteSignerConfig(t *testing.T) {
	runConfigCases(t, []configCase{
		{
			name: "vault section",
			file: "signer: vault\nvault:\n  address: https://vault:8200\n  mount: pki_int\n  role: castellan\n  rsaRole: castellan-rsa\n  authMethod: approle\n  roleID: rid\n  secretIDFile: /s\n  timeout: 3s\n",
			check: func(t *testing.T, c Config) {
				v := c.Vault
				if v.Address != "https://vault:8200" || v.Mount != "pki_int" || v.Role != "castellan" || v.RSARole != "castellan-rsa" ||
					v.AuthMethod != "approle" || v.RoleID != "rid" || v.SecretIDFile != "/s" || v.Timeout != 3*time.Second || v.Issuer != "default" {
					t.Errorf("vault = %+v", v)
				}
			},
		},
		{
			name: "vault flags",
			args: []string{"--signer", "vault", "--vault-address", "http://127.0.0.1:8200", "--vault-role", "r", "--vault-auth-method", "token", "--vault-token-file", "/t"},
			check: func(t *testing.T, c Config) {
				if c.Vault.Address != "http://127.0.0.1:8200" || c.Vault.TokenFile != "/t" || c.Vault.Mount != "pki" {
					t.Errorf("vault = %+v", c.Vault)
				}
			},
		},
		{name: "vault without address", args: []string{"--signer", "vault", "--vault-role", "r", "--vault-kubernetes-role", "k"}, wantErr: "vault.address"},
		{name: "vault without role", args: []string{"--signer", "vault", "--vault-address", "https://v", "--vault-kubernetes-role", "k"}, wantErr: "vault.role"},
		{name: "vault verbatim needs no role", args: []string{"--signer", "vault", "--vault-address", "https://v", "--vault-verbatim", "--vault-kubernetes-role", "k"}},
		{name: "vault kubernetes without role", args: []string{"--signer", "vault", "--vault-address", "https://v", "--vault-role", "r"}, wantErr: "vault.kubernetesRole"},
		{name: "vault unknown auth method", args: []string{"--signer", "vault", "--vault-address", "https://v", "--vault-role", "r", "--vault-auth-method", "ldap"}, wantErr: "vault.authMethod"},
		{name: "vault unknown key", file: "signer: vault\nvault:\n  vaultAddress: https://v\n", wantErr: "vaultAddress"},
		{
			name: "googleCAS section",
			file: "signer: googlecas\ngoogleCAS:\n  caPool: projects/p/locations/l/caPools/c\n  certificateAuthority: ca1\n",
			check: func(t *testing.T, c Config) {
				if c.GoogleCAS.CAPool != "projects/p/locations/l/caPools/c" || c.GoogleCAS.CertificateAuthority != "ca1" || c.GoogleCAS.Insecure {
					t.Errorf("googleCAS = %+v", c.GoogleCAS)
				}
			},
		},
		{name: "googleCAS without pool", args: []string{"--signer", "googlecas"}, wantErr: "googleCAS.caPool"},
		{name: "googleCAS insecure without endpoint", args: []string{"--signer", "googlecas", "--google-cas-ca-pool", "projects/p/locations/l/caPools/c", "--google-cas-insecure"}, wantErr: "googleCAS.insecure"},
		{name: "sections ignored for other signers", file: "signer: selfsigned\nvault:\n  address: not a url\n"},
	})
}
