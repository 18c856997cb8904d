package main

import (
	"context"
	"crypto/tls"
	"errors"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/castellan-ca/castellan/cmd/internal/datadir"
)

// doctorLine returns the line of check name in doctor's output.
func doctorLine(t *testing.T, out, name string) string {
	t.Helper()
	re := regexp.MustCompile(`(?m)^(ok|FAIL|warn|skip) +` + regexp.QuoteMeta(name) + ` .*$`)
	line := re.FindString(out)
	if line == "" {
		t.Fatalf("no %s line in doctor's output:\n%s", name, out)
	}
	return line
}

// TestDoctorServer runs doctor against a real castellan serve without
// Kubernetes: healthy, then with the trust bundle file replaced by another
// root, and with a name the serving certificate lacks.
func TestDoctorServer(t *testing.T) {
	data := filepath.Join(t.TempDir(), "data")
	startServer(t, data)
	for i := range 5 {
		issue(t, data, "spiffe://cluster.local/ns/doc/sa/app"+string(rune('a'+i)))
	}

	t.Run("healthy", func(t *testing.T) {
		for _, args := range [][]string{{"doctor"}, {"doctor", "--audit-tail", "2"}, {"doctor", "--full"}} {
			out, errOut, err := ctl(data, args...)
			if err != nil {
				t.Fatalf("%v: %v\n%s%s", args, err, out, errOut)
			}
			for name, want := range map[string]string{
				checkServer: "^ok +server +127.0.0.1:\\d+: serving certificate valid for istiod.istio-system.svc, chains to the trust bundle",
				checkBundle: "^ok +trust-bundle +1 root\\(s\\) .*the same in the server, the trust bundle file$",
				checkAudit:  "^ok +audit-chain +.* records of 1 writer\\(s\\) intact$",
				checkCA:     "^ok +ca-expiry +root CA [0-9a-f]+ expires ",
				checkSkew:   "^ok +clock-skew +the server's clock is ",
				checkRBAC:   "^skip +kube-rbac +no --kubeconfig given$",
			} {
				if line := doctorLine(t, out, name); !regexp.MustCompile(want).MatchString(line) {
					t.Errorf("%v: %s line %q, want %q", args, name, line, want)
				}
			}
		}
		out := mustCtl(t, data, "doctor", "--audit-tail", "2")
		t.Logf("doctor output:\n%s", out)
		if line := doctorLine(t, out, checkAudit); !strings.Contains(line, "last 2 records of each chain: 2 records") {
			t.Errorf("audit tail of 2: %q", line)
		}
	})

	t.Run("another root in the trust bundle file", func(t *testing.T) {
		other := newCA(t, "other root", nil)
		bad := filepath.Join(t.TempDir(), "root-cert.pem")
		if err := os.WriteFile(bad, pemCert(other.cert), 0o600); err != nil {
			t.Fatal(err)
		}
		out, _, err := ctl(data, "--ca", bad, "doctor")
		if ee := (exitError{}); !errors.As(err, &ee) || ee.code != 1 {
			t.Fatalf("doctor with a foreign root: err %v, want exit 1\n%s", err, out)
		}
		line := doctorLine(t, out, checkServer)
		if !strings.HasPrefix(line, "FAIL") || !strings.Contains(line, "does not chain to the trust bundle file") ||
			!strings.Contains(line, "-- fix: the trust bundle file (--ca") {
			t.Errorf("server line %q", line)
		}
		// Without the server, the only copy is the file: nothing to compare.
		if line := doctorLine(t, out, checkAudit); !strings.HasPrefix(line, "skip") {
			t.Errorf("audit line %q, want skip (no admin API)", line)
		}
	})

	t.Run("a name the certificate lacks", func(t *testing.T) {
		out, _, err := ctl(data, "doctor", "--names", "ca.example.com")
		if ee := (exitError{}); !errors.As(err, &ee) || ee.code != 1 {
			t.Fatalf("err %v, want exit 1\n%s", err, out)
		}
		if line := doctorLine(t, out, checkServer); !strings.Contains(line, "lacks ca.example.com") || !strings.Contains(line, "servingDNSNames") {
			t.Errorf("server line %q", line)
		}
	})

	t.Run("stale trust bundle file beside the server", func(t *testing.T) {
		// A stale copy the server is still verified with: the copy of the
		// root plus a root the server dropped.
		other := newCA(t, "dropped root", nil)
		rootPEM, err := os.ReadFile(filepath.Join(data, datadir.RootCert))
		if err != nil {
			t.Fatal(err)
		}
		stale := filepath.Join(t.TempDir(), "root-cert.pem")
		if err := os.WriteFile(stale, append(rootPEM, pemCert(other.cert)...), 0o600); err != nil {
			t.Fatal(err)
		}
		out, _, err := ctl(data, "--ca", stale, "doctor")
		if ee := (exitError{}); !errors.As(err, &ee) || ee.code != 1 {
			t.Fatalf("err %v, want exit 1\n%s", err, out)
		}
		line := doctorLine(t, out, checkBundle)
		if !strings.HasPrefix(line, "FAIL") || !strings.Contains(line, "stale (differ from the server's bundle): "+stale) ||
			!strings.Contains(line, "-- fix: the server rewrites DATA_DIR/root-cert.pem") {
			t.Errorf("trust-bundle line %q", line)
		}
	})
}

// TestProbeServingHandshakeRefused: a server that ends the handshake (it
// has no certificate to present) is told apart from one not listening.
func TestProbeServingHandshakeRefused(t *testing.T) {
	ln, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{MinVersion: tls.VersionTLS12,
		GetCertificate: func(*tls.ClientHelloInfo) (*tls.Certificate, error) { return nil, errors.New("no serving certificate") }})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			_ = c.(*tls.Conn).Handshake()
			_ = c.Close()
		}
	}()
	o := doctorOptions{now: time.Now}
	r := probeServing(context.Background(), ln.Addr().String(), "localhost", nil, nil, o)
	if !r.failed() || !strings.Contains(r.Finding, "TLS handshake refused") || !strings.Contains(r.Hint, "could not issue its serving certificate") {
		t.Errorf("handshake refused: %+v", r)
	}
	closed := ln.Addr().String()
	_ = ln.Close() // closed twice: the deferred Close then fails, harmlessly
	r = probeServing(context.Background(), closed, "localhost", nil, nil, o)
	if !r.failed() || !strings.Contains(r.Finding, "unreachable") || !strings.Contains(r.Hint, "runs and listens") {
		t.Errorf("nothing listening: %+v", r)
	}
}
