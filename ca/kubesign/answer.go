package kubesign

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/castellan-ca/castellan/ca"
	"k8s.io/apimachinery/pkg/types"
)

// errAnswered: the object was answered, or deleted, by someone else
// meanwhile; what this process had for it is not delivered.
var errAnswered = errors.New("request answered or deleted meanwhile")

// target is one request object being answered: what the pipeline is asked,
// and how its answer is written into the object's status.
type target interface {
	// id names the object in logs; uid identifies it.
	id() string
	uid() types.UID
	// signerName is the signer the request addresses, for the metrics.
	signerName() string
	// since is when the request became answerable (created, or approved).
	since() time.Time
	// grant is the pipeline request.
	grant() ca.GrantRequest
	// issue writes out as the answer; errAnswered when someone else answered.
	issue(ctx context.Context, out *ca.Issued) error
	// refuse writes the refusal err (fail: Failed rather than Denied) and
	// returns the condition reason it wrote; errAnswered as for issue.
	refuse(ctx context.Context, err error, fail bool) (string, error)
}

// answerer answers targets through the pipeline, once each: what
// PodCertificates and CSRSigners share.
type answerer struct {
	api     string
	issuer  Issuer
	answers *answers
	metrics *Metrics
	logger  *slog.Logger
	now     func() time.Time
	// retryWindow bounds retries after transient failures, from since.
	retryWindow time.Duration
	// reusable reports whether a certificate whose status write failed may
	// still be written (a PodCertificateRequest's notBefore must be recent).
	reusable func(out *ca.Issued, now time.Time) bool
}

// newAnswerer gives the settings both signers share their defaults (in
// place, so the signer runs with the values its answerer has) and returns
// the answerer of api: a nil reusable means a certificate is written again
// whenever its status write failed.
func newAnswerer(api string, issuer Issuer, metrics *Metrics, workers *int, retryWindow *time.Duration,
	logger **slog.Logger, now *func() time.Time) *answerer {
	if *workers <= 0 {
		*workers = DefaultWorkers
	}
	if *retryWindow <= 0 {
		*retryWindow = DefaultRetryWindow
	}
	if *logger == nil {
		*logger = slog.New(slog.DiscardHandler)
	}
	*logger = (*logger).With("component", api+"s")
	if *now == nil {
		*now = time.Now
	}
	return &answerer{api: api, issuer: issuer, answers: newAnswers(*now), metrics: metrics, logger: *logger,
		now: *now, retryWindow: *retryWindow}
}

// respond answers t; true means try again later. A certificate or refusal
// whose status write failed is kept and written again, so one request gets
// one audited answer, not one per attempt.
func (a *answerer) respond(ctx context.Context, t target) bool {
	now := a.now()
	out, refusal := a.pending(ctx, t, now)
	if out == nil && refusal == nil {
		out, refusal = a.issuer.IssueGrant(ctx, t.grant())
		if refusal != nil && judge(refusal) == retry {
			if now.Before(t.since().Add(a.retryWindow)) {
				a.metrics.count(a.api, t.signerName(), outcomeRetried, time.Time{}, now)
				a.logger.Warn("certificate request not signed; retrying", "request", t.id(), "error", refusal)
				return true
			}
			refusal = ca.Refuse(ca.ErrInternal, reasonRetriesExhausted, fmt.Errorf("no certificate within %s: %w", a.retryWindow, refusal))
		}
	}
	if out != nil {
		err := t.issue(ctx, out)
		switch {
		case err == nil:
			a.answers.finish(t.uid())
			a.metrics.count(a.api, t.signerName(), outcomeIssued, t.since(), a.now())
			a.logger.Debug("certificate request answered", "request", t.id(), "serial", out.Record.Serial)
			return false
		case errors.Is(err, errAnswered):
			a.answers.finish(t.uid())
			a.issuer.Undelivered(ctx, out, err)
			a.metrics.count(a.api, t.signerName(), outcomeUndelivered, time.Time{}, a.now())
			return false
		}
		a.answers.keep(t.uid(), pendingAnswer{out: out, signer: t.signerName(), at: now})
		a.logger.Warn("certificate not written into the request; retrying with the same certificate", "request", t.id(), "error", err)
		return true
	}
	fail := judge(refusal) == failed
	reason, err := t.refuse(ctx, refusal, fail)
	if err != nil && !errors.Is(err, errAnswered) {
		a.answers.keep(t.uid(), pendingAnswer{refusal: refusal, signer: t.signerName(), at: now})
		a.logger.Warn("refusal not written into the request; retrying", "request", t.id(), "error", err)
		return true
	}
	a.answers.finish(t.uid())
	outcome := outcomeDenied
	if fail {
		outcome = outcomeFailed
	}
	a.metrics.count(a.api, t.signerName(), outcome, t.since(), a.now())
	a.logger.Info("certificate request refused", "request", t.id(), "outcome", outcome, "reason", reason, "error", refusal)
	return false
}

// abandon records every certificate still waiting for its status write as
// undelivered: this process stops answering (it no longer leads), and the
// next leader signs such requests afresh.
func (a *answerer) abandon() {
	for _, p := range a.answers.drain() {
		if p.out != nil {
			ctx, cancel := context.WithTimeout(context.Background(), finishTimeout)
			a.issuer.Undelivered(ctx, p.out, errors.New("status not written before this replica stopped leading"))
			cancel()
			a.metrics.count(a.api, p.signer, outcomeUndelivered, time.Time{}, a.now())
		}
	}
}

// pending returns the answer an earlier attempt got for t but could not
// write, if it may still be written; an expired certificate is recorded as
// undelivered.
func (a *answerer) pending(ctx context.Context, t target, now time.Time) (*ca.Issued, error) {
	p, ok := a.answers.take(t.uid())
	switch {
	case !ok:
		return nil, nil
	case p.out == nil:
		return nil, p.refusal
	case a.reusable == nil || a.reusable(p.out, now):
		return p.out, nil
	}
	a.issuer.Undelivered(ctx, p.out, errors.New("status not written in time"))
	a.metrics.count(a.api, t.signerName(), outcomeUndelivered, time.Time{}, now)
	return nil, nil
}

// answers remembers, per request UID, what this process answered: requests
// whose answer is written, so that a cache that has not seen the write yet
// never gets a second answer, and answers whose status write failed, so that
// the retry writes the same one instead of asking the pipeline again.
type answers struct {
	mu      sync.Mutex
	done    map[types.UID]time.Time
	pending map[types.UID]pendingAnswer
	swept   time.Time
	now     func() time.Time
}

// pendingAnswer is an answer not yet written: a certificate or a refusal.
type pendingAnswer struct {
	out     *ca.Issued
	refusal error
	signer  string
	at      time.Time
}

// answersTTL is how long a written answer is remembered: longer than an
// informer takes to see it (and than a PodCertificateRequest lives).
const answersTTL = time.Hour

func newAnswers(now func() time.Time) *answers {
	return &answers{done: map[types.UID]time.Time{}, pending: map[types.UID]pendingAnswer{}, now: now}
}

// answered reports whether uid's answer was written by this process.
func (a *answers) answered(uid types.UID) bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	_, ok := a.done[uid]
	return ok
}

// finish records uid as answered, dropping any pending answer, and, once
// a minute, forgets answers older than answersTTL.
func (a *answers) finish(uid types.UID) {
	a.mu.Lock()
	defer a.mu.Unlock()
	now := a.now()
	delete(a.pending, uid)
	a.done[uid] = now
	if now.Sub(a.swept) < time.Minute {
		return
	}
	a.swept = now
	for k, t := range a.done {
		if now.Sub(t) > answersTTL {
			delete(a.done, k)
		}
	}
	for k, p := range a.pending {
		if now.Sub(p.at) > answersTTL {
			delete(a.pending, k)
		}
	}
}

// keep remembers an answer whose status write failed.
func (a *answers) keep(uid types.UID, p pendingAnswer) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.pending[uid] = p
}

// drain returns and forgets every pending answer.
func (a *answers) drain() []pendingAnswer {
	a.mu.Lock()
	defer a.mu.Unlock()
	out := make([]pendingAnswer, 0, len(a.pending))
	for uid, p := range a.pending {
		out = append(out, p)
		delete(a.pending, uid)
	}
	return out
}

// take returns and forgets uid's pending answer, if any.
func (a *answers) take(uid types.UID) (pendingAnswer, bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	p, ok := a.pending[uid]
	delete(a.pending, uid)
	return p, ok
}
