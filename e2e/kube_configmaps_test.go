package e2e

import (
	"context"
	"crypto/x509"
	"crypto/x509/pkix"
	"math/big"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/castellan-ca/castellan/e2e/internal/kubeenv"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// What Istio's agents read.
const (
	rootCMName = "istio-ca-root-cert"
	rootCMKey  = "root-cert.pem"
)

// testRootConfigMaps checks the istio-ca-root-cert controller: first with a
// namespace selector, then on all namespaces with two replicas electing a
// leader, through deletion, edits, a bundle change and a leader failover.
func testRootConfigMaps(t *testing.T, env *kubeenv.Env, kubeconfig string) {
	tca := newTestCA(t)
	cacerts := tca.writeCACerts(t)
	cfg := func(more ...string) serverConfig {
		return serverConfig{signer: "intermediate", cacertsDir: cacerts, extraArgs: kubeArgs(kubeconfig, "tokenreview",
			append([]string{"--cacerts-poll-interval", "1s"}, more...)...)}
	}
	env.CreateNamespace(t, "cm-selected", map[string]string{"castellan-e2e": "mesh"})
	env.CreateNamespace(t, "cm-unselected", nil)

	t.Run("namespace selector", func(t *testing.T) {
		srv := startServer(t, cfg("--root-configmap-namespace-selector", "castellan-e2e=mesh", "--leader-election-namespace", "cm-lease-a"))
		bundle := readFileString(t, filepath.Join(srv.dataDir, "root-cert.pem"))
		waitConfigMap(t, env, "cm-selected", bundle)
		env.CreateNamespace(t, "cm-selected-later", map[string]string{"castellan-e2e": "mesh"})
		waitConfigMap(t, env, "cm-selected-later", bundle)
		// The controller has handled the later namespace, so it has seen the
		// earlier, unselected one too (one ordered watch of namespaces).
		for _, ns := range []string{"cm-unselected", "default", "kube-system"} {
			if cm, err := env.Client.CoreV1().ConfigMaps(ns).Get(context.Background(), rootCMName, metav1.GetOptions{}); !apierrors.IsNotFound(err) {
				t.Errorf("%s/%s exists outside the selector (err %v): %v", ns, rootCMName, err, cm.GetLabels())
			}
		}
		srv.stop(t)
	})

	var replicas [2]*server
	for i := range replicas {
		replicas[i] = startServer(t, cfg("--leader-election-namespace", "cm-lease-b"))
	}
	bundle := readFileString(t, filepath.Join(replicas[0].dataDir, "root-cert.pem"))

	t.Run("every namespace but kube-public and kube-node-lease", func(t *testing.T) {
		for _, ns := range []string{"default", "kube-system", "cm-selected", "cm-unselected"} {
			waitConfigMap(t, env, ns, bundle)
		}
		for _, ns := range []string{"kube-public", "kube-node-lease"} {
			if _, err := env.Client.CoreV1().ConfigMaps(ns).Get(context.Background(), rootCMName, metav1.GetOptions{}); !apierrors.IsNotFound(err) {
				t.Errorf("%s/%s: err = %v, want NotFound", ns, rootCMName, err)
			}
		}
	})
	t.Run("new namespace", func(t *testing.T) {
		env.CreateNamespace(t, "cm-new", nil)
		waitConfigMap(t, env, "cm-new", bundle)
	})
	t.Run("restored after deletion", func(t *testing.T) {
		deleteConfigMap(t, env, "cm-new")
		waitConfigMap(t, env, "cm-new", bundle)
	})
	t.Run("restored after an edit, other keys kept", func(t *testing.T) {
		cms := env.Client.CoreV1().ConfigMaps("cm-unselected")
		cm, err := cms.Get(context.Background(), rootCMName, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		cm.Data[rootCMKey] = "tampered"
		cm.Data["extra"] = "kept"
		if _, err := cms.Update(context.Background(), cm, metav1.UpdateOptions{}); err != nil {
			t.Fatal(err)
		}
		got := waitConfigMap(t, env, "cm-unselected", bundle)
		if got.Data["extra"] != "kept" {
			t.Errorf("data[extra] = %q, want it kept", got.Data["extra"])
		}
	})

	t.Run("one leader", func(t *testing.T) {
		leader, follower := electedReplica(t, replicas)
		lease, err := env.Client.CoordinationV1().Leases("cm-lease-b").Get(context.Background(), "castellan-root-configmaps", metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if holder := lease.Spec.HolderIdentity; holder == nil || !strings.Contains(leader.logs.String(), *holder) {
			t.Errorf("lease holder %v is not the replica that logged it leads", holder)
		}
		if strings.Contains(follower.logs.String(), "started leading") {
			t.Errorf("both replicas started leading")
		}
	})

	t.Run("bundle change rewrites every ConfigMap", func(t *testing.T) {
		rotateCACerts(t, cacerts, rotatedTestCA(t, tca.otherRoot))
		var newBundle string
		deadline := time.Now().Add(eventualTimeout)
		for newBundle = bundle; newBundle == bundle && time.Now().Before(deadline); time.Sleep(eventualPoll) {
			newBundle = readFileString(t, filepath.Join(replicas[0].dataDir, "root-cert.pem"))
		}
		if newBundle == bundle {
			t.Fatal("the trust bundle did not change after the cacerts rotation")
		}
		for _, ns := range []string{"default", "cm-selected", "cm-unselected", "cm-new"} {
			waitConfigMap(t, env, ns, newBundle)
		}
		bundle = newBundle
	})

	t.Run("leader failover", func(t *testing.T) {
		leader, follower := electedReplica(t, replicas)
		leader.stop(t) // releases the lease
		deleteConfigMap(t, env, "cm-selected")
		waitConfigMap(t, env, "cm-selected", bundle)
		if !strings.Contains(follower.logs.String(), "started leading") {
			t.Errorf("the ConfigMap came back, but the remaining replica never logged that it leads")
		}
	})
}

// waitConfigMap waits until ns/istio-ca-root-cert holds bundle and the label.
func waitConfigMap(t *testing.T, env *kubeenv.Env, ns, bundle string) *corev1.ConfigMap {
	t.Helper()
	deadline := time.Now().Add(eventualTimeout)
	var last string
	for {
		cm, err := env.Client.CoreV1().ConfigMaps(ns).Get(context.Background(), rootCMName, metav1.GetOptions{})
		switch {
		case err != nil:
			last = err.Error()
		case cm.Data[rootCMKey] != bundle:
			last = "root-cert.pem is not the current bundle"
		case cm.Labels["istio.io/config"] != "true":
			last = "label istio.io/config is not \"true\""
		default:
			return cm
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s/%s not right within %v: %s", ns, rootCMName, eventualTimeout, last)
		}
		time.Sleep(eventualPoll)
	}
}

func deleteConfigMap(t *testing.T, env *kubeenv.Env, ns string) {
	t.Helper()
	if err := env.Client.CoreV1().ConfigMaps(ns).Delete(context.Background(), rootCMName, metav1.DeleteOptions{}); err != nil {
		t.Fatalf("delete %s/%s: %v", ns, rootCMName, err)
	}
}

// electedReplica waits until one replica logs that it leads, and returns it
// and the other.
func electedReplica(t *testing.T, replicas [2]*server) (leader, follower *server) {
	t.Helper()
	for deadline := time.Now().Add(eventualTimeout); time.Now().Before(deadline); time.Sleep(eventualPoll) {
		for i, r := range replicas {
			if strings.Contains(r.logs.String(), "started leading") {
				return r, replicas[1-i]
			}
		}
	}
	t.Fatal("no replica became leader")
	return nil, nil
}

// rotatedTestCA is a CA hierarchy with keys and names unrelated to
// newTestCA's; otherRoot stays in its bundle.
func rotatedTestCA(t *testing.T, otherRoot *x509.Certificate) *testCA {
	t.Helper()
	now := time.Now()
	rootKey, intKey := testKey(t, "rotated-root"), testKey(t, "rotated-intermediate")
	root := createCert(t, &x509.Certificate{
		SerialNumber: big.NewInt(11), Subject: pkix.Name{CommonName: "castellan e2e rotated root"},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(10 * 365 * 24 * time.Hour),
		KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageCRLSign, BasicConstraintsValid: true, IsCA: true,
	}, nil, &rootKey.PublicKey, rootKey)
	inter := createCert(t, &x509.Certificate{
		SerialNumber: big.NewInt(12), Subject: pkix.Name{CommonName: "castellan e2e rotated intermediate"},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(5 * 365 * 24 * time.Hour),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true, IsCA: true, MaxPathLenZero: true,
	}, root, &intKey.PublicKey, rootKey)
	return &testCA{root: root, intermediate: inter, otherRoot: otherRoot, intermediateKey: intKey}
}

// rotateCACerts replaces the cacerts files in dir with ca's, each file
// atomically (the server ignores an inconsistent set and reads it again).
func rotateCACerts(t *testing.T, dir string, ca *testCA) {
	t.Helper()
	src := ca.writeCACerts(t)
	for _, f := range []string{"root-cert.pem", "cert-chain.pem", "ca-cert.pem", "ca-key.pem"} {
		b, err := os.ReadFile(filepath.Join(src, f))
		if err != nil {
			t.Fatal(err)
		}
		tmp := filepath.Join(dir, "."+f+".tmp")
		if err := os.WriteFile(tmp, b, 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(tmp, filepath.Join(dir, f)); err != nil {
			t.Fatal(err)
		}
	}
}

func mustRead(t *testing.T, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func readFileString(t *testing.T, path string) string { return string(mustRead(t, path)) }
