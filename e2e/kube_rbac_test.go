package e2e

import (
	"context"
	"slices"
	"strings"
	"testing"

	"github.com/castellan-ca/castellan/deploy/manifests"
	"github.com/castellan-ca/castellan/e2e/internal/kubeenv"
	rbacv1 "k8s.io/api/rbac/v1"
	"k8s.io/apimachinery/pkg/api/equality"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// The RBAC Castellan runs with in these tests: exactly the rules of
// deploy/helm/castellan/templates/rbac.yaml, so the chart's RBAC is what the
// e2e proves sufficient. Keep the two equal.
var (
	castellanClusterRules = []rbacv1.PolicyRule{
		{APIGroups: []string{"authentication.k8s.io"}, Resources: []string{"tokenreviews"}, Verbs: []string{"create"}},
		{APIGroups: []string{""}, Resources: []string{"pods"}, Verbs: []string{"get", "list", "watch"}},
		{APIGroups: []string{""}, Resources: []string{"namespaces"}, Verbs: []string{"list", "watch"}},
		{APIGroups: []string{""}, Resources: []string{"configmaps"}, Verbs: []string{"create"}},
		{APIGroups: []string{""}, Resources: []string{"configmaps"}, ResourceNames: []string{rootCMName},
			Verbs: []string{"get", "list", "watch", "update"}},
		{NonResourceURLs: []string{"/.well-known/openid-configuration", "/openid/v1/jwks"}, Verbs: []string{"get"}},
	}
	castellanLeaseRules = []rbacv1.PolicyRule{
		{APIGroups: []string{"coordination.k8s.io"}, Resources: []string{"leases"}, Verbs: []string{"create"}},
		{APIGroups: []string{"coordination.k8s.io"}, Resources: []string{"leases"}, ResourceNames: []string{"castellan-root-configmaps", "castellan-kube-signers"},
			Verbs: []string{"get", "update"}},
	}
)

// signerRBAC is the configuration the chart derives the certificate APIs'
// rules from (config.podCertificateSigners, csrSigners, clusterTrustBundles,
// istioClusterTrustBundle).
type signerRBAC struct {
	podSigners  []string // the chart's default: defaultPodSigner
	csrSigners  []string
	istioBundle bool
}

// defaultSignerRBAC is what the chart's default values grant.
var defaultSignerRBAC = signerRBAC{podSigners: []string{defaultPodSigner}}

// defaultPodSigner is the signer name Castellan answers PodCertificateRequests of by default.
const defaultPodSigner = "castellan.io/workload-identity"

// rules are the chart's rules for o (clusterTrustBundles on).
func (o signerRBAC) rules() []rbacv1.PolicyRule {
	certs := func(res []string, verbs ...string) rbacv1.PolicyRule {
		return rbacv1.PolicyRule{APIGroups: []string{"certificates.k8s.io"}, Resources: res, Verbs: verbs}
	}
	named := func(r rbacv1.PolicyRule, names []string) rbacv1.PolicyRule { r.ResourceNames = names; return r }
	out := slices.Clone(castellanClusterRules)
	if len(o.podSigners) > 0 {
		out = append(out, certs([]string{"podcertificaterequests"}, "get", "list", "watch"),
			certs([]string{"podcertificaterequests/status"}, "update"))
	}
	if len(o.csrSigners) > 0 {
		out = append(out, certs([]string{"certificatesigningrequests"}, "get", "list", "watch"),
			certs([]string{"certificatesigningrequests/status"}, "update"))
	}
	if sign := slices.Compact(append(slices.Clone(o.podSigners), o.csrSigners...)); len(sign) > 0 {
		out = append(out, named(certs([]string{"signers"}, "sign"), sign))
	}
	var attest, bundles []string
	for _, s := range o.podSigners {
		attest, bundles = append(attest, s), append(bundles, strings.ReplaceAll(s, "/", ":")+":trust-bundle")
	}
	if o.istioBundle {
		attest, bundles = append(attest, "istio.io/istiod-ca"), append(bundles, "istio.io:istiod-ca:root-cert")
	}
	if len(bundles) > 0 {
		out = append(out, certs([]string{"clustertrustbundles"}, "create"),
			named(certs([]string{"clustertrustbundles"}, "get", "list", "watch", "update", "delete"), bundles),
			named(certs([]string{"signers"}, "attest"), attest))
	}
	return out
}

// castellanKubeconfig creates the service account castellan-system/castellan
// with the chart's ClusterRole for its default values, and its lease Role in
// each of leaseNamespaces (created here), and returns a kubeconfig with its
// token.
func castellanKubeconfig(t *testing.T, env *kubeenv.Env, leaseNamespaces ...string) string {
	t.Helper()
	return castellanKubeconfigFor(t, env, defaultSignerRBAC, leaseNamespaces...)
}

// castellanKubeconfigFor is castellanKubeconfig with the chart's rules for o.
func castellanKubeconfigFor(t *testing.T, env *kubeenv.Env, o signerRBAC, leaseNamespaces ...string) string {
	t.Helper()
	ctx := context.Background()
	const ns, sa = "castellan-system", "castellan"
	env.CreateNamespace(t, ns, nil)
	env.CreateServiceAccount(t, ns, sa)
	subject := []rbacv1.Subject{{Kind: "ServiceAccount", Name: sa, Namespace: ns}}
	rbac := env.Client.RbacV1()
	if _, err := rbac.ClusterRoles().Create(ctx, &rbacv1.ClusterRole{ObjectMeta: metav1.ObjectMeta{Name: "castellan"},
		Rules: o.rules()}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := rbac.ClusterRoleBindings().Create(ctx, &rbacv1.ClusterRoleBinding{ObjectMeta: metav1.ObjectMeta{Name: "castellan"},
		RoleRef: rbacv1.RoleRef{APIGroup: rbacv1.GroupName, Kind: "ClusterRole", Name: "castellan"}, Subjects: subject}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	for _, lns := range leaseNamespaces {
		env.CreateNamespace(t, lns, nil)
		if _, err := rbac.Roles(lns).Create(ctx, &rbacv1.Role{ObjectMeta: metav1.ObjectMeta{Name: "castellan-leader-election"},
			Rules: castellanLeaseRules}, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
		if _, err := rbac.RoleBindings(lns).Create(ctx, &rbacv1.RoleBinding{ObjectMeta: metav1.ObjectMeta{Name: "castellan-leader-election"},
			RoleRef: rbacv1.RoleRef{APIGroup: rbacv1.GroupName, Kind: "Role", Name: "castellan-leader-election"}, Subjects: subject}, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	// Long enough for the whole run; the apiserver's minimum is 10 minutes.
	token := env.Token(t, ns, sa, kubeenv.TokenOptions{ExpirationSeconds: 2 * 3600})
	return env.KubeconfigForToken(t, "castellan", token)
}

// TestRBACRulesMatchManifest: the rules these tests run Castellan with for
// the chart's default values are the ClusterRole and leader-election Role of
// deploy/manifests/castellan.yaml, the ones castellanctl doctor checks.
func TestRBACRulesMatchManifest(t *testing.T) {
	grants, err := manifests.Grants()
	if err != nil {
		t.Fatal(err)
	}
	want := map[string][]rbacv1.PolicyRule{"castellan": defaultSignerRBAC.rules(), "castellan-leader-election": castellanLeaseRules}
	for _, g := range grants {
		rules, ok := want[g.Name]
		if !ok {
			continue
		}
		delete(want, g.Name)
		if !equality.Semantic.DeepEqual(normalRules(g.Rules), normalRules(rules)) {
			t.Errorf("%s %s of the manifest:\n%+v\nthe e2e's:\n%+v", g.Kind, g.Name, g.Rules, rules)
		}
	}
	for name := range want {
		t.Errorf("the manifest has no role %s", name)
	}
}

// normalRules drops the difference between a nil and an empty list.
func normalRules(rs []rbacv1.PolicyRule) []rbacv1.PolicyRule {
	out := make([]rbacv1.PolicyRule, len(rs))
	for i, r := range rs {
		for _, l := range []*[]string{&r.APIGroups, &r.Resources, &r.ResourceNames, &r.NonResourceURLs, &r.Verbs} {
			if len(*l) == 0 {
				*l = nil
			}
		}
		out[i] = r
	}
	return out
}
