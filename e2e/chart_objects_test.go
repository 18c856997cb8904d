package e2e

import (
	"fmt"
	"slices"
	"strings"
	"testing"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	sigsyaml "sigs.k8s.io/yaml"
)

// TestChartObjects asserts what `helm template` renders, object by object:
// the pod runs under the rendered ServiceAccount with the rendered
// configuration, the ClusterRole grants no Secret and only the root
// ConfigMap by name, and istiod's Secret is reachable under exactly the
// configured name and namespace (RBAC by name, create narrowed by the
// admission policy), or not at all when istiodCert is off.
func TestChartObjects(t *testing.T) {
	helmBin(t)
	for _, tc := range []struct {
		name     string
		values   string // a values file's text; "" for the defaults
		certNS   string // where istiod's Secret Role must be; "" for none
		certName string
		policy   bool // the ValidatingAdmissionPolicy and its binding
	}{
		{name: "defaults", certNS: "istio-system", certName: "istiod-tls", policy: true},
		{name: "istiod elsewhere", values: "config:\n  istiodNamespace: mesh\n  istiodCertSecret: mesh-istiod-tls\n",
			certNS: "mesh", certName: "mesh-istiod-tls", policy: true},
		{name: "no admission policy", values: "rbac:\n  restrictSecretCreate: false\n",
			certNS: "istio-system", certName: "istiod-tls"},
		{name: "istiodCert off", values: "config:\n  istiodCert: false\n"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var files []string
			if tc.values != "" {
				files = []string{writeFile(t, t.TempDir(), "values.yaml", []byte(tc.values), 0o600)}
			}
			objs := renderChart(t, files...)
			byKind := map[string][]*unstructured.Unstructured{}
			for _, o := range objs {
				byKind[o.GetKind()] = append(byKind[o.GetKind()], o)
			}

			sa := one(t, byKind, "ServiceAccount")
			dep := one(t, byKind, "Deployment")
			if got, _, _ := unstructured.NestedString(dep.Object, "spec", "template", "spec", "serviceAccountName"); got != sa.GetName() {
				t.Errorf("Deployment runs as ServiceAccount %q, want the rendered %q", got, sa.GetName())
			}
			cfg := renderedConfig(t, one(t, byKind, "ConfigMap"))
			if want := tc.certNS != ""; cfg["istiodCert"] != want {
				t.Errorf("config.yaml istiodCert = %v, want %v", cfg["istiodCert"], want)
			}
			if tc.certNS != "" && (cfg["istiodNamespace"] != tc.certNS || cfg["istiodCertSecret"] != tc.certName) {
				t.Errorf("config.yaml names Secret %v/%v, want %s/%s", cfg["istiodNamespace"], cfg["istiodCertSecret"], tc.certNS, tc.certName)
			}

			for _, r := range rbacRules(t, one(t, byKind, "ClusterRole")) {
				if slices.Contains(r.Resources, "secrets") {
					t.Errorf("ClusterRole grants %v on Secrets cluster-wide", r.Verbs)
				}
				if slices.Contains(r.Resources, "configmaps") && !slices.Equal(r.Verbs, []string{"create"}) &&
					!slices.Equal(r.ResourceNames, []string{"istio-ca-root-cert"}) {
					t.Errorf("ClusterRole grants %v on ConfigMaps %v, want istio-ca-root-cert only", r.Verbs, r.ResourceNames)
				}
			}

			var secretRoles []*unstructured.Unstructured
			for _, role := range byKind["Role"] {
				for _, r := range rbacRules(t, role) {
					if slices.Contains(r.Resources, "secrets") {
						secretRoles = append(secretRoles, role)
						break
					}
				}
			}
			if tc.certNS == "" {
				if len(secretRoles) != 0 || len(byKind["ValidatingAdmissionPolicy"]) != 0 {
					t.Errorf("istiodCert off, yet %d Roles on Secrets and %d admission policies rendered", len(secretRoles), len(byKind["ValidatingAdmissionPolicy"]))
				}
				return
			}
			if len(secretRoles) != 1 || secretRoles[0].GetNamespace() != tc.certNS {
				t.Fatalf("Roles on Secrets: %v, want one in %s", names(secretRoles), tc.certNS)
			}
			for _, r := range rbacRules(t, secretRoles[0]) {
				switch {
				case slices.Equal(r.Verbs, []string{"create"}) && len(r.ResourceNames) == 0: // create cannot name; the policy narrows it
				case slices.Equal(r.ResourceNames, []string{tc.certName}) && !slices.Contains(r.Verbs, "delete"):
				default:
					t.Errorf("Role %s rule %+v: want create, or non-delete verbs on %s only", secretRoles[0].GetName(), r, tc.certName)
				}
			}
			binding := false
			for _, rb := range byKind["RoleBinding"] {
				ref, _, _ := unstructured.NestedString(rb.Object, "roleRef", "name")
				subjects, _, _ := unstructured.NestedSlice(rb.Object, "subjects")
				if ref == secretRoles[0].GetName() && rb.GetNamespace() == tc.certNS && len(subjects) == 1 &&
					subjects[0].(map[string]any)["name"] == sa.GetName() && subjects[0].(map[string]any)["namespace"] == "castellan-system" {
					binding = true
				}
			}
			if !binding {
				t.Errorf("no RoleBinding in %s gives %s to castellan-system/%s", tc.certNS, secretRoles[0].GetName(), sa.GetName())
			}

			if !tc.policy {
				if len(byKind["ValidatingAdmissionPolicy"]) != 0 {
					t.Errorf("restrictSecretCreate false, yet an admission policy rendered")
				}
				return
			}
			vap, vapb := one(t, byKind, "ValidatingAdmissionPolicy"), one(t, byKind, "ValidatingAdmissionPolicyBinding")
			conds, _, _ := unstructured.NestedSlice(vap.Object, "spec", "matchConditions")
			vals, _, _ := unstructured.NestedSlice(vap.Object, "spec", "validations")
			user := fmt.Sprintf(`"system:serviceaccount:castellan-system:%s"`, sa.GetName())
			if len(conds) != 1 || !strings.Contains(fmt.Sprint(conds[0].(map[string]any)["expression"]), user) {
				t.Errorf("admission policy matches %v, want requests by %s", conds, user)
			}
			wantExpr := fmt.Sprintf(`object.metadata.name == "%s" && object.type == "kubernetes.io/tls"`, tc.certName)
			if len(vals) != 1 || vals[0].(map[string]any)["expression"] != wantExpr {
				t.Errorf("admission policy validates %v, want %s", vals, wantExpr)
			}
			policy, _, _ := unstructured.NestedString(vapb.Object, "spec", "policyName")
			nsSel, _, _ := unstructured.NestedString(vapb.Object, "spec", "matchResources", "namespaceSelector", "matchLabels", "kubernetes.io/metadata.name")
			actions, _, _ := unstructured.NestedStringSlice(vapb.Object, "spec", "validationActions")
			if policy != vap.GetName() || nsSel != tc.certNS || !slices.Equal(actions, []string{"Deny"}) {
				t.Errorf("admission policy binding: policy %q in namespace %q with %v, want %q in %q with [Deny]", policy, nsSel, actions, vap.GetName(), tc.certNS)
			}
		})
	}
}

// one returns the only rendered object of kind.
func one(t *testing.T, byKind map[string][]*unstructured.Unstructured, kind string) *unstructured.Unstructured {
	t.Helper()
	if n := len(byKind[kind]); n != 1 {
		t.Fatalf("%d %s objects rendered, want 1", n, kind)
	}
	return byKind[kind][0]
}

// rbacRule is one rule of a Role or ClusterRole.
type rbacRule struct {
	Resources     []string `json:"resources"`
	ResourceNames []string `json:"resourceNames"`
	Verbs         []string `json:"verbs"`
}

func rbacRules(t *testing.T, role *unstructured.Unstructured) []rbacRule {
	t.Helper()
	raw, _, _ := unstructured.NestedSlice(role.Object, "rules")
	b, err := sigsyaml.Marshal(raw)
	if err != nil {
		t.Fatal(err)
	}
	var rules []rbacRule
	if err := sigsyaml.Unmarshal(b, &rules); err != nil {
		t.Fatalf("%s rules: %v", role.GetName(), err)
	}
	return rules
}

// renderedConfig parses the ConfigMap's config.yaml, the file `castellan serve --config` reads.
func renderedConfig(t *testing.T, cm *unstructured.Unstructured) map[string]any {
	t.Helper()
	s, _, _ := unstructured.NestedString(cm.Object, "data", "config.yaml")
	cfg := map[string]any{}
	if err := sigsyaml.Unmarshal([]byte(s), &cfg); err != nil {
		t.Fatalf("config.yaml: %v", err)
	}
	return cfg
}

func names(objs []*unstructured.Unstructured) []string {
	var out []string
	for _, o := range objs {
		out = append(out, o.GetNamespace()+"/"+o.GetName())
	}
	return out
}
