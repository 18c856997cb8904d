package publish

import (
	"context"
	"errors"
	"slices"
	"sync/atomic"

	"github.com/castellan-ca/castellan/internal/kubebundle"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/client-go/informers"
	coreinformers "k8s.io/client-go/informers/core/v1"
	"k8s.io/client-go/kubernetes"
	listerscorev1 "k8s.io/client-go/listers/core/v1"
	"k8s.io/client-go/tools/cache"
)

// RootCheck reports the istio-ca-root-cert ConfigMaps of one cluster that
// differ from the trust bundle: missing in a selected namespace, or holding
// another set of roots (order and PEM formatting aside). It runs on every
// replica, leader or not, and whether or not Castellan writes the ConfigMaps
// itself, so a writer that fails, or another writer (istiod's own CA) that
// competes, shows up. Differences are normal for the seconds after a bundle
// change; alert on one that lasts.
type RootCheck struct {
	Client kubernetes.Interface
	Bundle Bundle
	// NamespaceSelector limits the namespaces (as ConfigMaps); nil means all.
	NamespaceSelector labels.Selector

	namespaces atomic.Pointer[listerscorev1.NamespaceLister]
	configMaps atomic.Pointer[listerscorev1.ConfigMapLister]
}

// ErrNotSynced is returned by OutOfSync before the caches have synced.
var ErrNotSynced = errors.New("root configmap check: caches not synced yet")

// Run watches namespaces and the ConfigMaps until ctx ends.
func (r *RootCheck) Run(ctx context.Context) error {
	nsInf, cmInf, start := rootInformers(r.Client, r.NamespaceSelector)
	stop := start(ctx)
	defer stop()
	if !cache.WaitForCacheSync(ctx.Done(), nsInf.Informer().HasSynced, cmInf.Informer().HasSynced) {
		if ctx.Err() != nil {
			return nil
		}
		return errors.New("root configmap check: caches did not sync")
	}
	nl, cl := nsInf.Lister(), cmInf.Lister()
	r.namespaces.Store(&nl)
	r.configMaps.Store(&cl)
	<-ctx.Done()
	return nil
}

// OutOfSync returns the namespaces, sorted, whose ConfigMap differs from the
// bundle now. It reads the informer caches only.
func (r *RootCheck) OutOfSync() ([]string, error) {
	nl, cl := r.namespaces.Load(), r.configMaps.Load()
	st := r.Bundle.Current()
	if nl == nil || cl == nil || st == nil {
		return nil, ErrNotSynced
	}
	all, err := (*nl).List(labels.Everything())
	if err != nil {
		return nil, err
	}
	var out []string
	for _, ns := range all {
		if kubebundle.SkippedNamespace(ns.Name) || ns.Status.Phase == corev1.NamespaceTerminating {
			continue
		}
		cm, err := (*cl).ConfigMaps(ns.Name).Get(ConfigMapName)
		if err != nil || !kubebundle.SameRoots(cm.Data[RootCertKey], st.BundlePEM, st.Roots) {
			out = append(out, ns.Name)
		}
	}
	slices.Sort(out)
	return out, nil
}

// rootInformers returns the informers on the selected namespaces and on the
// istio-ca-root-cert ConfigMaps (by name: the only ones Castellan may read),
// and a function that starts them and returns their shutdown.
func rootInformers(client kubernetes.Interface, sel labels.Selector) (coreinformers.NamespaceInformer, coreinformers.ConfigMapInformer, func(context.Context) func()) {
	nsFactory := informers.NewSharedInformerFactoryWithOptions(client, 0,
		informers.WithTweakListOptions(func(o *metav1.ListOptions) {
			if sel != nil {
				o.LabelSelector = sel.String()
			}
		}))
	cmFactory := informers.NewSharedInformerFactoryWithOptions(client, 0,
		informers.WithTweakListOptions(func(o *metav1.ListOptions) {
			o.FieldSelector = fields.OneTermEqualSelector("metadata.name", ConfigMapName).String()
		}))
	nsInf, cmInf := nsFactory.Core().V1().Namespaces(), cmFactory.Core().V1().ConfigMaps()
	nsInf.Informer() // registered before Start, or Start starts nothing
	cmInf.Informer()
	return nsInf, cmInf, func(ctx context.Context) func() {
		nsFactory.Start(ctx.Done())
		cmFactory.Start(ctx.Done())
		return func() { nsFactory.Shutdown(); cmFactory.Shutdown() }
	}
}
