package main

import (
	"bufio"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strconv"
	"syscall"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"

	istiogrpc "istio.io/istio/pilot/pkg/grpc"
	istiokeepalive "istio.io/istio/pkg/keepalive"
	"istio.io/istio/pkg/security"
	istioca "istio.io/istio/security/pkg/pki/ca"
	"istio.io/istio/security/pkg/pki/util"
	caserver "istio.io/istio/security/pkg/server/ca"
	"istio.io/istio/security/pkg/server/ca/authenticate"
)

// istioServeCommand is the hidden subcommand that runs Istio's CA server.
const istioServeCommand = "istio-serve"

// Istio's CA as istiod configures it by default, apart from the key type.
const (
	istioTrustDomain = "cluster.local"
	istioServerName  = "istiod.istio-system.svc" // istiod's DNS SAN, as clients dial it
	istioDefaultTTL  = 24 * time.Hour            // DEFAULT_WORKLOAD_CERT_TTL
	istioMaxTTL      = 90 * 24 * time.Hour       // MAX_WORKLOAD_CERT_TTL
	istioRootTTL     = 10 * 365 * 24 * time.Hour // CITADEL_SELF_SIGNED_CA_CERT_TTL
)

// istioTarget starts Istio's CA server in a child process (this binary, run
// as `loadgen istio-serve`) and reads what it wrote: address, root and one
// client credential per client, issued by Istio's CA.
func istioTarget(ctx context.Context, o options) (*target, error) {
	exe, err := os.Executable()
	if err != nil {
		return nil, err
	}
	dir, err := os.MkdirTemp("", "istio-ca-loadgen-")
	if err != nil {
		return nil, err
	}
	logFile, err := os.Create(filepath.Join(dir, "istio.log"))
	if err != nil {
		return nil, errors.Join(err, os.RemoveAll(dir))
	}
	validity := max(24*time.Hour, 2*(o.warmup+o.duration))
	cmd := exec.Command(exe, istioServeCommand, "-dir", dir, "-clients", strconv.Itoa(o.clients),
		"-ca-key", o.istioCAKey, "-client-ttl", validity.String())
	cmd.Stderr = logFile
	abandon := func(err error) (*target, error) {
		return nil, errors.Join(err, logFile.Close(), os.RemoveAll(dir))
	}
	stdin, err := cmd.StdinPipe() // closed by us: the child's cue to exit if we die
	if err != nil {
		return abandon(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return abandon(err)
	}
	if err := cmd.Start(); err != nil {
		return abandon(fmt.Errorf("start %s %s: %w", exe, istioServeCommand, err))
	}
	exited := make(chan struct{})
	ready := make(chan error, 1)
	go func() {
		sc := bufio.NewScanner(stdout)
		if sc.Scan() && sc.Text() == "ready" {
			ready <- nil
		} else {
			ready <- errors.New("exited without reporting ready")
		}
		_, _ = io.Copy(io.Discard, stdout)
		_ = cmd.Wait()
		close(exited)
	}()
	stop := func() error {
		// Closing stdin is the child's cue to exit; SIGTERM follows anyway.
		return errors.Join(stdin.Close(), stopProcess(cmd.Process, exited), logFile.Close(), os.RemoveAll(dir))
	}
	select {
	case err = <-ready:
	case <-ctx.Done():
		err = ctx.Err()
	}
	if err != nil {
		logs, _ := os.ReadFile(logFile.Name()) // before stop, which removes dir
		return nil, errors.Join(fmt.Errorf("istio CA server: %w\n%s", err, truncate(string(logs), 4096)), stop())
	}
	t, err := readIstioDir(dir)
	if err != nil {
		return nil, errors.Join(err, stop())
	}
	t.pid, t.stop = cmd.Process.Pid, stop
	t.describe = fmt.Sprintf("Istio CA (istio.io/istio security/pkg/server/ca, %s CA key, child process)", o.istioCAKey)
	return t, nil
}

// readIstioDir loads the target that an Istio CA server described in dir.
func readIstioDir(dir string) (*target, error) {
	info, err := readServerInfo(dir)
	if err != nil {
		return nil, err
	}
	bundle, err := os.ReadFile(filepath.Join(dir, rootCertFile))
	if err != nil {
		return nil, err
	}
	t := &target{addr: info.Address, serverName: info.ServerName, bundlePEM: string(bundle), stop: func() error { return nil }}
	for i := 0; ; i++ {
		cdir := filepath.Join(dir, "clients", strconv.Itoa(i))
		if _, err := os.Stat(cdir); errors.Is(err, os.ErrNotExist) {
			break
		}
		cert, err := tls.LoadX509KeyPair(filepath.Join(cdir, "cert-chain.pem"), filepath.Join(cdir, "key.pem"))
		if err != nil {
			return nil, fmt.Errorf("client %d credential: %w", i, err)
		}
		t.creds = append(t.creds, credential{id: workloadID(info.TrustDomain, i), cert: cert})
	}
	return t, nil
}

// istioServe is the child: it runs Istio's CA server until SIGTERM or until
// its standard input closes (the parent exited), after printing "ready".
func istioServe(args []string, out io.Writer) error {
	fs := flag.NewFlagSet(istioServeCommand, flag.ContinueOnError)
	dir := fs.String("dir", "", "directory for server.json, root-cert.pem and client credentials")
	clients := fs.Int("clients", 32, "client credentials to issue")
	caKey := fs.String("ca-key", "ecdsa-p256", "ecdsa-p256 or rsa-2048")
	ttl := fs.Duration("client-ttl", 24*time.Hour, "client credential lifetime")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *dir == "" || *clients < 1 || *clients > maxClients {
		return errors.New("-dir and -clients 1..4096 are required")
	}
	stop, err := startIstioServer(*dir, *clients, *caKey, *ttl)
	if err != nil {
		return err
	}
	defer stop()
	fmt.Fprintln(out, "ready")

	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, os.Interrupt)
	stdinClosed := make(chan struct{})
	go func() { _, _ = io.Copy(io.Discard, os.Stdin); close(stdinClosed) }()
	select {
	case <-sig:
	case <-stdinClosed:
	}
	return nil
}

// startIstioServer builds Istio's self-signed CA and its CreateCertificate
// server the way istiod does (IstioCA from a KeyCertBundle, caserver.New with
// the ClientCertAuthenticator, TLS that verifies a client certificate if one
// is given, istiod's gRPC server options), serves it on a loopback port, and
// writes server.json, root-cert.pem and clients/<i>/{cert-chain,key}.pem into dir.
func startIstioServer(dir string, clients int, caKey string, clientTTL time.Duration) (stop func(), err error) {
	certOpts := util.CertOptions{TTL: istioRootTTL, Org: istioTrustDomain, IsCA: true, IsSelfSigned: true, RSAKeySize: 2048}
	switch caKey {
	case "ecdsa-p256":
		certOpts.ECSigAlg, certOpts.ECCCurve = util.EcdsaSigAlg, util.P256Curve
	case "rsa-2048":
	default:
		return nil, fmt.Errorf("CA key %q: want ecdsa-p256 or rsa-2048", caKey)
	}
	rootPEM, rootKeyPEM, err := util.GenCertKeyFromOptions(certOpts)
	if err != nil {
		return nil, fmt.Errorf("istio root: %w", err)
	}
	bundle, err := util.NewVerifiedKeyCertBundleFromPem(rootPEM, rootKeyPEM, nil, rootPEM, nil)
	if err != nil {
		return nil, fmt.Errorf("istio key/cert bundle: %w", err)
	}
	ica, err := istioca.NewIstioCA(&istioca.IstioCAOptions{DefaultCertTTL: istioDefaultTTL, MaxCertTTL: istioMaxTTL, CARSAKeySize: 2048, KeyCertBundle: bundle})
	if err != nil {
		return nil, fmt.Errorf("istio CA: %w", err)
	}
	servingChain, servingKey, err := ica.GenKeyCert([]string{istioServerName}, istioDefaultTTL, false)
	if err != nil {
		return nil, fmt.Errorf("istio serving certificate: %w", err)
	}
	serving, err := tls.X509KeyPair(servingChain, servingKey)
	if err != nil {
		return nil, fmt.Errorf("istio serving certificate: %w", err)
	}
	roots := x509.NewCertPool()
	roots.AppendCertsFromPEM(rootPEM)

	api, err := caserver.New(ica, istioDefaultTTL, []security.Authenticator{&authenticate.ClientCertAuthenticator{}}, nil)
	if err != nil {
		return nil, fmt.Errorf("istio CA server: %w", err)
	}
	opts := istiogrpc.ServerOptions(istiokeepalive.DefaultOption(), func(int64) {})
	opts = append(opts, grpc.Creds(credentials.NewTLS(&tls.Config{
		Certificates: []tls.Certificate{serving},
		ClientAuth:   tls.VerifyClientCertIfGiven, // istiod's secure gRPC port
		ClientCAs:    roots,
		MinVersion:   tls.VersionTLS12,
	})))
	srv := grpc.NewServer(opts...)
	api.Register(srv)
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	go func() { _ = srv.Serve(lis) }()
	stop = srv.Stop
	if err := writeIstioDir(dir, ica, rootPEM, lis.Addr().String(), clients, clientTTL); err != nil {
		stop()
		return nil, err
	}
	return stop, nil
}

// writeIstioDir issues the client credentials with Istio's CA (as istiod
// would for a workload) and writes them with the root and server.json, last.
func writeIstioDir(dir string, ica *istioca.IstioCA, rootPEM []byte, addr string, clients int, ttl time.Duration) error {
	for i := range clients {
		key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			return err
		}
		csr, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, key)
		if err != nil {
			return err
		}
		certPEM, err := ica.Sign(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: csr}),
			istioca.CertOpts{SubjectIDs: []string{workloadID(istioTrustDomain, i)}, TTL: ttl})
		if err != nil {
			return fmt.Errorf("istio CA: client %d credential: %w", i, err)
		}
		keyDER, err := x509.MarshalPKCS8PrivateKey(key)
		if err != nil {
			return err
		}
		cdir := filepath.Join(dir, "clients", strconv.Itoa(i))
		if err := os.MkdirAll(cdir, 0o700); err != nil {
			return err
		}
		if err := os.WriteFile(filepath.Join(cdir, "cert-chain.pem"), certPEM, 0o600); err != nil {
			return err
		}
		if err := os.WriteFile(filepath.Join(cdir, "key.pem"), pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}), 0o600); err != nil {
			return err
		}
	}
	if err := os.WriteFile(filepath.Join(dir, rootCertFile), rootPEM, 0o644); err != nil {
		return err
	}
	b, err := json.Marshal(serverInfo{Address: addr, ServerName: istioServerName, TrustDomain: istioTrustDomain})
	if err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(dir, serverInfoFile), b, 0o644)
}
