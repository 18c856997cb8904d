package rotation

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/castellan-ca/castellan/ca"
	"github.com/castellan-ca/castellan/internal/adminapi"
	"github.com/castellan-ca/castellan/signer"
	"github.com/castellan-ca/castellan/storage"
)

// Audit reasons of rotation records (Kind operator).
const (
	ReasonRotate    = "ca.rotate"        // a phase change
	ReasonForced    = "ca.rotate.forced" // a phase change whose safety check was overridden
	ReasonBootstrap = "ca.bootstrap"     // first CA, import, layer or KEK change at start
	ReasonReload    = "ca.reload"        // the cacerts files changed
)

// scheduleCaller names the schedule in the audit records of its steps.
const scheduleCaller = "castellan (schedule)"

// refusal is a step refused in the current state; it matches ca.ErrPrecondition
// and its message is shown to the operator as is.
type refusal struct{ msg string }

func (r *refusal) Error() string        { return r.msg }
func (r *refusal) Is(target error) bool { return target == ca.ErrPrecondition }

func refused(format string, a ...any) error { return &refusal{msg: fmt.Sprintf(format, a...)} }

// change is a planned step: the next state and what it does.
type change struct {
	next    *view
	summary string
	// forced says which safety check force overrode; "" when none.
	forced string
}

// Rotate runs one step for an operator (ca.Rotation). The step is audited
// before it is saved, so no phase changes without a record; a refusal is
// audited too.
func (m *Manager) Rotate(ctx context.Context, req adminapi.RotateRequest) (*adminapi.RotationStatus, error) {
	return m.rotate(ctx, req, "")
}

// rotate runs req; keyID limits a retire to one CA (the schedule's use).
func (m *Manager) rotate(ctx context.Context, req adminapi.RotateRequest, keyID string) (*adminapi.RotationStatus, error) {
	method := "operator"
	if req.Caller == scheduleCaller {
		method = "internal"
	}
	for range maxAttempts {
		v, err := m.load(ctx)
		if err != nil {
			return nil, err
		}
		ch, err := m.plan(ctx, v, req, keyID, m.now())
		if err == nil {
			err = m.sealNew(v, ch.next)
		}
		if err != nil {
			var refusal auditEntry
			switch {
			case errors.Is(err, ca.ErrPrecondition):
				refusal = auditEntry{method: method, caller: req.Caller, outcome: storage.OutcomeRefused,
					reason: adminapi.ReasonRotationRefused, detail: describe(req) + ": refused: " + err.Error(), err: err}
			case errors.Is(err, signer.ErrSignerUnavailable):
				// The key provider (HSM, KMS) is down: a backend outage, audited as one.
				refusal = auditEntry{method: method, caller: req.Caller, outcome: storage.OutcomeFailed,
					reason: ca.ReasonSignerDown, detail: describe(req) + ": failed: " + err.Error(), err: ca.Refuse(ca.ErrUnavailable, ca.ReasonSignerDown, err)}
			}
			if refusal.method != "" {
				if aerr := m.record(ctx, refusal); aerr != nil {
					// Every operator action is audited, refusals too: one the
					// log cannot take fails as a storage error (Unavailable,
					// retry), like a step whose record fails. The refusal is
					// named, not wrapped, so that it is not taken for one.
					return nil, fmt.Errorf("rotation: audit of the refusal (%s): %w", err.Error(), aerr)
				}
			}
			return nil, err
		}
		e := auditEntry{method: method, caller: req.Caller, outcome: storage.OutcomeOK, reason: ReasonRotate, detail: describe(req) + ": " + ch.summary}
		if ch.forced != "" {
			e.reason, e.detail = ReasonForced, e.detail+"; FORCED past: "+ch.forced
		}
		if err := m.commit(ctx, v, ch.next, e); errors.Is(err, storage.ErrConflict) {
			continue
		} else if err != nil {
			return nil, err
		}
		m.cfg.Logger.Info("CA rotation step", "step", req.Step, "target", req.Target, "caller", req.Caller,
			"summary", ch.summary, "forced", ch.forced)
		if err := m.apply(ch.next); err != nil {
			return nil, err
		}
		st := m.status(ch.next)
		st.Summary = ch.summary
		if ch.forced != "" {
			st.Summary += " (forced past: " + ch.forced + ")"
		}
		return st, nil
	}
	return nil, fmt.Errorf("rotation: %s: %w", req.Step, storage.ErrConflict)
}

func describe(req adminapi.RotateRequest) string {
	s := "ca rotate " + req.Step + " " + req.Target
	if req.Force {
		s += " --force"
	}
	return s
}

// plan decides a step on v without side effects beyond generating keys.
func (m *Manager) plan(ctx context.Context, v *view, req adminapi.RotateRequest, keyID string, now time.Time) (*change, error) {
	if req.Target != adminapi.TargetRoot && req.Target != adminapi.TargetIntermediate {
		return nil, refused("unknown target %q: want %s or %s", req.Target, adminapi.TargetRoot, adminapi.TargetIntermediate)
	}
	switch req.Step {
	case adminapi.StepPrepare, adminapi.StepActivate:
		if m.generator == nil {
			return nil, refused("the %s backend's CA comes from its files: put the new chain into cacerts (add a new root to root-cert.pem first, so that it propagates before the chain under it is used); old roots stay trusted until their certificates expire", m.cfg.Backend.Name())
		}
		if req.Target == adminapi.TargetIntermediate && m.cfg.IntermediateLifetime == 0 {
			return nil, refused("there is no intermediate layer: the root signs workload certificates (set intermediateLifetime to issue through an intermediate)")
		}
		if req.Step == adminapi.StepPrepare {
			return m.prepare(ctx, v, req.Target, now)
		}
		return m.activate(v, req.Target, req.Force, now)
	case adminapi.StepRetire:
		return m.retire(v, req.Target, keyID, req.Force, now)
	}
	return nil, refused("unknown step %q: want %s, %s or %s", req.Step, adminapi.StepPrepare, adminapi.StepActivate, adminapi.StepRetire)
}

func (m *Manager) prepare(ctx context.Context, v *view, target string, now time.Time) (*change, error) {
	n := v.clone()
	if p := n.managed(target, storage.PhasePrepared); p != nil {
		return nil, refused("%s %s is already prepared: activate it first", target, p.KeyID)
	}
	root := n.managed(storage.RoleRoot, storage.PhaseActive)
	if root == nil {
		return nil, refused("there is no active root")
	}
	if target == adminapi.TargetIntermediate {
		rootKey, err := m.key(root)
		if err != nil {
			return nil, err
		}
		e, err := m.newIntermediate(ctx, root, rootKey, now)
		if err != nil {
			return nil, err
		}
		n.cas = append(n.cas, e)
		return &change{next: n, summary: fmt.Sprintf("prepared intermediate %s%s under root %s", e.KeyID, keyLocation(e), root.KeyID)}, nil
	}
	key, err := m.newKey(ctx)
	if err != nil {
		return nil, err
	}
	e, err := m.newRoot(key, now)
	if err != nil {
		return nil, err
	}
	n.cas = append(n.cas, e)
	summary := fmt.Sprintf("prepared root %s%s (in the trust bundle from now on)", e.KeyID, keyLocation(e))
	if m.cfg.IntermediateLifetime > 0 {
		ie, err := m.newIntermediate(ctx, e, key, now)
		if err != nil {
			return nil, err
		}
		n.cas = append(n.cas, ie)
		summary += fmt.Sprintf(" and intermediate %s%s under it", ie.KeyID, keyLocation(ie))
	}
	return &change{next: n, summary: summary}, nil
}

func (m *Manager) activate(v *view, target string, force bool, now time.Time) (*change, error) {
	n := v.clone()
	p := n.managed(target, storage.PhasePrepared)
	if p == nil {
		return nil, refused("no %s is prepared: run prepare first", target)
	}
	root := n.byID(p.RootID)
	if target == adminapi.TargetIntermediate && (root == nil || root.Phase != storage.PhaseActive) {
		return nil, refused("intermediate %s is under root %s, which is not active: activate the root", p.KeyID, p.RootID)
	}
	ch := &change{next: n}
	if at := m.activateAt(p); now.Before(at) {
		why := fmt.Sprintf("%s %s was prepared at %s; clients may lack it in their trust bundle until %s (propagation window %s)",
			target, p.KeyID, stamp(p.PreparedAt), stamp(at), m.cfg.PropagationWindow)
		if !force {
			return nil, refused("%s", why)
		}
		ch.forced = why
	}
	var did []string
	promote := func(e *entry) {
		e.Phase, e.ActivatedAt = storage.PhaseActive, now
		did = append(did, e.Role+" "+e.KeyID+" active")
	}
	demote := func(e *entry) {
		if e != nil {
			e.Phase, e.DeactivatedAt = storage.PhasePrevious, now
			did = append(did, e.Role+" "+e.KeyID+" previous")
		}
	}
	oldInter := n.managed(storage.RoleIntermediate, storage.PhaseActive)
	if target == adminapi.TargetRoot {
		oldRoot := n.managed(storage.RoleRoot, storage.PhaseActive)
		demote(oldRoot)
		promote(p)
		if m.cfg.IntermediateLifetime > 0 {
			var next *entry
			for _, e := range n.all(storage.SourceManaged, storage.RoleIntermediate, storage.PhasePrepared) {
				switch {
				case e.RootID == p.KeyID && next == nil:
					next = e
				default: // prepared under the old root: never issued, superseded
					retire(e, now)
					did = append(did, "intermediate "+e.KeyID+" retired unused")
				}
			}
			if next == nil {
				return nil, refused("root %s has no prepared intermediate under it: prepare the root again", p.KeyID)
			}
			demote(oldInter)
			promote(next)
		}
	} else {
		demote(oldInter)
		promote(p)
	}
	ch.summary = "issuance switched: " + strings.Join(did, ", ")
	return ch, nil
}

func (m *Manager) retire(v *view, target, only string, force bool, now time.Time) (*change, error) {
	n := v.clone()
	var (
		todo    []*entry
		blocked []string
	)
	for _, e := range n.all("", target, storage.PhasePrevious) {
		if only != "" && e.KeyID != only {
			continue
		}
		todo = append(todo, e)
		if at, why := m.retireAt(v, e); now.Before(at) {
			blocked = append(blocked, why)
		}
	}
	if len(todo) == 0 {
		return nil, refused("no previous %s to retire", target)
	}
	ch := &change{next: n}
	if len(blocked) > 0 {
		why := strings.Join(blocked, "; ") + ": retiring now breaks them"
		if !force {
			return nil, refused("%s", why)
		}
		ch.forced = why
	}
	var did []string
	kept := false // a key provider still holds a retired key
	drop := func(e *entry) {
		loc := keyLocation(e)
		kept = kept || loc != ""
		retire(e, now)
		did = append(did, e.KeyID+loc)
	}
	for _, e := range todo {
		drop(e)
		if e.Role == storage.RoleRoot {
			// CAs under a retired root cannot be trusted any more either.
			for _, c := range n.cas {
				if c.RootID == e.KeyID && c.KeyID != e.KeyID && c.Phase != storage.PhaseRetired && c.Phase != storage.PhaseActive {
					drop(c)
				}
			}
		}
	}
	ch.summary = "retired " + strings.Join(did, ", ")
	if kept {
		ch.summary += "; the key provider still holds their keys: delete them there once no longer needed"
	}
	if target == adminapi.TargetRoot {
		ch.summary += " (removed from the trust bundle)"
	}
	return ch, nil
}

// commit saves next in place of v, audited by e. With an AuditedStore the
// state and its record are one transaction. Otherwise the record is written
// first, so that no state change goes unrecorded; if the save then fails, a
// second record says so. On success next carries the new version.
//
// When that second record fails too, the log says a step was done that was
// not: the error names both failures and no longer wraps the save's (not
// even a conflict), so the step is not retried into a log that misleads.
func (m *Manager) commit(ctx context.Context, v, next *view, e auditEntry) error {
	for _, c := range next.cas {
		if c.Source == storage.SourceManaged && c.Phase != storage.PhaseRetired && len(c.SealedKey) == 0 {
			return fmt.Errorf("rotation: CA %s would be saved without its key", c.KeyID)
		}
	}
	var err error
	notApplied := ": not applied: "
	if as, ok := m.cfg.Store.(AuditedStore); ok {
		err = as.SaveAudited(ctx, v.version, next.records(), m.audit.Build(ctx, e.action(m)))
		if errors.Is(err, storage.ErrConflict) {
			return err // neither was stored: the caller plans again on the new state
		}
		// The state and its record commit together or not at all, but an
		// error can also be a COMMIT whose answer was lost: then both are
		// stored, and this record must not claim the step was not done.
		notApplied = ": not confirmed (applied exactly if this step's own record, outcome ok, is in the log): "
	} else {
		if err := m.record(ctx, e); err != nil {
			return fmt.Errorf("rotation: audit: %w", err)
		}
		err = m.cfg.Store.Save(ctx, v.version, next.records())
	}
	if err != nil {
		e.outcome, e.detail = storage.OutcomeFailed, e.detail+notApplied+err.Error()
		e.err = ca.Refuse(ca.ErrUnavailable, adminapi.ReasonCAStateDown, err)
		if aerr := m.record(ctx, e); aerr != nil {
			return fmt.Errorf("rotation: save CA state (%s); the audit record written before it says the step was done and could not be corrected: %w", err.Error(), aerr)
		}
		return fmt.Errorf("rotation: save CA state: %w", err)
	}
	next.version = v.version + 1
	return nil
}

// auditEntry is the variable part of a rotation audit record; method and
// caller are empty for steps Castellan takes itself.
type auditEntry struct {
	method, caller, outcome, reason, detail string
	// err is why the step was refused or failed; nil when it was done.
	err error
}

// record appends a Kind operator audit record through the CA's one
// operator-action path; a failure is logged there and returned.
func (m *Manager) record(ctx context.Context, e auditEntry) error {
	_, err := m.audit.Record(ctx, e.action(m))
	return err
}

// action is e as the CA's operator action.
func (e auditEntry) action(m *Manager) ca.Action {
	return ca.Action{Method: e.method, Caller: e.caller, Outcome: e.outcome, Reason: e.reason,
		Signer: m.cfg.Backend.Name(), Detail: e.detail, Err: e.err}
}

// stamp formats t for messages.
func stamp(t time.Time) string { return t.UTC().Format(time.RFC3339) }
