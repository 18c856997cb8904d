package kube

import (
	"fmt"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"
)

// indexNodeSA indexes running pods by node and service account:
// "<node>/<namespace>/<service-account>".
const indexNodeSA = "nodeSA"

// Pods is one cluster's pod informer cache, reduced to the fields the checks of
// DESIGN.md §3 read and indexed by (node, ns/sa).
type Pods struct {
	informer cache.SharedIndexInformer
	synced   func() bool // the informer's HasSynced; a test seam
}

// newPods builds the informer; it starts with the factory.
func newPods(factory informers.SharedInformerFactory) (*Pods, error) {
	inf := factory.Core().V1().Pods().Informer()
	// Keep only what the checks read: a large cluster's pods are otherwise
	// hundreds of megabytes.
	if err := inf.SetTransform(slimPod); err != nil {
		return nil, fmt.Errorf("pod informer: %w", err)
	}
	if err := inf.AddIndexers(cache.Indexers{indexNodeSA: nodeSAIndex}); err != nil {
		return nil, fmt.Errorf("pod informer: %w", err)
	}
	return &Pods{informer: inf, synced: inf.HasSynced}, nil
}

// NewPodsFactory returns an informer factory for client with the pod resync
// disabled (the index is event-driven).
func NewPodsFactory(client kubernetes.Interface) informers.SharedInformerFactory {
	return informers.NewSharedInformerFactory(client, time.Duration(0))
}

// HasSynced reports whether the initial list has been loaded.
func (p *Pods) HasSynced() bool { return p.synced() }

// Get returns the cached pod ns/name.
func (p *Pods) Get(ns, name string) (*corev1.Pod, bool) {
	obj, ok, err := p.informer.GetIndexer().GetByKey(ns + "/" + name)
	if err != nil || !ok {
		return nil, false
	}
	pod, ok := obj.(*corev1.Pod)
	return pod, ok
}

// RunningOn reports whether a pod of service account ns/sa that is not
// finished (Failed or Succeeded) is scheduled on node.
func (p *Pods) RunningOn(node, ns, sa string) bool {
	objs, err := p.informer.GetIndexer().ByIndex(indexNodeSA, nodeSAKey(node, ns, sa))
	return err == nil && len(objs) > 0
}

func nodeSAKey(node, ns, sa string) string { return node + "/" + ns + "/" + sa }

// nodeSAIndex puts a pod in the index only while it is scheduled and not
// finished; informer updates move it out when its phase changes.
func nodeSAIndex(obj any) ([]string, error) {
	pod, ok := obj.(*corev1.Pod)
	if !ok || pod.Spec.NodeName == "" || finished(pod) {
		return nil, nil
	}
	return []string{nodeSAKey(pod.Spec.NodeName, pod.Namespace, serviceAccountOf(pod))}, nil
}

func finished(pod *corev1.Pod) bool {
	return pod.Status.Phase == corev1.PodFailed || pod.Status.Phase == corev1.PodSucceeded
}

// serviceAccountOf returns the pod's service account; an empty name means
// "default", as the apiserver's admission fills it in.
func serviceAccountOf(pod *corev1.Pod) string {
	if pod.Spec.ServiceAccountName == "" {
		return "default"
	}
	return pod.Spec.ServiceAccountName
}

// slimPod is the informer transform: a copy holding only the fields we read
// (and ResourceVersion, which the informer needs).
func slimPod(obj any) (any, error) {
	pod, ok := obj.(*corev1.Pod)
	if !ok {
		return obj, nil // a DeletedFinalStateUnknown tombstone: keep as is
	}
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{
			Name: pod.Name, Namespace: pod.Namespace, UID: pod.UID,
			ResourceVersion: pod.ResourceVersion, DeletionTimestamp: pod.DeletionTimestamp,
		},
		Spec: corev1.PodSpec{NodeName: pod.Spec.NodeName, ServiceAccountName: pod.Spec.ServiceAccountName,
			Volumes: podCertificateVolumes(pod.Spec.Volumes)},
		Status: corev1.PodStatus{Phase: pod.Status.Phase},
	}, nil
}

// podCertificateVolumes keeps, of a pod's volumes, the signer names of its
// podCertificate projections: the PodCertificateRequest signer checks that
// the pod mounts its signer's volume (NodeRestriction checks it only for
// kubelets).
func podCertificateVolumes(vols []corev1.Volume) []corev1.Volume {
	var out []corev1.Volume
	for _, v := range vols {
		if v.Projected == nil {
			continue
		}
		var sources []corev1.VolumeProjection
		for _, s := range v.Projected.Sources {
			if s.PodCertificate != nil {
				sources = append(sources, corev1.VolumeProjection{PodCertificate: &corev1.PodCertificateProjection{SignerName: s.PodCertificate.SignerName}})
			}
		}
		if len(sources) > 0 {
			out = append(out, corev1.Volume{Name: v.Name, VolumeSource: corev1.VolumeSource{Projected: &corev1.ProjectedVolumeSource{Sources: sources}}})
		}
	}
	return out
}

// MountsPodCertificate reports whether pod has a projected podCertificate
// volume source for signerName.
func MountsPodCertificate(pod *corev1.Pod, signerName string) bool {
	for _, v := range pod.Spec.Volumes {
		if v.Projected == nil {
			continue
		}
		for _, s := range v.Projected.Sources {
			if s.PodCertificate != nil && s.PodCertificate.SignerName == signerName {
				return true
			}
		}
	}
	return false
}
