package publish

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"slices"
	"strings"

	"github.com/castellan-ca/castellan/internal/kubebundle"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/discovery"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/dynamic/dynamicinformer"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/util/workqueue"
)

// Istio's own ClusterTrustBundle: what istiod writes with
// ENABLE_CLUSTER_TRUST_BUNDLE_API=true and what its injection templates
// mount (as root-cert.pem) instead of the istio-ca-root-cert ConfigMap.
const (
	// IstioSignerName is the signer Istio links its bundle to.
	IstioSignerName = "istio.io/istiod-ca"
	// IstioTrustBundleName is the default of Istio's global.trustBundleName,
	// the last part of the bundle's name.
	IstioTrustBundleName = "root-cert"
)

// DefaultBundleSuffix is the last part of the name of the bundle Castellan
// publishes for one of its own signer names.
const DefaultBundleSuffix = "trust-bundle"

// ManagedByLabel marks the ClusterTrustBundles Castellan writes, so a
// projected clusterTrustBundle volume can select them by label.
var ManagedByLabel = kubebundle.ManagedByLabel

// ClusterTrustBundle names one ClusterTrustBundle to keep: its object name
// and the signer it is linked to.
type ClusterTrustBundle struct {
	Name, SignerName string
}

// SignerBundle is the bundle linked to signerName with the given last name
// part: Kubernetes requires such a bundle to be named after its signer
// ("/" becomes ":"), e.g. castellan.io:workload-identity:trust-bundle.
func SignerBundle(signerName, suffix string) ClusterTrustBundle {
	return ClusterTrustBundle{Name: strings.ReplaceAll(signerName, "/", ":") + ":" + suffix, SignerName: signerName}
}

// IstioBundle is Istio's bundle istio.io:istiod-ca:<trustBundleName> (empty:
// IstioTrustBundleName), signer istio.io/istiod-ca.
func IstioBundle(trustBundleName string) ClusterTrustBundle {
	if trustBundleName == "" {
		trustBundleName = IstioTrustBundleName
	}
	return SignerBundle(IstioSignerName, trustBundleName)
}

// errBundlesNotServed: the apiserver serves no ClusterTrustBundle version
// Castellan knows (before 1.33, or the beta API off).
var errBundlesNotServed = kubebundle.ErrBundlesNotServed

// TrustBundles keeps each of Bundles equal to the trust bundle: created when
// missing, restored when edited or deleted, rewritten when the bundle changes
// (every rotation phase), re-created when its signerName (immutable) is wrong.
// Labels someone added are kept. Writing a bundle linked to a signer needs
// `attest` on that signer name. Run it only on the leader (see Elect).
type TrustBundles struct {
	// Dynamic writes the bundles (whichever API version is served, v1 first);
	// Discovery finds that version.
	Dynamic   dynamic.Interface
	Discovery discovery.DiscoveryInterface
	Bundle    Bundle
	Bundles   []ClusterTrustBundle
	// Labels are set on every bundle (default ManagedByLabel).
	Labels map[string]string
	Logger *slog.Logger
}

// Run reconciles until ctx ends. It returns an error when the API is not
// served or the caches cannot sync.
func (t *TrustBundles) Run(ctx context.Context) error {
	logger := t.Logger
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	gvr, err := bundleResource(t.Discovery)
	if err != nil {
		return err
	}
	r := &bundleReconciler{gvr: gvr, client: t.Dynamic.Resource(gvr), bundle: t.Bundle, labels: t.Labels, wanted: map[string]ClusterTrustBundle{},
		listers: map[string]cache.GenericLister{}, logger: logger}
	if r.labels == nil {
		r.labels = ManagedByLabel
	}
	queue := workqueue.NewTypedRateLimitingQueueWithConfig(workqueue.DefaultTypedControllerRateLimiter[string](),
		workqueue.TypedRateLimitingQueueConfig[string]{Name: "cluster-trust-bundles"})
	defer queue.ShutDown()
	var synced []cache.InformerSynced
	var factories []dynamicinformer.DynamicSharedInformerFactory
	for _, b := range t.Bundles {
		r.wanted[b.Name] = b
		// One informer per bundle, on its name: a cluster may hold many bundles.
		f := dynamicinformer.NewFilteredDynamicSharedInformerFactory(t.Dynamic, 0, "", func(o *metav1.ListOptions) {
			o.FieldSelector = fields.OneTermEqualSelector("metadata.name", b.Name).String()
		})
		inf := f.ForResource(gvr)
		enqueue := func(any) { queue.Add(b.Name) }
		if _, err := inf.Informer().AddEventHandler(cache.ResourceEventHandlerFuncs{
			AddFunc: enqueue, UpdateFunc: func(_, o any) { enqueue(o) }, DeleteFunc: enqueue,
		}); err != nil {
			return err
		}
		r.listers[b.Name] = inf.Lister()
		synced = append(synced, inf.Informer().HasSynced)
		factories = append(factories, f)
	}
	changed := t.Bundle.Changed()
	for _, f := range factories {
		f.Start(ctx.Done())
		defer f.Shutdown()
	}
	if !cache.WaitForCacheSync(ctx.Done(), synced...) {
		if ctx.Err() != nil {
			return nil
		}
		return errors.New("cluster trust bundles: caches did not sync")
	}
	all := func() []string { return slices.Sorted(maps.Keys(r.wanted)) }
	for _, name := range all() { // a missing bundle has no event to queue it
		queue.Add(name)
	}
	logger.Info("cluster trust bundle controller running", "version", gvr.Version, "bundles", strings.Join(all(), ","))
	keep(ctx, keeper{bundle: t.Bundle, changed: changed, queue: queue, workers: 1, all: all,
		reconcile: r.reconcile, logger: logger, what: "cluster trust bundle"})
	return nil
}

// bundleResource is the ClusterTrustBundle resource the apiserver serves.
var bundleResource = kubebundle.BundleResource

// bundleReconciler makes one ClusterTrustBundle right.
type bundleReconciler struct {
	gvr     schema.GroupVersionResource
	client  dynamic.ResourceInterface
	bundle  Bundle
	labels  map[string]string
	wanted  map[string]ClusterTrustBundle
	listers map[string]cache.GenericLister
	logger  *slog.Logger
}

// reconcile creates, updates or re-creates the bundle called name.
func (r *bundleReconciler) reconcile(ctx context.Context, name string) error {
	want, ok := r.wanted[name]
	if !ok {
		return nil
	}
	st := r.bundle.Current()
	if st == nil {
		return errors.New("no trust bundle yet")
	}
	obj, err := r.listers[name].Get(name)
	if apierrors.IsNotFound(err) {
		return r.create(ctx, want, st.BundlePEM)
	}
	if err != nil {
		return err
	}
	cur, ok := obj.(*unstructured.Unstructured)
	if !ok {
		return fmt.Errorf("cluster trust bundle %s: unexpected %T in the cache", name, obj)
	}
	signerName, _, _ := unstructured.NestedString(cur.Object, "spec", "signerName")
	if signerName != want.SignerName {
		// spec.signerName is immutable: replace the object, only the one we saw.
		uid := cur.GetUID()
		err := r.client.Delete(ctx, name, metav1.DeleteOptions{Preconditions: &metav1.Preconditions{UID: &uid}})
		if err != nil && !apierrors.IsNotFound(err) {
			return fmt.Errorf("delete cluster trust bundle %s (signer %q, want %q): %w", name, signerName, want.SignerName, err)
		}
		return r.create(ctx, want, st.BundlePEM)
	}
	bundle, _, _ := unstructured.NestedString(cur.Object, "spec", "trustBundle")
	labels := cur.GetLabels()
	if bundle == st.BundlePEM && hasLabels(labels, r.labels) {
		return nil
	}
	next := cur.DeepCopy()
	if err := unstructured.SetNestedField(next.Object, st.BundlePEM, "spec", "trustBundle"); err != nil {
		return err
	}
	if labels == nil {
		labels = map[string]string{}
	}
	maps.Copy(labels, r.labels)
	next.SetLabels(labels)
	if _, err := r.client.Update(ctx, next, metav1.UpdateOptions{FieldManager: FieldManager}); err != nil {
		return fmt.Errorf("update cluster trust bundle %s: %w", name, err)
	}
	r.logger.Info("cluster trust bundle updated", "name", name, "generation", st.Generation, "roots", len(st.Roots))
	return nil
}

func (r *bundleReconciler) create(ctx context.Context, want ClusterTrustBundle, pem string) error {
	obj := &unstructured.Unstructured{Object: map[string]any{
		"apiVersion": r.gvr.GroupVersion().String(),
		"kind":       "ClusterTrustBundle",
		"metadata":   map[string]any{"name": want.Name},
		"spec":       map[string]any{"signerName": want.SignerName, "trustBundle": pem},
	}}
	obj.SetLabels(maps.Clone(r.labels))
	if _, err := r.client.Create(ctx, obj, metav1.CreateOptions{FieldManager: FieldManager}); err != nil {
		return fmt.Errorf("create cluster trust bundle %s: %w", want.Name, err)
	}
	r.logger.Info("cluster trust bundle created", "name", want.Name, "signer", want.SignerName)
	return nil
}

func hasLabels(have, want map[string]string) bool {
	for k, v := range want {
		if have[k] != v {
			return false
		}
	}
	return true
}
