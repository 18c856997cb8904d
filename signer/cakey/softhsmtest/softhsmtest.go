// Package softhsmtest gives a test binary a throwaway SoftHSM2 token: a real
// PKCS#11 module (Debian's softhsm2) for CA-key tests. SoftHSM reads its
// configuration once per process (at C_Initialize), so each test binary gets
// one token directory, set up by Main from TestMain, and every test shares
// its one token, with keys of its own (CA key ids are random).
package softhsmtest

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/castellan-ca/castellan/signer/cakey"
)

// Module is where Debian's softhsm2 installs the PKCS#11 module; the
// environment variable ModuleEnv overrides it.
const Module = "/usr/lib/softhsm/libsofthsm2.so"

// ModuleEnv names another SoftHSM2 module path (the Makefile sets it).
const ModuleEnv = "CASTELLAN_TEST_SOFTHSM_MODULE"

// Token label and PINs of the test token.
const (
	Label = "castellan-test"
	PIN   = "1234"
	SOPIN = "5678"
)

// Token is this process's initialised token.
type Token struct {
	// Dir holds the configuration, the token directory and the PIN file.
	Dir string
	// Module is the PKCS#11 module path.
	Module string
	// PINFile holds PIN (0600); SetPIN rewrites it.
	PINFile string
	// ProviderURI is the key provider URI of the token.
	ProviderURI string

	tokenDir string // Dir/tokens/<the token's own directory>
}

// dir is this process's SoftHSM directory, set by Main.
var dir string

// Main runs m with SOFTHSM2_CONF pointing at a fresh directory of this
// process (before any test can initialise the module) and removes it after.
// Call it from TestMain: os.Exit(softhsmtest.Main(m)).
func Main(m *testing.M) int {
	d, err := os.MkdirTemp("", "castellan-softhsm-")
	if err != nil {
		fmt.Fprintln(os.Stderr, "softhsmtest:", err)
		return 1
	}
	defer os.RemoveAll(d)
	conf := filepath.Join(d, "softhsm2.conf")
	content := "directories.tokendir = " + filepath.Join(d, "tokens") + "\nobjectstore.backend = file\nlog.level = ERROR\n"
	if err := os.WriteFile(conf, []byte(content), 0o600); err != nil {
		fmt.Fprintln(os.Stderr, "softhsmtest:", err)
		return 1
	}
	// Read by the C library at C_Initialize, which no test has called yet.
	os.Setenv("SOFTHSM2_CONF", conf)
	dir = d
	return m.Run()
}

var token = sync.OnceValues(func() (*Token, error) {
	if dir == "" {
		return nil, fmt.Errorf("softhsmtest.Main did not run: call it from TestMain")
	}
	module := Module
	if m := os.Getenv(ModuleEnv); m != "" {
		module = m
	}
	if _, err := os.Stat(module); err != nil {
		return nil, fmt.Errorf("SoftHSM2 module: %w (apt-get install softhsm2)", err)
	}
	if _, err := exec.LookPath("softhsm2-util"); err != nil {
		return nil, fmt.Errorf("softhsm2-util: %w (apt-get install softhsm2)", err)
	}
	tokens := filepath.Join(dir, "tokens")
	if err := os.MkdirAll(tokens, 0o700); err != nil {
		return nil, err
	}
	out, err := exec.Command("softhsm2-util", "--init-token", "--free", "--label", Label, "--pin", PIN, "--so-pin", SOPIN).CombinedOutput()
	if err != nil {
		return nil, fmt.Errorf("softhsm2-util --init-token: %w: %s", err, out)
	}
	ents, err := os.ReadDir(tokens)
	if err != nil || len(ents) != 1 {
		return nil, fmt.Errorf("token directory %s: %d entries, %v", tokens, len(ents), err)
	}
	tk := &Token{Dir: dir, Module: module, PINFile: filepath.Join(dir, "pin"), tokenDir: filepath.Join(tokens, ents[0].Name())}
	if err := os.WriteFile(tk.PINFile, []byte(PIN+"\n"), 0o600); err != nil {
		return nil, err
	}
	tk.ProviderURI = "pkcs11:module-path=" + module + ";token=" + Label + "?pin-source=" + tk.PINFile
	return tk, nil
})

// Get returns this process's token, initialising it on first use. Without
// SoftHSM2 the test is skipped, or fails when CI is set (CI must run it).
func Get(t testing.TB) *Token {
	t.Helper()
	tk, err := token()
	if err != nil {
		if os.Getenv("CI") != "" {
			t.Fatalf("SoftHSM2 token: %v", err)
		}
		t.Skipf("SoftHSM2 token: %v", err)
	}
	return tk
}

// RetryInterval is how soon a Provider of the token reconnects after a
// failure: short, so recovery tests do not wait.
const RetryInterval = 20 * time.Millisecond

// Provider opens a key provider on the token (reconnecting after
// RetryInterval), closed at the end of the test.
func (tk *Token) Provider(t testing.TB) *cakey.Provider {
	t.Helper()
	p, err := cakey.New(t.Context(), cakey.Config{URI: tk.ProviderURI, RetryInterval: RetryInterval})
	if err != nil {
		t.Fatalf("key provider on the SoftHSM2 token: %v", err)
	}
	t.Cleanup(func() { _ = p.Close() })
	return p
}

// Remove takes the token out, as if it were unplugged (its files leave the
// token directory), until the returned function puts it back. Tests that
// remove the token must not run in parallel with others of the binary.
func (tk *Token) Remove(t testing.TB) (restore func()) {
	t.Helper()
	away := filepath.Join(tk.Dir, "removed")
	if err := os.Rename(tk.tokenDir, away); err != nil {
		t.Fatalf("remove token: %v", err)
	}
	var once sync.Once
	restore = func() {
		once.Do(func() {
			if err := os.Rename(away, tk.tokenDir); err != nil {
				t.Errorf("put the token back: %v", err)
			}
		})
	}
	t.Cleanup(restore)
	return restore
}

// SetPIN writes pin into the PIN file.
func (tk *Token) SetPIN(t testing.TB, pin string) {
	t.Helper()
	if err := os.WriteFile(tk.PINFile, []byte(pin+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
}

// Objects returns the number of key objects stored in the token (SoftHSM
// keeps one file per object, a key pair is two; token.object is the token's
// own record).
func (tk *Token) Objects(t testing.TB) int {
	t.Helper()
	ents, err := os.ReadDir(tk.tokenDir)
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, e := range ents {
		if filepath.Ext(e.Name()) == ".object" && e.Name() != "token.object" {
			n++
		}
	}
	return n
}
