package authn_test

import (
	"errors"
	"strings"
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/castellan-ca/castellan/authn"
)

var td = spiffeid.RequireTrustDomainFromString("cluster.local")

func TestParseWorkloadID(t *testing.T) {
	long63 := strings.Repeat("a", 63)
	sa253 := strings.Repeat(long63+".", 3) + strings.Repeat("b", 61) // 3*64 + 61 = 253
	tests := []struct {
		name string
		in   string
		ok   bool
	}{
		{"good", "spiffe://cluster.local/ns/default/sa/app", true},
		{"good with dashes and digits", "spiffe://cluster.local/ns/istio-system/sa/istio-ingressgateway-1", true},
		{"service account with dots", "spiffe://cluster.local/ns/default/sa/my.app.sa", true},
		{"63 character namespace", "spiffe://cluster.local/ns/" + long63 + "/sa/app", true},
		{"253 character service account", "spiffe://cluster.local/ns/default/sa/" + sa253, true},
		{"other trust domain", "spiffe://evil.example/ns/default/sa/app", false},
		{"trust domain suffix", "spiffe://cluster.local.evil/ns/default/sa/app", false},
		{"no path", "spiffe://cluster.local", false},
		{"trust domain root path", "spiffe://cluster.local/", false},
		{"extra segment", "spiffe://cluster.local/ns/default/sa/app/extra", false},
		{"namespace holding sa segments", "spiffe://cluster.local/ns/a/sa/b/sa/c", false},
		{"missing sa", "spiffe://cluster.local/ns/default", false},
		{"swapped keywords", "spiffe://cluster.local/sa/app/ns/default", false},
		{"uppercase keyword", "spiffe://cluster.local/NS/default/sa/app", false},
		{"dot dot namespace", "spiffe://cluster.local/ns/../sa/app", false},
		{"dot namespace", "spiffe://cluster.local/ns/./sa/app", false},
		{"dot dot service account", "spiffe://cluster.local/ns/default/sa/..", false},
		{"uppercase namespace", "spiffe://cluster.local/ns/Default/sa/app", false},
		{"uppercase service account", "spiffe://cluster.local/ns/default/sa/App", false},
		{"uppercase trust domain", "spiffe://Cluster.local/ns/default/sa/app", false},
		{"uppercase scheme", "SPIFFE://cluster.local/ns/default/sa/app", false},
		{"empty", "", false},
		{"empty namespace", "spiffe://cluster.local/ns//sa/app", false},
		{"empty service account", "spiffe://cluster.local/ns/default/sa/", false},
		{"64 character namespace", "spiffe://cluster.local/ns/" + long63 + "a/sa/app", false},
		{"254 character service account", "spiffe://cluster.local/ns/default/sa/" + sa253 + "b", false},
		{"namespace with dot", "spiffe://cluster.local/ns/a.b/sa/app", false},
		{"namespace leading dash", "spiffe://cluster.local/ns/-a/sa/app", false},
		{"namespace trailing dash", "spiffe://cluster.local/ns/a-/sa/app", false},
		{"service account empty label", "spiffe://cluster.local/ns/default/sa/a..b", false},
		{"service account underscore", "spiffe://cluster.local/ns/default/sa/my_sa", false},
		{"percent-encoded slash", "spiffe://cluster.local/ns/a%2Fsa%2Fb/sa/app", false},
		{"percent-encoded letter", "spiffe://cluster.local/ns/%61/sa/app", false},
		{"query", "spiffe://cluster.local/ns/default/sa/app?x=1", false},
		{"fragment", "spiffe://cluster.local/ns/default/sa/app#frag", false},
		{"user info", "spiffe://admin@cluster.local/ns/default/sa/app", false},
		{"port", "spiffe://cluster.local:8443/ns/default/sa/app", false},
		{"other scheme", "https://cluster.local/ns/default/sa/app", false},
		{"no scheme", "cluster.local/ns/default/sa/app", false},
		{"trailing slash", "spiffe://cluster.local/ns/default/sa/app/", false},
		{"double slash", "spiffe://cluster.local//ns/default/sa/app", false},
		{"whitespace", " spiffe://cluster.local/ns/default/sa/app", false},
		{"trailing newline", "spiffe://cluster.local/ns/default/sa/app\n", false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			id, err := authn.ParseWorkloadID(td, tc.in)
			if !tc.ok {
				if !errors.Is(err, authn.ErrBadIdentity) {
					t.Fatalf("ParseWorkloadID(%q) = %v, %v; want ErrBadIdentity", tc.in, id, err)
				}
				if !id.IsZero() {
					t.Errorf("ParseWorkloadID returned %v with an error", id)
				}
				return
			}
			if err != nil {
				t.Fatalf("ParseWorkloadID(%q): %v", tc.in, err)
			}
			if id.String() != tc.in || id.TrustDomain() != td {
				t.Errorf("ParseWorkloadID(%q) = %v", tc.in, id)
			}
		})
	}
}

func TestWorkloadID(t *testing.T) {
	tests := []struct {
		name, ns, sa string
		want         string // "" means refused
	}{
		{name: "good", ns: "default", sa: "app", want: "spiffe://cluster.local/ns/default/sa/app"},
		{name: "dotted service account", ns: "default", sa: "a.b", want: "spiffe://cluster.local/ns/default/sa/a.b"},
		{name: "path-like namespace forging an identity", ns: "a/sa/b", sa: "c"},
		{name: "path-like service account", ns: "default", sa: "app/extra"},
		{name: "namespace ending the path", ns: "default/sa/app", sa: ""},
		{name: "dot dot namespace", ns: "..", sa: "app"},
		{name: "dot dot service account", ns: "default", sa: ".."},
		{name: "dot service account", ns: "default", sa: "."},
		{name: "uppercase", ns: "Default", sa: "app"},
		{name: "empty namespace", ns: "", sa: "app"},
		{name: "empty service account", ns: "default", sa: ""},
		{name: "too long namespace", ns: strings.Repeat("a", 64), sa: "app"},
		{name: "too long service account", ns: "default", sa: strings.Repeat("a.", 127)},
		{name: "percent", ns: "a%2f", sa: "app"},
		{name: "query", ns: "default", sa: "app?x=1"},
		{name: "fragment", ns: "default", sa: "app#x"},
		{name: "at sign", ns: "a@b", sa: "app"},
		{name: "colon", ns: "a:1", sa: "app"},
		{name: "unicode", ns: "dеfault", sa: "app"}, // Cyrillic e
		{name: "nul", ns: "a\x00", sa: "app"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			id, err := authn.WorkloadID(td, tc.ns, tc.sa)
			if tc.want == "" {
				if !errors.Is(err, authn.ErrBadIdentity) {
					t.Fatalf("WorkloadID(%q, %q) = %v, %v; want ErrBadIdentity", tc.ns, tc.sa, id, err)
				}
				return
			}
			if err != nil {
				t.Fatalf("WorkloadID(%q, %q): %v", tc.ns, tc.sa, err)
			}
			if id.String() != tc.want {
				t.Errorf("WorkloadID = %s, want %s", id, tc.want)
			}
		})
	}
	t.Run("zero trust domain", func(t *testing.T) {
		if id, err := authn.WorkloadID(spiffeid.TrustDomain{}, "default", "app"); !errors.Is(err, authn.ErrBadIdentity) {
			t.Errorf("WorkloadID with a zero trust domain = %v, %v; want ErrBadIdentity", id, err)
		}
	})
}

func TestCheckWorkloadID(t *testing.T) {
	tests := []struct {
		name string
		id   spiffeid.ID
		ok   bool
	}{
		{"good", spiffeid.RequireFromPath(td, "/ns/default/sa/app"), true},
		{"other trust domain", spiffeid.RequireFromString("spiffe://evil.example/ns/default/sa/app"), false},
		{"non-workload path", spiffeid.RequireFromPath(td, "/castellan/operator"), false},
		{"trust domain ID", td.ID(), false},
		{"extra segments", spiffeid.RequireFromPath(td, "/ns/a/sa/b/c/d"), false},
		{"uppercase namespace", spiffeid.RequireFromPath(td, "/ns/A/sa/b"), false},
		{"zero", spiffeid.ID{}, false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := authn.CheckWorkloadID(td, tc.id)
			if !tc.ok {
				if !errors.Is(err, authn.ErrBadIdentity) {
					t.Fatalf("CheckWorkloadID(%v) = %v, %v; want ErrBadIdentity", tc.id, got, err)
				}
				return
			}
			if err != nil || got != tc.id {
				t.Fatalf("CheckWorkloadID(%v) = %v, %v", tc.id, got, err)
			}
		})
	}
}

// FuzzWorkloadID: no namespace or service account can make WorkloadID build an
// identity other than /ns/<ns>/sa/<sa> (a path-like "a/sa/b" must never forge one).
func FuzzWorkloadID(f *testing.F) {
	for _, s := range [][2]string{
		{"default", "app"}, {"a/sa/b", "c"}, {"a", "b/sa/c"}, {"..", "app"}, {"default", "a.b"},
		{"a%2fsa%2fb", "c"}, {"Default", "App"}, {"", ""}, {"default", "app?x"}, {"ns", "sa#f"},
		{strings.Repeat("a", 63), strings.Repeat("b", 253)}, {"a", "b..c"}, {"x-1", "-y"},
	} {
		f.Add(s[0], s[1])
	}
	f.Fuzz(func(t *testing.T, ns, sa string) {
		id, err := authn.WorkloadID(td, ns, sa)
		if err != nil {
			if !errors.Is(err, authn.ErrBadIdentity) {
				t.Fatalf("WorkloadID error %v does not wrap ErrBadIdentity", err)
			}
			return
		}
		if id.TrustDomain() != td {
			t.Fatalf("trust domain %v", id.TrustDomain())
		}
		if want := "/ns/" + ns + "/sa/" + sa; id.Path() != want {
			t.Fatalf("path %q, want %q", id.Path(), want)
		}
		if seg := strings.Split(strings.TrimPrefix(id.Path(), "/"), "/"); len(seg) != 4 {
			t.Fatalf("path %q has %d segments", id.Path(), len(seg))
		}
		back, err := authn.ParseWorkloadID(td, id.String())
		if err != nil || back != id {
			t.Fatalf("ParseWorkloadID(%q) = %v, %v; want the same ID", id.String(), back, err)
		}
	})
}

func FuzzParseWorkloadID(f *testing.F) {
	for _, s := range []string{
		"spiffe://cluster.local/ns/default/sa/app", "spiffe://evil.example/ns/default/sa/app",
		"spiffe://cluster.local/ns/a/sa/b/sa/c", "spiffe://cluster.local/ns/../sa/app",
		"spiffe://cluster.local/ns/a%2F/sa/b", "spiffe://u@cluster.local:1/ns/a/sa/b?q#f", "",
		"spiffe://cluster.local/ns/default/sa/a.b.c", "spiffe://CLUSTER.local/ns/a/sa/b",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		id, err := authn.ParseWorkloadID(td, s)
		if err != nil {
			if !errors.Is(err, authn.ErrBadIdentity) {
				t.Fatalf("error %v does not wrap ErrBadIdentity", err)
			}
			return
		}
		if id.TrustDomain() != td {
			t.Fatalf("accepted %q in trust domain %v", s, id.TrustDomain())
		}
		seg := strings.Split(strings.TrimPrefix(id.Path(), "/"), "/")
		if len(seg) != 4 || seg[0] != "ns" || seg[2] != "sa" {
			t.Fatalf("accepted %q with path %q", s, id.Path())
		}
		if id.String() != s {
			t.Fatalf("accepted %q but it means %q", s, id.String())
		}
		if again, err := authn.WorkloadID(td, seg[1], seg[3]); err != nil || again != id {
			t.Fatalf("WorkloadID(%q, %q) = %v, %v; want %v", seg[1], seg[3], again, err, id)
		}
	})
}
