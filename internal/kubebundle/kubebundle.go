// Package kubebundle names the Kubernetes objects Castellan publishes its
// trust bundle in (the istio-ca-root-cert ConfigMaps and its
// ClusterTrustBundles) and says when one holds the bundle. The publisher
// (ca/publish) and castellanctl doctor, which must not link the issuance
// pipeline, share it.
package kubebundle

import (
	"bytes"
	"crypto/x509"
	"errors"
	"fmt"
	"slices"

	"github.com/castellan-ca/castellan/signer"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/discovery"
)

// What Istio's agents read (DESIGN.md §2).
const (
	ConfigMapName = "istio-ca-root-cert"
	RootCertKey   = "root-cert.pem"
	// LabelKey/LabelValue mark the ConfigMap as Istio configuration.
	LabelKey   = "istio.io/config"
	LabelValue = "true"
)

// ManagedByLabel marks the ClusterTrustBundles Castellan writes, so a
// projected clusterTrustBundle volume (and castellanctl doctor) can select
// them by label.
var ManagedByLabel = map[string]string{"app.kubernetes.io/managed-by": "castellan"}

// SkippedNamespace reports whether namespace ns never gets the ConfigMap: no
// workload runs there.
func SkippedNamespace(ns string) bool { return ns == "kube-public" || ns == "kube-node-lease" }

// bundleVersions are the ClusterTrustBundle API versions Castellan writes, preferred first.
var bundleVersions = []string{"v1", "v1beta1"}

// ErrBundlesNotServed reports that the apiserver serves no ClusterTrustBundle version
// Castellan knows (before 1.33, or the beta API off).
var ErrBundlesNotServed = errors.New("the apiserver serves no certificates.k8s.io ClusterTrustBundle API (v1 or v1beta1)")

// BundleResource is the ClusterTrustBundle resource in the first version
// Castellan writes that the apiserver serves; ErrBundlesNotServed when none.
func BundleResource(d discovery.DiscoveryInterface) (schema.GroupVersionResource, error) {
	for _, v := range bundleVersions {
		gv := schema.GroupVersion{Group: "certificates.k8s.io", Version: v}
		list, err := d.ServerResourcesForGroupVersion(gv.String())
		switch {
		case apierrors.IsNotFound(err):
			continue
		case err != nil:
			return schema.GroupVersionResource{}, fmt.Errorf("discover %s: %w", gv, err)
		}
		for _, res := range list.APIResources {
			if res.Name == "clustertrustbundles" {
				return gv.WithResource(res.Name), nil
			}
		}
	}
	return schema.GroupVersionResource{}, ErrBundlesNotServed
}

// SameRoots reports whether got (a published PEM) holds exactly the
// certificates of the bundle: byte-equal PEM, or the same set parsed (order
// and PEM formatting aside).
func SameRoots(got, bundlePEM string, roots []*x509.Certificate) bool {
	if got == bundlePEM {
		return true
	}
	certs, err := signer.ParseCertificatesPEM([]byte(got))
	if err != nil {
		return false
	}
	for _, c := range certs {
		if !signer.ContainsCertificate(roots, c) {
			return false
		}
	}
	for _, c := range roots {
		if !slices.ContainsFunc(certs, func(o *x509.Certificate) bool { return bytes.Equal(o.Raw, c.Raw) }) {
			return false
		}
	}
	return true
}
