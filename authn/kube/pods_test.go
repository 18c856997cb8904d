package kube

import (
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// TestSlimPodKeepsPodCertificateSigners checks that the pod cache keeps what
// the PodCertificateRequest signer reads (the podCertificate projections'
// signer names) and drops every other volume.
func TestSlimPodKeepsPodCertificateSigners(t *testing.T) {
	projected := func(sources ...corev1.VolumeProjection) corev1.VolumeSource {
		return corev1.VolumeSource{Projected: &corev1.ProjectedVolumeSource{Sources: sources}}
	}
	podCert := func(signer string) corev1.VolumeProjection {
		return corev1.VolumeProjection{PodCertificate: &corev1.PodCertificateProjection{SignerName: signer, KeyType: "ECDSAP256", CredentialBundlePath: "creds.pem"}}
	}
	token := corev1.VolumeProjection{ServiceAccountToken: &corev1.ServiceAccountTokenProjection{Path: "token"}}
	full := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "app-1", Namespace: "app", UID: "uid-1"},
		Spec: corev1.PodSpec{ServiceAccountName: "app", NodeName: "node-a", Volumes: []corev1.Volume{
			{Name: "data", VolumeSource: corev1.VolumeSource{EmptyDir: &corev1.EmptyDirVolumeSource{}}},
			{Name: "tokens", VolumeSource: projected(token)},
			{Name: "mesh", VolumeSource: projected(token, podCert("castellan.io/workload-identity"))},
			{Name: "other", VolumeSource: projected(podCert("example.com/other"))},
		}},
	}
	obj, err := slimPod(full)
	if err != nil {
		t.Fatal(err)
	}
	slim := obj.(*corev1.Pod)
	if len(slim.Spec.Volumes) != 2 {
		t.Fatalf("slim pod keeps %d volumes, want the 2 with podCertificate sources: %+v", len(slim.Spec.Volumes), slim.Spec.Volumes)
	}
	for _, v := range slim.Spec.Volumes {
		for _, s := range v.Projected.Sources {
			if s.PodCertificate == nil || s.PodCertificate.KeyType != "" || s.ServiceAccountToken != nil {
				t.Errorf("volume %s keeps %+v, want only podCertificate signer names", v.Name, s)
			}
		}
	}
	for _, tc := range []struct {
		signer string
		want   bool
	}{
		{"castellan.io/workload-identity", true},
		{"example.com/other", true},
		{"example.com/absent", false},
		{"", false},
	} {
		for name, pod := range map[string]*corev1.Pod{"full": full, "slim": slim} {
			if got := MountsPodCertificate(pod, tc.signer); got != tc.want {
				t.Errorf("MountsPodCertificate(%s pod, %q) = %v, want %v", name, tc.signer, got, tc.want)
			}
		}
	}
}
