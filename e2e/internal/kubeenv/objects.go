package kubeenv

import (
	"bufio"
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"strconv"
	"strings"

	jose "github.com/go-jose/go-jose/v4"
	authnv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/utils/ptr"

	"github.com/castellan-ca/castellan/e2e/internal/testproc"
)

// ctx returns a context bounded by CallTimeout.
func ctx(t testproc.TB) context.Context {
	c, cancel := context.WithTimeout(context.Background(), CallTimeout)
	t.Cleanup(cancel)
	return c
}

// CreateNamespace creates namespace name with labels.
func (e *Env) CreateNamespace(t testproc.TB, name string, labels map[string]string) *corev1.Namespace {
	t.Helper()
	ns, err := e.Client.CoreV1().Namespaces().Create(ctx(t), &corev1.Namespace{
		ObjectMeta: metav1.ObjectMeta{Name: name, Labels: labels},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("create namespace %s: %v", name, err)
	}
	return ns
}

// CreateServiceAccount creates ns/name. There is no controller-manager, so
// not even "default" exists until a test creates it.
func (e *Env) CreateServiceAccount(t testproc.TB, ns, name string) *corev1.ServiceAccount {
	t.Helper()
	sa, err := e.Client.CoreV1().ServiceAccounts(ns).Create(ctx(t), &corev1.ServiceAccount{
		ObjectMeta: metav1.ObjectMeta{Name: name},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("create service account %s/%s: %v", ns, name, err)
	}
	return sa
}

// CreateNode creates the Node object name, as its kubelet would register
// it (none runs here): node-scoped checks, e.g. NodeRestriction's for
// PodCertificateRequests, look the node up.
func (e *Env) CreateNode(t testproc.TB, name string) *corev1.Node {
	t.Helper()
	n, err := e.Client.CoreV1().Nodes().Create(ctx(t), &corev1.Node{
		ObjectMeta: metav1.ObjectMeta{Name: name},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("create node %s: %v", name, err)
	}
	return n
}

// CreatePod creates a pod of service account sa scheduled on node (set
// directly: there is no scheduler, and no kubelet ever runs it), with vols.
func (e *Env) CreatePod(t testproc.TB, ns, name, sa, node string, vols ...corev1.Volume) *corev1.Pod {
	t.Helper()
	pod, err := e.Client.CoreV1().Pods(ns).Create(ctx(t), &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name},
		Spec: corev1.PodSpec{
			ServiceAccountName:           sa,
			NodeName:                     node,
			AutomountServiceAccountToken: ptr.To(false),
			Containers:                   []corev1.Container{{Name: "app", Image: "example.invalid/app"}},
			Volumes:                      vols,
		},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("create pod %s/%s: %v", ns, name, err)
	}
	return pod
}

// DeletePod deletes a pod at once (grace period 0: no kubelet would confirm
// a graceful deletion).
func (e *Env) DeletePod(t testproc.TB, ns, name string) {
	t.Helper()
	if err := e.Client.CoreV1().Pods(ns).Delete(ctx(t), name, metav1.DeleteOptions{GracePeriodSeconds: ptr.To[int64](0)}); err != nil {
		t.Fatalf("delete pod %s/%s: %v", ns, name, err)
	}
}

// SetPodPhase sets a pod's status.phase, as a kubelet would.
func (e *Env) SetPodPhase(t testproc.TB, ns, name string, phase corev1.PodPhase) {
	t.Helper()
	pod, err := e.Client.CoreV1().Pods(ns).Get(ctx(t), name, metav1.GetOptions{})
	if err != nil {
		t.Fatalf("get pod %s/%s: %v", ns, name, err)
	}
	pod.Status.Phase = phase
	if _, err := e.Client.CoreV1().Pods(ns).UpdateStatus(ctx(t), pod, metav1.UpdateOptions{}); err != nil {
		t.Fatalf("set phase of pod %s/%s: %v", ns, name, err)
	}
}

// TokenOptions shape a TokenRequest.
type TokenOptions struct {
	Audiences []string
	// Pod binds the token to a pod (name and UID); nil for an unbound token.
	Pod *corev1.Pod
	// ExpirationSeconds defaults to one hour (the apiserver's minimum is 10 minutes).
	ExpirationSeconds int64
}

// Token mints a real service-account token with the TokenRequest API.
func (e *Env) Token(t testproc.TB, ns, sa string, o TokenOptions) string {
	t.Helper()
	if o.ExpirationSeconds == 0 {
		o.ExpirationSeconds = 3600
	}
	req := &authnv1.TokenRequest{Spec: authnv1.TokenRequestSpec{Audiences: o.Audiences, ExpirationSeconds: &o.ExpirationSeconds}}
	if o.Pod != nil {
		req.Spec.BoundObjectRef = &authnv1.BoundObjectReference{Kind: "Pod", APIVersion: "v1", Name: o.Pod.Name, UID: o.Pod.UID}
	}
	out, err := e.Client.CoreV1().ServiceAccounts(ns).CreateToken(ctx(t), sa, req, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("TokenRequest for %s/%s: %v", ns, sa, err)
	}
	return out.Status.Token
}

// Resign returns token with its claims changed by edit and signed again with
// the apiserver's own service-account key and key ID: a token the apiserver
// itself could have issued (e.g. one that has already expired, which the
// TokenRequest API will not mint).
func (e *Env) Resign(t testproc.TB, token string, edit func(claims map[string]any)) string {
	t.Helper()
	parts := strings.Split(token, ".")
	if len(parts) != 3 {
		t.Fatalf("not a JWT: %d parts", len(parts))
	}
	var header struct {
		Kid string `json:"kid"`
	}
	claims := map[string]any{}
	for i, dst := range []any{&header, &claims} {
		raw, err := base64.RawURLEncoding.DecodeString(parts[i])
		if err != nil {
			t.Fatal(err)
		}
		dec := json.NewDecoder(bytes.NewReader(raw))
		dec.UseNumber()
		if err := dec.Decode(dst); err != nil {
			t.Fatal(err)
		}
	}
	edit(claims)
	signer, err := jose.NewSigner(jose.SigningKey{Algorithm: jose.RS256, Key: e.saKey},
		(&jose.SignerOptions{}).WithType("JWT").WithHeader("kid", header.Kid))
	if err != nil {
		t.Fatal(err)
	}
	payload, err := json.Marshal(claims)
	if err != nil {
		t.Fatal(err)
	}
	jws, err := signer.Sign(payload)
	if err != nil {
		t.Fatal(err)
	}
	out, err := jws.CompactSerialize()
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// AllowAnonymousIssuerDiscovery lets unauthenticated clients read the
// service-account issuer's OIDC discovery document and JWKS, as a cloud
// provider's public issuer does.
func (e *Env) AllowAnonymousIssuerDiscovery(t testproc.TB) {
	t.Helper()
	if _, err := e.Client.RbacV1().ClusterRoleBindings().Create(ctx(t), &rbacv1.ClusterRoleBinding{
		ObjectMeta: metav1.ObjectMeta{Name: "kubeenv-anonymous-issuer-discovery"},
		RoleRef:    rbacv1.RoleRef{APIGroup: "rbac.authorization.k8s.io", Kind: "ClusterRole", Name: "system:service-account-issuer-discovery"},
		Subjects:   []rbacv1.Subject{{APIGroup: "rbac.authorization.k8s.io", Kind: "Group", Name: "system:unauthenticated"}},
	}, metav1.CreateOptions{}); err != nil {
		t.Fatalf("bind issuer discovery to anonymous: %v", err)
	}
}

// RequestCount returns how many requests for resource the apiserver has
// served, from its own apiserver_request_total metric (all verbs and codes).
func (e *Env) RequestCount(t testproc.TB, resource string) float64 {
	t.Helper()
	return e.RequestCounts(t)[resource]
}

// RequestCounts returns apiserver_request_total summed over verbs and codes
// for each resource ("" for non-resource paths such as /metrics).
func (e *Env) RequestCounts(t testproc.TB) map[string]float64 {
	t.Helper()
	raw, err := e.Client.CoreV1().RESTClient().Get().AbsPath("/metrics").DoRaw(ctx(t))
	if err != nil {
		t.Fatalf("GET /metrics: %v", err)
	}
	counts, err := parseRequestCounts(raw)
	if err != nil {
		t.Fatal(err)
	}
	return counts
}

// parseRequestCounts sums the apiserver_request_total samples of a metrics
// page by their resource label.
func parseRequestCounts(page []byte) (map[string]float64, error) {
	counts := map[string]float64{}
	sc := bufio.NewScanner(bytes.NewReader(page))
	sc.Buffer(make([]byte, 0, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if !strings.HasPrefix(line, "apiserver_request_total{") {
			continue
		}
		v, err := strconv.ParseFloat(line[strings.LastIndexByte(line, ' ')+1:], 64)
		if err != nil {
			return nil, fmt.Errorf("metrics line %q: %w", line, err)
		}
		var resource string // the label, not subresource's
		for _, sep := range []string{`{resource="`, `,resource="`} {
			if _, rest, ok := strings.Cut(line, sep); ok {
				resource, _, _ = strings.Cut(rest, `"`)
			}
		}
		counts[resource] += v
	}
	return counts, sc.Err()
}
