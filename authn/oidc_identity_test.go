package authn

import (
	"encoding/json"
	"errors"
	"strings"
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

var ruleTD = spiffeid.RequireTrustDomainFromString("cluster.local")

// rawClaims encodes claim values as a verified token would carry them.
func rawClaims(t testing.TB, c map[string]any) map[string]json.RawMessage {
	t.Helper()
	out := map[string]json.RawMessage{}
	for k, v := range c {
		b, err := json.Marshal(v)
		if err != nil {
			t.Fatal(err)
		}
		out[k] = b
	}
	return out
}

func TestParseTemplate(t *testing.T) {
	tests := []struct {
		name string
		in   string
		want []templatePart // nil: an error is expected
	}{
		{"claim only", "{ns}", []templatePart{{claim: "ns"}}},
		{"prefix and claim", "gh-{repository_owner_id}", []templatePart{{literal: "gh-"}, {claim: "repository_owner_id"}}},
		{"two claims", "{a}.{b}", []templatePart{{claim: "a"}, {literal: "."}, {claim: "b"}}},
		{"literal only", "ci", []templatePart{{literal: "ci"}}},
		{"claim name with colon and dot", "{x:y.z}", []templatePart{{claim: "x:y.z"}}},
		{"empty", "", nil},
		{"empty claim", "{}", nil},
		{"unterminated", "{ns", nil},
		{"stray close", "ns}", nil},
		{"nested", "{a{b}}", nil},
		{"slash literal", "a/{ns}", nil},
		{"uppercase literal", "A{ns}", nil},
		{"slash in claim name", "{a/b}", nil},
		{"space in claim name", "{a b}", nil},
		{"long claim name", "{" + strings.Repeat("a", 129) + "}", nil},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := parseTemplate(tc.in)
			if tc.want == nil {
				if err == nil {
					t.Fatalf("parseTemplate(%q) = %+v, want an error", tc.in, got)
				}
				return
			}
			if err != nil {
				t.Fatalf("parseTemplate(%q): %v", tc.in, err)
			}
			if len(got) != len(tc.want) {
				t.Fatalf("parseTemplate(%q) = %+v, want %+v", tc.in, got, tc.want)
			}
			for i := range got {
				if got[i] != tc.want[i] {
					t.Fatalf("parseTemplate(%q) = %+v, want %+v", tc.in, got, tc.want)
				}
			}
		})
	}
}

func TestIdentityRule(t *testing.T) {
	github := OIDCIdentity{Namespace: "gh-{repository_owner_id}", ServiceAccount: "{repo}"}
	tests := []struct {
		name   string
		rule   OIDCIdentity
		claims map[string]any
		want   string // empty: refused with ErrBadIdentity
	}{
		{"default rule", OIDCIdentity{}, map[string]any{"sub": "system:serviceaccount:default:app"}, "spiffe://cluster.local/ns/default/sa/app"},
		{"default rule dotted service account", OIDCIdentity{}, map[string]any{"sub": "system:serviceaccount:prod:my.app"}, "spiffe://cluster.local/ns/prod/sa/my.app"},
		{"default rule user subject", OIDCIdentity{}, map[string]any{"sub": "alice@example.com"}, ""},
		{"default rule missing sub", OIDCIdentity{}, map[string]any{}, ""},
		{"default rule sub not a string", OIDCIdentity{}, map[string]any{"sub": []string{"system:serviceaccount:a:b"}}, ""},
		{"default rule extra colon", OIDCIdentity{}, map[string]any{"sub": "system:serviceaccount:a:b:c"}, ""},
		{"default rule slash in namespace", OIDCIdentity{}, map[string]any{"sub": "system:serviceaccount:a/sa/b:c"}, ""},
		{"default rule dot dot namespace", OIDCIdentity{}, map[string]any{"sub": "system:serviceaccount:..:app"}, ""},
		{"default rule dot dot service account", OIDCIdentity{}, map[string]any{"sub": "system:serviceaccount:default:.."}, ""},
		{"default rule traversal in service account", OIDCIdentity{}, map[string]any{"sub": "system:serviceaccount:default:app/../../x"}, ""},
		{"default rule foreign trust domain", OIDCIdentity{}, map[string]any{"sub": "system:serviceaccount:spiffe://evil.example/ns/a:b"}, ""},
		{"default rule empty names", OIDCIdentity{}, map[string]any{"sub": "system:serviceaccount::"}, ""},
		{"default rule uppercase", OIDCIdentity{}, map[string]any{"sub": "system:serviceaccount:Default:app"}, ""},
		{"default rule percent-encoded slash", OIDCIdentity{}, map[string]any{"sub": "system:serviceaccount:a%2Fb:app"}, ""},
		{"template", github, map[string]any{"repository_owner_id": "1342004", "repo": "castellan"}, "spiffe://cluster.local/ns/gh-1342004/sa/castellan"},
		{"template numeric claim", github, map[string]any{"repository_owner_id": 1342004, "repo": "castellan"}, "spiffe://cluster.local/ns/gh-1342004/sa/castellan"},
		{"template missing claim", github, map[string]any{"repo": "castellan"}, ""},
		{"template null claim", github, map[string]any{"repository_owner_id": nil, "repo": "castellan"}, ""},
		{"template boolean claim", github, map[string]any{"repository_owner_id": true, "repo": "castellan"}, ""},
		{"template object claim", github, map[string]any{"repository_owner_id": map[string]any{"a": "b"}, "repo": "castellan"}, ""},
		{"template slash", github, map[string]any{"repository_owner_id": "1", "repo": "org/repo"}, ""},
		{"template path injection", github, map[string]any{"repository_owner_id": "1/sa/admin", "repo": "x"}, ""},
		{"template dot dot", github, map[string]any{"repository_owner_id": "1", "repo": ".."}, ""},
		{"template foreign trust domain", OIDCIdentity{Namespace: "{ns}", ServiceAccount: "{sa}"},
			map[string]any{"ns": "spiffe://evil.example/ns/a", "sa": "b"}, ""},
		{"template dot in namespace", OIDCIdentity{Namespace: "{ns}", ServiceAccount: "{sa}"}, map[string]any{"ns": "a.b", "sa": "b"}, ""},
		{"template empty value", OIDCIdentity{Namespace: "{ns}", ServiceAccount: "{sa}"}, map[string]any{"ns": "", "sa": "b"}, ""},
		{"template newline", OIDCIdentity{Namespace: "{ns}", ServiceAccount: "{sa}"}, map[string]any{"ns": "a\n", "sa": "b"}, ""},
		{"template too long namespace", OIDCIdentity{Namespace: "{ns}", ServiceAccount: "{sa}"}, map[string]any{"ns": strings.Repeat("a", 64), "sa": "b"}, ""},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			rule, err := newIdentityRule(tc.rule)
			if err != nil {
				t.Fatalf("newIdentityRule: %v", err)
			}
			id, err := rule.id(ruleTD, rawClaims(t, tc.claims))
			if tc.want == "" {
				if !errors.Is(err, ErrBadIdentity) {
					t.Fatalf("id = %v, %v; want ErrBadIdentity", id, err)
				}
				return
			}
			if err != nil || id.String() != tc.want {
				t.Fatalf("id = %v, %v; want %s", id, err, tc.want)
			}
		})
	}
}

func TestNewIdentityRuleNeedsBothTemplates(t *testing.T) {
	for _, c := range []OIDCIdentity{{Namespace: "{ns}"}, {ServiceAccount: "{sa}"}} {
		if _, err := newIdentityRule(c); err == nil {
			t.Errorf("newIdentityRule(%+v) accepted a single template", c)
		}
	}
}

// FuzzIdentityRule checks the property that matters: whatever the claims and
// templates, a mapped ID is exactly spiffe://cluster.local/ns/<ns>/sa/<sa>
// with valid Kubernetes names, built from what the claims said.
func FuzzIdentityRule(f *testing.F) {
	seeds := []struct{ sub, nsTmpl, saTmpl, a, b string }{
		{"system:serviceaccount:default:app", "", "", "", ""},
		{"system:serviceaccount:a/sa/b:c", "", "", "", ""},
		{"system:serviceaccount:..:app", "", "", "", ""},
		{"system:serviceaccount:default:a..b", "", "", "", ""},
		{"system:serviceaccount:spiffe://evil.example/ns/a:b", "", "", "", ""},
		{"", "{a}", "{b}", "default", "app"},
		{"", "gh-{a}", "repo-{b}", "1342004", "74"},
		{"", "{a}", "{b}", "a/sa/b", "c"},
		{"", "{a}", "{b}", "..", "."},
		{"", "{a}", "{b}", "x", "../../etc"},
		{"", "{a}{b}", "{b}.{a}", "evil.example", "ns"},
		{"", "{a}", "{b}", "spiffe://evil.example/ns/x", "y"},
		{"", "{a}", "{b}", "a%2Fb", "c"},
		{"", "ci", "{sub}", "", "x"},
	}
	for _, s := range seeds {
		f.Add(s.sub, s.nsTmpl, s.saTmpl, s.a, s.b)
	}
	f.Fuzz(func(t *testing.T, sub, nsTmpl, saTmpl, a, b string) {
		rule, err := newIdentityRule(OIDCIdentity{Namespace: nsTmpl, ServiceAccount: saTmpl})
		if err != nil {
			return
		}
		claims := rawClaims(t, map[string]any{"sub": sub, "a": a, "b": b})
		id, err := rule.id(ruleTD, claims)
		if err != nil {
			if !errors.Is(err, ErrBadIdentity) {
				t.Fatalf("error %v is not ErrBadIdentity", err)
			}
			return
		}
		if id.TrustDomain() != ruleTD {
			t.Fatalf("%s is not in the configured trust domain", id)
		}
		seg := strings.Split(id.Path(), "/")
		if len(seg) != 5 || seg[0] != "" || seg[1] != "ns" || seg[3] != "sa" {
			t.Fatalf("%s is not /ns/<ns>/sa/<sa>", id)
		}
		ns, sa := seg[2], seg[4]
		if !isDNSLabel(ns) || !isDNSSubdomain(sa) {
			t.Fatalf("%s holds invalid names", id)
		}
		if id.String() != "spiffe://cluster.local/ns/"+ns+"/sa/"+sa {
			t.Fatalf("%s is not spiffe://cluster.local/ns/%s/sa/%s", id, ns, sa)
		}
		// The names are exactly what the claims said, not a repaired version.
		var wantNS, wantSA string
		if rule.ns == nil {
			wantNS, wantSA, _ = strings.Cut(strings.TrimPrefix(sub, serviceAccountSubPrefix), ":")
		} else {
			wantNS, _ = expand(rule.ns, claims)
			wantSA, _ = expand(rule.sa, claims)
		}
		if ns != wantNS || sa != wantSA {
			t.Fatalf("%s does not come from the claims (want ns %q sa %q)", id, wantNS, wantSA)
		}
	})
}
