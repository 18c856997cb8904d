package intermediate_test

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/rsa"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"io/fs"
	"log/slog"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/castellan-ca/castellan/ca"
	"github.com/castellan-ca/castellan/signer"
	"github.com/castellan-ca/castellan/signer/intermediate"
	"github.com/castellan-ca/castellan/signer/local"
	"github.com/castellan-ca/castellan/signer/signertest"
)

// testPKI is root → mid → issuing, root → direct, and an unrelated root.
type testPKI struct {
	root, other, mid, issuing, direct *signertest.CA
}

func newPKI(t *testing.T) testPKI {
	t.Helper()
	root := signertest.NewRoot(t, "root", signertest.CertOptions{})
	mid := root.NewIntermediate(t, "mid", signertest.CertOptions{})
	return testPKI{
		root:    root,
		other:   signertest.NewRoot(t, "other root", signertest.CertOptions{}),
		mid:     mid,
		issuing: mid.NewIntermediate(t, "issuing", signertest.CertOptions{}),
		direct:  root.NewIntermediate(t, "direct", signertest.CertOptions{}),
	}
}

func certs(c ...*signertest.CA) []*x509.Certificate {
	var out []*x509.Certificate
	for _, x := range c {
		out = append(out, x.Cert)
	}
	return out
}

func without(files map[string][]byte, names ...string) map[string][]byte {
	for _, n := range names {
		delete(files, n)
	}
	return files
}

func with(files map[string][]byte, name string, data []byte) map[string][]byte {
	files[name] = data
	return files
}

func TestLoad(t *testing.T) {
	p := newPKI(t)
	rsaCA := p.root.NewIntermediate(t, "rsa", signertest.CertOptions{Key: signertest.LeafKeys()["rsa-2048"]})
	pkcs1 := pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(rsaCA.Key.(*rsa.PrivateKey))})
	sec1DER, err := x509.MarshalECPrivateKey(p.direct.Key.(*ecdsa.PrivateKey))
	if err != nil {
		t.Fatal(err)
	}
	sec1 := pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: sec1DER})

	tests := []struct {
		name      string
		files     map[string][]byte
		wantCA    *signertest.CA
		wantChain []*x509.Certificate // response intermediates
		wantRoots []*x509.Certificate
	}{
		{"cacerts chain without root", cacerts(t, material{p.issuing, certs(p.mid), certs(p.root)}),
			p.issuing, certs(p.issuing, p.mid), certs(p.root)},
		{"cacerts chain with root", cacerts(t, material{p.issuing, certs(p.mid, p.root), certs(p.root)}),
			p.issuing, certs(p.issuing, p.mid), certs(p.root)},
		{"cacerts several roots", cacerts(t, material{p.issuing, certs(p.mid, p.root), certs(p.other, p.root)}),
			p.issuing, certs(p.issuing, p.mid), certs(p.other, p.root)},
		{"cacerts without cert-chain.pem", without(cacerts(t, material{p.direct, nil, certs(p.root)}), intermediate.CertChainFile),
			p.direct, certs(p.direct), certs(p.root)},
		{"cacerts PKCS#1 RSA key", with(cacerts(t, material{rsaCA, nil, certs(p.root)}), intermediate.CAKeyFile, pkcs1),
			rsaCA, certs(rsaCA), certs(p.root)},
		{"cacerts SEC1 key", with(cacerts(t, material{p.direct, certs(p.root), certs(p.root)}), intermediate.CAKeyFile, sec1),
			p.direct, certs(p.direct), certs(p.root)},
		{"tls chain with root", tlsSecret(t, material{p.issuing, certs(p.mid, p.root), certs(p.root)}),
			p.issuing, certs(p.issuing, p.mid), certs(p.root)},
		{"tls certificate only", tlsSecret(t, material{p.direct, nil, certs(p.root)}),
			p.direct, certs(p.direct), certs(p.root)},
		{"tls several roots", tlsSecret(t, material{p.issuing, certs(p.mid), certs(p.root, p.other)}),
			p.issuing, certs(p.issuing, p.mid), certs(p.root, p.other)},
	}
	id := spiffeid.RequireFromString("spiffe://cluster.local/ns/a/sa/b")
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			writeFiles(t, dir, tc.files)
			s, err := intermediate.Load(dir, nil)
			if err != nil {
				t.Fatalf("Load: %v", err)
			}
			if !bytes.Equal(s.Certificate().Raw, tc.wantCA.Cert.Raw) {
				t.Errorf("Certificate() = %q, want %q", s.Certificate().Subject, tc.wantCA.Cert.Subject)
			}
			assertCerts(t, "trust bundle", s.TrustBundle(), tc.wantRoots)
			key := signertest.Key(0)
			now := time.Now()
			serial, _ := signer.NewSerial(bytes.NewReader(make([]byte, 16)))
			chain, err := s.Sign(t.Context(), signer.SignRequest{Template: ca.LeafTemplate(id, key.Public(), serial, now, now.Add(time.Hour)), PublicKey: key.Public(), Identity: id})
			if err != nil {
				t.Fatalf("Sign: %v", err)
			}
			assertCerts(t, "response chain", chain.Intermediates, tc.wantChain)
		})
	}
}

func assertCerts(t *testing.T, what string, got, want []*x509.Certificate) {
	t.Helper()
	if len(got) != len(want) {
		t.Errorf("%s holds %d certificates, want %d", what, len(got), len(want))
		return
	}
	for i := range want {
		if !bytes.Equal(got[i].Raw, want[i].Raw) {
			t.Errorf("%s[%d] = %q, want %q", what, i, got[i].Subject, want[i].Subject)
		}
	}
}

func TestLoadRefuses(t *testing.T) {
	p := newPKI(t)
	now := time.Now()
	expiredOpts := signertest.CertOptions{NotBefore: now.Add(-48 * time.Hour), NotAfter: now.Add(-time.Hour)}
	expiredCA := p.root.NewIntermediate(t, "expired", expiredOpts)
	expiredRoot := signertest.NewRoot(t, "expired root", expiredOpts)
	expiredMid := p.root.NewIntermediate(t, "expired mid", expiredOpts)
	underExpiredMid := expiredMid.NewIntermediate(t, "under expired mid", signertest.CertOptions{})
	notCA := p.root.NewIntermediate(t, "not a CA", signertest.CertOptions{Modify: func(c *x509.Certificate) { c.IsCA = false }})
	noCertSign := p.root.NewIntermediate(t, "no certSign", signertest.CertOptions{Modify: func(c *x509.Certificate) { c.KeyUsage = x509.KeyUsageDigitalSignature }})
	good := func() map[string][]byte { return cacerts(t, material{p.issuing, certs(p.mid), certs(p.root)}) }
	goodTLS := func() map[string][]byte { return tlsSecret(t, material{p.issuing, certs(p.mid), certs(p.root)}) }

	tests := []struct {
		name     string
		files    map[string][]byte
		wantFile string // the message must name it
		wantErr  error  // nil: only the file name is checked
	}{
		{"empty directory", map[string][]byte{}, "neither " + intermediate.CACertFile, nil},
		{"missing ca-key.pem", without(good(), intermediate.CAKeyFile), intermediate.CAKeyFile, fs.ErrNotExist},
		{"missing root-cert.pem", without(good(), intermediate.RootCertFile), intermediate.RootCertFile, fs.ErrNotExist},
		{"corrupt ca-key.pem", with(good(), intermediate.CAKeyFile, []byte("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")), intermediate.CAKeyFile, nil},
		{"corrupt ca-cert.pem", with(good(), intermediate.CACertFile, []byte("garbage")), intermediate.CACertFile, nil},
		{"key of another CA", with(good(), intermediate.CAKeyFile, keyPEM(t, p.mid)), intermediate.CAKeyFile, local.ErrKeyMismatch},
		{"not a CA", cacerts(t, material{notCA, nil, certs(p.root)}), intermediate.CACertFile, local.ErrNotCA},
		{"no certSign", cacerts(t, material{noCertSign, nil, certs(p.root)}), intermediate.CACertFile, local.ErrNotCA},
		{"chain to another root", cacerts(t, material{p.issuing, certs(p.mid), certs(p.other)}), intermediate.RootCertFile, local.ErrUntrustedChain},
		{"chain missing an intermediate", cacerts(t, material{p.issuing, nil, certs(p.root)}), intermediate.CertChainFile, local.ErrUntrustedChain},
		{"cert-chain.pem not starting with ca-cert.pem", with(good(), intermediate.CertChainFile, []byte(signer.EncodePEM(p.mid.Cert))), intermediate.CertChainFile, nil},
		{"ca-cert.pem with several certificates", with(good(), intermediate.CACertFile, []byte(signer.EncodePEM(p.issuing.Cert, p.mid.Cert))), intermediate.CACertFile, nil},
		{"expired CA", cacerts(t, material{expiredCA, nil, certs(p.root)}), intermediate.CACertFile, local.ErrExpired},
		{"expired intermediate", cacerts(t, material{underExpiredMid, certs(expiredMid), certs(p.root)}), intermediate.CertChainFile, local.ErrExpired},
		{"expired root", cacerts(t, material{p.issuing, certs(p.mid), certs(p.root, expiredRoot)}), intermediate.RootCertFile, local.ErrExpired},
		{"tls key of another CA", with(goodTLS(), intermediate.TLSKeyFile, keyPEM(t, p.mid)), intermediate.TLSKeyFile, local.ErrKeyMismatch},
		{"tls missing ca.crt", without(goodTLS(), intermediate.TLSCAFile), intermediate.TLSCAFile, fs.ErrNotExist},
		{"tls chain to another root", tlsSecret(t, material{p.issuing, certs(p.mid), certs(p.other)}), intermediate.TLSCAFile, local.ErrUntrustedChain},
		{"tls expired intermediate", tlsSecret(t, material{underExpiredMid, certs(expiredMid), certs(p.root)}), intermediate.TLSCertFile, local.ErrExpired},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			writeFiles(t, dir, tc.files)
			s, err := intermediate.Load(dir, nil)
			if err == nil || s != nil {
				t.Fatal("Load succeeded, want an error")
			}
			t.Logf("refused: %v", err)
			if !strings.Contains(err.Error(), tc.wantFile) {
				t.Errorf("err = %v, want it to name %s", err, tc.wantFile)
			}
			if tc.wantErr != nil && !errors.Is(err, tc.wantErr) {
				t.Errorf("err = %v, want one wrapping %v", err, tc.wantErr)
			}
		})
	}
}

// logRecorder keeps every log record so tests can wait for and count them.
type logRecorder struct {
	mu      sync.Mutex
	records []slog.Record
}

func (h *logRecorder) Enabled(context.Context, slog.Level) bool { return true }
func (h *logRecorder) WithAttrs([]slog.Attr) slog.Handler       { return h }
func (h *logRecorder) WithGroup(string) slog.Handler            { return h }
func (h *logRecorder) Handle(_ context.Context, r slog.Record) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.records = append(h.records, r.Clone())
	return nil
}

func (h *logRecorder) count(level slog.Level, msg string) int {
	h.mu.Lock()
	defer h.mu.Unlock()
	n := 0
	for _, r := range h.records {
		if r.Level == level && strings.Contains(r.Message, msg) {
			n++
		}
	}
	return n
}

// waitTimeout only turns a hang into a failure.
const waitTimeout = 10 * time.Second

// watcher runs a Watch whose polls the test drives.
type watcher struct {
	got   chan *local.Signer
	rec   *logRecorder
	polls chan chan struct{}
}

// startWatch runs Watch on dir until the test ends. It returns once Watch
// has read its baseline (and warned about the key's mode) and polled once.
func startWatch(t *testing.T, dir string) *watcher {
	t.Helper()
	w := &watcher{got: make(chan *local.Signer, 16), rec: &logRecorder{}, polls: make(chan chan struct{})}
	src := &intermediate.Source{Dir: dir, Logger: slog.New(w.rec), Polls: w.polls}
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan struct{})
	go func() {
		defer close(done)
		src.Watch(ctx, func(s *local.Signer, _ string) { w.got <- s })
	}()
	t.Cleanup(func() {
		cancel()
		select {
		case <-done:
		case <-time.After(waitTimeout):
			t.Error("Watch did not return after its context ended")
		}
	})
	w.poll(t)
	return w
}

// poll has Watch poll once and returns when that poll is done.
func (w *watcher) poll(t *testing.T) {
	t.Helper()
	done := make(chan struct{})
	select {
	case w.polls <- done:
	case <-time.After(waitTimeout):
		t.Fatal("Watch does not poll")
	}
	<-done
}

// expectSigner polls once and requires a callback with want.
func (w *watcher) expectSigner(t *testing.T, want *signertest.CA) {
	t.Helper()
	w.poll(t)
	select {
	case s := <-w.got:
		if !bytes.Equal(s.Certificate().Raw, want.Cert.Raw) {
			t.Fatalf("onChange got %q, want %q", s.Certificate().Subject, want.Cert.Subject)
		}
	default:
		t.Fatalf("no onChange for %q", want.Cert.Subject)
	}
}

// expectNoCallback polls twice (a change, then no change) and requires that
// nothing was handed over.
func (w *watcher) expectNoCallback(t *testing.T) {
	t.Helper()
	w.poll(t)
	w.poll(t)
	select {
	case s := <-w.got:
		t.Fatalf("unexpected onChange with %q", s.Certificate().Subject)
	default:
	}
}

func TestWatchSymlinkSwap(t *testing.T) {
	p := newPKI(t)
	next := p.root.NewIntermediate(t, "next", signertest.CertOptions{})
	dir := t.TempDir()
	swapFiles(t, dir, cacerts(t, material{p.direct, nil, certs(p.root)}), 0o600)
	if _, err := intermediate.Load(dir, nil); err != nil {
		t.Fatal(err)
	}
	w := startWatch(t, dir)
	w.expectNoCallback(t)

	swapFiles(t, dir, cacerts(t, material{next, nil, certs(p.root)}), 0o600)
	w.expectSigner(t, next)
	w.expectNoCallback(t)

	// A certificate with the wrong key: refused, logged once, no callback.
	swapFiles(t, dir, with(cacerts(t, material{p.direct, nil, certs(p.root)}), intermediate.CAKeyFile, keyPEM(t, next)), 0o600)
	w.expectNoCallback(t)
	if n := w.rec.count(slog.LevelError, "invalid"); n != 1 {
		t.Errorf("invalid set logged %d times, want once", n)
	}

	swapFiles(t, dir, cacerts(t, material{p.issuing, certs(p.mid, p.root), certs(p.root)}), 0o600)
	w.expectSigner(t, p.issuing)
	w.expectNoCallback(t)
}

func TestWatchInPlaceRewrite(t *testing.T) {
	p := newPKI(t)
	dir := t.TempDir()
	writeFiles(t, dir, tlsSecret(t, material{p.direct, nil, certs(p.root)}))
	w := startWatch(t, dir)

	// Files are rewritten one by one, with a poll after each: the
	// half-written state does not validate, so only the complete new set is
	// handed over.
	next := tlsSecret(t, material{p.issuing, certs(p.mid), certs(p.root)})
	writeFiles(t, dir, map[string][]byte{intermediate.TLSCertFile: next[intermediate.TLSCertFile]})
	w.expectNoCallback(t)
	writeFiles(t, dir, map[string][]byte{intermediate.TLSKeyFile: next[intermediate.TLSKeyFile]})
	w.expectSigner(t, p.issuing)
	writeFiles(t, dir, map[string][]byte{intermediate.TLSCAFile: next[intermediate.TLSCAFile]})
	w.expectNoCallback(t)
}

func TestWatchWarnsAboutKeyMode(t *testing.T) {
	tests := []struct {
		mode     os.FileMode
		wantWarn int
	}{{0o600, 0}, {0o400, 0}, {0o640, 1}, {0o644, 1}}
	p := newPKI(t)
	for _, tc := range tests {
		t.Run(tc.mode.String(), func(t *testing.T) {
			dir := t.TempDir()
			swapFiles(t, dir, cacerts(t, material{p.direct, nil, certs(p.root)}), tc.mode)
			w := startWatch(t, dir)
			if n := w.rec.count(slog.LevelWarn, "readable by group or others"); n != tc.wantWarn {
				t.Errorf("%d warnings, want %d", n, tc.wantWarn)
			}
		})
	}
}

func TestConformance(t *testing.T) {
	p := newPKI(t)
	layouts := []struct {
		name  string
		files map[string][]byte
	}{
		{"cacerts", cacerts(t, material{p.issuing, certs(p.mid, p.root), certs(p.other, p.root)})},
		{"tls", tlsSecret(t, material{p.direct, nil, certs(p.root)})},
	}
	for _, l := range layouts {
		t.Run(l.name, func(t *testing.T) {
			dir := t.TempDir()
			writeFiles(t, dir, l.files)
			signertest.Run(t, signertest.Factory{New: func(t *testing.T) signer.Signer {
				s, err := intermediate.Load(dir, nil)
				if err != nil {
					t.Fatal(err)
				}
				return s
			}})
		})
	}
}

// TestLoadAtClock shows the injected clock is what validity is checked against.
func TestLoadAtClock(t *testing.T) {
	p := newPKI(t)
	dir := t.TempDir()
	writeFiles(t, dir, cacerts(t, material{p.direct, nil, certs(p.root)}))
	later := func() time.Time { return p.direct.Cert.NotAfter.Add(time.Second) }
	if _, err := intermediate.Load(dir, later); !errors.Is(err, local.ErrExpired) {
		t.Fatalf("Load after expiry: err = %v, want ErrExpired", err)
	}
	if _, err := intermediate.Load(dir, time.Now); err != nil {
		t.Fatalf("Load now: %v", err)
	}
}
