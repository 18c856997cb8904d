package ca

import (
	"context"

	"github.com/castellan-ca/castellan/storage"
	"go.opentelemetry.io/otel/attribute"
	otelcodes "go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/trace"
)

// Span names of the pipeline's steps (README "Tracing"). Each is a child of
// the span of the call that runs the pipeline (otelgrpc's server span).
const (
	// SpanAuthenticate covers the Authenticator chain (TokenReview, OIDC key
	// fetch, client certificate verification).
	SpanAuthenticate = "castellan.authenticate"
	// SpanSign covers the signing backend's Sign call.
	SpanSign = "castellan.sign"
	// SpanAuditCommit covers one record's wait for its durable commit: the
	// group-commit transaction that carries it may carry other requests'
	// records too (storage/groupcommit.AttrBatchRecords says how many).
	SpanAuditCommit = "castellan.audit.commit"
	// SpanIssue is the span of a pipeline run that no traced call started
	// (the Kubernetes signers' requests, Castellan's own certificates), so
	// that its steps still share one trace.
	SpanIssue = "castellan.issue"
)

// Attribute keys the pipeline sets. Values are codes and names Castellan
// chose (reason codes, backend names, request ids), never what a caller
// sent: no token, CSR, key, certificate or error text reaches a span.
const (
	AttrRequestID  = attribute.Key("castellan.request_id")
	AttrOutcome    = attribute.Key("castellan.outcome")
	AttrReason     = attribute.Key("castellan.reason")
	AttrAuthMethod = attribute.Key("castellan.auth.method")
	AttrSigner     = attribute.Key("castellan.signer.backend")
	AttrPurpose    = attribute.Key("castellan.purpose")
)

// tracerName is the instrumentation scope of the pipeline's spans.
const tracerName = "github.com/castellan-ca/castellan/ca"

// newTracer returns the pipeline's tracer, nil when tracing is off.
func newTracer(tp trace.TracerProvider) trace.Tracer {
	if tp == nil {
		return nil
	}
	return tp.Tracer(tracerName)
}

// startSpan starts the step name as a child of ctx's span. With tracing off
// (t nil) it returns ctx and a nil span, at the cost of a nil check.
func startSpan(ctx context.Context, t trace.Tracer, name string) (context.Context, trace.Span) {
	if t == nil {
		return ctx, nil
	}
	return t.Start(ctx, name)
}

// startRun starts a SpanIssue span when tracing is on and ctx carries no
// span (nil otherwise: the call's span is the run's).
func (is *Issuer) startRun(ctx context.Context, attrs ...attribute.KeyValue) (context.Context, trace.Span) {
	if is.tracer == nil || trace.SpanContextFromContext(ctx).IsValid() {
		return ctx, nil
	}
	return is.tracer.Start(ctx, SpanIssue, trace.WithAttributes(attrs...))
}

// endOnPanic, deferred after startSpan, ends span with ReasonPanic when the
// step panics (Issuer.guarded recovers the panic further up): a span never
// ended is never exported.
func endOnPanic(span trace.Span) {
	if r := recover(); r != nil {
		span.SetAttributes(AttrReason.String(ReasonPanic))
		span.SetStatus(otelcodes.Error, ReasonPanic)
		span.End()
		panic(r)
	}
}

// endSpan ends span (nil: tracing is off) with kv and, on failure, err's
// reason code as attribute and status description: the reason, never the
// error's text, which can quote what the caller sent.
func endSpan(span trace.Span, err error, kv attribute.KeyValue) {
	if span == nil {
		return
	}
	span.SetAttributes(kv)
	if err != nil {
		reason := ReasonOf(err)
		span.SetAttributes(AttrReason.String(reason))
		span.SetStatus(otelcodes.Error, reason)
	}
	span.End()
}

// annotateRequest puts the request's id, outcome and reason on the span of
// the call (otelgrpc's server span, or castellan.issue), so that a trace
// leads to its audit record. err is the call's: an issuance whose record
// could not be committed was withheld, so its outcome is failed.
func (is *Issuer) annotateRequest(ctx context.Context, rec *storage.Record, err error) {
	if is.tracer == nil {
		return
	}
	span := trace.SpanFromContext(ctx)
	if !span.IsRecording() {
		return
	}
	outcome, reason := rec.Outcome, rec.Reason
	if err != nil {
		reason = ReasonOf(err)
		if outcome == storage.OutcomeIssued {
			outcome = storage.OutcomeFailed
		}
	}
	span.SetAttributes(AttrRequestID.String(rec.RequestID), AttrOutcome.String(outcome))
	if reason != "" {
		span.SetAttributes(AttrReason.String(reason))
	}
}
