package kubeenv

import (
	"slices"
	"strconv"
	"strings"
	"testing"

	authnv1 "k8s.io/api/authentication/v1"
	authzv1 "k8s.io/api/authorization/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// TestEnv starts the control plane and checks what the other tests rely on:
// the apiserver release and the certificates.k8s.io resources it serves, a
// pod-bound TokenRequest that TokenReview accepts with the pod in user.extra,
// and the apiserver's request counter.
func TestEnv(t *testing.T) {
	e := Start(t)
	v, err := e.Client.Discovery().ServerVersion()
	if err != nil {
		t.Fatal(err)
	}
	// PodCertificateRequest and ClusterTrustBundle are v1 from 1.37 on; a
	// v0.0.0 here means the build lost its -ldflags version.
	if minor, err := strconv.Atoi(strings.TrimSuffix(v.Minor, "+")); v.Major != "1" || err != nil || minor < 37 {
		t.Errorf("server version %s (major %q minor %q), want 1.37 or later", v.GitVersion, v.Major, v.Minor)
	}
	for gv, want := range map[string][]string{
		"certificates.k8s.io/v1":      {"certificatesigningrequests", "clustertrustbundles", "podcertificaterequests", "podcertificaterequests/status"},
		"certificates.k8s.io/v1beta1": {"clustertrustbundles", "podcertificaterequests", "podcertificaterequests/status"},
	} {
		list, err := e.Client.Discovery().ServerResourcesForGroupVersion(gv)
		if err != nil {
			t.Errorf("discovery of %s: %v", gv, err)
			continue
		}
		var served []string
		for _, r := range list.APIResources {
			served = append(served, r.Name)
		}
		for _, r := range want {
			if !slices.Contains(served, r) {
				t.Errorf("%s serves %v, missing %s", gv, served, r)
			}
		}
	}
	e.CreateNamespace(t, "smoke", nil)
	e.CreateServiceAccount(t, "smoke", "sa")
	pod := e.CreatePod(t, "smoke", "p", "sa", "node-a")
	tok := e.Token(t, "smoke", "sa", TokenOptions{Audiences: []string{"istio-ca"}, Pod: pod})
	before := e.RequestCount(t, "tokenreviews")
	tr, err := e.Client.AuthenticationV1().TokenReviews().Create(ctx(t), &authnv1.TokenReview{
		Spec: authnv1.TokenReviewSpec{Token: tok, Audiences: []string{"istio-ca"}}}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if !tr.Status.Authenticated || tr.Status.User.Username != "system:serviceaccount:smoke:sa" {
		t.Fatalf("review = %+v", tr.Status)
	}
	if got := tr.Status.User.Extra["authentication.kubernetes.io/pod-uid"]; len(got) != 1 || got[0] != string(pod.UID) {
		t.Errorf("pod-uid extra = %v, want %s", got, pod.UID)
	}
	if got := tr.Status.User.Extra["authentication.kubernetes.io/node-name"]; len(got) != 1 || got[0] != "node-a" {
		t.Errorf("node-name extra = %v, want node-a", got)
	}
	if after := e.RequestCount(t, "tokenreviews"); after != before+1 {
		t.Errorf("tokenreviews counter went %v → %v, want +1", before, after)
	}
	if !strings.HasPrefix(e.IssuerURL, "https://127.0.0.1:") {
		t.Errorf("issuer %q", e.IssuerURL)
	}
}

// TestNodeClient checks the kubelet identity the node-scoped tests use: the
// apiserver authenticates it as system:node:<node> in system:nodes, and
// NodeRestriction (admission, after the Node authorizer allowed the request)
// stops it from writing another node's object.
func TestNodeClient(t *testing.T) {
	e := Start(t)
	nodeA := e.NodeClient(t, "node-a")
	review, err := nodeA.AuthenticationV1().SelfSubjectReviews().Create(ctx(t), &authnv1.SelfSubjectReview{}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if u := review.Status.UserInfo; u.Username != "system:node:node-a" || !slices.Contains(u.Groups, "system:nodes") {
		t.Fatalf("node client authenticated as %q in %v", u.Username, u.Groups)
	}

	if _, err := nodeA.CoreV1().Nodes().Create(ctx(t), &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "node-a"}}, metav1.CreateOptions{}); err != nil {
		t.Fatalf("node-a registering itself: %v", err)
	}
	access, err := nodeA.AuthorizationV1().SelfSubjectAccessReviews().Create(ctx(t), &authzv1.SelfSubjectAccessReview{
		Spec: authzv1.SelfSubjectAccessReviewSpec{ResourceAttributes: &authzv1.ResourceAttributes{Verb: "create", Resource: "nodes", Name: "node-b"}},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if !access.Status.Allowed {
		t.Fatalf("authorizer denies node-a creating nodes (%s): the check below would not reach admission", access.Status.Reason)
	}
	_, err = nodeA.CoreV1().Nodes().Create(ctx(t), &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "node-b"}}, metav1.CreateOptions{})
	if !apierrors.IsForbidden(err) {
		t.Fatalf("node-a creating node-b: err = %v, want Forbidden by NodeRestriction", err)
	}

	created := e.CreateNode(t, "node-b")
	got, err := e.NodeClient(t, "node-b").CoreV1().Nodes().Get(ctx(t), "node-b", metav1.GetOptions{})
	if err != nil {
		t.Fatalf("node-b reading its own Node: %v", err)
	}
	if got.UID != created.UID {
		t.Errorf("node-b read UID %s, created %s", got.UID, created.UID)
	}
}

func TestParseRequestCounts(t *testing.T) {
	page := `# HELP apiserver_request_total [STABLE] Counter of apiserver requests
# TYPE apiserver_request_total counter
apiserver_request_total{code="201",component="apiserver",dry_run="",group="authentication.k8s.io",resource="tokenreviews",scope="cluster",subresource="",verb="POST",version="v1"} 7
apiserver_request_total{code="200",component="apiserver",dry_run="",group="",resource="pods",scope="namespace",subresource="",verb="GET",version="v1"} 3
apiserver_request_total{code="404",component="apiserver",dry_run="",group="",resource="pods",scope="namespace",subresource="",verb="GET",version="v1"} 2
apiserver_request_total{code="201",component="apiserver",dry_run="",group="",resource="serviceaccounts",scope="namespace",subresource="token",verb="POST",version="v1"} 10
apiserver_request_total{code="200",component="",dry_run="",group="",resource="",scope="",subresource="/metrics",verb="GET",version=""} 4
apiserver_request_duration_seconds_count{resource="pods",verb="GET"} 99
`
	got, err := parseRequestCounts([]byte(page))
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]float64{"tokenreviews": 7, "pods": 5, "serviceaccounts": 10, "": 4}
	if len(got) != len(want) {
		t.Errorf("counts = %v, want %v", got, want)
	}
	for k, v := range want {
		if got[k] != v {
			t.Errorf("counts[%q] = %v, want %v (all: %v)", k, got[k], v, got)
		}
	}
	if _, err := parseRequestCounts([]byte("apiserver_request_total{resource=\"pods\"} x\n")); err == nil {
		t.Error("a sample that is not a number parsed")
	}
}
