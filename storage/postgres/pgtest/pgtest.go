// Package pgtest gives tests a real PostgreSQL: the server named by
// CASTELLAN_TEST_POSTGRES_DSN when set, otherwise a throwaway cluster that
// it creates (initdb) and starts from the PostgreSQL 15 server binaries,
// as the unprivileged "postgres" user when the tests run as root.
//
// A test package that uses it calls Main from TestMain, so the shared
// cluster is stopped and deleted after its tests:
//
//	func TestMain(m *testing.M) { os.Exit(pgtest.Main(m)) }
//
// Without the binaries (and without the DSN) tests are skipped with a
// message, or fail when CI is set, since CI must not silently skip them.
package pgtest

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
)

// Environment variables the helper reads.
const (
	// EnvDSN names a developer's own server (a postgres:// URL whose user may
	// create databases); each test gets its own database on it.
	EnvDSN = "CASTELLAN_TEST_POSTGRES_DSN"
	// EnvBinDir overrides where initdb and postgres are found.
	EnvBinDir = "CASTELLAN_TEST_POSTGRES_BIN_DIR"
)

// DefaultBinDir is where Debian's postgresql-15 package installs the server.
const DefaultBinDir = "/usr/lib/postgresql/15/bin"

var shared struct {
	mu     sync.Mutex
	server *Server
	err    error
}

// Main runs the tests, then stops and deletes the shared cluster if one was
// started. It returns m.Run's exit code.
func Main(m *testing.M) int {
	code := m.Run()
	shared.mu.Lock()
	defer shared.mu.Unlock()
	if shared.server != nil {
		if err := shared.server.stop(syscall.SIGINT); err != nil {
			fmt.Fprintln(os.Stderr, "pgtest: stopping the shared cluster:", err)
		}
		if err := shared.server.remove(); err != nil {
			fmt.Fprintln(os.Stderr, "pgtest: removing the shared cluster:", err)
		}
	}
	return code
}

// DSN returns the DSN of a new, empty database for t on the developer's
// server or the shared throwaway cluster (fsync off: fast, not durable),
// dropped when t ends.
func DSN(t testing.TB) string {
	t.Helper()
	base := os.Getenv(EnvDSN)
	if base == "" {
		shared.mu.Lock()
		if shared.server == nil && shared.err == nil {
			shared.server, shared.err = start(Options{})
		}
		srv, err := shared.server, shared.err
		shared.mu.Unlock()
		if err != nil {
			unavailable(t, err)
		}
		base = srv.DSN("postgres")
	}
	return createDB(t, base)
}

// Options configures a Server.
type Options struct {
	// Durable keeps fsync and synchronous_commit on, for durability tests
	// and benchmarks; the default turns them off for speed.
	Durable bool
}

// Server is a throwaway cluster owned by one test, which may stop, freeze
// and restart it (on the same data directory and port).
type Server struct {
	dir  string // temp dir: data/ and the socket, owned by the server's user
	bin  string
	port int
	opts Options
	cred *syscall.Credential
	cmd  *exec.Cmd
	exit chan error // receives cmd.Wait's result
}

// Start starts a cluster for t alone (never the developer's DSN: the test
// controls the server process) and removes it when t ends.
func Start(t testing.TB, opts Options) *Server {
	t.Helper()
	s, err := start(opts)
	if err != nil {
		unavailable(t, err)
	}
	t.Cleanup(func() {
		if err := s.stop(syscall.SIGINT); err != nil {
			t.Logf("pgtest: stop: %v", err)
		}
		if err := s.remove(); err != nil {
			t.Logf("pgtest: remove: %v", err)
		}
	})
	return s
}

// Launch starts a cluster outside a test (the load generator's PostgreSQL
// audit mode); the caller stops and deletes it with Close.
func Launch(opts Options) (*Server, error) { return start(opts) }

// Close stops a server from Launch (fast shutdown) and deletes its files.
func (s *Server) Close() error { return errors.Join(s.stop(syscall.SIGINT), s.remove()) }

// PID is the postmaster's process id (its backends are its children), or 0
// when the server is not running.
func (s *Server) PID() int {
	if s.cmd == nil || s.cmd.Process == nil {
		return 0
	}
	return s.cmd.Process.Pid
}

// DSN is the URL of database db on s.
func (s *Server) DSN(db string) string {
	return fmt.Sprintf("postgres://postgres@127.0.0.1:%d/%s?sslmode=disable", s.port, db)
}

// CreateDB creates a fresh database on s for t and returns its DSN.
func (s *Server) CreateDB(t testing.TB) string {
	t.Helper()
	return createDB(t, s.DSN("postgres"))
}

// Stop stops the server with sig (SIGQUIT: immediate, like a crash;
// SIGINT: fast shutdown) and waits for it to exit.
func (s *Server) Stop(t testing.TB, sig syscall.Signal) {
	t.Helper()
	if err := s.stop(sig); err != nil {
		t.Fatalf("pgtest: stop: %v", err)
	}
}

// Restart starts the stopped server again on the same data and port.
func (s *Server) Restart(t testing.TB) {
	t.Helper()
	if err := s.run(); err != nil {
		t.Fatalf("pgtest: restart: %v", err)
	}
}

// Freeze stops every process of the server with SIGSTOP: connections stay
// open but nothing answers, like a hung database. Thaw resumes them.
func (s *Server) Freeze(t testing.TB) {
	t.Helper()
	if err := s.signalAll(syscall.SIGSTOP); err != nil {
		t.Fatalf("pgtest: freeze: %v", err)
	}
}

// Thaw resumes a frozen server.
func (s *Server) Thaw(t testing.TB) {
	t.Helper()
	if err := s.signalAll(syscall.SIGCONT); err != nil {
		t.Fatalf("pgtest: thaw: %v", err)
	}
}

// signalAll signals the postmaster, then each of its children: every
// backend calls setsid(), so a process-group signal would miss them. The
// postmaster goes first so that, stopped, it forks no child we would miss.
func (s *Server) signalAll(sig syscall.Signal) error {
	pid := s.cmd.Process.Pid
	if err := syscall.Kill(pid, sig); err != nil {
		return err
	}
	children, err := childrenOf(pid)
	for _, c := range children {
		_ = syscall.Kill(c, sig) // a child may have exited meanwhile
	}
	return err
}

// childrenOf lists the processes whose parent is pid, from /proc.
func childrenOf(pid int) ([]int, error) {
	stats, err := filepath.Glob("/proc/[0-9]*/stat")
	if err != nil {
		return nil, err
	}
	var out []int
	for _, path := range stats {
		b, err := os.ReadFile(path)
		if err != nil {
			continue // exited
		}
		// "pid (comm) state ppid ...": comm may hold spaces and parentheses.
		i := bytes.LastIndexByte(b, ')')
		f := strings.Fields(string(b[i+1:]))
		if len(f) < 2 {
			continue
		}
		if ppid, _ := strconv.Atoi(f[1]); ppid == pid {
			c, _ := strconv.Atoi(filepath.Base(filepath.Dir(path)))
			out = append(out, c)
		}
	}
	return out, nil
}

// unavailable skips t, or fails it under CI, when no server can be had.
func unavailable(t testing.TB, err error) {
	t.Helper()
	if os.Getenv("CI") != "" {
		t.Fatalf("PostgreSQL is required in CI: %v (install postgresql-15, e.g. `make postgres`, or set %s)", err, EnvDSN)
	}
	t.Skipf("PostgreSQL not available, skipping: %v (install postgresql-15 or set %s)", err, EnvDSN)
}

func binDir() string {
	if d := os.Getenv(EnvBinDir); d != "" {
		return d
	}
	return DefaultBinDir
}

// start creates and starts a cluster.
func start(opts Options) (*Server, error) {
	bin := binDir()
	if _, err := os.Stat(filepath.Join(bin, "initdb")); err != nil {
		return nil, fmt.Errorf("no initdb in %s: %w", bin, err)
	}
	s := &Server{bin: bin, opts: opts}
	var err error
	if s.cred, err = serverCredential(); err != nil {
		return nil, err
	}
	if s.dir, err = os.MkdirTemp("", "castellan-pg-"); err != nil {
		return nil, err
	}
	if s.cred != nil {
		if err := os.Chown(s.dir, int(s.cred.Uid), int(s.cred.Gid)); err != nil {
			return nil, errors.Join(err, s.remove())
		}
	}
	out, err := s.command("initdb", "-D", s.dataDir(), "-U", "postgres", "-A", "trust", "-E", "UTF8",
		"--locale=C", "--no-sync", "--no-instructions").CombinedOutput()
	if err != nil {
		return nil, errors.Join(fmt.Errorf("initdb: %w: %s", err, out), s.remove())
	}
	if s.port, err = freePort(); err != nil {
		return nil, errors.Join(err, s.remove())
	}
	if err := s.run(); err != nil {
		return nil, errors.Join(err, s.remove())
	}
	return s, nil
}

// serverCredential is the user to run the server as: initdb and postgres
// refuse root, so as root they run as "postgres"; otherwise as ourselves.
func serverCredential() (*syscall.Credential, error) {
	if os.Geteuid() != 0 {
		return nil, nil
	}
	u, err := user.Lookup("postgres")
	if err != nil {
		return nil, fmt.Errorf("running as root and there is no postgres user to run the server as: %w", err)
	}
	uid, _ := strconv.Atoi(u.Uid)
	gid, _ := strconv.Atoi(u.Gid)
	return &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)}, nil
}

func (s *Server) dataDir() string { return filepath.Join(s.dir, "data") }

func (s *Server) command(name string, args ...string) *exec.Cmd {
	cmd := exec.Command(filepath.Join(s.bin, name), args...)
	cmd.Dir = s.dir
	// Own process group (away from the terminal's ^C); killed with the test binary.
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: s.cred, Setpgid: true, Pdeathsig: syscall.SIGQUIT}
	return cmd
}

// run starts postgres and waits until it accepts connections.
func (s *Server) run() error {
	args := []string{"-D", s.dataDir(), "-p", strconv.Itoa(s.port), "-k", s.dir,
		"-c", "listen_addresses=127.0.0.1", "-c", "shared_buffers=32MB", "-c", "max_connections=200"}
	if !s.opts.Durable {
		args = append(args, "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off")
	}
	logPath := filepath.Join(s.dir, "postgres.log")
	logf, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	defer logf.Close()
	s.cmd = s.command("postgres", args...)
	s.cmd.Stdout, s.cmd.Stderr = logf, logf
	if err := s.cmd.Start(); err != nil {
		return fmt.Errorf("start postgres: %w", err)
	}
	s.exit = make(chan error, 1)
	go func(cmd *exec.Cmd, exit chan<- error) { exit <- cmd.Wait() }(s.cmd, s.exit)

	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	for {
		conn, err := pgx.Connect(ctx, s.DSN("postgres"))
		if err == nil {
			_ = conn.Close(ctx) // a readiness probe: the server answered, which is all it asked
			return nil
		}
		select {
		case werr := <-s.exit:
			s.exit <- werr
			log, _ := os.ReadFile(logPath)
			return fmt.Errorf("postgres exited (%w): %s", werr, tail(string(log), 2000))
		case <-ctx.Done():
			return fmt.Errorf("postgres did not accept connections: %w", err)
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// stop signals the postmaster and waits for it to exit; SIGKILL after 30 s.
func (s *Server) stop(sig syscall.Signal) error {
	if s.cmd == nil || s.cmd.Process == nil {
		return nil
	}
	select {
	case err := <-s.exit: // already gone
		s.exit <- err
		return nil
	default:
	}
	// A frozen server ignores everything but SIGCONT until resumed.
	_ = s.signalAll(syscall.SIGCONT)
	if err := s.cmd.Process.Signal(sig); err != nil {
		return err
	}
	select {
	case err := <-s.exit:
		s.exit <- err
	case <-time.After(30 * time.Second):
		_ = s.signalAll(syscall.SIGKILL)
		err := <-s.exit
		s.exit <- err
		return errors.New("postgres did not stop within 30s; killed")
	}
	return nil
}

func (s *Server) remove() error {
	if s.dir == "" {
		return nil
	}
	return os.RemoveAll(s.dir)
}

func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// createDB creates a uniquely named database through base (a DSN of an
// existing database) and drops it when t ends.
func createDB(t testing.TB, base string) string {
	t.Helper()
	u, err := url.Parse(base)
	if err != nil || (u.Scheme != "postgres" && u.Scheme != "postgresql") {
		t.Fatalf("pgtest: %s must be a postgres:// URL", EnvDSN)
	}
	var b [6]byte
	_, _ = rand.Read(b[:])
	name := "castellan_test_" + hex.EncodeToString(b[:])
	ctx := context.Background()
	admin, err := pgx.Connect(ctx, base)
	if err != nil {
		unavailable(t, fmt.Errorf("connect: %w", err))
	}
	defer admin.Close(ctx)
	if _, err := admin.Exec(ctx, "CREATE DATABASE "+name); err != nil {
		t.Fatalf("pgtest: create database: %v", err)
	}
	t.Cleanup(func() {
		conn, err := pgx.Connect(ctx, base)
		if err != nil {
			t.Logf("pgtest: drop database %s: %v", name, err)
			return
		}
		defer conn.Close(ctx)
		if _, err := conn.Exec(ctx, "DROP DATABASE IF EXISTS "+name+" WITH (FORCE)"); err != nil {
			t.Logf("pgtest: drop database %s: %v", name, err)
		}
	})
	u.Path = "/" + name
	return u.String()
}

func tail(s string, n int) string {
	s = strings.TrimSpace(s)
	if len(s) > n {
		return "…" + s[len(s)-n:]
	}
	return s
}
