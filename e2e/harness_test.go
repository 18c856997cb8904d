package e2e

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/big"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/castellan-ca/castellan/e2e/internal/testproc"
)

// Bounds on the waits of the harness. None of them is an assertion about
// speed except stopTimeout: they only turn a hang into a failure.
const (
	readyTimeout   = 30 * time.Second // castellan serve: start to /readyz 200
	stopTimeout    = 10 * time.Second // SIGTERM to exit
	ctlTimeout     = 30 * time.Second // one castellanctl invocation
	pollInterval   = 50 * time.Millisecond
	httpTimeout    = 2 * time.Second
	startAttempts  = 3 // new ports when another process took ours first
	maxLoggedBytes = 64 << 10
)

// serverConfig selects the signer backend of a server under test.
type serverConfig struct {
	signer     string // "selfsigned" or "intermediate"
	cacertsDir string // Istio cacerts layout, for the intermediate signer
	configFile string // --config YAML file, for settings without flags (oidc)

	// extraArgs are further flags, appended last (kubernetes).
	extraArgs []string
	// env are further NAME=value variables of the process (AWS credentials,
	// SOFTHSM2_CONF).
	env []string
}

// server is one running `castellan serve` process with its own data
// directory and loopback ports.
type server struct {
	dataDir  string
	grpcAddr string // 127.0.0.1:PORT of the CA API
	monAddr  string // 127.0.0.1:PORT of /metrics, /healthz, /readyz

	cmd    *exec.Cmd
	logs   *testproc.SyncBuffer
	exited chan struct{} // closed when the process has been reaped
	state  *os.ProcessState
}

// startServer starts castellan serve with cfg and waits until it is ready.
// The process is killed at the end of the test if it still runs, and its
// logs are written to the test log if the test failed.
func startServer(t *testing.T, cfg serverConfig) *server {
	t.Helper()
	return testproc.Retry(t, "castellan serve", startAttempts, func() (*server, error) { return launch(t, cfg, t.TempDir()) })
}

// launch makes one attempt at starting castellan serve on fresh ports with
// dataDir. It wraps testproc.ErrPortTaken when the process died for lack of
// a port.
func launch(t *testing.T, cfg serverConfig, dataDir string) (*server, error) {
	t.Helper()
	s := &server{
		dataDir:  dataDir,
		grpcAddr: testproc.FreeAddr(t),
		monAddr:  testproc.FreeAddr(t),
		logs:     &testproc.SyncBuffer{},
		exited:   make(chan struct{}),
	}
	args := []string{"serve",
		"--data-dir", s.dataDir,
		"--listen", s.grpcAddr,
		"--monitoring-listen", s.monAddr,
		"--trust-domain", trustDomain,
		"--signer", cfg.signer,
	}
	if cfg.cacertsDir != "" {
		args = append(args, "--cacerts-dir", cfg.cacertsDir)
	}
	if cfg.configFile != "" {
		args = append(args, "--config", cfg.configFile)
	}
	args = append(args, cfg.extraArgs...)
	s.cmd = exec.Command(castellanBin, args...)
	s.cmd.Env = append(os.Environ(), cfg.env...)
	s.cmd.Stdout = s.logs
	s.cmd.Stderr = s.logs
	t.Logf("starting %s %s", castellanBin, strings.Join(args, " "))
	if err := s.cmd.Start(); err != nil {
		return nil, err
	}
	go func() {
		_ = s.cmd.Wait() // the exit status is read from s.cmd.ProcessState
		s.state = s.cmd.ProcessState
		close(s.exited)
	}()
	t.Cleanup(func() {
		select {
		case <-s.exited:
		default:
			_ = s.cmd.Process.Kill()
			<-s.exited
		}
		if t.Failed() {
			t.Logf("castellan serve (%s) logs:\n%s", cfg.signer, s.logs.Tail(maxLoggedBytes))
		}
	})

	if err := s.waitReady(); err != nil {
		select {
		case <-s.exited:
			if strings.Contains(s.logs.String(), "address already in use") {
				return nil, fmt.Errorf("%w: %w", testproc.ErrPortTaken, err)
			}
		default:
			_ = s.cmd.Process.Kill()
			<-s.exited
		}
		return nil, err // the cleanup above writes the logs to the test log
	}
	return s, nil
}

// waitReady polls /readyz until it answers 200, the process exits, or
// readyTimeout passes.
func (s *server) waitReady() error {
	err := testproc.WaitOK(http.DefaultClient, "http://"+s.monAddr+"/readyz", httpTimeout, pollInterval, readyTimeout, s.exited)
	if errors.Is(err, testproc.ErrExited) {
		return fmt.Errorf("%w (%v)", err, s.state)
	}
	return err
}

// stop sends SIGTERM and waits up to stopTimeout for the process to exit. It
// returns the exit status and how long the exit took.
func (s *server) stop(t *testing.T) (*os.ProcessState, time.Duration) {
	t.Helper()
	start := time.Now()
	if err := s.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatalf("SIGTERM: %v", err)
	}
	select {
	case <-s.exited:
		return s.state, time.Since(start)
	case <-time.After(stopTimeout):
		t.Fatalf("castellan serve still running %v after SIGTERM", stopTimeout)
		return nil, 0
	}
}

// ctlResult is the outcome of one castellanctl invocation.
type ctlResult struct {
	stdout, stderr []byte
	err            error // nil for exit status 0
}

// runCtl runs castellanctl against s with args after --data-dir.
func (s *server) runCtl(t *testing.T, args ...string) ctlResult {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), ctlTimeout)
	defer cancel()
	full := append([]string{"--data-dir", s.dataDir}, args...)
	cmd := exec.CommandContext(ctx, castellanctlBin, full...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout = &stdout
	cmd.Stderr = &stderr
	err := cmd.Run()
	if ctx.Err() != nil {
		t.Fatalf("castellanctl %s: no exit within %v\nstderr:\n%s", strings.Join(full, " "), ctlTimeout, stderr.Bytes())
	}
	return ctlResult{stdout: stdout.Bytes(), stderr: stderr.Bytes(), err: err}
}

// ctl runs castellanctl against s and fails the test unless it exits 0. It
// returns what the command printed on stdout.
func (s *server) ctl(t *testing.T, args ...string) []byte {
	t.Helper()
	r := s.runCtl(t, args...)
	if r.err != nil {
		t.Fatalf("castellanctl %s: %v\nstdout:\n%s\nstderr:\n%s", strings.Join(args, " "), r.err, r.stdout, r.stderr)
	}
	return r.stdout
}

// auditRecord is one line of `castellanctl audit list --output json`.
type auditRecord struct {
	Seq               uint64 `json:"seq"`
	Writer            string `json:"writer"`
	Time              string `json:"time"`
	Kind              string `json:"kind"`
	RequestID         string `json:"request_id"`
	Peer              string `json:"peer"`
	AuthMethod        string `json:"auth_method"`
	Caller            string `json:"caller"`
	ClusterID         string `json:"cluster_id"`
	RequestedIdentity string `json:"requested_identity"`
	GrantedIdentity   string `json:"granted_identity"`
	Outcome           string `json:"outcome"`
	Reason            string `json:"reason"`
	Code              string `json:"code"`
	Serial            string `json:"serial"`
	NotBefore         string `json:"not_before"`
	NotAfter          string `json:"not_after"`
	CertSHA256        string `json:"cert_sha256"`
	Detail            string `json:"detail"`
	Signer            string `json:"signer"`
	IssuerKeyID       string `json:"issuer_key_id"`
	PrevHash          string `json:"prev_hash"`
	Hash              string `json:"hash"`
}

// auditList returns the whole audit log, oldest first. Fields beyond the
// contract (e.g. "detail") are ignored and empty ones may be omitted; a
// renamed contract field reads as empty and fails the field checks.
func (s *server) auditList(t *testing.T) []auditRecord {
	t.Helper()
	out := s.ctl(t, "audit", "list", "--output", "json")
	var recs []auditRecord
	sc := bufio.NewScanner(bytes.NewReader(out))
	sc.Buffer(make([]byte, 0, 64<<10), 1<<20)
	for n := 1; sc.Scan(); n++ {
		line := bytes.TrimSpace(sc.Bytes())
		if len(line) == 0 {
			continue
		}
		var r auditRecord
		if err := json.Unmarshal(line, &r); err != nil {
			t.Fatalf("audit list line %d: %v\n%s", n, err, line)
		}
		recs = append(recs, r)
	}
	if err := sc.Err(); err != nil {
		t.Fatalf("audit list: %v", err)
	}
	return recs
}

// csrRecords returns the records of kind "csr" in recs.
func csrRecords(recs []auditRecord) []auditRecord {
	var out []auditRecord
	for _, r := range recs {
		if r.Kind == "csr" {
			out = append(out, r)
		}
	}
	return out
}

// recordsWithSerial returns the records whose serial equals serial as a
// number, however the hex is padded or cased.
func recordsWithSerial(t *testing.T, recs []auditRecord, serial *big.Int) []auditRecord {
	t.Helper()
	var out []auditRecord
	for _, r := range recs {
		if r.Serial == "" {
			continue
		}
		n, ok := new(big.Int).SetString(r.Serial, 16)
		if !ok {
			t.Errorf("audit record seq %d: serial %q is not hex", r.Seq, r.Serial)
			continue
		}
		if n.Cmp(serial) == 0 {
			out = append(out, r)
		}
	}
	return out
}

// metrics scrapes /metrics and returns each sample's value summed over its
// labels, keyed by metric name.
func (s *server) metrics(t *testing.T) map[string]float64 {
	t.Helper()
	client := &http.Client{Timeout: httpTimeout}
	resp, err := client.Get("http://" + s.monAddr + "/metrics")
	if err != nil {
		t.Fatalf("GET /metrics: %v", err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("GET /metrics: %v", err)
	}
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET /metrics: %s\n%s", resp.Status, body)
	}
	m, err := parsePromText(body)
	if err != nil {
		t.Fatalf("GET /metrics: %v", err)
	}
	return m
}

// parsePromText reads Prometheus text exposition format, summing the
// samples of each metric name over their labels.
func parsePromText(body []byte) (map[string]float64, error) {
	m := make(map[string]float64)
	for i, line := range strings.Split(string(body), "\n") {
		line = strings.TrimSpace(line)
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		name, rest := line, ""
		if j := strings.IndexByte(line, '{'); j >= 0 {
			k := strings.LastIndexByte(line, '}')
			if k < j {
				return nil, fmt.Errorf("line %d: unbalanced labels: %q", i+1, line)
			}
			name, rest = line[:j], line[k+1:]
		} else if j := strings.IndexAny(line, " \t"); j >= 0 {
			name, rest = line[:j], line[j:]
		}
		fields := strings.Fields(rest)
		if len(fields) == 0 {
			return nil, fmt.Errorf("line %d: no value: %q", i+1, line)
		}
		v, err := strconv.ParseFloat(fields[0], 64)
		if err != nil {
			return nil, fmt.Errorf("line %d: %w", i+1, err)
		}
		m[name] += v
	}
	return m, nil
}

// writeFile writes data to dir/name with mode perm and returns the path.
func writeFile(t *testing.T, dir, name string, data []byte, perm os.FileMode) string {
	t.Helper()
	p := filepath.Join(dir, name)
	if err := os.WriteFile(p, data, perm); err != nil {
		t.Fatal(err)
	}
	return p
}
