package manifests

import (
	"slices"
	"testing"
)

func TestGrants(t *testing.T) {
	gs, err := Grants()
	if err != nil {
		t.Fatal(err)
	}
	want := []struct{ kind, name, ns string }{
		{"ClusterRole", "castellan", ""},
		{"Role", "castellan-leader-election", "castellan-system"},
		{"Role", "castellan-istiod-cert", "istio-system"},
	}
	if len(gs) != len(want) {
		t.Fatalf("got %d grants, want %d: %+v", len(gs), len(want), gs)
	}
	for i, w := range want {
		g := gs[i]
		if g.Kind != w.kind || g.Name != w.name || g.Namespace != w.ns || len(g.Rules) == 0 {
			t.Errorf("grant %d = %s %s/%s with %d rules, want %s %s/%s", i, g.Kind, g.Namespace, g.Name, len(g.Rules), w.kind, w.ns, w.name)
		}
	}
	// The first rule the server cannot work without: TokenReviews.
	r := gs[0].Rules[0]
	if !slices.Equal(r.APIGroups, []string{"authentication.k8s.io"}) || !slices.Equal(r.Resources, []string{"tokenreviews"}) ||
		!slices.Equal(r.Verbs, []string{"create"}) {
		t.Errorf("first ClusterRole rule = %+v, want create tokenreviews", r)
	}
}

func TestParseGrantsRejectsBadYAML(t *testing.T) {
	if _, err := parseGrants([]byte("kind: Role\nrules: [\n")); err == nil {
		t.Error("parseGrants of broken YAML: no error")
	}
}
