package main

import (
	"os"
	"strings"
	"testing"
	"time"
)

// readmeOIDCExample returns the YAML of the README's OIDC worked example, so
// that the documented configuration is the one tested.
func readmeOIDCExample(t *testing.T) string {
	t.Helper()
	b, err := os.ReadFile("../../README.md")
	if err != nil {
		t.Fatal(err)
	}
	_, rest, ok := strings.Cut(string(b), "### Worked example: GitHub Actions")
	if !ok {
		t.Fatal("README has no OIDC worked example")
	}
	_, rest, ok = strings.Cut(rest, "```yaml\n")
	body, _, ok2 := strings.Cut(rest, "```")
	if !ok || !ok2 {
		t.Fatal("README OIDC worked example has no yaml block")
	}
	return body
}

func TestLoadConfigOIDC(t *testing.T) {
	const issuer = "oidc:\n  issuers:\n  - issuerURL: https://issuer.example\n"
	tests := []struct {
		name    string
		file    string
		wantErr string // substring naming the key; "" means success
		check   func(t *testing.T, c Config)
	}{
		{
			name: "README worked example",
			file: readmeOIDCExample(t),
			check: func(t *testing.T, c Config) {
				iss := c.OIDC.Issuers
				if len(iss) != 3 || iss[0].IssuerURL != "https://token.actions.githubusercontent.com" ||
					iss[0].RequiredClaims["repository_owner"] != "my-org" || iss[0].Identity.Namespace != "gh-{repository_owner_id}" ||
					iss[2].JWKSFile != "/etc/castellan/sso-jwks.json" || iss[2].AllowedAlgorithms[0] != "ES256" {
					t.Errorf("got %+v", iss)
				}
			},
		},
		{
			name: "durations and lists",
			file: issuer + "    audiences: [a, b]\n    clockSkew: 30s\n",
			check: func(t *testing.T, c Config) {
				if iss := c.OIDC.Issuers[0]; iss.ClockSkew != 30*time.Second || len(iss.Audiences) != 2 {
					t.Errorf("got %+v", iss)
				}
			},
		},
		{name: "audiences required", file: issuer, wantErr: "oidc.issuers[0].audiences:"},
		{name: "unknown key", file: issuer + "    audiences: [a]\n    audience: a\n", wantErr: "audience"},
		{name: "symmetric algorithm", file: issuer + "    audiences: [a]\n    allowedAlgorithms: [HS256]\n", wantErr: "oidc.issuers[0].allowedAlgorithms:"},
		{name: "plain http issuer", file: "oidc:\n  issuers:\n  - issuerURL: http://issuer.example\n    audiences: [a]\n", wantErr: "oidc.issuers[0].issuerURL:"},
		{name: "bad template", file: issuer + "    audiences: [a]\n    identity: {namespace: \"a/{ns}\", serviceAccount: \"{sa}\"}\n", wantErr: "oidc.issuers[0].identity:"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			c, err := loadConfig([]string{"--config", writeConfig(t, tc.file)})
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("loadConfig: %v, want an error naming %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatalf("loadConfig: %v", err)
			}
			tc.check(t, c)
		})
	}
}
