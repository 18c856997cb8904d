package ca

import (
	"cmp"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"time"

	"github.com/castellan-ca/castellan/authn"
	"github.com/castellan-ca/castellan/signer"
	"github.com/castellan-ca/castellan/storage"
	"go.opentelemetry.io/otel/trace"
)

// DefaultAuditTimeout bounds an audit write when no timeout is configured.
const DefaultAuditTimeout = 5 * time.Second

// Who Castellan names in the records of the actions it takes itself.
const (
	internalMethod = "internal"
	internalCaller = "castellan"
)

// Auditor appends audit records under the CA's one timeout policy: the write
// is detached from the caller's context, so a caller that hangs up cannot
// undo the record of what was done for it, and bounded by Timeout, so a
// stalled store refuses the request instead of holding it forever. Every
// record the CA writes, workload or operator, goes through an Auditor.
type Auditor struct {
	// Log is the audit store.
	Log AuditLog
	// Timeout bounds each append; zero means DefaultAuditTimeout.
	Timeout time.Duration
	// Now and Rand stamp operator records; nil means time.Now and crypto/rand.
	Now  func() time.Time
	Rand io.Reader
	// Logger reports operator records that could not be appended; nil discards.
	Logger *slog.Logger
	// Metrics counts failed appends; nil counts nothing.
	Metrics *Metrics
	// Tracer, if set, traces each append (SpanAuditCommit); nil traces nothing.
	Tracer trace.Tracer
}

// Append appends rec under the timeout and counts a failure.
func (a *Auditor) Append(ctx context.Context, rec *storage.Record) error {
	ctx, span := startSpan(ctx, a.Tracer, SpanAuditCommit)
	actx, cancel := context.WithTimeout(context.WithoutCancel(ctx), cmp.Or(a.Timeout, DefaultAuditTimeout))
	defer cancel()
	err := a.Log.Append(actx, rec)
	if err != nil && a.Metrics != nil {
		a.Metrics.auditFailures.Inc()
	}
	if span != nil {
		var serr error
		if err != nil {
			serr = Refuse(ErrUnavailable, ReasonAuditDown, err)
		}
		endSpan(span, serr, AttrOutcome.String(rec.Outcome))
	}
	return err
}

// Action is one operator action for the audit log (DESIGN.md §5): a step an
// operator took through the admin API, or one Castellan took itself (a
// rotation step of the schedule, a reload, a certificate for its own use).
type Action struct {
	// Method and Caller say who acted; empty means Castellan itself.
	Method, Caller string
	// Reason is the audit reason code; empty means ReasonOf(Err).
	Reason string
	// Detail says what was done, for operators reading the log.
	Detail string
	// Signer names the signing backend involved, if any.
	Signer string
	// Chain is the certificate the action issued, if any; Identity the
	// identity it was granted.
	Chain    *signer.Chain
	Identity string
	// Outcome defaults to storage.OutcomeOK without Err and to
	// storage.OutcomeFailed with it; a step refused in the current state sets
	// storage.OutcomeRefused.
	Outcome string
	// Err is why the action failed (nil: it was done); its kind gives the
	// record's gRPC code, as Status maps it.
	Err error
}

// Record builds the audit record of act (Build) and appends it. It is the
// one way operator actions reach the audit log: the admin API's, the
// rotation manager's and Castellan's own. A failure is logged and returned
// with the record.
func (a *Auditor) Record(ctx context.Context, act Action) (*storage.Record, error) {
	rec := a.Build(ctx, act)
	if err := a.Append(ctx, rec); err != nil {
		logger := a.Logger
		if logger == nil {
			logger = slog.New(slog.DiscardHandler)
		}
		logger.Error("audit of an operator action failed", "request_id", rec.RequestID,
			"reason", rec.Reason, "detail", rec.Detail, "error", err)
		return rec, err
	}
	return rec, nil
}

// Build returns the audit record of act (Kind operator, with the peer and
// cluster of the call in ctx, if any) without appending it: for a store
// that commits it together with the change it records (the CA state).
func (a *Auditor) Build(ctx context.Context, act Action) *storage.Record {
	now, random := a.Now, a.Rand
	if now == nil {
		now = time.Now
	}
	if random == nil {
		random = rand.Reader
	}
	rec := &storage.Record{Time: now().UTC(), Kind: storage.KindOperator, RequestID: newRequestID(random),
		AuthMethod: cmp.Or(act.Method, internalMethod),
		Caller:     cmp.Or(act.Caller, internalCaller), Reason: act.Reason, Signer: act.Signer, GrantedIdentity: act.Identity,
		Detail: storage.Sanitize(act.Detail, storage.MaxDetailLen), Outcome: act.Outcome, Code: Status(act.Err).Code().String()}
	req := withConn(ctx, Request{})
	rec.Peer, rec.ClusterID = storage.Sanitize(req.Peer, storage.MaxNameLen), storage.Sanitize(req.ClusterID, storage.MaxNameLen)
	if act.Chain != nil {
		fillRecord(rec, act.Chain)
	}
	if act.Err == nil {
		rec.Outcome = cmp.Or(rec.Outcome, storage.OutcomeOK)
	} else {
		rec.Outcome, rec.Reason = cmp.Or(rec.Outcome, storage.OutcomeFailed), cmp.Or(rec.Reason, ReasonOf(act.Err))
	}
	return rec
}

// newRequestID returns the random id of one request or action in the audit log.
func newRequestID(r io.Reader) string {
	var b [12]byte
	if _, err := io.ReadFull(r, b[:]); err != nil {
		return "unknown"
	}
	return hex.EncodeToString(b[:])
}

// Operator authenticates the caller of an admin call and requires operator
// credentials: the one gate of every admin RPC.
func (is *Issuer) Operator(ctx context.Context) (*authn.Caller, error) {
	caller, err := is.authenticate(ctx)
	if err != nil {
		return nil, err
	}
	if err := requireOperator(caller); err != nil {
		return nil, err
	}
	return caller, nil
}

// authenticate proves who the caller is and classifies a failure: no
// credentials and bad credentials are the caller's (Unauthenticated), an
// authenticator that cannot answer is ours (Unavailable, worth a retry).
func (is *Issuer) authenticate(ctx context.Context) (*authn.Caller, error) {
	ctx, span := startSpan(ctx, is.tracer, SpanAuthenticate)
	if span != nil {
		defer endOnPanic(span)
	}
	caller, err := is.authenticateCaller(ctx)
	if span != nil {
		method := ""
		if f := (*authn.Failure)(nil); errors.As(err, &f) {
			method = f.Method
		} else if caller != nil {
			method = caller.Method
		}
		endSpan(span, err, AttrAuthMethod.String(method))
	}
	return caller, err
}

// authenticateCaller asks the Authenticator and classifies its failure.
func (is *Issuer) authenticateCaller(ctx context.Context) (*authn.Caller, error) {
	caller, err := is.cfg.Authenticator.Authenticate(ctx)
	switch {
	case err == nil:
		return caller, nil
	case errors.Is(err, authn.ErrNoCredentials):
		is.adm.chargePeer(ctx)
		return nil, Refuse(ErrUnauthenticated, ReasonNoCredentials, err)
	case errors.Is(err, authn.ErrUnavailable):
		return nil, Refuse(ErrUnavailable, ReasonAuthnDown, err)
	default:
		is.adm.chargePeer(ctx) // the peer's fault: its address pays (Admission)
		return nil, Refuse(ErrUnauthenticated, ReasonAuthnFailed, err)
	}
}

func requireOperator(caller *authn.Caller) error {
	if !caller.Operator {
		return Refuse(ErrPermissionDenied, ReasonNotOperator, fmt.Errorf("%s is not an operator", caller.Name))
	}
	return nil
}
