package publish

import (
	"context"
	"crypto/x509"
	"errors"
	"slices"
	"testing"
	"time"

	"github.com/castellan-ca/castellan/ca"
	"github.com/castellan-ca/castellan/signer"
	"github.com/castellan-ca/castellan/signer/signertest"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/kubernetes/fake"
)

// TestRootCheck lists exactly the namespaces whose ConfigMap is missing or
// holds other roots, whoever wrote it.
func TestRootCheck(t *testing.T) {
	r1 := signertest.NewRoot(t, "one", signertest.CertOptions{}).Cert
	r2 := signertest.NewRoot(t, "two", signertest.CertOptions{}).Cert
	st := &ca.State{Roots: []*x509.Certificate{r1, r2}, BundlePEM: signer.EncodePEM(r1, r2)}
	ns := func(name string, phase corev1.NamespacePhase) runtime.Object {
		return &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name}, Status: corev1.NamespaceStatus{Phase: phase}}
	}
	cm := func(ns, pem string) runtime.Object {
		return &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Name: ConfigMapName, Namespace: ns}, Data: map[string]string{RootCertKey: pem}}
	}
	client := fake.NewClientset(
		ns("same", corev1.NamespaceActive), cm("same", st.BundlePEM),
		ns("reordered", corev1.NamespaceActive), cm("reordered", "\n"+signer.EncodePEM(r2, r1)),
		ns("missing", corev1.NamespaceActive),
		ns("old-root-only", corev1.NamespaceActive), cm("old-root-only", signer.EncodePEM(r1)),
		ns("extra-root", corev1.NamespaceActive), cm("extra-root", signer.EncodePEM(r1, r2, signertest.NewRoot(t, "three", signertest.CertOptions{}).Cert)),
		ns("garbage", corev1.NamespaceActive), cm("garbage", "not PEM"),
		ns("kube-public", corev1.NamespaceActive),
		ns("going", corev1.NamespaceTerminating),
	)
	check := &RootCheck{Client: client, Bundle: bundleState{st}}
	if _, err := check.OutOfSync(); !errors.Is(err, ErrNotSynced) {
		t.Fatalf("before Run: %v, want ErrNotSynced", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- check.Run(ctx) }()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Error(err)
		}
	}()
	var got []string
	var err error
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		if got, err = check.OutOfSync(); err == nil {
			break
		}
	}
	if err != nil {
		t.Fatal(err)
	}
	want := []string{"extra-root", "garbage", "missing", "old-root-only"}
	if !slices.Equal(got, want) {
		t.Errorf("OutOfSync = %v, want %v", got, want)
	}
}
