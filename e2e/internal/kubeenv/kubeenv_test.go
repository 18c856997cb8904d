package kubeenv

import (
	"strings"
	"testing"

	authnv1 "k8s.io/api/authentication/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// TestEnv starts the control plane and checks what the other tests rely on:
// a pod-bound TokenRequest that TokenReview accepts with the pod in user.extra,
// and the apiserver's request counter.
func TestEnv(t *testing.T) {
	e := Start(t)
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
