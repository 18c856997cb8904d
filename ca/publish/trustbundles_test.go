package publish

import (
	"context"
	"errors"
	"log/slog"
	"testing"

	"github.com/castellan-ca/castellan/ca"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	fakediscovery "k8s.io/client-go/discovery/fake"
	dynamicfake "k8s.io/client-go/dynamic/fake"
	k8sfake "k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"
	"k8s.io/client-go/tools/cache"
)

func TestBundleNames(t *testing.T) {
	for _, tc := range []struct {
		got  ClusterTrustBundle
		want ClusterTrustBundle
	}{
		{SignerBundle("castellan.io/workload-identity", DefaultBundleSuffix),
			ClusterTrustBundle{Name: "castellan.io:workload-identity:trust-bundle", SignerName: "castellan.io/workload-identity"}},
		{SignerBundle("example.com/a/b", "v1"), ClusterTrustBundle{Name: "example.com:a:b:v1", SignerName: "example.com/a/b"}},
		// What Istio's injection templates mount with ENABLE_CLUSTER_TRUST_BUNDLE_API.
		{IstioBundle(""), ClusterTrustBundle{Name: "istio.io:istiod-ca:root-cert", SignerName: "istio.io/istiod-ca"}},
		{IstioBundle("mesh-roots"), ClusterTrustBundle{Name: "istio.io:istiod-ca:mesh-roots", SignerName: "istio.io/istiod-ca"}},
	} {
		if tc.got != tc.want {
			t.Errorf("got %+v, want %+v", tc.got, tc.want)
		}
	}
}

func TestBundleResource(t *testing.T) {
	res := func(gv string, names ...string) *metav1.APIResourceList {
		l := &metav1.APIResourceList{GroupVersion: gv}
		for _, n := range names {
			l.APIResources = append(l.APIResources, metav1.APIResource{Name: n})
		}
		return l
	}
	for _, tc := range []struct {
		name    string
		served  []*metav1.APIResourceList
		want    string
		wantErr error
	}{
		{"v1 preferred", []*metav1.APIResourceList{res("certificates.k8s.io/v1beta1", "clustertrustbundles"),
			res("certificates.k8s.io/v1", "certificatesigningrequests", "clustertrustbundles")}, "v1", nil},
		{"v1beta1 when v1 lacks it", []*metav1.APIResourceList{res("certificates.k8s.io/v1", "certificatesigningrequests"),
			res("certificates.k8s.io/v1beta1", "clustertrustbundles")}, "v1beta1", nil},
		{"not served", []*metav1.APIResourceList{res("certificates.k8s.io/v1", "certificatesigningrequests")}, "", errBundlesNotServed},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d := k8sfake.NewClientset().Discovery().(*fakediscovery.FakeDiscovery)
			d.Resources = tc.served
			gvr, err := bundleResource(d)
			if !errors.Is(err, tc.wantErr) || gvr.Version != tc.want {
				t.Errorf("bundleResource = %v, %v; want version %q, error %v", gvr, err, tc.want, tc.wantErr)
			}
		})
	}
}

func TestReconcileTrustBundle(t *testing.T) {
	const bundle = "-----BEGIN CERTIFICATE-----\nroot\n-----END CERTIFICATE-----\n"
	gvr := schema.GroupVersionResource{Group: "certificates.k8s.io", Version: "v1", Resource: "clustertrustbundles"}
	want := SignerBundle("castellan.io/workload-identity", DefaultBundleSuffix)
	ctb := func(signerName, pem string, labels map[string]string) *unstructured.Unstructured {
		u := &unstructured.Unstructured{Object: map[string]any{
			"apiVersion": "certificates.k8s.io/v1", "kind": "ClusterTrustBundle",
			"metadata": map[string]any{"name": want.Name, "uid": "uid-1"},
			"spec":     map[string]any{"signerName": signerName, "trustBundle": pem},
		}}
		u.SetLabels(labels)
		return u
	}
	managed := map[string]string{"app.kubernetes.io/managed-by": "castellan"}
	for _, tc := range []struct {
		name       string
		existing   *unstructured.Unstructured
		wantVerbs  []string
		wantLabels map[string]string
	}{
		{name: "created", wantVerbs: []string{"create"}, wantLabels: managed},
		{name: "up to date", existing: ctb(want.SignerName, bundle, managed), wantLabels: managed},
		{name: "stale bundle rewritten, other labels kept", existing: ctb(want.SignerName, "old", map[string]string{"team": "mesh"}),
			wantVerbs: []string{"update"}, wantLabels: map[string]string{"team": "mesh", "app.kubernetes.io/managed-by": "castellan"}},
		{name: "wrong signer replaced", existing: ctb("example.com/other", bundle, managed),
			wantVerbs: []string{"delete", "create"}, wantLabels: managed},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var objs []runtime.Object
			idx := cache.NewIndexer(cache.MetaNamespaceKeyFunc, cache.Indexers{})
			if tc.existing != nil {
				objs = append(objs, tc.existing)
				_ = idx.Add(tc.existing)
			}
			client := dynamicfake.NewSimpleDynamicClientWithCustomListKinds(runtime.NewScheme(),
				map[schema.GroupVersionResource]string{gvr: "ClusterTrustBundleList"}, objs...)
			r := &bundleReconciler{gvr: gvr, client: client.Resource(gvr), bundle: bundleState{&ca.State{BundlePEM: bundle}},
				labels: ManagedByLabel, wanted: map[string]ClusterTrustBundle{want.Name: want},
				listers: map[string]cache.GenericLister{want.Name: cache.NewGenericLister(idx, gvr.GroupResource())},
				logger:  slog.New(slog.DiscardHandler)}
			if err := r.reconcile(context.Background(), want.Name); err != nil {
				t.Fatal(err)
			}
			var verbs []string
			for _, a := range client.Actions() {
				if a.GetVerb() != "get" && a.GetVerb() != "list" && a.GetVerb() != "watch" {
					verbs = append(verbs, a.GetVerb())
				}
				if d, ok := a.(k8stesting.DeleteAction); ok {
					if p := d.GetDeleteOptions().Preconditions; p == nil || p.UID == nil || *p.UID != "uid-1" {
						t.Errorf("delete without the UID precondition of the object seen: %+v", p)
					}
				}
			}
			if len(verbs) != len(tc.wantVerbs) {
				t.Fatalf("writes = %v, want %v", verbs, tc.wantVerbs)
			}
			for i := range verbs {
				if verbs[i] != tc.wantVerbs[i] {
					t.Fatalf("writes = %v, want %v", verbs, tc.wantVerbs)
				}
			}
			got, err := client.Resource(gvr).Get(context.Background(), want.Name, metav1.GetOptions{})
			if err != nil {
				t.Fatal(err)
			}
			signerName, _, _ := unstructured.NestedString(got.Object, "spec", "signerName")
			pem, _, _ := unstructured.NestedString(got.Object, "spec", "trustBundle")
			if signerName != want.SignerName || pem != bundle {
				t.Errorf("bundle object: signer %q, trustBundle %q; want %q and the bundle", signerName, pem, want.SignerName)
			}
			if l := got.GetLabels(); len(l) != len(tc.wantLabels) || !hasLabels(l, tc.wantLabels) {
				t.Errorf("labels = %v, want %v", l, tc.wantLabels)
			}
		})
	}
	t.Run("unknown name ignored", func(t *testing.T) {
		r := &bundleReconciler{wanted: map[string]ClusterTrustBundle{}}
		if err := r.reconcile(context.Background(), "example.com:x:y"); err != nil {
			t.Fatal(err)
		}
	})
	t.Run("no bundle yet", func(t *testing.T) {
		idx := cache.NewIndexer(cache.MetaNamespaceKeyFunc, cache.Indexers{})
		r := &bundleReconciler{gvr: gvr, bundle: bundleState{nil}, wanted: map[string]ClusterTrustBundle{want.Name: want},
			listers: map[string]cache.GenericLister{want.Name: cache.NewGenericLister(idx, gvr.GroupResource())}}
		if err := r.reconcile(context.Background(), want.Name); err == nil || apierrors.IsNotFound(err) {
			t.Errorf("reconcile without a bundle = %v, want an error that retries", err)
		}
	})
}
