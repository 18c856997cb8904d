package publish

import (
	"context"
	"log/slog"
	"testing"

	"github.com/castellan-ca/castellan/ca"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/kubernetes/fake"
	listerscorev1 "k8s.io/client-go/listers/core/v1"
	"k8s.io/client-go/tools/cache"
)

// bundleState is a fixed bundle.
type bundleState struct{ st *ca.State }

func (b bundleState) Current() *ca.State       { return b.st }
func (b bundleState) Changed() <-chan struct{} { return nil }

func TestReconcile(t *testing.T) {
	const bundle = "-----BEGIN CERTIFICATE-----\nroot\n-----END CERTIFICATE-----\n"
	cm := func(ns string, data, labels map[string]string) *corev1.ConfigMap {
		return &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Name: ConfigMapName, Namespace: ns, Labels: labels}, Data: data}
	}
	ns := func(name string, phase corev1.NamespacePhase) *corev1.Namespace {
		return &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name}, Status: corev1.NamespaceStatus{Phase: phase}}
	}
	for _, tc := range []struct {
		name      string
		namespace *corev1.Namespace // nil: not in the (selected) namespace cache
		existing  *corev1.ConfigMap
		wantData  map[string]string // nil: no ConfigMap expected
		wantWrite bool
	}{
		{name: "created", namespace: ns("app", corev1.NamespaceActive),
			wantData: map[string]string{RootCertKey: bundle}, wantWrite: true},
		{name: "up to date", namespace: ns("app", corev1.NamespaceActive),
			existing: cm("app", map[string]string{RootCertKey: bundle}, map[string]string{LabelKey: LabelValue}),
			wantData: map[string]string{RootCertKey: bundle}},
		{name: "stale bundle rewritten, other keys kept", namespace: ns("app", corev1.NamespaceActive),
			existing: cm("app", map[string]string{RootCertKey: "old", "extra": "x"}, map[string]string{LabelKey: LabelValue}),
			wantData: map[string]string{RootCertKey: bundle, "extra": "x"}, wantWrite: true},
		{name: "label restored", namespace: ns("app", corev1.NamespaceActive),
			existing: cm("app", map[string]string{RootCertKey: bundle}, nil),
			wantData: map[string]string{RootCertKey: bundle}, wantWrite: true},
		{name: "kube-public skipped", namespace: ns("kube-public", corev1.NamespaceActive)},
		{name: "kube-node-lease skipped", namespace: ns("kube-node-lease", corev1.NamespaceActive)},
		{name: "terminating namespace skipped", namespace: ns("app", corev1.NamespaceTerminating)},
		{name: "unselected namespace skipped", namespace: nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			name := "app"
			if tc.namespace != nil {
				name = tc.namespace.Name
			}
			var objs []runtime.Object
			nsIdx := cache.NewIndexer(cache.MetaNamespaceKeyFunc, cache.Indexers{})
			cmIdx := cache.NewIndexer(cache.MetaNamespaceKeyFunc, cache.Indexers{cache.NamespaceIndex: cache.MetaNamespaceIndexFunc})
			if tc.namespace != nil {
				_ = nsIdx.Add(tc.namespace)
			}
			if tc.existing != nil {
				_ = cmIdx.Add(tc.existing)
				objs = append(objs, tc.existing)
			}
			client := fake.NewClientset(objs...)
			r := &reconciler{client: client, bundle: bundleState{&ca.State{BundlePEM: bundle}},
				namespaces: listerscorev1.NewNamespaceLister(nsIdx), configMaps: listerscorev1.NewConfigMapLister(cmIdx),
				logger: slog.New(slog.DiscardHandler)}
			if err := r.reconcile(context.Background(), name); err != nil {
				t.Fatal(err)
			}
			writes := 0
			for _, a := range client.Actions() {
				if a.GetVerb() == "create" || a.GetVerb() == "update" {
					writes++
				}
			}
			if (writes > 0) != tc.wantWrite {
				t.Errorf("writes = %d, want write %v", writes, tc.wantWrite)
			}
			got, err := client.CoreV1().ConfigMaps(name).Get(context.Background(), ConfigMapName, metav1.GetOptions{})
			if tc.wantData == nil {
				if !apierrors.IsNotFound(err) {
					t.Errorf("ConfigMap in %s: err = %v, want none", name, err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if len(got.Data) != len(tc.wantData) || got.Labels[LabelKey] != LabelValue {
				t.Errorf("ConfigMap = %v %v, want data %v and the label", got.Labels, got.Data, tc.wantData)
			}
			for k, v := range tc.wantData {
				if got.Data[k] != v {
					t.Errorf("data[%s] = %q, want %q", k, got.Data[k], v)
				}
			}
		})
	}
}
