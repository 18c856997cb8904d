// Package cafile keeps the CA rotation state of a single Castellan process in
// one JSON file of its data directory (the embedded counterpart of the
// PostgreSQL CA tables). Every change is written atomically and fsynced, so a
// crash leaves either the old or the new state, never a mix.
package cafile

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/castellan-ca/castellan/internal/atomicfile"
	"github.com/castellan-ca/castellan/storage"
)

// Store is a CA state file. It is safe for concurrent use within one
// process; two processes must never share one file (use PostgreSQL).
type Store struct {
	path string
	mu   sync.Mutex
}

// Open returns the store at path, creating its directory 0700. The file
// itself appears (0600) with the first Save.
func Open(path string) (*Store, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, fmt.Errorf("cafile: %w", err)
	}
	return &Store{path: path}, nil
}

// Path returns the file's path.
func (s *Store) Path() string { return s.path }

// Load returns the stored state; Version 0 and no CAs when the file does not exist.
func (s *Store) Load(_ context.Context) (*storage.CAState, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.read()
}

func (s *Store) read() (*storage.CAState, error) {
	b, err := os.ReadFile(s.path)
	if errors.Is(err, fs.ErrNotExist) {
		return &storage.CAState{Dependents: map[string]time.Time{}}, nil
	}
	if err != nil {
		return nil, fmt.Errorf("cafile: %w", err)
	}
	var st storage.CAState
	if err := json.Unmarshal(b, &st); err != nil {
		return nil, fmt.Errorf("cafile: %s: %w", s.path, err)
	}
	if st.Dependents == nil {
		st.Dependents = map[string]time.Time{}
	}
	return &st, nil
}

// Save replaces the CAs when the stored version is still version, storing
// version+1; otherwise it returns storage.ErrConflict. Dependents are kept.
func (s *Store) Save(_ context.Context, version uint64, cas []storage.CARecord) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	st, err := s.read()
	if err != nil {
		return err
	}
	if st.Version != version {
		return fmt.Errorf("cafile: stored version %d, expected %d: %w", st.Version, version, storage.ErrConflict)
	}
	st.Version++
	st.CAs = cas
	return s.write(st)
}

// RaiseDependents records that certificates issued by keyID live until at
// least t; an earlier t than the stored one changes nothing.
func (s *Store) RaiseDependents(_ context.Context, keyID string, t time.Time) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	st, err := s.read()
	if err != nil {
		return err
	}
	if !t.After(st.Dependents[keyID]) {
		return nil
	}
	st.Dependents[keyID] = t.UTC()
	return s.write(st)
}

func (s *Store) write(st *storage.CAState) error {
	b, err := json.MarshalIndent(st, "", "  ")
	if err != nil {
		return fmt.Errorf("cafile: %w", err)
	}
	// Sealed keys are in the file: 0600, like every key file.
	if err := atomicfile.Write(s.path, append(b, '\n'), 0o600); err != nil {
		return fmt.Errorf("cafile: %w", err)
	}
	return nil
}
