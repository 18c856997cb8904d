package main

import (
	"crypto/rand"
	"crypto/x509"
	"errors"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestDoctorServingCertificateExpired runs a real server whose CA, and so
// its serving certificate, expires a few seconds after it starts: doctor
// first reports the certificate near its end, then, once it has expired,
// that the server refuses the handshake (it never presents an expired
// certificate) with the hint to look at its CA.
func TestDoctorServingCertificateExpired(t *testing.T) {
	castellanBinary(t) // built before the clock starts
	root := newCA(t, "short root", nil)
	inter := newCA(t, "short intermediate", root)
	inter = reissue(t, inter, root, time.Now().Add(30*time.Second))
	cacerts := filepath.Join(t.TempDir(), "cacerts")
	writeCACerts(t, cacerts, root, inter, nil)
	data := filepath.Join(t.TempDir(), "data")
	startServer(t, data, "--signer", "intermediate", "--cacerts-dir", cacerts)

	out, _, _ := ctl(data, "doctor")
	if time.Now().After(inter.cert.NotAfter) {
		t.Fatal("the CA expired before the first doctor ran (30 s after it was made)")
	}
	// Capped at its CA's NotAfter, the certificate has far less than a
	// quarter of its life left: renewal cannot help.
	if line := doctorLine(t, out, checkServer); !strings.HasPrefix(line, "warn") || !strings.Contains(line, "expires in") ||
		!strings.Contains(line, "-- fix: the server renews its serving certificate at two thirds") {
		t.Errorf("before expiry: %q", line)
	}
	if line := doctorLine(t, out, checkCA); !strings.HasPrefix(line, "FAIL") || !strings.Contains(line, "expiring without a prepared successor") ||
		!strings.Contains(line, "-- fix: the CA comes from the cacerts files") {
		t.Errorf("before expiry: %q", line)
	}
	time.Sleep(time.Until(inter.cert.NotAfter.Add(time.Second)))
	out, _, err := ctl(data, "doctor")
	if ee := (exitError{}); !errors.As(err, &ee) || ee.code != 1 {
		t.Fatalf("after expiry: err %v, want exit 1\n%s", err, out)
	}
	if line := doctorLine(t, out, checkServer); !strings.HasPrefix(line, "FAIL") || !strings.Contains(line, "TLS handshake refused") ||
		!strings.Contains(line, "-- fix: the server could not issue its serving certificate: check that its CA is valid") {
		t.Errorf("after expiry: %q", line)
	}
}

// reissue returns ca's key under a new certificate from parent that ends at notAfter.
func reissue(t *testing.T, ca, parent *testCA, notAfter time.Time) *testCA {
	t.Helper()
	tmpl := *ca.cert
	tmpl.NotAfter = notAfter
	der, err := x509.CreateCertificate(rand.Reader, &tmpl, parent.cert, ca.key.Public(), parent.key)
	if err != nil {
		t.Fatal(err)
	}
	c, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return &testCA{cert: c, key: ca.key}
}
