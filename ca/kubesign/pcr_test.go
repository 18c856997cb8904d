package kubesign

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"errors"
	"fmt"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	certv1 "k8s.io/api/certificates/v1"
	certv1beta1 "k8s.io/api/certificates/v1beta1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/types"
	k8stesting "k8s.io/client-go/testing"
	"k8s.io/utils/ptr"

	"github.com/castellan-ca/castellan/ca"
	"github.com/castellan-ca/castellan/signer"
	"github.com/castellan-ca/castellan/signer/signertest"
	"github.com/castellan-ca/castellan/storage"
)

const (
	testSigner = DefaultPodSignerName
	testNS     = "app"
	testNode   = "node-a"
)

// testPod is a pod of service account "web" on testNode mounting a
// podCertificate volume of signerName.
func testPod(name string, uid types.UID, signerName string) *corev1.Pod {
	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: testNS, UID: uid},
		Spec:       corev1.PodSpec{ServiceAccountName: "web", NodeName: testNode},
		Status:     corev1.PodStatus{Phase: corev1.PodRunning},
	}
	if signerName != "" {
		pod.Spec.Volumes = []corev1.Volume{{Name: "mesh", VolumeSource: corev1.VolumeSource{Projected: &corev1.ProjectedVolumeSource{
			Sources: []corev1.VolumeProjection{{PodCertificate: &corev1.PodCertificateProjection{SignerName: signerName}}}}}}}
	}
	return pod
}

// testPCR is a request for pod with key, as the kubelet makes it.
func testPCR(t *testing.T, name string, pod *corev1.Pod, key crypto.Signer) *certv1.PodCertificateRequest {
	return &certv1.PodCertificateRequest{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: testNS, UID: types.UID("pcr-" + name), CreationTimestamp: metav1.Now()},
		Spec: certv1.PodCertificateRequestSpec{
			SignerName: testSigner, PodName: pod.Name, PodUID: pod.UID, ServiceAccountName: pod.Spec.ServiceAccountName,
			ServiceAccountUID: "sa-uid", NodeName: types.NodeName(pod.Spec.NodeName), NodeUID: "node-uid",
			MaxExpirationSeconds: ptr.To[int32](86400), StubPKCS10Request: stubCSR(t, key),
		},
	}
}

func (e *env) createPCR(t *testing.T, pcr *certv1.PodCertificateRequest) {
	t.Helper()
	if _, err := e.client.CertificatesV1().PodCertificateRequests(pcr.Namespace).Create(context.Background(), pcr, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
}

// answered waits for the request's one condition and returns the request.
func (e *env) answered(t *testing.T, name string) *certv1.PodCertificateRequest {
	t.Helper()
	var got *certv1.PodCertificateRequest
	eventually(t, "the answer of "+name, func() bool {
		pcr, err := e.client.CertificatesV1().PodCertificateRequests(testNS).Get(context.Background(), name, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		got = pcr
		return len(pcr.Status.Conditions) > 0
	})
	return got
}

func (e *env) podSigner(ctx context.Context) error {
	return (&PodCertificates{Client: e.client, Issuer: e.issuer, Pods: e.pods, ClusterID: "Kubernetes", Metrics: NewMetrics(nil)}).Run(ctx)
}

func TestPodCertificates(t *testing.T) {
	p256, p384 := signertest.Key(1), signertest.LeafKeys()["ecdsa-p384"]
	ed := signertest.LeafKeys()["ed25519"]
	p521, err := ecdsa.GenerateKey(elliptic.P521(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		// pod is in the cache and on the apiserver; nil: neither.
		pod    *corev1.Pod
		key    crypto.Signer
		modify func(*certv1.PodCertificateRequest)
		// wantType and wantReason are the one condition; wantRecord the
		// audit record's outcome and reason.
		wantType, wantReason       string
		wantOutcome, wantRecReason string
		wantLife                   time.Duration
	}{
		{name: "issued P-256", pod: testPod("web-1", "uid-1", testSigner), key: p256,
			wantType: "Issued", wantReason: "Issued", wantOutcome: storage.OutcomeIssued, wantLife: 24 * time.Hour},
		{name: "issued P-384 within a short maxExpirationSeconds", pod: testPod("web-1", "uid-1", testSigner), key: p384,
			modify:   func(r *certv1.PodCertificateRequest) { r.Spec.MaxExpirationSeconds = ptr.To[int32](3600) },
			wantType: "Issued", wantReason: "Issued", wantOutcome: storage.OutcomeIssued, wantLife: time.Hour},
		{name: "issued Ed25519", pod: testPod("web-1", "uid-1", testSigner), key: ed,
			wantType: "Issued", wantReason: "Issued", wantOutcome: storage.OutcomeIssued, wantLife: 24 * time.Hour},
		{name: "unsupported key type denied", pod: testPod("web-1", "uid-1", testSigner), key: p521,
			wantType: "Denied", wantReason: "UnsupportedKeyType", wantOutcome: storage.OutcomeRefused, wantRecReason: "csr.key"},
		{name: "pod gone", key: p256, wantType: "Denied", wantReason: "PodNotFound",
			wantOutcome: storage.OutcomeRefused, wantRecReason: reasonPodNotFound},
		{name: "pod re-created with another UID", pod: testPod("web-1", "uid-2", testSigner), key: p256,
			wantType: "Denied", wantReason: "PodUIDMismatch", wantOutcome: storage.OutcomeRefused, wantRecReason: reasonPodUID},
		{name: "service account differs", pod: testPod("web-1", "uid-1", testSigner), key: p256,
			modify:   func(r *certv1.PodCertificateRequest) { r.Spec.ServiceAccountName = "admin" },
			wantType: "Denied", wantReason: "ServiceAccountMismatch", wantOutcome: storage.OutcomeRefused, wantRecReason: reasonPodServiceAccount},
		{name: "node differs", pod: testPod("web-1", "uid-1", testSigner), key: p256,
			modify:   func(r *certv1.PodCertificateRequest) { r.Spec.NodeName = "node-b" },
			wantType: "Denied", wantReason: "NodeMismatch", wantOutcome: storage.OutcomeRefused, wantRecReason: reasonPodNode},
		{name: "pod without the signer's volume", pod: testPod("web-1", "uid-1", "example.com/other"), key: p256,
			wantType: "Denied", wantReason: "NoPodCertificateVolume", wantOutcome: storage.OutcomeRefused, wantRecReason: reasonPodVolume},
		{name: "unverified user annotations denied", pod: testPod("web-1", "uid-1", testSigner), key: p256,
			modify: func(r *certv1.PodCertificateRequest) {
				r.Spec.UnverifiedUserAnnotations = map[string]string{"example.com/x": "y"}
			},
			wantType: "Denied", wantReason: "InvalidUnverifiedUserAnnotations", wantOutcome: storage.OutcomeRefused, wantRecReason: reasonPCRAnnotations},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t, "certificates.k8s.io/v1")
			podForPCR := testPod("web-1", "uid-1", testSigner)
			if tc.pod != nil {
				e.pods.put(tc.pod)
				if _, err := e.client.CoreV1().Pods(testNS).Create(context.Background(), tc.pod, metav1.CreateOptions{}); err != nil {
					t.Fatal(err)
				}
			}
			pcr := testPCR(t, "req-1", podForPCR, tc.key)
			if tc.modify != nil {
				tc.modify(pcr)
			}
			e.createPCR(t, pcr)
			run(t, e.podSigner)
			got := e.answered(t, "req-1")
			if len(got.Status.Conditions) != 1 || got.Status.Conditions[0].Type != tc.wantType || got.Status.Conditions[0].Reason != tc.wantReason ||
				got.Status.Conditions[0].Status != metav1.ConditionTrue {
				t.Fatalf("conditions = %+v, want one %s (%s)", got.Status.Conditions, tc.wantType, tc.wantReason)
			}
			recs := e.records(t)
			if len(recs) != 1 {
				t.Fatalf("audit records = %d, want 1: %+v", len(recs), recs)
			}
			r := recs[0]
			wantReq := "spiffe://cluster.local/ns/app/sa/" + pcr.Spec.ServiceAccountName
			if r.AuthMethod != MethodPCR || r.Outcome != tc.wantOutcome || r.Reason != tc.wantRecReason ||
				r.Peer != "pcr/app/req-1/pcr-req-1" || r.RequestedIdentity != wantReq || !strings.Contains(r.Caller, "pod app/web-1") {
				t.Errorf("audit record = %+v", r)
			}
			if tc.wantType != "Issued" {
				if got.Status.CertificateChain != "" || got.Status.NotBefore != nil {
					t.Errorf("a refusal carries a certificate: %+v", got.Status)
				}
				return
			}
			checkIssuedPCR(t, e, got, tc.key.Public(), tc.wantLife, r)
		})
	}
}

// checkIssuedPCR checks an Issued answer against the leaf and its record.
func checkIssuedPCR(t *testing.T, e *env, got *certv1.PodCertificateRequest, pub crypto.PublicKey, life time.Duration, r storage.Record) {
	t.Helper()
	certs, err := signer.ParseCertificatesPEM([]byte(got.Status.CertificateChain))
	if err != nil {
		t.Fatal(err)
	}
	leaf := certs[0]
	if err := leaf.CheckSignatureFrom(e.root.Cert); err != nil {
		t.Errorf("leaf not signed by the CA: %v", err)
	}
	if want := "spiffe://cluster.local/ns/app/sa/web"; len(leaf.URIs) != 1 || leaf.URIs[0].String() != want {
		t.Errorf("leaf URIs = %v, want [%s]", leaf.URIs, want)
	}
	if k, ok := leaf.PublicKey.(interface{ Equal(crypto.PublicKey) bool }); !ok || !k.Equal(pub) {
		t.Error("leaf certifies another key")
	}
	st := got.Status
	if !st.NotBefore.Time.Equal(leaf.NotBefore) || !st.NotAfter.Time.Equal(leaf.NotAfter) {
		t.Errorf("status validity %s..%s, leaf %s..%s", st.NotBefore, st.NotAfter, leaf.NotBefore, leaf.NotAfter)
	}
	if d := leaf.NotAfter.Sub(leaf.NotBefore); d != life {
		t.Errorf("lifetime = %s, want %s (maxExpirationSeconds, backdating included)", d, life)
	}
	if br := st.BeginRefreshAt.Time; br.Before(leaf.NotBefore.Add(refreshMargin)) || br.After(leaf.NotAfter.Add(-refreshMargin)) {
		t.Errorf("beginRefreshAt %s outside [notBefore+10m, notAfter-10m]", br)
	}
	if r.Serial != leaf.SerialNumber.Text(16) || r.GrantedIdentity != "spiffe://cluster.local/ns/app/sa/web" {
		t.Errorf("record serial %s identity %s, leaf %x", r.Serial, r.GrantedIdentity, leaf.SerialNumber)
	}
}

// TestPodCertificatesOtherSigner checks that a request for another signer
// name gets no answer and no record.
func TestPodCertificatesOtherSigner(t *testing.T) {
	e := newEnv(t, "certificates.k8s.io/v1")
	pod := testPod("web-1", "uid-1", "example.com/other")
	e.pods.put(pod)
	other := testPCR(t, "other", pod, signertest.Key(1))
	other.Spec.SignerName = "example.com/other"
	e.createPCR(t, other)
	ours := testPCR(t, "ours", testPod("web-2", "uid-2", testSigner), signertest.Key(2))
	e.pods.put(testPod("web-2", "uid-2", testSigner))
	e.createPCR(t, ours)
	run(t, e.podSigner)
	e.answered(t, "ours") // answered after the other one was seen
	got, err := e.client.CertificatesV1().PodCertificateRequests(testNS).Get(context.Background(), "other", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if len(got.Status.Conditions) != 0 {
		t.Errorf("request for another signer answered: %+v", got.Status)
	}
	if n := len(e.records(t)); n != 1 {
		t.Errorf("audit records = %d, want only the one of our request", n)
	}
}

// TestPodCertificatesBeta checks a request made through v1beta1 with the
// old pkixPublicKey: through v1 its stubPKCS10Request is empty, so it is read
// and answered through v1beta1.
func TestPodCertificatesBeta(t *testing.T) {
	e := newEnv(t, "certificates.k8s.io/v1", "certificates.k8s.io/v1beta1")
	key := signertest.Key(3)
	pod := testPod("web-1", "uid-1", testSigner)
	e.pods.put(pod)
	v1 := testPCR(t, "old-kubelet", pod, key)
	v1.Spec.StubPKCS10Request = nil // what v1 shows of such a request
	e.createPCR(t, v1)
	pkix, err := x509.MarshalPKIXPublicKey(key.Public())
	if err != nil {
		t.Fatal(err)
	}
	beta := &certv1beta1.PodCertificateRequest{ObjectMeta: v1.ObjectMeta, Spec: certv1beta1.PodCertificateRequestSpec{
		SignerName: v1.Spec.SignerName, PodName: v1.Spec.PodName, PodUID: v1.Spec.PodUID, ServiceAccountName: v1.Spec.ServiceAccountName,
		NodeName: v1.Spec.NodeName, MaxExpirationSeconds: v1.Spec.MaxExpirationSeconds,
		PKIXPublicKey: pkix, //nolint:staticcheck // SA1019: what a 1.35 kubelet sends, the case under test
	}}
	if _, err := e.client.CertificatesV1beta1().PodCertificateRequests(testNS).Create(context.Background(), beta, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	run(t, e.podSigner)
	var got *certv1beta1.PodCertificateRequest
	eventually(t, "the v1beta1 answer", func() bool {
		got, err = e.client.CertificatesV1beta1().PodCertificateRequests(testNS).Get(context.Background(), "old-kubelet", metav1.GetOptions{})
		return err == nil && len(got.Status.Conditions) > 0
	})
	if c := got.Status.Conditions; len(c) != 1 || c[0].Type != "Issued" {
		t.Fatalf("conditions = %+v, want Issued", c)
	}
	certs, err := signer.ParseCertificatesPEM([]byte(got.Status.CertificateChain))
	if err != nil || !certs[0].PublicKey.(*ecdsa.PublicKey).Equal(key.Public()) {
		t.Errorf("chain %v (%v) does not certify the pkixPublicKey", certs, err)
	}
}

// TestPodCertificatesBetaNotServed checks that such a request is denied
// when v1beta1 is not served: its key cannot be read.
func TestPodCertificatesBetaNotServed(t *testing.T) {
	e := newEnv(t, "certificates.k8s.io/v1")
	pod := testPod("web-1", "uid-1", testSigner)
	e.pods.put(pod)
	pcr := testPCR(t, "old-kubelet", pod, signertest.Key(3))
	pcr.Spec.StubPKCS10Request = nil
	e.createPCR(t, pcr)
	run(t, e.podSigner)
	if c := e.answered(t, "old-kubelet").Status.Conditions; c[0].Type != "Denied" || c[0].Reason != "InvalidRequest" {
		t.Errorf("conditions = %+v, want Denied InvalidRequest", c)
	}
}

// TestPodCertificatesRetry checks transient failures: the request is retried
// (each attempt audited) while the signer is down, issued when it is back;
// past the retry window it is answered Failed.
func TestPodCertificatesRetry(t *testing.T) {
	t.Run("recovers", func(t *testing.T) {
		e := newEnv(t, "certificates.k8s.io/v1")
		e.down.Store(true)
		pod := testPod("web-1", "uid-1", testSigner)
		e.pods.put(pod)
		e.createPCR(t, testPCR(t, "req-1", pod, signertest.Key(1)))
		run(t, e.podSigner)
		eventually(t, "a failed attempt", func() bool { return len(e.records(t)) > 0 })
		e.down.Store(false)
		if c := e.answered(t, "req-1").Status.Conditions; c[0].Type != "Issued" {
			t.Fatalf("conditions = %+v, want Issued", c)
		}
		recs := e.records(t)
		last := recs[len(recs)-1]
		if last.Outcome != storage.OutcomeIssued {
			t.Errorf("last record = %+v, want the issuance", last)
		}
		for _, r := range recs[:len(recs)-1] {
			if r.Outcome != storage.OutcomeFailed || r.Reason != "signer.unavailable" {
				t.Errorf("attempt record = %+v, want failed signer.unavailable", r)
			}
		}
	})
	t.Run("window closes", func(t *testing.T) {
		e := newEnv(t, "certificates.k8s.io/v1")
		e.down.Store(true)
		pod := testPod("web-1", "uid-1", testSigner)
		e.pods.put(pod)
		pcr := testPCR(t, "req-1", pod, signertest.Key(1))
		pcr.CreationTimestamp = metav1.NewTime(time.Now().Add(-DefaultRetryWindow - time.Second))
		e.createPCR(t, pcr)
		run(t, e.podSigner)
		if c := e.answered(t, "req-1").Status.Conditions; c[0].Type != "Failed" || c[0].Reason != "SignerUnavailable" {
			t.Fatalf("conditions = %+v, want Failed SignerUnavailable", c)
		}
		if recs := e.records(t); len(recs) != 1 || recs[0].Outcome != storage.OutcomeFailed {
			t.Errorf("records = %+v, want one failed attempt", recs)
		}
	})
}

// TestPodCertificatesWriteRetried checks that a certificate whose status
// write fails is written again, not signed again: one record, and the
// status holds the recorded certificate.
func TestPodCertificatesWriteRetried(t *testing.T) {
	e := newEnv(t, "certificates.k8s.io/v1")
	var failures atomic.Int32
	e.client.PrependReactor("update", "podcertificaterequests", func(a k8stesting.Action) (bool, runtime.Object, error) {
		if a.GetSubresource() == "status" && failures.Add(1) <= 2 {
			return true, nil, apierrors.NewServiceUnavailable("etcd leader change")
		}
		return false, nil, nil
	})
	pod := testPod("web-1", "uid-1", testSigner)
	e.pods.put(pod)
	e.createPCR(t, testPCR(t, "req-1", pod, signertest.Key(1)))
	run(t, e.podSigner)
	got := e.answered(t, "req-1")
	recs := e.records(t)
	if len(recs) != 1 {
		t.Fatalf("records = %d, want 1 (signed once): %+v", len(recs), recs)
	}
	certs, err := signer.ParseCertificatesPEM([]byte(got.Status.CertificateChain))
	if err != nil {
		t.Fatal(err)
	}
	if certs[0].SerialNumber.Text(16) != recs[0].Serial {
		t.Errorf("written serial %x, recorded %s", certs[0].SerialNumber, recs[0].Serial)
	}
}

// TestPodCertificatesAnsweredElsewhere checks that a certificate for a
// request someone else answered first is recorded undelivered.
func TestPodCertificatesAnsweredElsewhere(t *testing.T) {
	e := newEnv(t, "certificates.k8s.io/v1")
	pod := testPod("web-1", "uid-1", testSigner)
	e.pods.put(pod)
	e.createPCR(t, testPCR(t, "req-1", pod, signertest.Key(1)))
	gvr := schema.GroupVersionResource{Group: "certificates.k8s.io", Version: "v1", Resource: "podcertificaterequests"}
	e.client.PrependReactor("update", "podcertificaterequests", func(a k8stesting.Action) (bool, runtime.Object, error) {
		if a.GetSubresource() != "status" {
			return false, nil, nil
		}
		// Another writer got there first: store its answer, then conflict.
		other, _ := e.client.Tracker().Get(gvr, testNS, "req-1")
		pcr := other.(*certv1.PodCertificateRequest).DeepCopy()
		if len(pcr.Status.Conditions) == 0 {
			pcr.Status.Conditions = []metav1.Condition{{Type: "Denied", Status: metav1.ConditionTrue, Reason: "Elsewhere", LastTransitionTime: metav1.Now()}}
			pcr.ResourceVersion = "99"
			_ = e.client.Tracker().Update(gvr, pcr, testNS)
		}
		return true, nil, apierrors.NewConflict(gvr.GroupResource(), "req-1", errors.New("changed"))
	})
	run(t, e.podSigner)
	eventually(t, "the undelivered record", func() bool { return len(e.records(t)) == 2 })
	recs := e.records(t)
	if recs[0].Outcome != storage.OutcomeIssued || recs[1].Outcome != storage.OutcomeUndelivered || recs[1].Serial != recs[0].Serial {
		t.Errorf("records = %+v, want the issuance and its undelivered marker", recs)
	}
}

func TestRefreshAt(t *testing.T) {
	nb := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	for _, tc := range []struct {
		life, want time.Duration
	}{
		{24 * time.Hour, 12 * time.Hour},
		{time.Hour, 30 * time.Minute},
		{25 * time.Minute, refreshMargin + 2*time.Minute + 30*time.Second},
		{20 * time.Minute, refreshMargin},
	} {
		got := refreshAt(&x509.Certificate{NotBefore: nb, NotAfter: nb.Add(tc.life)})
		if want := nb.Add(tc.want); !got.Equal(want) {
			t.Errorf("refreshAt(%s) = +%s, want +%s", tc.life, got.Sub(nb), tc.want)
		}
	}
}

func TestJudge(t *testing.T) {
	for _, tc := range []struct {
		err  error
		want verdict
	}{
		{fmt.Errorf("x: %w", signer.ErrSignerUnavailable), failed}, // unclassified: ours
		{context.DeadlineExceeded, retry},
		{ca.Refuse(ca.ErrUnavailable, ca.ReasonAuditDown, errors.New("disk")), retry},
		{ca.Refuse(ca.ErrOverloaded, ca.ReasonOverload, errors.New("busy")), retry},
		{ca.Refuse(ca.ErrPermissionDenied, reasonPodUID, errors.New("re-created")), denied},
		{ca.Refuse(ca.ErrInvalidRequest, ca.ReasonKeyType, ca.ErrKeyType), denied},
		{ca.Refuse(ca.ErrInternal, reasonRetriesExhausted, ca.Refuse(ca.ErrUnavailable, ca.ReasonSignerDown, errors.New("down"))), failed},
	} {
		if got := judge(tc.err); got != tc.want {
			t.Errorf("judge(%v) = %v, want %v", tc.err, got, tc.want)
		}
	}
}
