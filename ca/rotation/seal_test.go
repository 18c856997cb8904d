package rotation

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/base64"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/castellan-ca/castellan/ca"
	"github.com/castellan-ca/castellan/internal/adminapi"
	"github.com/castellan-ca/castellan/signer/selfsigned"
	"github.com/castellan-ca/castellan/storage"
)

func testKEK(b byte) []byte { return bytes.Repeat([]byte{b}, KEKSize) }

func mustSealer(t *testing.T, kek []byte) *Sealer {
	t.Helper()
	s, err := NewSealer(kek)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func TestSealOpen(t *testing.T) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	right, wrong := mustSealer(t, testKEK(1)), mustSealer(t, testKEK(2))
	sealed, err := right.Seal("id1", key)
	if err != nil {
		t.Fatal(err)
	}
	plain, err := (*Sealer)(nil).Seal("id1", key)
	if err != nil {
		t.Fatal(err)
	}
	flipped := bytes.Clone(sealed)
	flipped[len(flipped)-1] ^= 1
	for _, tc := range []struct {
		name    string
		sealer  *Sealer
		id      string
		blob    []byte
		wantErr error
	}{
		{"sealed, right KEK", right, "id1", sealed, nil},
		{"plain, no KEK", nil, "id1", plain, nil},
		{"plain read with a KEK (before resealing)", right, "id1", plain, nil},
		{"wrong KEK", wrong, "id1", sealed, ErrWrongKEK},
		{"no KEK", nil, "id1", sealed, ErrNoKEK},
		{"moved to another CA's row", right, "id2", sealed, ErrWrongKEK},
		{"tampered ciphertext", right, "id1", flipped, ErrWrongKEK},
		{"truncated", right, "id1", sealed[:10], ErrWrongKEK},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := tc.sealer.Open(tc.id, tc.blob)
			if !errors.Is(err, tc.wantErr) {
				t.Fatalf("Open: %v, want %v", err, tc.wantErr)
			}
			if err == nil && !key.Equal(got) {
				t.Errorf("Open returned another key")
			}
		})
	}
	der, _ := x509.MarshalPKCS8PrivateKey(key)
	if bytes.Contains(sealed, der) || bytes.Contains(sealed, der[len(der)-32:]) {
		t.Errorf("the sealed key contains its plaintext")
	}
}

func TestReadKEKFile(t *testing.T) {
	dir := t.TempDir()
	kek := testKEK(7)
	for _, tc := range []struct {
		name    string
		content []byte
		wantErr bool
	}{
		{"raw bytes", kek, false},
		{"base64 with newline (kubectl --from-literal)", []byte(base64.StdEncoding.EncodeToString(kek) + "\n"), false},
		{"too short", kek[:16], true},
		{"not base64", []byte(strings.Repeat("z", 45)), true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := filepath.Join(dir, strings.ReplaceAll(tc.name, " ", "_"))
			if err := os.WriteFile(p, tc.content, 0o600); err != nil {
				t.Fatal(err)
			}
			got, err := ReadKEKFile(p)
			if (err != nil) != tc.wantErr {
				t.Fatalf("ReadKEKFile: %v, want error %v", err, tc.wantErr)
			}
			if err == nil && !bytes.Equal(got, kek) {
				t.Errorf("read %x, want %x", got, kek)
			}
			if err != nil && strings.Contains(err.Error(), string(tc.content)) {
				t.Errorf("the error echoes the file's content: %v", err)
			}
		})
	}
}

// TestKeysEncryptedAtRest checks the stored state: every key is ciphertext
// under the KEK, the KEK is nowhere in the data directory, a wrong or
// missing KEK is refused, and keys stored before a KEK was set get sealed.
func TestKeysEncryptedAtRest(t *testing.T) {
	kekDir, dataDir := t.TempDir(), t.TempDir()
	kek := testKEK(9)
	if err := os.WriteFile(filepath.Join(kekDir, "kek"), kek, 0o600); err != nil {
		t.Fatal(err)
	}
	readKEK, err := ReadKEKFile(filepath.Join(kekDir, "kek"))
	if err != nil {
		t.Fatal(err)
	}
	withKEK := func(k []byte) option { return func(c *Config) { c.Sealer = mustSealer(t, k) } }

	// Start without a KEK, as an existing installation would, then set one.
	h := newHarnessIn(t, dataDir, nil, nil, withIntermediates)
	h = newHarnessIn(t, dataDir, h.store, h.clock, withIntermediates, withKEK(readKEK))
	if recs := h.audit.since(0); len(recs) != 1 || !strings.Contains(recs[0].Detail, "sealed key of") {
		t.Errorf("setting a KEK did not reseal the stored keys: %+v", recs)
	}
	h.mustRotate(t, adminapi.StepPrepare, adminapi.TargetRoot, false)
	h.issue(t)

	st, err := h.store.Load(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	file, err := os.ReadFile(filepath.Join(dataDir, "ca", "state.json"))
	if err != nil {
		t.Fatal(err)
	}
	sealer := mustSealer(t, kek)
	for _, r := range st.CAs {
		if r.Phase == storage.PhaseRetired {
			continue
		}
		if len(r.SealedKey) == 0 || r.SealedKey[0] != formatAESGCM {
			t.Errorf("CA %s: stored key is not AES-GCM ciphertext", r.KeyID)
		}
		key, err := sealer.Open(r.KeyID, r.SealedKey)
		if err != nil {
			t.Fatalf("CA %s: %v", r.KeyID, err)
		}
		der, _ := x509.MarshalPKCS8PrivateKey(key)
		for _, enc := range [][]byte{der, []byte(base64.StdEncoding.EncodeToString(der))} {
			if bytes.Contains(file, enc) {
				t.Errorf("CA %s: the state file holds its private key in clear", r.KeyID)
			}
		}
	}
	// The KEK is never written beside the data, in any encoding.
	err = filepath.WalkDir(dataDir, func(path string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		b, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		for _, enc := range [][]byte{kek, []byte(base64.StdEncoding.EncodeToString(kek))} {
			if bytes.Contains(b, enc) {
				t.Errorf("%s contains the KEK", path)
			}
		}
		if strings.HasSuffix(path, selfsigned.KeyFile) {
			t.Errorf("%s: a plaintext key file was written", path)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}

	for _, tc := range []struct {
		name string
		opts []option
		want error
	}{
		{"wrong KEK", []option{withKEK(testKEK(8))}, ErrWrongKEK},
		{"no KEK", nil, ErrNoKEK},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := Config{Authority: ca.NewAuthority(), Store: h.store, Audit: &auditLog{}, Backend: generator(t, ""),
				IntermediateLifetime: 48 * time.Hour, Now: h.clock.Now}
			for _, o := range tc.opts {
				o(&cfg)
			}
			m, err := New(cfg)
			if err != nil {
				t.Fatal(err)
			}
			if err := m.Bootstrap(context.Background()); !errors.Is(err, tc.want) {
				t.Errorf("Bootstrap: %v, want %v", err, tc.want)
			}
			if m.cfg.Authority.Current() != nil {
				t.Errorf("a CA was put to use without its key")
			}
		})
	}
}
