package kubesign

import (
	"context"
	"errors"
	"fmt"

	certv1 "k8s.io/api/certificates/v1"
	certv1beta1 "k8s.io/api/certificates/v1beta1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/discovery"
	"k8s.io/client-go/kubernetes"
)

// ErrNotServed is returned by PodCertificates.Run when the apiserver serves
// no PodCertificateRequest API (before Kubernetes 1.35, or the beta off).
var ErrNotServed = errors.New("the apiserver serves no certificates.k8s.io PodCertificateRequest API (v1 or v1beta1)")

// pcrAPI is which PodCertificateRequest versions the apiserver serves. v1
// (Kubernetes 1.37) is watched when served, v1beta1 (1.35, 1.36) otherwise.
type pcrAPI struct {
	v1, v1beta1 bool
}

// discoverPCR asks the apiserver which versions it serves.
func discoverPCR(d discovery.DiscoveryInterface) (pcrAPI, error) {
	var api pcrAPI
	for _, v := range []struct {
		gv     string
		served *bool
	}{{"certificates.k8s.io/v1", &api.v1}, {"certificates.k8s.io/v1beta1", &api.v1beta1}} {
		list, err := d.ServerResourcesForGroupVersion(v.gv)
		switch {
		case apierrors.IsNotFound(err):
			continue
		case err != nil:
			return api, fmt.Errorf("discover %s: %w", v.gv, err)
		}
		for _, r := range list.APIResources {
			if r.Name == "podcertificaterequests" {
				*v.served = true
			}
		}
	}
	if !api.v1 && !api.v1beta1 {
		return api, ErrNotServed
	}
	return api, nil
}

// request is a PodCertificateRequest in v1's form, whichever version it was
// read through. A request created through v1beta1 with the old
// pkixPublicKey shows an empty stubPKCS10Request through v1 (DESIGN.md §11);
// it is read, and answered, through v1beta1, which shows the key.
type request struct {
	*certv1.PodCertificateRequest
	// beta is the object as read through v1beta1, nil when read through v1.
	beta *certv1beta1.PodCertificateRequest
	// pkix is v1beta1's pkixPublicKey.
	pkix []byte
}

// fromBeta converts a v1beta1 request; the fields are the same but for the
// public key's.
func fromBeta(b *certv1beta1.PodCertificateRequest) *request {
	s := b.Spec
	v1 := &certv1.PodCertificateRequest{
		ObjectMeta: b.ObjectMeta,
		Spec: certv1.PodCertificateRequestSpec{
			SignerName: s.SignerName, PodName: s.PodName, PodUID: s.PodUID,
			ServiceAccountName: s.ServiceAccountName, ServiceAccountUID: s.ServiceAccountUID,
			NodeName: s.NodeName, NodeUID: s.NodeUID, MaxExpirationSeconds: s.MaxExpirationSeconds,
			StubPKCS10Request: s.StubPKCS10Request, UnverifiedUserAnnotations: s.UnverifiedUserAnnotations,
		},
		Status: certv1.PodCertificateRequestStatus(b.Status),
	}
	//nolint:staticcheck // SA1019: the deprecated field is what such a request carries.
	return &request{PodCertificateRequest: v1, beta: b, pkix: s.PKIXPublicKey}
}

// final reports whether the request has its answer (Issued, Denied or Failed).
func (r *request) final() bool {
	for _, c := range r.Status.Conditions {
		switch c.Type {
		case certv1.PodCertificateRequestConditionTypeIssued, certv1.PodCertificateRequestConditionTypeDenied,
			certv1.PodCertificateRequestConditionTypeFailed:
			return true
		}
	}
	return false
}

// needsBeta reports whether r, read through v1, hides its key (see request).
func (r *request) needsBeta() bool {
	return r.beta == nil && len(r.Spec.StubPKCS10Request) == 0
}

// get reads the request afresh from the apiserver, through v1beta1 when
// beta is set.
func get(ctx context.Context, client kubernetes.Interface, ns, name string, beta bool) (*request, error) {
	if beta {
		b, err := client.CertificatesV1beta1().PodCertificateRequests(ns).Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			return nil, err
		}
		return fromBeta(b), nil
	}
	v1, err := client.CertificatesV1().PodCertificateRequests(ns).Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		return nil, err
	}
	return &request{PodCertificateRequest: v1}, nil
}

// updateStatus writes st as r's status, through the version r was read
// through, with r's resourceVersion (a Conflict means r changed).
func updateStatus(ctx context.Context, client kubernetes.Interface, r *request, st certv1.PodCertificateRequestStatus) error {
	if r.beta != nil {
		b := r.beta.DeepCopy()
		b.Status = certv1beta1.PodCertificateRequestStatus(st)
		_, err := client.CertificatesV1beta1().PodCertificateRequests(b.Namespace).UpdateStatus(ctx, b, metav1.UpdateOptions{FieldManager: fieldManager})
		return err
	}
	v1 := r.DeepCopy()
	v1.Status = st
	_, err := client.CertificatesV1().PodCertificateRequests(v1.Namespace).UpdateStatus(ctx, v1, metav1.UpdateOptions{FieldManager: fieldManager})
	return err
}
