package intermediate_test

import (
	"context"
	"crypto/rand"
	"errors"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/castellan-ca/castellan/internal/keyfile"
	"github.com/castellan-ca/castellan/signer"
	"github.com/castellan-ca/castellan/signer/cakey"
	"github.com/castellan-ca/castellan/signer/cakey/softhsmtest"
	"github.com/castellan-ca/castellan/signer/intermediate"
	"github.com/castellan-ca/castellan/signer/local"
	"github.com/castellan-ca/castellan/signer/signertest"
)

func TestMain(m *testing.M) { os.Exit(softhsmtest.Main(m)) }

// hsmCA is an operator's intermediate whose key was made in the token.
type hsmCA struct {
	tk     *softhsmtest.Token
	keys   *cakey.Provider
	uri    string
	root   *signertest.CA
	files  map[string][]byte // Istio's cacerts layout without ca-key.pem
	issuer *signertest.CA
}

func newHSMCA(t *testing.T) *hsmCA {
	t.Helper()
	tk := softhsmtest.Get(t)
	p := tk.Provider(t)
	id := make([]byte, 16)
	if _, err := rand.Read(id); err != nil {
		t.Fatal(err)
	}
	key, err := p.CreateKey(t.Context(), id, keyfile.KeyTypeECDSAP256)
	if err != nil {
		t.Fatal(err)
	}
	root := signertest.NewRoot(t, "root", signertest.CertOptions{})
	issuing := root.NewIntermediate(t, "issuing in the HSM", signertest.CertOptions{Key: key})
	files := map[string][]byte{
		intermediate.CACertFile:   []byte(signer.EncodePEM(issuing.Cert)),
		intermediate.RootCertFile: []byte(signer.EncodePEM(root.Cert)),
	}
	return &hsmCA{tk: tk, keys: p, uri: key.URI(), root: root, files: files, issuer: issuing}
}

// TestConformanceKeyURI: with its key in the token, named by URI in place
// of ca-key.pem, the intermediate passes the conformance suite, the
// token's removal being its outage.
func TestConformanceKeyURI(t *testing.T) {
	h := newHSMCA(t)
	dir := t.TempDir()
	writeFiles(t, dir, h.files)
	src := &intermediate.Source{Dir: dir, Keys: h.keys, KeyURI: h.uri}
	s, detail, err := src.Load()
	if err != nil {
		t.Fatalf("Load: %v", err)
	}
	if !strings.Contains(detail, h.uri) {
		t.Errorf("load detail %q does not name the key URI", detail)
	}
	signertest.Run(t, signertest.Factory{
		New:    func(*testing.T) signer.Signer { return s },
		Outage: func(t *testing.T, _ signer.Signer) func() { return h.tk.Remove(t) },
	})
	if err := s.Check(t.Context()); err != nil {
		t.Errorf("Check after the suite: %v", err)
	}
}

func TestKeyURIRefusals(t *testing.T) {
	h := newHSMCA(t)
	other := newHSMCA(t) // another key in the same token
	for _, tc := range []struct {
		name    string
		files   map[string][]byte
		src     func(dir string) *intermediate.Source
		wantErr error
		wantMsg string
	}{
		{
			name:  "key file beside the key URI",
			files: map[string][]byte{intermediate.CAKeyFile: keyPEM(t, signertest.NewRoot(t, "stray", signertest.CertOptions{}))},
			src: func(dir string) *intermediate.Source {
				return &intermediate.Source{Dir: dir, Keys: h.keys, KeyURI: h.uri}
			},
			wantMsg: "remove the file",
		},
		{
			name: "key URI of another key",
			src: func(dir string) *intermediate.Source {
				return &intermediate.Source{Dir: dir, Keys: h.keys, KeyURI: other.uri}
			},
			wantErr: local.ErrKeyMismatch,
		},
		{
			name: "key URI without a key provider",
			src: func(dir string) *intermediate.Source {
				return &intermediate.Source{Dir: dir, KeyURI: h.uri}
			},
			wantMsg: "needs a key provider",
		},
		{
			name: "key URI that is a file",
			src: func(dir string) *intermediate.Source {
				return &intermediate.Source{Dir: dir, Keys: h.keys, KeyURI: "/etc/ca-key.pem"}
			},
			wantMsg: "scheme is missing",
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			writeFiles(t, dir, h.files)
			writeFiles(t, dir, tc.files)
			_, _, err := tc.src(dir).Load()
			if err == nil {
				t.Fatal("Load succeeded")
			}
			if tc.wantErr != nil && !errors.Is(err, tc.wantErr) {
				t.Errorf("Load: err = %v, want %v", err, tc.wantErr)
			}
			if tc.wantMsg != "" && !strings.Contains(err.Error(), tc.wantMsg) {
				t.Errorf("Load: err = %v, want one saying %q", err, tc.wantMsg)
			}
		})
	}
}

// TestKeyURIProviderDown: the CA loads while the token is out (its key is
// known by URI), reports Unavailable, and signs once the token is back.
func TestKeyURIProviderDown(t *testing.T) {
	h := newHSMCA(t)
	dir := t.TempDir()
	writeFiles(t, dir, h.files)
	restore := h.tk.Remove(t)
	s, _, err := (&intermediate.Source{Dir: dir, Keys: h.keys, KeyURI: h.uri}).Load()
	if err != nil {
		t.Fatalf("Load with the token out: %v", err)
	}
	if err := s.Check(t.Context()); !errors.Is(err, signer.ErrSignerUnavailable) {
		t.Errorf("Check with the token out: err = %v, want ErrSignerUnavailable", err)
	}
	restore()
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	for err := s.Check(ctx); err != nil; err = s.Check(ctx) {
		if !errors.Is(err, signer.ErrSignerUnavailable) || ctx.Err() != nil {
			t.Fatalf("Check once the token is back: %v", err)
		}
		time.Sleep(softhsmtest.RetryInterval)
	}
}
