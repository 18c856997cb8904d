package cafile

import (
	"context"
	"os"
	"path/filepath"
	"testing"

	"github.com/castellan-ca/castellan/storage"
	"github.com/castellan-ca/castellan/storage/castoretest"
)

func TestConformance(t *testing.T) {
	castoretest.Run(t, func(t *testing.T) castoretest.Store {
		s, err := Open(filepath.Join(t.TempDir(), "ca", "state.json"))
		if err != nil {
			t.Fatal(err)
		}
		return s
	})
}

func TestFileModes(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "ca")
	s, err := Open(filepath.Join(dir, "state.json"))
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Save(context.Background(), 0, []storage.CARecord{{KeyID: "a", SealedKey: []byte{0}}}); err != nil {
		t.Fatal(err)
	}
	for path, want := range map[string]os.FileMode{dir: os.ModeDir | 0o700, s.Path(): 0o600} {
		fi, err := os.Stat(path)
		if err != nil {
			t.Fatal(err)
		}
		if fi.Mode() != want {
			t.Errorf("%s: mode %v, want %v", path, fi.Mode(), want)
		}
	}
}
