package rotation

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/castellan-ca/castellan/ca"
	"github.com/castellan-ca/castellan/internal/adminapi"
	"github.com/castellan-ca/castellan/storage"
)

// Leader runs fn on one replica at a time among those sharing a Store: fn's
// context ends when this replica stops leading. Run returns when ctx ends.
// Implementations: a PostgreSQL advisory lock (storage/postgres), a
// Kubernetes Lease (ca/publish.Election), Always for a single process.
type Leader interface {
	Run(ctx context.Context, fn func(ctx context.Context)) error
}

// Always is the Leader of a process that shares its store with nobody.
type Always struct{}

// Run calls fn(ctx).
func (Always) Run(ctx context.Context, fn func(ctx context.Context)) error {
	fn(ctx)
	return nil
}

// RunSchedule takes every due step, checking each PollInterval, until ctx
// ends. Run it on the leader only (Leader.Run(ctx, m.RunSchedule)); other
// replicas follow the state through Follow. Previous CAs are retired once
// nothing chains to them any more; with Schedule on, managed CAs are also
// prepared at ScheduleFraction of their lifetime and activated after the
// propagation window.
func (m *Manager) RunSchedule(ctx context.Context) {
	m.cfg.Logger.Info("CA rotation schedule running on this replica", "schedule", m.cfg.Schedule)
	t := time.NewTicker(m.cfg.PollInterval)
	defer t.Stop()
	for {
		if err := m.Tick(ctx); err != nil && ctx.Err() == nil {
			m.cfg.Logger.Error("CA rotation schedule", "error", err)
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// Tick takes the steps due now, one after the other.
func (m *Manager) Tick(ctx context.Context) error {
	for range maxAttempts {
		v, err := m.load(ctx)
		if err != nil {
			return err
		}
		req, keyID := m.due(v, m.now())
		if req == nil {
			return nil
		}
		if missing := m.missingKEKs(v); req.Step == adminapi.StepPrepare && len(missing) > 0 {
			// A rekey is under way and this leader could not seal the new
			// key for every replica: wait for the new KEK or the finish,
			// without an audit record every poll interval.
			m.warnOnce(v.version, "scheduled CA prepare waits: a KEK rekey is under way and this replica does not hold every KEK the CA keys are sealed under",
				"step", req.Target, "missing_kek_ids", kekList(missing))
			return nil
		}
		if _, err := m.rotate(ctx, *req, keyID); err != nil {
			if errors.Is(err, ca.ErrPrecondition) {
				// Another replica or an operator got there first.
				return nil
			}
			return fmt.Errorf("%s %s: %w", req.Step, req.Target, err)
		}
	}
	return nil
}

// due returns the first step due at now, or nil.
func (m *Manager) due(v *view, now time.Time) (*adminapi.RotateRequest, string) {
	step := func(s, target string) *adminapi.RotateRequest {
		return &adminapi.RotateRequest{Step: s, Target: target, Caller: scheduleCaller}
	}
	for _, e := range v.all("", "", storage.PhasePrevious) {
		// Managed CAs follow the schedule; external ones always leave once
		// unused: the operator already replaced them in the files.
		if at, _ := m.retireAt(v, e); (m.cfg.Schedule || e.Source == storage.SourceExternal) && !now.Before(at) {
			return step(adminapi.StepRetire, e.Role), e.KeyID
		}
	}
	if !m.cfg.Schedule || m.generator == nil {
		return nil, ""
	}
	for _, target := range []string{adminapi.TargetRoot, adminapi.TargetIntermediate} {
		if target == adminapi.TargetIntermediate && m.cfg.IntermediateLifetime == 0 {
			continue
		}
		if p := v.managed(target, storage.PhasePrepared); p != nil {
			root := v.byID(p.RootID)
			if !now.Before(m.activateAt(p)) && (target == adminapi.TargetRoot || (root != nil && root.Phase == storage.PhaseActive)) {
				return step(adminapi.StepActivate, target), ""
			}
			continue
		}
		if a := v.managed(target, storage.PhaseActive); a != nil && !now.Before(m.prepareAt(a)) {
			return step(adminapi.StepPrepare, target), ""
		}
	}
	return nil, ""
}
