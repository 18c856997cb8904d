package main

import (
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/castellan-ca/castellan/cmd/internal/datadir"
	adminpb "github.com/castellan-ca/castellan/proto/castellan/admin/v1"
	"github.com/castellan-ca/castellan/signer"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
)

func defaultDataDir() string { return datadir.Default() }

// dial connects to the admin API with the operator credential, verifying the
// server against the trust bundle.
func (g *globals) dial() (adminpb.AdminServiceClient, func(), error) {
	addr, name, err := g.target()
	if err != nil {
		return nil, nil, err
	}
	pair, err := loadKeyPair(g.pick(g.cert, filepath.Join(datadir.OperatorDir, datadir.OperatorCert)),
		g.pick(g.key, filepath.Join(datadir.OperatorDir, datadir.OperatorKey)))
	if err != nil {
		return nil, nil, fmt.Errorf("operator credential: %w", err)
	}
	roots, err := g.roots()
	if err != nil {
		return nil, nil, err
	}
	pool := x509.NewCertPool()
	for _, r := range roots {
		pool.AddCert(r)
	}
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(credentials.NewTLS(&tls.Config{
		MinVersion: tls.VersionTLS12, RootCAs: pool, ServerName: name, Certificates: []tls.Certificate{pair},
	})))
	if err != nil {
		return nil, nil, fmt.Errorf("dial %s: %w", addr, err)
	}
	return adminpb.NewAdminServiceClient(conn), func() { _ = conn.Close() }, nil // Close fails only on a second close
}

// target returns the server's address and the DNS name to verify in its
// certificate: the flags, else what the server wrote in server.json.
func (g *globals) target() (addr, name string, err error) {
	addr, name = g.server, g.serverName
	if addr == "" || name == "" {
		info, err := datadir.ReadServer(g.dataDir)
		if err != nil {
			return "", "", err
		}
		if addr == "" {
			addr = info.Address
		}
		if name == "" {
			name = info.ServerName
		}
	}
	return addr, name, nil
}

// pick returns flag when set, else the file rel in the data directory.
func (g *globals) pick(flag, rel string) string {
	if flag != "" {
		return flag
	}
	return filepath.Join(g.dataDir, rel)
}

// trustFile is the trust bundle the server is verified against.
func (g *globals) trustFile() string { return g.pick(g.caFile, datadir.RootCert) }

// roots reads the trust bundle file.
func (g *globals) roots() ([]*x509.Certificate, error) {
	caFile := g.trustFile()
	b, err := os.ReadFile(caFile)
	if err != nil {
		return nil, fmt.Errorf("trust bundle: %w", err)
	}
	roots, err := signer.ParseCertificatesPEM(b)
	if err != nil {
		return nil, fmt.Errorf("trust bundle %s: %w", caFile, err)
	}
	return roots, nil
}

// loadKeyPair reads the operator credential. The server replaces it (key,
// then certificate) when the CA changes, so a read between the two writes
// sees a mismatched pair: read again shortly.
func loadKeyPair(certFile, keyFile string) (tls.Certificate, error) {
	var (
		pair tls.Certificate
		err  error
	)
	for range 5 {
		if pair, err = tls.LoadX509KeyPair(certFile, keyFile); err == nil {
			return pair, nil
		}
		time.Sleep(100 * time.Millisecond)
	}
	return pair, err
}
