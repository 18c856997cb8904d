package main

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"

	adminpb "github.com/castellan-ca/castellan/proto/castellan/admin/v1"
)

// Files of castellan's data directory (cmd/internal/datadir, which another
// module cannot import; e2e/harness_test.go relies on the same layout).
const (
	serverInfoFile = "server.json"
	rootCertFile   = "root-cert.pem"
	operatorCert   = "operator/cert-chain.pem"
	operatorKey    = "operator/key.pem"
)

// serverInfo is server.json, written by `castellan serve` (and by the Istio
// child of this program, in the same format).
type serverInfo struct {
	Address     string `json:"address"`
	ServerName  string `json:"serverName"`
	TrustDomain string `json:"trustDomain"`
}

func readServerInfo(dir string) (serverInfo, error) {
	var s serverInfo
	b, err := os.ReadFile(filepath.Join(dir, serverInfoFile))
	if err != nil {
		return s, err
	}
	if err := json.Unmarshal(b, &s); err != nil {
		return s, fmt.Errorf("parse %s: %w", serverInfoFile, err)
	}
	return s, nil
}

// castellanTarget starts castellan (with -castellan-bin) or uses a running
// one (-data-dir), then issues one workload credential per client through the
// admin API with the operator credential of the data directory.
func castellanTarget(ctx context.Context, o options) (*target, error) {
	t := &target{describe: "castellan", pid: o.pid, stop: func() error { return nil }}
	dir := o.dataDir
	if o.castellanBin != "" {
		p, err := startCastellan(ctx, o)
		if err != nil {
			return nil, err
		}
		t.pid, t.stop, dir, t.monitor = p.pid, p.stop, p.dataDir, p.monitor
		t.describe = "castellan (started by loadgen, data dir " + dir + ")"
	}
	info, err := readServerInfo(dir)
	if err != nil {
		return nil, errors.Join(fmt.Errorf("castellan data dir: %w (is `castellan serve --data-dir %s` running?)", err, dir), t.stop())
	}
	t.addr, t.serverName = info.Address, info.ServerName
	if o.addr != "" {
		t.addr = o.addr
	}
	if o.serverName != "" {
		t.serverName = o.serverName
	}
	if err := bootstrapCastellan(ctx, t, dir, info.TrustDomain, o); err != nil {
		return nil, errors.Join(err, t.stop())
	}
	return t, nil
}

// bootstrapCastellan issues the clients' credentials with the admin API's
// IssueCertificate, the operator path of `castellanctl issue`.
func bootstrapCastellan(ctx context.Context, t *target, dir, td string, o options) error {
	bundle, err := os.ReadFile(filepath.Join(dir, rootCertFile))
	if err != nil {
		return fmt.Errorf("trust bundle: %w", err)
	}
	t.bundlePEM = string(bundle)
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(bundle) {
		return fmt.Errorf("%s holds no certificate", rootCertFile)
	}
	op, err := tls.LoadX509KeyPair(filepath.Join(dir, operatorCert), filepath.Join(dir, operatorKey))
	if err != nil {
		return fmt.Errorf("operator credential: %w", err)
	}
	conn, err := grpc.NewClient(t.addr, grpc.WithTransportCredentials(credentials.NewTLS(&tls.Config{
		MinVersion: tls.VersionTLS12, RootCAs: roots, ServerName: t.serverName, Certificates: []tls.Certificate{op},
	})))
	if err != nil {
		return fmt.Errorf("dial %s: %w", t.addr, err)
	}
	defer conn.Close()
	admin := adminpb.NewAdminServiceClient(conn)
	// Long enough for the longest run; castellan's default maxTTL is 90 days.
	validity := max(24*time.Hour, 2*(o.warmup+o.duration))
	for i := range o.clients {
		id := workloadID(td, i)
		key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			return err
		}
		csrDER, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, key)
		if err != nil {
			return err
		}
		resp, err := admin.IssueCertificate(ctx, &adminpb.IssueCertificateRequest{
			Csr:             string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: csrDER})),
			Identity:        id,
			ValiditySeconds: int64(validity / time.Second),
		})
		if err != nil {
			return fmt.Errorf("issue the credential of %s with the operator credential: %w", id, err)
		}
		cert, err := tlsCertificate(resp.GetCertChain(), key)
		if err != nil {
			return fmt.Errorf("credential of %s: %w", id, err)
		}
		t.creds = append(t.creds, credential{id: id, cert: cert})
	}
	return nil
}

// tlsCertificate turns response elements [leaf, intermediates…, bundle] into
// a client certificate: the leaf and intermediates, not the roots.
func tlsCertificate(elements []string, key *ecdsa.PrivateKey) (tls.Certificate, error) {
	if len(elements) < 2 {
		return tls.Certificate{}, fmt.Errorf("%d response elements, want at least 2", len(elements))
	}
	var c tls.Certificate
	for _, e := range elements[:len(elements)-1] {
		block, _ := pem.Decode([]byte(e))
		if block == nil || block.Type != "CERTIFICATE" {
			return tls.Certificate{}, errors.New("response element is not a PEM certificate")
		}
		c.Certificate = append(c.Certificate, block.Bytes)
	}
	c.PrivateKey = key
	return c, nil
}

// process is a server this program started and must stop.
type process struct {
	pid     int
	dataDir string
	monitor string // http://<monitoring address>
	stop    func() error
}

// startCastellan runs `castellan serve` on free loopback ports with a
// temporary (or the given) data directory and waits until /readyz answers.
func startCastellan(ctx context.Context, o options) (_ *process, err error) {
	dir, temp := o.dataDir, false
	if dir == "" {
		d, err := os.MkdirTemp("", "castellan-loadgen-")
		if err != nil {
			return nil, err
		}
		dir, temp = d, true
		defer func() {
			if err != nil {
				err = errors.Join(err, os.RemoveAll(d)) // p.stop has not taken it over
			}
		}()
	}
	grpcAddr, err := freeAddr()
	if err != nil {
		return nil, err
	}
	monAddr, err := freeAddr()
	if err != nil {
		return nil, err
	}
	logFile, err := os.Create(filepath.Join(dir, "castellan.log"))
	if err != nil {
		return nil, err
	}
	// Each client renews its one identity as fast as it can, which is the
	// flood the per-caller rate limit stops: off here, so that the run
	// measures the issuance path (-castellan-args can turn it back on).
	args := []string{"serve", "--data-dir", dir, "--listen", grpcAddr, "--monitoring-listen", monAddr, "--log-level", "warn"}
	if o.mode != "storm" { // a storm runs with the default limits, which it must not meet
		args = append(args, "--caller-rate-limit", "0")
	}
	args = append(args, o.castellanExtra...)
	args = append(args, strings.Fields(o.castellanArgs)...)
	cmd := exec.Command(o.castellanBin, args...)
	cmd.Stdout, cmd.Stderr = logFile, logFile
	if err := cmd.Start(); err != nil {
		return nil, errors.Join(fmt.Errorf("start %s: %w", o.castellanBin, err), logFile.Close())
	}
	exited := make(chan struct{})
	go func() { _ = cmd.Wait(); close(exited) }()
	p := &process{pid: cmd.Process.Pid, dataDir: dir, monitor: "http://" + monAddr}
	p.stop = func() error {
		err := stopProcess(cmd.Process, exited)
		if cerr := logFile.Close(); cerr != nil && err == nil {
			err = cerr
		}
		if temp && !o.keep {
			if rerr := os.RemoveAll(dir); rerr != nil && err == nil {
				err = rerr
			}
		}
		return err
	}
	if err := waitHTTPReady(ctx, "http://"+monAddr+"/readyz", exited); err != nil {
		logs, _ := os.ReadFile(logFile.Name()) // before p.stop, which removes a temporary data dir
		return nil, errors.Join(fmt.Errorf("castellan serve: %w\n%s", err, truncate(string(logs), 4096)), p.stop())
	}
	if _, err := readServerInfo(dir); err != nil {
		return nil, errors.Join(fmt.Errorf("castellan serve is ready but wrote no %s: %w", serverInfoFile, err), p.stop())
	}
	return p, nil
}

// stopProcess sends SIGTERM to a process this program started and waits for
// it to exit, killing it after 10 s.
func stopProcess(p *os.Process, exited <-chan struct{}) error {
	select {
	case <-exited:
		return nil
	default:
	}
	if err := p.Signal(syscall.SIGTERM); err != nil {
		return err
	}
	select {
	case <-exited:
		return nil
	case <-time.After(10 * time.Second):
		_ = p.Kill()
		<-exited
		return errors.New("did not exit within 10s of SIGTERM; killed")
	}
}

// waitHTTPReady polls url until it answers 200, the process exits or ctx ends.
func waitHTTPReady(ctx context.Context, url string, exited <-chan struct{}) error {
	hc := &http.Client{Timeout: 2 * time.Second}
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	for {
		if resp, err := hc.Get(url); err == nil {
			_, _ = io.Copy(io.Discard, resp.Body)
			_ = resp.Body.Close() // drained: a probe has nothing to lose
			if resp.StatusCode == http.StatusOK {
				return nil
			}
		}
		select {
		case <-exited:
			return errors.New("exited before it was ready")
		case <-ctx.Done():
			return fmt.Errorf("not ready: %w", ctx.Err())
		case <-tick.C:
		}
	}
}
