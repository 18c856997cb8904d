package authn

import (
	"strings"
	"testing"
)

func TestParseJWKS(t *testing.T) {
	const ec = `{"kty":"EC","crv":"P-256","kid":"%s","x":"f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU","y":"x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"%s}`
	key := func(kid, extra string) string {
		return strings.Replace(strings.Replace(ec, "%s", kid, 1), "%s", extra, 1)
	}
	tests := []struct {
		name string
		jwks string
		kids []string // nil: an error is expected
	}{
		{"public signing key", `{"keys":[` + key("a", "") + `]}`, []string{"a"}},
		{"symmetric key skipped", `{"keys":[{"kty":"oct","kid":"s","k":"c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0"},` + key("a", "") + `]}`, []string{"a"}},
		{"private key skipped", `{"keys":[` + key("p", `,"d":"jpsQnnGQmL-YBIffH1136cspYG6-0iY7X1fCE9-E9LI"`) + `,` + key("a", "") + `]}`, []string{"a"}},
		{"encryption key skipped", `{"keys":[` + key("e", `,"use":"enc"`) + `,` + key("a", `,"use":"sig"`) + `]}`, []string{"a"}},
		{"unknown key type skipped", `{"keys":[{"kty":"OKP","crv":"X448","kid":"x","x":"AAAA"},` + key("a", "") + `]}`, []string{"a"}},
		{"only unusable keys", `{"keys":[{"kty":"oct","kid":"s","k":"c2VjcmV0"}]}`, nil},
		{"no keys", `{"keys":[]}`, nil},
		{"not JSON", `<html>`, nil},
		{"too large", `{"keys":[],"pad":"` + strings.Repeat("x", maxJWKSBytes) + `"}`, nil},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			keys, err := parseJWKS([]byte(tc.jwks))
			if tc.kids == nil {
				if err == nil {
					t.Fatalf("parseJWKS = %d keys, want an error", len(keys))
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			var got []string
			for _, k := range keys {
				got = append(got, k.KeyID)
			}
			if strings.Join(got, ",") != strings.Join(tc.kids, ",") {
				t.Fatalf("kept keys %v, want %v", got, tc.kids)
			}
		})
	}
}
