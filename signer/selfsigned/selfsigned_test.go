package selfsigned_test

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/rsa"
	"crypto/x509"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/castellan-ca/castellan/internal/keyfile"
	"github.com/castellan-ca/castellan/signer"
	"github.com/castellan-ca/castellan/signer/local"
	"github.com/castellan-ca/castellan/signer/selfsigned"
	"github.com/castellan-ca/castellan/signer/signertest"
)

var td = spiffeid.RequireTrustDomainFromString("cluster.local")

func load(t *testing.T, opts selfsigned.Options) *local.Signer {
	t.Helper()
	s, err := selfsigned.Load(opts)
	if err != nil {
		t.Fatalf("Load: %v", err)
	}
	return s
}

func TestFirstStartThenReload(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "ca")
	now := time.Now().Truncate(time.Second)
	clock := func() time.Time { return now }
	first := load(t, selfsigned.Options{Dir: dir, TrustDomain: td, Now: clock})

	for name, want := range map[string]os.FileMode{dir: 0o700, filepath.Join(dir, selfsigned.KeyFile): 0o600, filepath.Join(dir, selfsigned.CertFile): 0o644} {
		fi, err := os.Stat(name)
		if err != nil {
			t.Fatal(err)
		}
		if fi.Mode().Perm() != want {
			t.Errorf("%s mode = %#o, want %#o", name, fi.Mode().Perm(), want)
		}
	}
	keyPEM, _ := os.ReadFile(filepath.Join(dir, selfsigned.KeyFile))
	if !bytes.HasPrefix(keyPEM, []byte("-----BEGIN PRIVATE KEY-----")) {
		t.Errorf("key file is not PKCS#8 PEM: %.40q", keyPEM)
	}

	root := first.Certificate()
	checks := []struct {
		name string
		ok   bool
	}{
		{"subject", root.Subject.CommonName == fmt.Sprintf("%s %x", selfsigned.RootCommonName, root.SubjectKeyId[:8]) && len(root.Subject.Organization) == 1 && root.Subject.Organization[0] == td.Name()},
		{"URI SAN", len(root.URIs) == 1 && root.URIs[0].String() == "spiffe://cluster.local"},
		{"CA", root.BasicConstraintsValid && root.IsCA},
		{"key usage", root.KeyUsage == x509.KeyUsageCertSign|x509.KeyUsageCRLSign|x509.KeyUsageDigitalSignature},
		{"SubjectKeyId", len(root.SubjectKeyId) > 0},
		{"128-bit serial", root.SerialNumber.BitLen() == 128},
		{"NotBefore", root.NotBefore.Equal(now.Add(-signer.DefaultClockSkew))},
		{"NotAfter", root.NotAfter.Equal(now.Add(selfsigned.DefaultLifetime))},
		{"self-signed", root.CheckSignatureFrom(root) == nil},
		{"default key type", isECDSA(root, 256)},
	}
	for _, c := range checks {
		if !c.ok {
			t.Errorf("root profile: %s wrong", c.name)
		}
	}
	if len(first.TrustBundle()) != 1 || !bytes.Equal(first.TrustBundle()[0].Raw, root.Raw) {
		t.Error("trust bundle is not the root")
	}

	second := load(t, selfsigned.Options{Dir: dir, TrustDomain: td, KeyType: keyfile.KeyTypeRSA2048})
	if !bytes.Equal(second.Certificate().Raw, root.Raw) {
		t.Error("second start did not load the same root")
	}
}

func isECDSA(c *x509.Certificate, bits int) bool {
	k, ok := c.PublicKey.(*ecdsa.PublicKey)
	return ok && k.Curve.Params().BitSize == bits
}

func TestKeyTypeSelectable(t *testing.T) {
	s := load(t, selfsigned.Options{Dir: t.TempDir(), TrustDomain: td, KeyType: keyfile.KeyTypeRSA2048, Lifetime: 24 * time.Hour})
	k, ok := s.Certificate().PublicKey.(*rsa.PublicKey)
	if !ok || k.N.BitLen() != 2048 {
		t.Fatalf("root key = %T, want RSA-2048", s.Certificate().PublicKey)
	}
	if got := s.Certificate().NotAfter.Sub(s.Certificate().NotBefore); got != 24*time.Hour+signer.DefaultClockSkew {
		t.Errorf("validity = %s, want the configured lifetime plus the skew allowance", got)
	}
}

func TestLoadRefuses(t *testing.T) {
	otherTD := spiffeid.RequireTrustDomainFromString("other.example")
	tests := []struct {
		name     string
		opts     func(dir string) selfsigned.Options
		damage   func(t *testing.T, dir string)
		wantText string // the error names the file (or value) at fault
		wantErr  error  // and wraps this kind, where one exists
	}{
		{"corrupt key file", nil, func(t *testing.T, dir string) {
			write(t, filepath.Join(dir, selfsigned.KeyFile), "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
		}, selfsigned.KeyFile, nil},
		{"corrupt cert file", nil, func(t *testing.T, dir string) {
			write(t, filepath.Join(dir, selfsigned.CertFile), "garbage")
		}, selfsigned.CertFile, nil},
		{"mismatched key", nil, func(t *testing.T, dir string) {
			pemKey, err := keyfile.MarshalPrivateKeyPEM(signertest.Key(5))
			if err != nil {
				t.Fatal(err)
			}
			write(t, filepath.Join(dir, selfsigned.KeyFile), string(pemKey))
		}, selfsigned.KeyFile, local.ErrKeyMismatch},
		{"key without certificate", nil, func(t *testing.T, dir string) {
			if err := os.Remove(filepath.Join(dir, selfsigned.CertFile)); err != nil {
				t.Fatal(err)
			}
		}, selfsigned.CertFile + " is missing", nil},
		{"certificate without key", nil, func(t *testing.T, dir string) {
			if err := os.Remove(filepath.Join(dir, selfsigned.KeyFile)); err != nil {
				t.Fatal(err)
			}
		}, selfsigned.KeyFile + " is missing", nil},
		{"other trust domain", func(dir string) selfsigned.Options {
			return selfsigned.Options{Dir: dir, TrustDomain: otherTD}
		}, func(*testing.T, string) {}, "not the configured trust domain", nil},
		{"unknown key type", func(dir string) selfsigned.Options {
			return selfsigned.Options{Dir: dir, TrustDomain: td, KeyType: "dsa-1024"}
		}, func(*testing.T, string) {}, "dsa-1024", nil},
		{"expired root", func(dir string) selfsigned.Options {
			return selfsigned.Options{Dir: dir, TrustDomain: td, Now: func() time.Time { return time.Now().Add(11 * 365 * 24 * time.Hour) }}
		}, func(*testing.T, string) {}, selfsigned.CertFile, local.ErrExpired},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			load(t, selfsigned.Options{Dir: dir, TrustDomain: td})
			tc.damage(t, dir)
			before := dirContent(t, dir)
			opts := selfsigned.Options{Dir: dir, TrustDomain: td}
			if tc.opts != nil {
				opts = tc.opts(dir)
			}
			s, err := selfsigned.Load(opts)
			if err == nil || s != nil {
				t.Fatalf("Load succeeded, want an error mentioning %q", tc.wantText)
			}
			if !strings.Contains(err.Error(), tc.wantText) {
				t.Errorf("err = %v, want it to mention %q", err, tc.wantText)
			}
			if tc.wantErr != nil && !errors.Is(err, tc.wantErr) {
				t.Errorf("err = %v, want one wrapping %v", err, tc.wantErr)
			}
			if after := dirContent(t, dir); after != before {
				t.Error("Load changed the directory instead of refusing")
			}
		})
	}
}

// dirContent is every file name and content of dir, to detect any rewrite.
func dirContent(t *testing.T, dir string) string {
	t.Helper()
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var b strings.Builder
	for _, e := range entries {
		data, _ := os.ReadFile(filepath.Join(dir, e.Name()))
		b.WriteString(e.Name() + "\x00" + string(data) + "\x00")
	}
	return b.String()
}

func write(t *testing.T, path, content string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
}

func TestConformance(t *testing.T) {
	dir := t.TempDir()
	load(t, selfsigned.Options{Dir: dir, TrustDomain: td})
	signertest.Run(t, signertest.Factory{
		TrustDomain: td,
		New: func(t *testing.T) signer.Signer {
			return load(t, selfsigned.Options{Dir: dir, TrustDomain: td})
		},
	})
}
