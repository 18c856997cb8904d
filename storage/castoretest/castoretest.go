// Package castoretest is the conformance suite every CA state store
// (storage/cafile, storage/postgres) passes.
package castoretest

import (
	"context"
	"errors"
	"reflect"
	"sync"
	"testing"
	"time"

	"github.com/castellan-ca/castellan/storage"
)

// Store is the CA state store contract (ca/rotation.Store).
type Store interface {
	Load(ctx context.Context) (*storage.CAState, error)
	Save(ctx context.Context, version uint64, cas []storage.CARecord) error
	RaiseDependents(ctx context.Context, keyID string, t time.Time) error
}

// Run checks the contract on stores made by open, each empty.
func Run(t *testing.T, open func(t *testing.T) Store) {
	ctx := context.Background()
	base := time.Date(2031, 2, 3, 4, 5, 6, 789000, time.UTC) // microsecond precision, as PostgreSQL keeps
	rec := func(id, phase string) storage.CARecord {
		return storage.CARecord{KeyID: id, Role: storage.RoleRoot, RootID: id, Source: storage.SourceManaged, Phase: phase,
			CertDER: []byte("der-" + id), SealedKey: []byte{1, 2, 3, 0, 255}, PreparedAt: base, ActivatedAt: base.Add(time.Hour)}
	}

	t.Run("empty", func(t *testing.T) {
		st, err := open(t).Load(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if st.Version != 0 || len(st.CAs) != 0 || len(st.Dependents) != 0 {
			t.Errorf("empty store: %+v", st)
		}
	})

	t.Run("save and load round-trip", func(t *testing.T) {
		s := open(t)
		retired := rec("b", storage.PhaseRetired)
		retired.SealedKey, retired.RetiredAt, retired.DeactivatedAt = nil, base.Add(3*time.Hour), base.Add(2*time.Hour)
		external := rec("c", storage.PhaseActive)
		external.Source, external.Role, external.RootID, external.SealedKey = storage.SourceExternal, storage.RoleIntermediate, "a", nil
		want := []storage.CARecord{rec("a", storage.PhaseActive), retired, external}
		if err := s.Save(ctx, 0, want); err != nil {
			t.Fatal(err)
		}
		st, err := s.Load(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if st.Version != 1 {
			t.Errorf("version %d after the first save, want 1", st.Version)
		}
		if !reflect.DeepEqual(normalize(st.CAs), normalize(want)) {
			t.Errorf("loaded\n%+v\nwant\n%+v", st.CAs, want)
		}
	})

	t.Run("stale version conflicts", func(t *testing.T) {
		s := open(t)
		if err := s.Save(ctx, 0, []storage.CARecord{rec("a", storage.PhaseActive)}); err != nil {
			t.Fatal(err)
		}
		for _, v := range []uint64{0, 2} {
			if err := s.Save(ctx, v, []storage.CARecord{rec("x", storage.PhaseActive)}); !errors.Is(err, storage.ErrConflict) {
				t.Errorf("Save with version %d: %v, want ErrConflict", v, err)
			}
		}
		if err := s.Save(ctx, 1, []storage.CARecord{rec("a", storage.PhasePrevious), rec("d", storage.PhaseActive)}); err != nil {
			t.Fatal(err)
		}
		st, _ := s.Load(ctx)
		if st.Version != 2 || len(st.CAs) != 2 {
			t.Errorf("after a second save: version %d, %d CAs", st.Version, len(st.CAs))
		}
	})

	t.Run("concurrent saves: exactly one wins", func(t *testing.T) {
		s := open(t)
		var wg sync.WaitGroup
		errs := make([]error, 8)
		for i := range errs {
			wg.Add(1)
			go func() {
				defer wg.Done()
				errs[i] = s.Save(ctx, 0, []storage.CARecord{rec(string(rune('a'+i)), storage.PhaseActive)})
			}()
		}
		wg.Wait()
		won := 0
		for _, err := range errs {
			switch {
			case err == nil:
				won++
			case !errors.Is(err, storage.ErrConflict):
				t.Errorf("Save: %v", err)
			}
		}
		if st, _ := s.Load(ctx); won != 1 || st.Version != 1 || len(st.CAs) != 1 {
			t.Errorf("%d saves won, version %d; want exactly one", won, st.Version)
		}
	})

	t.Run("dependents only rise and survive saves", func(t *testing.T) {
		s := open(t)
		for _, step := range []struct {
			id string
			t  time.Time
		}{{"a", base.Add(time.Hour)}, {"a", base}, {"b", base}, {"a", base.Add(2 * time.Hour)}} {
			if err := s.RaiseDependents(ctx, step.id, step.t); err != nil {
				t.Fatal(err)
			}
		}
		if err := s.Save(ctx, 0, []storage.CARecord{rec("a", storage.PhaseActive)}); err != nil {
			t.Fatal(err)
		}
		st, err := s.Load(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if !st.Dependents["a"].Equal(base.Add(2*time.Hour)) || !st.Dependents["b"].Equal(base) || len(st.Dependents) != 2 {
			t.Errorf("dependents %v", st.Dependents)
		}
	})
}

// normalize makes records comparable across stores: UTC times, nil for empty slices.
func normalize(in []storage.CARecord) []storage.CARecord {
	out := make([]storage.CARecord, len(in))
	for i, r := range in {
		for _, p := range []*time.Time{&r.PreparedAt, &r.ActivatedAt, &r.DeactivatedAt, &r.RetiredAt} {
			*p = p.UTC()
		}
		if len(r.SealedKey) == 0 {
			r.SealedKey = nil
		}
		out[i] = r
	}
	return out
}
