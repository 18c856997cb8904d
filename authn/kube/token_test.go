package kube

import (
	"encoding/base64"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/metadata"
)

// jwtWith builds an unsigned compact JWT with payload (tests of the
// unverified exp parser only).
func jwtWith(payload string) string {
	enc := base64.RawURLEncoding.EncodeToString
	return enc([]byte(`{"alg":"RS256"}`)) + "." + enc([]byte(payload)) + ".c2ln"
}

func TestBearerToken(t *testing.T) {
	for _, tc := range []struct {
		name string
		md   metadata.MD
		want string
	}{
		{"none", metadata.MD{}, ""},
		{"bearer", metadata.Pairs("authorization", "Bearer abc.def.ghi"), "abc.def.ghi"},
		{"scheme case-insensitive", metadata.Pairs("authorization", "bearer abc"), "abc"},
		{"other scheme", metadata.Pairs("authorization", "Basic dXNlcg=="), ""},
		{"no token", metadata.Pairs("authorization", "Bearer"), ""},
		{"first header counts", metadata.Pairs("authorization", "Bearer one", "authorization", "Bearer two"), "one"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := bearerToken(tc.md); got != tc.want {
				t.Errorf("bearerToken = %q, want %q", got, tc.want)
			}
		})
	}
}

func TestParseServiceAccount(t *testing.T) {
	for _, tc := range []struct {
		user, ns, sa string
		ok           bool
	}{
		{"system:serviceaccount:default:sleep", "default", "sleep", true},
		{"system:serviceaccount:istio-system:ztunnel", "istio-system", "ztunnel", true},
		{"system:serviceaccount:default", "", "", false},
		{"system:serviceaccount::sleep", "", "", false},
		{"system:serviceaccount:ns:a:b", "", "", false},
		{"system:node:worker-1", "", "", false},
		{"admin", "", "", false},
	} {
		t.Run(tc.user, func(t *testing.T) {
			ns, sa, err := parseServiceAccount(tc.user)
			if (err == nil) != tc.ok || ns != tc.ns || sa != tc.sa {
				t.Errorf("parseServiceAccount = %q, %q, %v; want %q, %q, ok=%v", ns, sa, err, tc.ns, tc.sa, tc.ok)
			}
		})
	}
}

func TestUnverifiedExpiry(t *testing.T) {
	for _, tc := range []struct {
		name  string
		token string
		want  time.Time // zero: an error
	}{
		{"integer exp", jwtWith(`{"exp":1700000000}`), time.Unix(1700000000, 0).UTC()},
		{"fractional exp", jwtWith(`{"exp":1700000000.5}`), time.Unix(1700000000, 5e8).UTC()},
		{"padded payload", strings.Replace(jwtWith(`{"exp":1700000000}`), ".c2ln", "", 1) + "==.c2ln", time.Unix(1700000000, 0).UTC()},
		{"no exp", jwtWith(`{"sub":"x"}`), time.Time{}},
		{"string exp", jwtWith(`{"exp":"1700000000"}`), time.Time{}},
		{"negative exp", jwtWith(`{"exp":-1}`), time.Time{}},
		{"huge exp", jwtWith(`{"exp":1e300}`), time.Time{}},
		{"not JSON", jwtWith(`exp`), time.Time{}},
		{"two parts", "a.b", time.Time{}},
		{"bad base64", "a.!!!.c", time.Time{}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := unverifiedExpiry(tc.token)
			if tc.want.IsZero() {
				if err == nil {
					t.Errorf("unverifiedExpiry = %v, want an error", got)
				}
				return
			}
			if err != nil || !got.Equal(tc.want) {
				t.Errorf("unverifiedExpiry = %v, %v; want %v", got, err, tc.want)
			}
		})
	}
}

// FuzzUnverifiedExpiry: any input either fails or yields a time in the
// range real tokens use; it never panics.
func FuzzUnverifiedExpiry(f *testing.F) {
	for _, s := range []string{jwtWith(`{"exp":1700000000}`), jwtWith(`{"exp":1.5}`), "a.b.c", "..", jwtWith(`{"exp":null}`)} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, token string) {
		exp, err := unverifiedExpiry(token)
		if err == nil && (exp.Before(time.Unix(0, 0)) || exp.After(time.Unix(1e11+1, 0))) {
			t.Errorf("unverifiedExpiry(%q) = %v, outside the accepted range", token, exp)
		}
	})
}

// FuzzParseServiceAccount: an accepted username always rebuilds exactly, so
// no input yields a namespace or name with a colon.
func FuzzParseServiceAccount(f *testing.F) {
	for _, s := range []string{"system:serviceaccount:a:b", "system:serviceaccount:a:b:c", "system:serviceaccount::", "x"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, user string) {
		ns, sa, err := parseServiceAccount(user)
		if err != nil {
			return
		}
		if saUserPrefix+ns+":"+sa != user || strings.Contains(ns, ":") || strings.Contains(sa, ":") || ns == "" || sa == "" {
			t.Errorf("parseServiceAccount(%q) = %q, %q", user, ns, sa)
		}
	})
}
