package e2e

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"fmt"
	"math/big"
	"net"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/castellan-ca/castellan/e2e/internal/kubeenv"
	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// doctorChecks are the lines castellanctl doctor prints, in order.
var doctorChecks = []string{"server", "trust-bundle", "audit-chain", "ca-expiry", "clock-skew", "kube-rbac"}

// doctorRun is one castellanctl doctor run: its exit status and each check's line.
type doctorRun struct {
	exit   int
	out    string
	checks map[string]string
}

// runDoctor runs castellanctl doctor against s with the admin kubeconfig
// (reading the ConfigMaps and ClusterTrustBundles) and args.
func runDoctor(t *testing.T, s *server, env *kubeenv.Env, args ...string) doctorRun {
	t.Helper()
	var global []string
	for len(args) > 0 && args[0] != "doctor" {
		global, args = append(global, args[0]), args[1:]
	}
	if len(args) == 0 {
		args = []string{"doctor"}
	}
	full := append(append(global, args[0], "--kubeconfig", env.Kubeconfig), args[1:]...)
	r := s.runCtl(t, full...)
	run := doctorRun{out: string(r.stdout), checks: map[string]string{}}
	var ee *exec.ExitError
	switch {
	case r.err == nil:
	case errors.As(r.err, &ee):
		run.exit = ee.ExitCode()
	default:
		t.Fatalf("castellanctl doctor: %v", r.err)
	}
	for _, name := range doctorChecks {
		line := regexp.MustCompile(`(?m)^(ok|FAIL|warn|skip) +` + regexp.QuoteMeta(name) + ` .*$`).FindString(run.out)
		if line == "" {
			t.Fatalf("no %s line in doctor's output:\n%s\nstderr:\n%s", name, run.out, r.stderr)
		}
		run.checks[name] = line
	}
	return run
}

// want fails the test unless the check's line starts with status and holds every part.
func (d doctorRun) want(t *testing.T, check, status string, parts ...string) {
	t.Helper()
	line := d.checks[check]
	if !strings.HasPrefix(line, status+" ") {
		t.Errorf("%s: %q, want status %s\nfull output:\n%s", check, line, status, d.out)
		return
	}
	for _, p := range parts {
		if !strings.Contains(line, p) {
			t.Errorf("%s: %q lacks %q", check, line, p)
		}
	}
}

// TestDoctor runs castellanctl doctor against a Castellan publishing root
// ConfigMaps and ClusterTrustBundles to a real kube-apiserver: it passes on
// the healthy deployment, and each check fails with its hint when the
// deployment is broken on purpose.
func TestDoctor(t *testing.T) {
	env := kubeenv.Start(t)
	const leaseNS, appNS = "doctor-lease", "doctor-app"
	const asServer = "system:serviceaccount:castellan-system:castellan"
	kc := castellanKubeconfig(t, env, leaseNS)
	env.CreateNamespace(t, appNS, nil)
	tca := newTestCA(t)
	cfg := serverConfig{signer: "intermediate", cacertsDir: tca.writeCACerts(t),
		extraArgs: kubeArgs(kc, "tokenreview", "--leader-election-namespace", leaseNS)}
	srv := startServer(t, cfg)
	bundle := readFileString(t, filepath.Join(srv.dataDir, "root-cert.pem"))
	waitConfigMap(t, env, appNS, bundle)
	const ctbName = "castellan.io:workload-identity:trust-bundle"
	eventuallyE2E(t, eventualTimeout, "ClusterTrustBundle "+ctbName, func() error {
		ctb, err := env.Client.CertificatesV1().ClusterTrustBundles().Get(context.Background(), ctbName, metav1.GetOptions{})
		if err != nil {
			return err
		}
		if ctb.Spec.TrustBundle != bundle {
			return errors.New("not the current bundle")
		}
		return nil
	})
	srv.ctl(t, "issue", "--identity", "spiffe://"+trustDomain+"/ns/"+appNS+"/sa/app", "--out-dir", t.TempDir())

	t.Run("healthy", func(t *testing.T) {
		d := runDoctor(t, srv, env, "doctor", "--as", asServer, "--lease-namespace", leaseNS)
		if d.exit != 0 {
			t.Errorf("exit %d, want 0:\n%s", d.exit, d.out)
		}
		d.want(t, "server", "ok", "serving certificate valid for istiod.istio-system.svc")
		d.want(t, "trust-bundle", "ok", "the same in the server, the trust bundle file", "root ConfigMaps", "1 ClusterTrustBundle")
		d.want(t, "audit-chain", "ok", "intact")
		d.want(t, "ca-expiry", "ok", "intermediate CA")
		d.want(t, "clock-skew", "ok")
		d.want(t, "kube-rbac", "ok", asServer+" has all")
		t.Logf("doctor on the healthy deployment:\n%s", d.out)
	})

	t.Run("missing RBAC rule", func(t *testing.T) {
		// The chart's rules without update on the root ConfigMaps.
		rules := slices.Clone(defaultSignerRBAC.rules())
		for i, r := range rules {
			if slices.Contains(r.ResourceNames, rootCMName) {
				r.Verbs = slices.DeleteFunc(slices.Clone(r.Verbs), func(v string) bool { return v == "update" })
				rules[i] = r
			}
		}
		const sa = "castellan-limited"
		env.CreateServiceAccount(t, "castellan-system", sa)
		subject := []rbacv1.Subject{{Kind: "ServiceAccount", Name: sa, Namespace: "castellan-system"}}
		ctx := context.Background()
		if _, err := env.Client.RbacV1().ClusterRoles().Create(ctx, &rbacv1.ClusterRole{ObjectMeta: metav1.ObjectMeta{Name: sa}, Rules: rules},
			metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
		if _, err := env.Client.RbacV1().ClusterRoleBindings().Create(ctx, &rbacv1.ClusterRoleBinding{ObjectMeta: metav1.ObjectMeta{Name: sa},
			RoleRef: rbacv1.RoleRef{APIGroup: rbacv1.GroupName, Kind: "ClusterRole", Name: sa}, Subjects: subject}, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
		if _, err := env.Client.RbacV1().RoleBindings(leaseNS).Create(ctx, &rbacv1.RoleBinding{ObjectMeta: metav1.ObjectMeta{Name: sa},
			RoleRef: rbacv1.RoleRef{APIGroup: rbacv1.GroupName, Kind: "Role", Name: "castellan-leader-election"}, Subjects: subject}, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
		as := "system:serviceaccount:castellan-system:" + sa
		d := runDoctor(t, srv, env, "doctor", "--as", as, "--lease-namespace", leaseNS)
		if d.exit != 1 {
			t.Errorf("exit %d, want 1:\n%s", d.exit, d.out)
		}
		d.want(t, "kube-rbac", "FAIL", as+" lacks 1 of ", ": update configmaps istio-ca-root-cert -- fix: apply the ClusterRole and Roles of deploy/manifests/castellan.yaml")
		d.want(t, "trust-bundle", "ok")
	})

	t.Run("broken chain", func(t *testing.T) {
		// root-cert.pem replaced by another root: nothing the server
		// presents chains to it, and it disagrees with every other copy.
		path := filepath.Join(srv.dataDir, "root-cert.pem")
		writeFile(t, srv.dataDir, "root-cert.pem", encodeCerts(tca.otherRoot), 0o644)
		defer writeFile(t, srv.dataDir, "root-cert.pem", []byte(bundle), 0o644)
		d := runDoctor(t, srv, env, "doctor", "--as", asServer, "--lease-namespace", leaseNS)
		if d.exit != 1 {
			t.Errorf("exit %d, want 1:\n%s", d.exit, d.out)
		}
		d.want(t, "server", "FAIL", "does not chain to the trust bundle file", "-- fix: the trust bundle file (--ca, default DATA_DIR/root-cert.pem) holds other roots")
		d.want(t, "trust-bundle", "FAIL", "stale (differ from the roots most copies hold (the server could not be asked)): "+path,
			"-- fix: the server rewrites DATA_DIR/root-cert.pem")
		d.want(t, "audit-chain", "skip", "needs the admin API")
	})

	t.Run("expired serving certificate", func(t *testing.T) {
		// The server never presents an expired certificate (it renews at two
		// thirds and fails the handshake rather than serve one past its
		// NotAfter), so an expired one is what a TLS front (load balancer,
		// proxy) left with a stale certificate presents: a listener here,
		// with a certificate for the server's name from the server's own CA.
		key := testKey(t, "doctor-serving")
		now := time.Now()
		leaf := createCert(t, &x509.Certificate{SerialNumber: big.NewInt(99), Subject: pkix.Name{CommonName: "expired"},
			DNSNames: []string{"istiod.istio-system.svc"}, NotBefore: now.Add(-48 * time.Hour), NotAfter: now.Add(-24 * time.Hour),
			KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}},
			tca.intermediate, &key.PublicKey, tca.intermediateKey)
		ln, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{MinVersion: tls.VersionTLS12,
			Certificates: []tls.Certificate{{Certificate: [][]byte{leaf.Raw, tca.intermediate.Raw}, PrivateKey: key, Leaf: leaf}}})
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		go serveHandshakes(ln)
		d := runDoctor(t, srv, env, "--server", ln.Addr().String(), "doctor", "--as", asServer, "--lease-namespace", leaseNS)
		if d.exit != 1 {
			t.Errorf("exit %d, want 1:\n%s", d.exit, d.out)
		}
		d.want(t, "server", "FAIL", ln.Addr().String()+": serving certificate expired ", "(24h ago) -- fix: the server renews it at two thirds of servingCertTTL")
		d.want(t, "trust-bundle", "ok") // every copy but the server's agrees
	})

	t.Run("stale root ConfigMap", func(t *testing.T) {
		// The publisher restores an edited ConfigMap within seconds; the
		// same server without it (a writer that stopped) leaves the edit.
		if st, _ := srv.stop(t); st == nil || !st.Success() {
			t.Fatalf("server stop: %v", st)
		}
		cfg.extraArgs = append(slices.Clone(cfg.extraArgs), "--root-configmaps=false")
		srv2, err := launch(t, cfg, srv.dataDir)
		if err != nil {
			t.Fatal(err)
		}
		cms := env.Client.CoreV1().ConfigMaps(appNS)
		cm, err := cms.Get(context.Background(), rootCMName, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		cm.Data[rootCMKey] = string(encodeCerts(tca.otherRoot))
		if _, err := cms.Update(context.Background(), cm, metav1.UpdateOptions{}); err != nil {
			t.Fatal(err)
		}
		d := runDoctor(t, srv2, env, "doctor", "--as", asServer, "--lease-namespace", leaseNS)
		if d.exit != 1 {
			t.Errorf("exit %d, want 1:\n%s", d.exit, d.out)
		}
		d.want(t, "trust-bundle", "FAIL", fmt.Sprintf("stale (differ from the server's bundle): ConfigMap %s/%s -- fix: ", appNS, rootCMName),
			"the elected replica rewrites the istio-ca-root-cert ConfigMaps")
		d.want(t, "server", "ok")
	})
}

// serveHandshakes completes the TLS handshake of every connection to ln and
// closes it, until ln is closed.
func serveHandshakes(ln net.Listener) {
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		go func() {
			_ = c.SetDeadline(time.Now().Add(10 * time.Second))
			_ = c.(*tls.Conn).Handshake() // the client's verdict is its own
			_ = c.Close()
		}()
	}
}
