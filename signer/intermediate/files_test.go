package intermediate_test

import (
	"crypto/x509"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/castellan-ca/castellan/internal/atomicfile"
	"github.com/castellan-ca/castellan/internal/keyfile"
	"github.com/castellan-ca/castellan/signer"
	"github.com/castellan-ca/castellan/signer/intermediate"
	"github.com/castellan-ca/castellan/signer/signertest"
)

// material is a signing CA as an operator would hand it over.
type material struct {
	issuing *signertest.CA
	above   []*x509.Certificate // issuing's issuers upwards, the root possibly included
	roots   []*x509.Certificate
}

func keyPEM(t *testing.T, c *signertest.CA) []byte {
	t.Helper()
	b, err := keyfile.MarshalPrivateKeyPEM(c.Key)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// cacerts returns m in Istio's cacerts layout.
func cacerts(t *testing.T, m material) map[string][]byte {
	t.Helper()
	return map[string][]byte{
		intermediate.CACertFile:    []byte(signer.EncodePEM(m.issuing.Cert)),
		intermediate.CAKeyFile:     keyPEM(t, m.issuing),
		intermediate.CertChainFile: []byte(signer.EncodePEM(append([]*x509.Certificate{m.issuing.Cert}, m.above...)...)),
		intermediate.RootCertFile:  []byte(signer.EncodePEM(m.roots...)),
	}
}

// tlsSecret returns m in the kubernetes.io/tls layout.
func tlsSecret(t *testing.T, m material) map[string][]byte {
	t.Helper()
	return map[string][]byte{
		intermediate.TLSCertFile: []byte(signer.EncodePEM(append([]*x509.Certificate{m.issuing.Cert}, m.above...)...)),
		intermediate.TLSKeyFile:  keyPEM(t, m.issuing),
		intermediate.TLSCAFile:   []byte(signer.EncodePEM(m.roots...)),
	}
}

// writeFiles writes files into dir in place, keys 0600 and the rest 0644.
func writeFiles(t *testing.T, dir string, files map[string][]byte) {
	t.Helper()
	for name, data := range files {
		mode := os.FileMode(0o644)
		if name == intermediate.CAKeyFile || name == intermediate.TLSKeyFile {
			mode = 0o600
		}
		if err := atomicfile.Write(filepath.Join(dir, name), data, mode); err != nil {
			t.Fatal(err)
		}
	}
}

// swapFiles updates dir the way the kubelet updates a Secret volume: the files
// go into a fresh hidden directory, the ..data symlink is atomically replaced,
// and each visible name is a symlink through ..data. Names absent from files
// dangle, as after a Secret update that dropped a key.
func swapFiles(t *testing.T, dir string, files map[string][]byte, keyMode os.FileMode) {
	t.Helper()
	// Beside ..data, named by the time as the kubelet names its own (Mkdir
	// fails rather than reuse one).
	ts := filepath.Join(dir, time.Now().Format("..2006_01_02_15_04_05.000000000"))
	if err := os.Mkdir(ts, 0o755); err != nil {
		t.Fatal(err)
	}
	for name, data := range files {
		mode := os.FileMode(0o644)
		if name == intermediate.CAKeyFile || name == intermediate.TLSKeyFile {
			mode = keyMode
		}
		if err := os.WriteFile(filepath.Join(ts, name), data, mode); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(filepath.Join(ts, name), mode); err != nil { // umask-proof
			t.Fatal(err)
		}
		link := filepath.Join(dir, name)
		if _, err := os.Lstat(link); os.IsNotExist(err) {
			if err := os.Symlink(filepath.Join("..data", name), link); err != nil {
				t.Fatal(err)
			}
		}
	}
	tmpLink := filepath.Join(dir, "..data_tmp")
	if err := os.Symlink(filepath.Base(ts), tmpLink); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmpLink, filepath.Join(dir, "..data")); err != nil {
		t.Fatal(err)
	}
}
