package e2e

import (
	"context"
	"testing"

	"github.com/castellan-ca/castellan/e2e/internal/kubeenv"
	rbacv1 "k8s.io/api/rbac/v1"
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
		{APIGroups: []string{"coordination.k8s.io"}, Resources: []string{"leases"}, ResourceNames: []string{"castellan-root-configmaps"},
			Verbs: []string{"get", "update"}},
	}
)

// castellanKubeconfig creates the service account castellan-system/castellan
// with the chart's ClusterRole, and its lease Role in each of
// leaseNamespaces (created here), and returns a kubeconfig with its token.
func castellanKubeconfig(t *testing.T, env *kubeenv.Env, leaseNamespaces ...string) string {
	t.Helper()
	ctx := context.Background()
	const ns, sa = "castellan-system", "castellan"
	env.CreateNamespace(t, ns, nil)
	env.CreateServiceAccount(t, ns, sa)
	subject := []rbacv1.Subject{{Kind: "ServiceAccount", Name: sa, Namespace: ns}}
	rbac := env.Client.RbacV1()
	if _, err := rbac.ClusterRoles().Create(ctx, &rbacv1.ClusterRole{ObjectMeta: metav1.ObjectMeta{Name: "castellan"},
		Rules: castellanClusterRules}, metav1.CreateOptions{}); err != nil {
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
