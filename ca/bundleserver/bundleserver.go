// Package bundleserver serves the trust bundle at a SPIFFE bundle endpoint
// (SPIFFE Trust Domain and Bundle, §5), so that SPIRE and other meshes can
// federate with Castellan's trust domain: a JWK set of every root of the
// bundle, over HTTPS authenticated either by an X.509-SVID of this trust
// domain (https_spiffe) or by a Web PKI certificate (https_web).
package bundleserver

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"os"
	"sync"
	"time"

	"github.com/castellan-ca/castellan/ca"
	"github.com/castellan-ca/castellan/internal/netlimit"
	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/federation"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// Endpoint authentication methods (the SPIFFE federation profiles).
const (
	// AuthSPIFFE: the endpoint presents an X.509-SVID of the trust domain.
	AuthSPIFFE = "https_spiffe"
	// AuthWeb: the endpoint presents a Web PKI certificate.
	AuthWeb = "https_web"
)

// DefaultRefreshHint tells federating parties how often to fetch the bundle:
// often enough that a prepared root reaches them well within a propagation window.
const DefaultRefreshHint = 5 * time.Minute

// EndpointPath is the SPIFFE path of the endpoint's SVID under https_spiffe.
const EndpointPath = "/castellan/bundle-endpoint"

// Config configures a Server.
type Config struct {
	// Authority supplies the bundle: every root of it, current at each request.
	Authority   *ca.Authority
	TrustDomain spiffeid.TrustDomain
	// Addr is the listen address.
	Addr string
	// Auth is AuthSPIFFE or AuthWeb.
	Auth string
	// Issuer issues the endpoint's SVID (AuthSPIFFE).
	Issuer *ca.Issuer
	// CertFile and KeyFile are the Web PKI certificate (AuthWeb); they are
	// re-read when they change, for certificates renewed by cert-manager.
	CertFile, KeyFile string
	// RefreshHint is the bundle's spiffe_refresh_hint; zero means DefaultRefreshHint.
	RefreshHint time.Duration
	// Limits bound connections, headers and handshakes; zero fields take
	// netlimit.DefaultHTTP.
	Limits netlimit.HTTP
	Logger *slog.Logger
}

// Server is a bundle endpoint: New listens, Serve serves until Close.
type Server struct {
	srv    *http.Server
	lis    *netlimit.Listener
	logger *slog.Logger
	auth   string
}

// New checks cfg, prepares the TLS identity (issuing the SPIFFE
// authentication's certificate with ctx) and listens on cfg.Addr.
func New(ctx context.Context, cfg Config) (*Server, error) {
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.RefreshHint <= 0 {
		cfg.RefreshHint = DefaultRefreshHint
	}
	handler, err := federation.NewHandler(cfg.TrustDomain, &source{cfg: cfg})
	if err != nil {
		return nil, fmt.Errorf("bundle endpoint: %w", err)
	}
	tlsCfg := &tls.Config{MinVersion: tls.VersionTLS12}
	switch cfg.Auth {
	case AuthSPIFFE:
		id, err := spiffeid.FromPath(cfg.TrustDomain, EndpointPath)
		if err != nil {
			return nil, fmt.Errorf("bundle endpoint: %w", err)
		}
		svid := &ca.ServingCert{Issuer: cfg.Issuer, URIs: []*url.URL{id.URL()}, Logger: cfg.Logger}
		if _, err := svid.Current(ctx); err != nil {
			return nil, fmt.Errorf("bundle endpoint SVID: %w", err)
		}
		tlsCfg.GetCertificate = svid.GetCertificate
	case AuthWeb:
		fc := &fileCert{certFile: cfg.CertFile, keyFile: cfg.KeyFile}
		if _, err := fc.get(); err != nil {
			return nil, fmt.Errorf("bundle endpoint: %w", err)
		}
		tlsCfg.GetCertificate = func(*tls.ClientHelloInfo) (*tls.Certificate, error) { return fc.get() }
	default:
		return nil, fmt.Errorf("bundle endpoint: unknown authentication %q (want %s or %s)", cfg.Auth, AuthSPIFFE, AuthWeb)
	}
	lis, err := net.Listen("tcp", cfg.Addr)
	if err != nil {
		return nil, fmt.Errorf("bundle endpoint: %w", err)
	}
	srv := cfg.Limits.Server(handler)
	srv.TLSConfig = tlsCfg
	return &Server{lis: cfg.Limits.Listen(lis), logger: cfg.Logger, auth: cfg.Auth, srv: srv}, nil
}

// Listener returns the endpoint's listener, whose connections are counted.
func (s *Server) Listener() *netlimit.Listener { return s.lis }

// Serve serves the endpoint until Close, then returns nil.
func (s *Server) Serve() error {
	s.logger.Info("SPIFFE bundle endpoint serving", "listen", s.lis.Addr().String(), "auth", s.auth)
	if err := s.srv.ServeTLS(s.lis, "", ""); !errors.Is(err, http.ErrServerClosed) {
		return fmt.Errorf("bundle endpoint: %w", err)
	}
	return nil
}

// Addr returns the address the endpoint listens on.
func (s *Server) Addr() string { return s.lis.Addr().String() }

// Close stops the endpoint, letting requests in flight finish within ctx; a
// Server never served closes its listener. Connections still busy when ctx
// ends are closed.
func (s *Server) Close(ctx context.Context) error {
	err := s.srv.Shutdown(ctx)
	if err != nil {
		_ = s.srv.Close()
	}
	if cerr := s.lis.Close(); err == nil && cerr != nil && !errors.Is(cerr, net.ErrClosed) {
		err = cerr
	}
	return err
}

// source is the spiffebundle.Source of the handler: the Authority's roots.
type source struct{ cfg Config }

// GetBundleForTrustDomain returns the current bundle of our trust domain.
func (s *source) GetBundleForTrustDomain(td spiffeid.TrustDomain) (*spiffebundle.Bundle, error) {
	st := s.cfg.Authority.Current()
	if td != s.cfg.TrustDomain || st == nil {
		return nil, fmt.Errorf("no bundle for trust domain %q", td)
	}
	b := spiffebundle.FromX509Authorities(td, st.Roots)
	b.SetRefreshHint(s.cfg.RefreshHint)
	return b, nil
}

// fileCert serves a certificate and key from files, re-read at each
// handshake (two small files) so that a renewed pair is served at once.
type fileCert struct {
	certFile, keyFile string

	mu      sync.Mutex
	cert    *tls.Certificate
	certPEM []byte
	keyPEM  []byte
}

func (f *fileCert) get() (*tls.Certificate, error) {
	certPEM, cerr := os.ReadFile(f.certFile)
	keyPEM, kerr := os.ReadFile(f.keyFile)
	f.mu.Lock()
	defer f.mu.Unlock()
	err := errors.Join(cerr, kerr)
	if err == nil && f.cert != nil && bytes.Equal(certPEM, f.certPEM) && bytes.Equal(keyPEM, f.keyPEM) {
		return f.cert, nil
	}
	if err == nil {
		var c tls.Certificate
		if c, err = tls.X509KeyPair(certPEM, keyPEM); err == nil {
			f.cert, f.certPEM, f.keyPEM = &c, certPEM, keyPEM
			return f.cert, nil
		}
	}
	if f.cert != nil {
		return f.cert, nil // missing or mid-update: keep serving the last good pair
	}
	return nil, fmt.Errorf("web PKI certificate: %w", err)
}
