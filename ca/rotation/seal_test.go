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
	"fmt"
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

// withKEK configures kek as the replica's own KEK.
func withKEK(t *testing.T, kek []byte) option {
	return func(c *Config) { c.Sealer = mustSealer(t, kek) }
}

func mustSealer(t testing.TB, kek []byte) *Sealer {
	t.Helper()
	s, err := NewSealer(kek)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// FuzzOpenStoredKey: a stored key comes from the shared CA state, which
// whoever can write the database can change. Any blob opens or fails, never
// panics; a key URI is never taken for key material; and a blob that opens
// has sealings that sealedUnder reads.
func FuzzOpenStoredKey(f *testing.F) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		f.Fatal(err)
	}
	one := mustSealer(f, testKEK(1))
	both, second, err := one.Hold(testKEK(2))
	if err != nil {
		f.Fatal(err)
	}
	plain, _ := (*Sealer)(nil).Seal("01", key)
	sealed, _ := one.Seal("01", key)
	multiple, err := both.sealUnder([]string{second, one.ID()}, "01", key)
	if err != nil {
		f.Fatal(err)
	}
	for _, seed := range [][]byte{nil, {formatPlain}, {formatAESGCM}, {formatMultiple, 2}, {formatKeyURI}, keyRef("pkcs11:id=01;object=01"),
		plain, sealed, multiple, multiple[:len(multiple)-1], append([]byte{formatMultiple, 2, 0, 3}, keyRef("a:b")...)} {
		f.Add(seed)
	}
	f.Fuzz(func(t *testing.T, blob []byte) {
		for _, s := range []*Sealer{nil, one, both} {
			k, err := s.Open("01", blob)
			if isKeyRef(blob) {
				if !errors.Is(err, ErrKeyInProvider) {
					t.Fatalf("Open of the key URI %q: %v, want ErrKeyInProvider", blob, err)
				}
				continue
			}
			if err != nil {
				continue
			}
			ids, serr := sealedUnder(blob)
			if k == nil || serr != nil || len(ids) == 0 {
				t.Fatalf("opened %x (key %v) but its sealings do not read: %v %v", blob, k != nil, ids, serr)
			}
		}
	})
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

	// Sealings under two KEKs, as during a rekey: 1 (new) first, then 2.
	both, idNew, err := wrong.Hold(testKEK(1))
	if err != nil {
		t.Fatal(err)
	}
	two, err := both.sealUnder([]string{idNew, wrong.ID()}, "id1", key)
	if err != nil {
		t.Fatal(err)
	}
	// A store without a KEK being rekeyed: sealed under 1 and unencrypted.
	migrating, _, err := (*Sealer)(nil).Hold(testKEK(1))
	if err != nil {
		t.Fatal(err)
	}
	besidePlain, err := migrating.sealUnder([]string{idNew, ""}, "id1", key)
	if err != nil {
		t.Fatal(err)
	}
	firstFlipped := bytes.Clone(two)
	firstFlipped[2+2+40] ^= 1 // inside the first sealing's ciphertext
	nested := append([]byte{formatMultiple, 2, 0, byte(len(two))}, two...)
	nested = append(nested, 0, byte(len(sealed)))
	nested = append(nested, sealed...)

	for _, tc := range []struct {
		name    string
		sealer  *Sealer
		id      string
		blob    []byte
		wantErr error
	}{
		{"sealed, right KEK", right, "id1", sealed, nil},
		{"plain, no KEK", nil, "id1", plain, nil},
		{"plain with a KEK configured", right, "id1", plain, ErrUnsealed},
		{"wrong KEK", wrong, "id1", sealed, ErrWrongKEK},
		{"no KEK", nil, "id1", sealed, ErrNoKEK},
		{"moved to another CA's row", right, "id1x", sealed, ErrWrongKEK},
		{"tampered ciphertext", right, "id1", flipped, ErrWrongKEK},
		{"truncated", right, "id1", sealed[:10], ErrWrongKEK},
		{"two sealings, the new KEK only", right, "id1", two, nil},
		{"two sealings, the old KEK only", wrong, "id1", two, nil},
		{"two sealings, neither KEK", mustSealer(t, testKEK(3)), "id1", two, ErrWrongKEK},
		{"two sealings, no KEK", nil, "id1", two, ErrNoKEK},
		{"two sealings, the first tampered", right, "id1", firstFlipped, ErrWrongKEK},
		{"two sealings, truncated", wrong, "id1", two[:len(two)-5], ErrWrongKEK},
		{"two sealings, a count of one", wrong, "id1", append([]byte{formatMultiple, 1}, two[2:]...), ErrWrongKEK},
		{"nested sealings", wrong, "id1", nested, ErrWrongKEK},
		{"beside an unencrypted copy, KEK configured", right, "id1", besidePlain, ErrUnsealed},
		{"beside an unencrypted copy, no KEK configured", nil, "id1", besidePlain, nil},
		{"beside an unencrypted copy, no KEK configured but the new one held", migrating, "id1", besidePlain, nil},
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
	for name, blob := range map[string][]byte{"sealed": sealed, "two sealings": two} {
		if bytes.Contains(blob, der) || bytes.Contains(blob, der[len(der)-32:]) {
			t.Errorf("%s: the stored key contains its plaintext", name)
		}
	}
	if ids, err := sealedUnder(two); err != nil || fmt.Sprint(ids) != fmt.Sprint([]string{idNew, wrong.ID()}) {
		t.Errorf("sealedUnder = %v, %v; want [%s %s]", ids, err, idNew, wrong.ID())
	}
	if _, err := right.sealUnder([]string{""}, "id1", key); !errors.Is(err, ErrUnsealed) {
		t.Errorf("a replica with a KEK stored a key unencrypted: %v", err)
	}
	if _, err := right.sealUnder([]string{wrong.ID()}, "id1", key); !errors.Is(err, ErrKEKNotHeld) {
		t.Errorf("sealed under a KEK not held: %v", err)
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
// under the KEK, the KEK is nowhere in the data directory, and a wrong or
// missing KEK is refused.
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
	h := newHarnessIn(t, dataDir, nil, nil, withIntermediates, withKEK(t, readKEK))
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
		{"wrong KEK", []option{withKEK(t, testKEK(8))}, ErrWrongKEK},
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
