// Package vaulttest runs a real OpenBao server (the Vault API) for tests: a
// non-dev server with file storage on 127.0.0.1, initialised and unsealed by
// the harness, so that it can be stopped and restarted with its PKI intact,
// as a production Vault outage would be.
package vaulttest

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/vault/api"
)

// EnvBin names the OpenBao binary (`make test` builds it and sets it).
const EnvBin = "CASTELLAN_TEST_BAO_BIN"

// readyTimeout bounds waiting for the server; it only turns a hang into a failure.
const readyTimeout = 30 * time.Second

// Server is one OpenBao process with its storage directory.
type Server struct {
	// Addr is the http://127.0.0.1:PORT URL of the API.
	Addr string
	// RootToken is the initial root token.
	RootToken string

	bin, dir, port, unsealKey string
	opts                      Options

	mu      sync.Mutex
	cmd     *exec.Cmd
	exited  chan struct{}
	logs    bytes.Buffer
	logsMu  sync.Mutex
	stopped bool
}

// Bin returns the OpenBao binary from EnvBin. Without it the test is skipped
// with a hint to run `make test`, except under CI (env CI set), where a
// silent skip would hide missing coverage: there it fails.
func Bin(t testing.TB) string {
	t.Helper()
	bin := os.Getenv(EnvBin)
	switch {
	case bin == "" && os.Getenv("CI") != "":
		t.Fatalf("%s is not set: CI must run the Vault tests (`make test` builds OpenBao and sets it)", EnvBin)
	case bin == "":
		t.Skipf("%s is not set: run `make test` (or `make openbao` and set it) to run the tests against a real OpenBao", EnvBin)
	}
	return bin
}

// Options configures the server's listener.
type Options struct {
	// TLSCertFile and TLSKeyFile make the listener serve TLS (https URL);
	// CAFile and ServerName are what the harness's own client then trusts.
	TLSCertFile, TLSKeyFile, CAFile, ServerName string
}

// Start runs a fresh plain-HTTP server, initialises and unseals it, and stops
// it when the test ends (its logs go to the test log if the test failed).
func Start(t testing.TB) *Server {
	t.Helper()
	return StartWith(t, Options{})
}

// StartWith is Start with listener options.
func StartWith(t testing.TB, opts Options) *Server {
	t.Helper()
	s := &Server{bin: Bin(t), dir: t.TempDir(), opts: opts}
	s.port = freePort(t)
	tlsConf := "tls_disable = true"
	s.Addr = "http://127.0.0.1:" + s.port
	if opts.TLSCertFile != "" {
		tlsConf = fmt.Sprintf("tls_cert_file = %q\n  tls_key_file = %q", opts.TLSCertFile, opts.TLSKeyFile)
		s.Addr = "https://127.0.0.1:" + s.port
	}
	cfg := fmt.Sprintf(`storage "file" { path = %q }
listener "tcp" {
  address = "127.0.0.1:%s"
  %s
}
api_addr  = %q
log_level = "warn"
`, filepath.Join(s.dir, "data"), s.port, tlsConf, s.Addr)
	if err := os.WriteFile(filepath.Join(s.dir, "config.hcl"), []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		s.Stop(t)
		if t.Failed() {
			s.logsMu.Lock()
			t.Logf("openbao logs:\n%s", s.logs.String())
			s.logsMu.Unlock()
		}
	})
	s.launch(t)

	ctx, cancel := context.WithTimeout(context.Background(), readyTimeout)
	defer cancel()
	c := s.client(t, "")
	init, err := c.Sys().InitWithContext(ctx, &api.InitRequest{SecretShares: 1, SecretThreshold: 1})
	if err != nil {
		t.Fatalf("openbao init: %v", err)
	}
	s.unsealKey, s.RootToken = init.KeysB64[0], init.RootToken
	s.unseal(t)
	return s
}

// launch starts the process and waits until its API answers.
func (s *Server) launch(t testing.TB) {
	t.Helper()
	s.mu.Lock()
	defer s.mu.Unlock()
	cmd := exec.Command(s.bin, "server", "-config", filepath.Join(s.dir, "config.hcl"))
	cmd.Stdout, cmd.Stderr = (*logWriter)(s), (*logWriter)(s)
	if err := cmd.Start(); err != nil {
		t.Fatalf("start openbao: %v", err)
	}
	exited := make(chan struct{})
	go func() { _ = cmd.Wait(); close(exited) }()
	s.cmd, s.exited, s.stopped = cmd, exited, false

	deadline := time.Now().Add(readyTimeout)
	for {
		conn, err := net.DialTimeout("tcp", "127.0.0.1:"+s.port, time.Second)
		if err == nil {
			_ = conn.Close() // a readiness probe: the server answered, which is all it asked
			return
		}
		select {
		case <-exited:
			t.Fatalf("openbao exited before listening on port %s", s.port)
		case <-time.After(50 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("openbao did not listen on port %s within %v", s.port, readyTimeout)
		}
	}
}

// unseal unseals the server and waits until it is active.
func (s *Server) unseal(t testing.TB) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), readyTimeout)
	defer cancel()
	c := s.client(t, "")
	if _, err := c.Sys().UnsealWithContext(ctx, s.unsealKey); err != nil {
		t.Fatalf("openbao unseal: %v", err)
	}
	for {
		h, err := c.Sys().HealthWithContext(ctx)
		if err == nil && h.Initialized && !h.Sealed && !h.Standby {
			return
		}
		select {
		case <-ctx.Done():
			t.Fatalf("openbao not active within %v: %v", readyTimeout, err)
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// Stop ends the process (SIGTERM, then SIGKILL) and waits for it to exit.
func (s *Server) Stop(t testing.TB) {
	t.Helper()
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.cmd == nil || s.stopped {
		return
	}
	s.stopped = true
	_ = s.cmd.Process.Signal(os.Interrupt)
	select {
	case <-s.exited:
	case <-time.After(10 * time.Second):
		_ = s.cmd.Process.Kill()
		<-s.exited
	}
}

// Restart starts the stopped server again on the same port and storage and
// unseals it: mounts, keys and roles are as they were.
func (s *Server) Restart(t testing.TB) {
	t.Helper()
	s.launch(t)
	s.unseal(t)
}

// Client returns an API client for the server with the root token.
func (s *Server) Client(t testing.TB) *api.Client {
	t.Helper()
	return s.client(t, s.RootToken)
}

func (s *Server) client(t testing.TB, token string) *api.Client {
	t.Helper()
	conf := api.DefaultConfig()
	conf.Address, conf.MaxRetries = s.Addr, 0
	if s.opts.CAFile != "" {
		if err := conf.ConfigureTLS(&api.TLSConfig{CACert: s.opts.CAFile, TLSServerName: s.opts.ServerName}); err != nil {
			t.Fatal(err)
		}
	}
	c, err := api.NewClient(conf)
	if err != nil {
		t.Fatal(err)
	}
	c.SetToken(token)
	return c
}

// Write performs a root-token write and fails the test on error.
func (s *Server) Write(t testing.TB, path string, data map[string]any) *api.Secret {
	t.Helper()
	secret, err := s.Client(t).Logical().WriteWithContext(context.Background(), path, data)
	if err != nil {
		t.Fatalf("openbao write %s: %v", path, err)
	}
	return secret
}

// logWriter collects the process output for failed tests.
type logWriter Server

func (w *logWriter) Write(p []byte) (int, error) {
	w.logsMu.Lock()
	defer w.logsMu.Unlock()
	if w.logs.Len() < 1<<20 {
		w.logs.Write(p)
	}
	return len(p), nil
}

// freePort returns a loopback port that was free a moment ago.
func freePort(t testing.TB) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return strconv.Itoa(l.Addr().(*net.TCPAddr).Port)
}
