// Package intermediate is the signing backend for an operator-supplied CA (an
// intermediate of the organisation's PKI), read from a directory in Istio's
// cacerts layout or the kubernetes.io/tls layout and hot-reloaded on change.
package intermediate

import (
	"bytes"
	"context"
	"crypto"
	"crypto/sha256"
	"crypto/x509"
	"encoding/binary"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"time"

	"github.com/castellan-ca/castellan/internal/keyfile"
	"github.com/castellan-ca/castellan/signer"
	"github.com/castellan-ca/castellan/signer/cakey"
	"github.com/castellan-ca/castellan/signer/local"
)

// Backend is the configuration name of this backend.
const Backend = "intermediate"

// Istio's cacerts layout.
const (
	// CACertFile is the signing CA certificate.
	CACertFile = "ca-cert.pem"
	// CAKeyFile is the signing CA's private key.
	CAKeyFile = "ca-key.pem"
	// CertChainFile is CACertFile followed by its issuers, optionally up to the root.
	CertChainFile = "cert-chain.pem"
	// RootCertFile holds the trusted roots (one or several).
	RootCertFile = "root-cert.pem"
)

// The kubernetes.io/tls Secret layout (as written by cert-manager).
const (
	// TLSCertFile is the signing CA certificate, optionally followed by its chain.
	TLSCertFile = "tls.crt"
	// TLSKeyFile is the signing CA's private key.
	TLSKeyFile = "tls.key"
	// TLSCAFile holds the trusted roots.
	TLSCAFile = "ca.crt"
)

// DefaultWatchInterval is the polling period of Watch when none is given.
const DefaultWatchInterval = 10 * time.Second

// allFiles is every file either layout may use, in a fixed order for hashing.
var allFiles = []string{CACertFile, CAKeyFile, CertChainFile, RootCertFile, TLSCertFile, TLSKeyFile, TLSCAFile}

// snapshot is the content of the directory read once, so that what is hashed
// is exactly what is validated (no window between hashing and loading).
type snapshot struct {
	dir   string
	data  map[string][]byte
	errs  map[string]error // read failures other than "does not exist"
	modes map[string]fs.FileMode
	hash  [sha256.Size]byte
}

func readSnapshot(dir string) *snapshot {
	s := &snapshot{dir: dir, data: map[string][]byte{}, errs: map[string]error{}, modes: map[string]fs.FileMode{}}
	h := sha256.New()
	for _, name := range allFiles {
		path := filepath.Join(dir, name)
		// Stat and ReadFile follow symlinks, so Kubernetes' ..data swaps are seen.
		b, err := os.ReadFile(path)
		h.Write([]byte(name))
		switch {
		case err == nil:
			s.data[name] = b
			if fi, err := os.Stat(path); err == nil {
				s.modes[name] = fi.Mode().Perm()
			}
			h.Write([]byte{1})
			h.Write(binary.BigEndian.AppendUint64(nil, uint64(len(b))))
			h.Write(b)
		case errors.Is(err, fs.ErrNotExist):
			h.Write([]byte{0})
		default:
			s.errs[name] = err
			h.Write([]byte{2})
			h.Write([]byte(err.Error()))
		}
	}
	h.Sum(s.hash[:0])
	return s
}

func (s *snapshot) path(name string) string { return filepath.Join(s.dir, name) }

func (s *snapshot) has(name string) bool {
	_, ok := s.data[name]
	return ok || s.errs[name] != nil
}

// read returns the file's bytes or an error naming it.
func (s *snapshot) read(name string) ([]byte, error) {
	if err := s.errs[name]; err != nil {
		return nil, err // already names the path
	}
	b, ok := s.data[name]
	if !ok {
		return nil, fmt.Errorf("%s: %w", s.path(name), fs.ErrNotExist)
	}
	return b, nil
}

func (s *snapshot) certs(name string) ([]*x509.Certificate, error) {
	b, err := s.read(name)
	if err != nil {
		return nil, err
	}
	certs, err := signer.ParseCertificatesPEM(b)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", s.path(name), err)
	}
	return certs, nil
}

func (s *snapshot) key(name string) (crypto.Signer, error) {
	b, err := s.read(name)
	if err != nil {
		return nil, err
	}
	k, err := keyfile.ParsePrivateKeyPEM(b)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", s.path(name), err)
	}
	return k, nil
}

// layout names the files of the layout present in the directory.
type layout struct {
	cert, key, chain, roots string // chain is "" in the tls layout (it follows the cert in tls.crt)
}

// Load reads and validates the CA in dir. Istio's cacerts layout is used when
// ca-cert.pem exists (as istiod does), otherwise the kubernetes.io/tls layout.
// The CA must match its key, be a CA allowed to sign certificates, chain to a
// root of the root file, and nothing may be expired at now; errors name the
// file at fault. Roots found in the chain are dropped from the response chain.
func Load(dir string, now func() time.Time) (*local.Signer, error) {
	return load(dir, now, providerKey{})
}

func load(dir string, now func() time.Time, pk providerKey) (*local.Signer, error) {
	s, err := build(readSnapshot(dir), now, pk)
	if err != nil {
		return nil, fmt.Errorf("intermediate: %w", err)
	}
	return s, nil
}

// providerKey names the CA key in a key provider (HSM, KMS), in place of
// the key file; the zero value means the key file.
type providerKey struct {
	keys *cakey.Provider
	uri  string
}

// keyCheckTimeout bounds the check, at load, that the provider's key is the
// CA certificate's.
const keyCheckTimeout = 10 * time.Second

// open returns the provider's key for cert. A key that is not cert's is
// refused; a provider that cannot be reached now is not (the CA reports
// Unavailable and readiness fails until it can).
func (pk providerKey) open(snap *snapshot, l layout, cert *x509.Certificate) (crypto.Signer, error) {
	if snap.has(l.key) {
		return nil, fmt.Errorf("%s exists, but the CA key is %s in the key provider: remove the file (a CA key on disk defeats the HSM)", snap.path(l.key), pk.uri)
	}
	k, err := pk.keys.Key(pk.uri, cert.PublicKey)
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(context.Background(), keyCheckTimeout)
	defer cancel()
	if err := k.Check(ctx); errors.Is(err, local.ErrKeyMismatch) {
		return nil, fmt.Errorf("%s is not the key of %s: %w", pk.uri, snap.path(l.cert), err)
	}
	return k, nil
}

func build(snap *snapshot, now func() time.Time, pk providerKey) (*local.Signer, error) {
	if now == nil {
		now = time.Now
	}
	var (
		l     layout
		cert  *x509.Certificate
		above []*x509.Certificate // cert's issuers upwards, possibly including roots
	)
	switch {
	case snap.has(CACertFile):
		l = layout{cert: CACertFile, key: CAKeyFile, chain: CertChainFile, roots: RootCertFile}
		certs, err := snap.certs(CACertFile)
		if err != nil {
			return nil, err
		}
		if len(certs) != 1 {
			return nil, fmt.Errorf("%s: holds %d certificates, want only the signing CA (its issuers go in %s)", snap.path(CACertFile), len(certs), CertChainFile)
		}
		cert = certs[0]
		// cert-chain.pem is optional: without it the CA is signed by a root directly.
		if snap.has(CertChainFile) {
			chain, err := snap.certs(CertChainFile)
			if err != nil {
				return nil, err
			}
			if !bytes.Equal(chain[0].Raw, cert.Raw) {
				return nil, fmt.Errorf("%s: must start with the certificate of %s", snap.path(CertChainFile), CACertFile)
			}
			above = chain[1:]
		}
	case snap.has(TLSCertFile):
		l = layout{cert: TLSCertFile, key: TLSKeyFile, roots: TLSCAFile}
		certs, err := snap.certs(TLSCertFile)
		if err != nil {
			return nil, err
		}
		cert, above = certs[0], certs[1:]
	default:
		return nil, fmt.Errorf("%s: neither %s (Istio cacerts layout) nor %s (kubernetes.io/tls layout) found", snap.dir, CACertFile, TLSCertFile)
	}

	var (
		key crypto.Signer
		err error
	)
	if pk.uri != "" {
		key, err = pk.open(snap, l, cert)
	} else {
		key, err = snap.key(l.key)
	}
	if err != nil {
		return nil, err
	}
	roots, err := snap.certs(l.roots)
	if err != nil {
		return nil, err
	}
	if err := local.KeyMatches(cert, key); err != nil {
		return nil, fmt.Errorf("%s does not match %s: %w", snap.path(l.key), snap.path(l.cert), err)
	}
	chainFile := l.chain
	if chainFile == "" {
		chainFile = l.cert
	}
	t := now()
	for _, group := range []struct {
		file  string
		certs []*x509.Certificate
	}{{l.cert, []*x509.Certificate{cert}}, {chainFile, above}, {l.roots, roots}} {
		for _, c := range group.certs {
			if t.Before(c.NotBefore) || t.After(c.NotAfter) {
				return nil, fmt.Errorf("%s: %w: %q valid %s to %s", snap.path(group.file), local.ErrExpired,
					c.Subject.String(), c.NotBefore.UTC().Format(time.RFC3339), c.NotAfter.UTC().Format(time.RFC3339))
			}
		}
	}
	var intermediates []*x509.Certificate
	for _, c := range above {
		if !signer.ContainsCertificate(roots, c) {
			intermediates = append(intermediates, c)
		}
	}
	s, err := local.New(local.Config{Cert: cert, Key: key, Intermediates: intermediates, Roots: roots, Now: now})
	switch {
	case err == nil:
		return s, nil
	case errors.Is(err, local.ErrUntrustedChain):
		return nil, fmt.Errorf("%s does not chain to a root of %s: %w", snap.path(chainFile), snap.path(l.roots), err)
	default:
		return nil, fmt.Errorf("%s: %w", snap.path(l.cert), err)
	}
}

// Log field names of this package.
const (
	logDir      = "dir"
	logError    = "error"
	logFile     = "file"
	logMode     = "mode"
	logSubject  = "ca_subject"
	logNotAfter = "ca_not_after"
	logInterval = "interval"
)

// Watch polls the files of dir every interval (DefaultWatchInterval if ≤ 0)
// until ctx ends. When their content changed (compared by hash, so symlink swaps
// and in-place rewrites are both caught) and the new set validates as in Load,
// it calls onChange once with the new signer; an invalid set is logged and no
// callback happens, so the current signer stays in use. Call it right after
// Load: the content at Watch's start is the baseline. It also warns when the
// key file is readable by group or others.
func Watch(ctx context.Context, dir string, interval time.Duration, logger *slog.Logger, onChange func(*local.Signer)) {
	watch(ctx, dir, interval, logger, providerKey{}, onChange)
}

// watch is Watch with the CA key in a key provider when pk names one.
func watch(ctx context.Context, dir string, interval time.Duration, logger *slog.Logger, pk providerKey, onChange func(*local.Signer)) {
	if interval <= 0 {
		interval = DefaultWatchInterval
	}
	w := newWatcher(dir, interval.String(), logger, pk, onChange)
	ticker := time.NewTicker(interval)
	defer ticker.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-ticker.C:
			w.poll()
		}
	}
}

// watcher is the state of Watch between polls.
type watcher struct {
	dir      string
	pk       providerKey
	logger   *slog.Logger
	onChange func(*local.Signer)
	last     [sha256.Size]byte
}

// newWatcher reads the baseline of dir and warns about its key's mode.
func newWatcher(dir, interval string, logger *slog.Logger, pk providerKey, onChange func(*local.Signer)) *watcher {
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	snap := readSnapshot(dir)
	warnKeyMode(logger, snap)
	logger.Debug("watching intermediate CA files", logDir, dir, logInterval, interval)
	return &watcher{dir: dir, pk: pk, logger: logger, onChange: onChange, last: snap.hash}
}

// poll reads dir once and hands over a changed set that validates.
func (w *watcher) poll() {
	snap := readSnapshot(w.dir)
	if snap.hash == w.last {
		return
	}
	// Remember even an invalid set, so it is reported once, not every tick,
	// and any later change (e.g. the second half of a non-atomic update) is retried.
	w.last = snap.hash
	s, err := build(snap, time.Now, w.pk)
	if err != nil {
		w.logger.Error("intermediate CA changed but the new material is invalid; keeping the current CA", logDir, w.dir, logError, err.Error())
		return
	}
	warnKeyMode(w.logger, snap)
	w.logger.Info("intermediate CA reloaded", logDir, w.dir, logSubject, s.Certificate().Subject.String(),
		logNotAfter, s.Certificate().NotAfter.UTC().Format(time.RFC3339))
	w.onChange(s)
}

// warnKeyMode warns about a key readable by group or others. It does not
// refuse: Kubernetes mounts Secrets 0644 unless defaultMode says otherwise.
func warnKeyMode(logger *slog.Logger, snap *snapshot) {
	for _, name := range []string{CAKeyFile, TLSKeyFile} {
		if mode, ok := snap.modes[name]; ok && mode&0o044 != 0 {
			logger.Warn("CA private key file is readable by group or others; set the Secret's defaultMode to 0400 or 0600",
				logFile, snap.path(name), logMode, fmt.Sprintf("%#o", mode))
		}
	}
}

// Source is the intermediate backend as the CA rotation manager runs it (it
// implements ca/rotation.External): the operator's CA in Dir, reloaded when
// the files change.
type Source struct {
	// Dir holds the CA in Istio's cacerts layout or the kubernetes.io/tls layout.
	Dir string
	// Interval is the polling period of Watch; zero means DefaultWatchInterval.
	Interval time.Duration
	// Logger reports reloads and invalid files; nil discards.
	Logger *slog.Logger
	// Now is the clock of Load; nil means time.Now.
	Now func() time.Time
	// Polls, if set, replaces the Interval ticker of Watch: Watch polls once
	// for each channel it receives and closes the channel when that poll is
	// done (tests drive the polls and wait for each).
	Polls <-chan chan struct{}
	// KeyURI, when set, names the CA's key in Keys (an HSM or KMS) in place
	// of the key file (ca-key.pem, tls.key), which must then be absent.
	KeyURI string
	// Keys is the key provider holding KeyURI.
	Keys *cakey.Provider
}

// providerKey is where the CA key is: KeyURI in Keys, or the key file.
func (s *Source) providerKey() providerKey { return providerKey{keys: s.Keys, uri: s.KeyURI} }

// Name returns Backend.
func (s *Source) Name() string { return Backend }

// Load reads and validates the CA in Dir (see Load); detail names it.
func (s *Source) Load() (*local.Signer, string, error) {
	if s.KeyURI != "" && s.Keys == nil {
		return nil, "", fmt.Errorf("intermediate: the CA key %s needs a key provider (keyProvider)", s.KeyURI)
	}
	ca, err := load(s.Dir, s.Now, s.providerKey())
	if err != nil {
		return nil, "", err
	}
	detail := "intermediate CA loaded from " + s.Dir + ": " + ca.Certificate().Subject.String()
	if s.KeyURI != "" {
		detail += " (key " + s.KeyURI + ")"
	}
	return ca, detail, nil
}

// Watch calls onChange with each new valid CA in Dir until ctx ends (see Watch).
func (s *Source) Watch(ctx context.Context, onChange func(ca *local.Signer, detail string)) {
	reloaded := func(ca *local.Signer) {
		onChange(ca, "intermediate CA reloaded from "+s.Dir+": "+ca.Certificate().Subject.String())
	}
	if s.Polls == nil {
		watch(ctx, s.Dir, s.Interval, s.Logger, s.providerKey(), reloaded)
		return
	}
	w := newWatcher(s.Dir, "driven", s.Logger, s.providerKey(), reloaded)
	for {
		select {
		case <-ctx.Done():
			return
		case done := <-s.Polls:
			w.poll()
			close(done)
		}
	}
}
