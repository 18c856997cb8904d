// Package publish writes what Kubernetes workloads and istiod read from
// Castellan, kept equal to the trust bundle through every rotation phase:
// the istio-ca-root-cert ConfigMap in every namespace (ConfigMaps),
// ClusterTrustBundles (TrustBundles), istiod's serving certificate in its
// kubernetes.io/tls Secret (IstiodCert), a check that reports ConfigMaps
// differing from the bundle (RootCheck), and the Lease election that lets
// one replica write (Election).
package publish

import (
	"context"
	"errors"
	"fmt"
	"log/slog"

	"github.com/castellan-ca/castellan/ca"
	"github.com/castellan-ca/castellan/internal/kubebundle"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/client-go/kubernetes"
	listerscorev1 "k8s.io/client-go/listers/core/v1"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/util/workqueue"
)

// What Istio's agents read (DESIGN.md §2).
const (
	ConfigMapName = kubebundle.ConfigMapName
	RootCertKey   = kubebundle.RootCertKey
	// LabelKey/LabelValue mark the ConfigMap as Istio configuration.
	LabelKey   = kubebundle.LabelKey
	LabelValue = kubebundle.LabelValue
	// FieldManager names Castellan in the ConfigMaps' managed fields.
	FieldManager = "castellan"
)

// Bundle is the source of the trust bundle (ca.Authority).
type Bundle interface {
	Current() *ca.State
	Changed() <-chan struct{}
}

// ConfigMaps keeps istio-ca-root-cert equal to the trust bundle in every
// selected namespace: created in new namespaces, re-created when deleted,
// restored when edited, rewritten when the bundle changes. Run it only on the
// leader (see Elect).
type ConfigMaps struct {
	Client kubernetes.Interface
	Bundle Bundle
	// NamespaceSelector limits the namespaces (label selector); nil means all.
	NamespaceSelector labels.Selector
	Logger            *slog.Logger
	// Workers is the number of namespaces reconciled at once (default 2).
	Workers int
}

// Run reconciles until ctx ends. It returns an error only if its caches
// cannot sync.
func (c *ConfigMaps) Run(ctx context.Context) error {
	logger := c.Logger
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	workers := c.Workers
	if workers <= 0 {
		workers = 2
	}
	nsInformer, cmInformer, start := rootInformers(c.Client, c.NamespaceSelector)

	queue := workqueue.NewTypedRateLimitingQueueWithConfig(workqueue.DefaultTypedControllerRateLimiter[string](),
		workqueue.TypedRateLimitingQueueConfig[string]{Name: "root-configmaps"})
	defer queue.ShutDown()
	r := &reconciler{client: c.Client, bundle: c.Bundle, namespaces: nsInformer.Lister(), configMaps: cmInformer.Lister(), logger: logger}

	enqueueNS := func(obj any) {
		if ns, ok := objectName(obj); ok {
			queue.Add(ns)
		}
	}
	enqueueCM := func(obj any) {
		if ns, ok := objectNamespace(obj); ok {
			queue.Add(ns)
		}
	}
	if _, err := nsInformer.Informer().AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc: enqueueNS, UpdateFunc: func(_, obj any) { enqueueNS(obj) },
	}); err != nil {
		return err
	}
	if _, err := cmInformer.Informer().AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc: enqueueCM, UpdateFunc: func(_, obj any) { enqueueCM(obj) }, DeleteFunc: enqueueCM,
	}); err != nil {
		return err
	}
	// Armed before the caches sync, whose initial list enqueues every namespace.
	changed := c.Bundle.Changed()
	stop := start(ctx)
	defer stop()
	if !cache.WaitForCacheSync(ctx.Done(), nsInformer.Informer().HasSynced, cmInformer.Informer().HasSynced) {
		if ctx.Err() != nil {
			return nil
		}
		return errors.New("root configmaps: caches did not sync")
	}
	logger.Info("root configmap controller running")

	all := func() []string {
		nss, err := r.namespaces.List(labels.Everything())
		if err != nil {
			return nil
		}
		names := make([]string, len(nss))
		for i, ns := range nss {
			names[i] = ns.Name
		}
		return names
	}
	keep(ctx, keeper{bundle: c.Bundle, changed: changed, queue: queue, workers: workers, all: all,
		reconcile: r.reconcile, logger: logger, what: "root configmap"})
	return nil
}

// reconciler makes one namespace's ConfigMap right.
type reconciler struct {
	client     kubernetes.Interface
	bundle     Bundle
	namespaces listerscorev1.NamespaceLister
	configMaps listerscorev1.ConfigMapLister
	logger     *slog.Logger
}

// reconcile creates or updates the ConfigMap in namespace name so that its
// root-cert.pem is the current bundle and it carries the label. Other keys and
// labels someone added are left alone.
func (r *reconciler) reconcile(ctx context.Context, name string) error {
	if kubebundle.SkippedNamespace(name) {
		return nil
	}
	ns, err := r.namespaces.Get(name)
	if apierrors.IsNotFound(err) {
		return nil // deleted, or not selected
	}
	if err != nil {
		return err
	}
	if ns.Status.Phase == corev1.NamespaceTerminating {
		return nil
	}
	st := r.bundle.Current()
	if st == nil {
		return errors.New("no trust bundle yet")
	}
	cm, err := r.configMaps.ConfigMaps(name).Get(ConfigMapName)
	switch {
	case apierrors.IsNotFound(err):
		_, err = r.client.CoreV1().ConfigMaps(name).Create(ctx, &corev1.ConfigMap{
			ObjectMeta: metav1.ObjectMeta{Name: ConfigMapName, Namespace: name, Labels: map[string]string{LabelKey: LabelValue}},
			Data:       map[string]string{RootCertKey: st.BundlePEM},
		}, metav1.CreateOptions{FieldManager: FieldManager})
		if err != nil {
			return fmt.Errorf("create %s/%s: %w", name, ConfigMapName, err)
		}
		r.logger.Debug("root configmap created", "namespace", name, "generation", st.Generation)
		return nil
	case err != nil:
		return err
	case cm.Data[RootCertKey] == st.BundlePEM && cm.Labels[LabelKey] == LabelValue:
		return nil
	}
	cm = cm.DeepCopy()
	if cm.Data == nil {
		cm.Data = map[string]string{}
	}
	if cm.Labels == nil {
		cm.Labels = map[string]string{}
	}
	cm.Data[RootCertKey] = st.BundlePEM
	cm.Labels[LabelKey] = LabelValue
	if _, err := r.client.CoreV1().ConfigMaps(name).Update(ctx, cm, metav1.UpdateOptions{FieldManager: FieldManager}); err != nil {
		return fmt.Errorf("update %s/%s: %w", name, ConfigMapName, err)
	}
	r.logger.Debug("root configmap updated", "namespace", name, "generation", st.Generation)
	return nil
}

// objectName returns the name of a namespace event's object.
func objectName(obj any) (string, bool) {
	if o, ok := obj.(metav1.Object); ok {
		return o.GetName(), true
	}
	return "", false
}

// objectNamespace returns the namespace of a ConfigMap event's object,
// including a deletion tombstone.
func objectNamespace(obj any) (string, bool) {
	if t, ok := obj.(cache.DeletedFinalStateUnknown); ok {
		obj = t.Obj
	}
	if o, ok := obj.(metav1.Object); ok {
		return o.GetNamespace(), true
	}
	return "", false
}
