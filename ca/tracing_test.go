package ca_test

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"

	"github.com/castellan-ca/castellan/ca"
	"github.com/castellan-ca/castellan/signer"
	"github.com/castellan-ca/castellan/storage"
	"github.com/castellan-ca/castellan/storage/groupcommit"
	otelattr "go.opentelemetry.io/otel/attribute"
	otelcodes "go.opentelemetry.io/otel/codes"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
)

// downSigner fails every Sign as unavailable, with a cause no span may show.
type downSigner struct{ signer.Signer }

func (downSigner) Sign(context.Context, signer.SignRequest) (*signer.Chain, error) {
	return nil, fmt.Errorf("%w: backend says secret-cause", signer.ErrSignerUnavailable)
}

// panicSigner panics in Sign, as a broken backend might.
type panicSigner struct{ signer.Signer }

func (panicSigner) Sign(context.Context, signer.SignRequest) (*signer.Chain, error) {
	panic("backend secret-cause")
}

// TestTracingSpans runs IssueGrant (which no traced call starts, like the
// Kubernetes signers) through the SDK with a span recorder: the steps are
// children of one castellan.issue span (or of the caller's span when ctx has
// one), carry their attributes, and a failure shows its reason code as the
// status, never the cause's text.
func TestTracingSpans(t *testing.T) {
	key := leafKey("ecdsa-p256")
	grant := func(context.Context) (*ca.Grant, error) {
		return &ca.Grant{Identity: appID, PublicKey: key.Public()}, nil
	}
	for _, tc := range []struct {
		name       string
		opts       harnessOpts
		parent     bool // ctx carries the caller's span
		wantSpans  []string
		failed     string // the span whose status is the error
		wantReason string
	}{
		{name: "issued", wantSpans: []string{ca.SpanIssue, ca.SpanSign, ca.SpanAuditCommit}},
		{name: "under the caller's span", parent: true, wantSpans: []string{"caller", ca.SpanSign, ca.SpanAuditCommit}},
		{name: "signer down", opts: harnessOpts{wrapSigner: func(s signer.Signer) signer.Signer { return downSigner{s} }},
			wantSpans: []string{ca.SpanIssue, ca.SpanSign, ca.SpanAuditCommit}, failed: ca.SpanSign, wantReason: ca.ReasonSignerDown},
		{name: "signer panics", opts: harnessOpts{wrapSigner: func(s signer.Signer) signer.Signer { return panicSigner{s} }},
			wantSpans: []string{ca.SpanIssue, ca.SpanSign, ca.SpanAuditCommit}, failed: ca.SpanSign, wantReason: ca.ReasonPanic},
		{name: "audit down", opts: harnessOpts{wrapAudit: func(ca.AuditLog) ca.AuditLog { return failingAudit{errors.New("disk secret-cause")} }},
			wantSpans: []string{ca.SpanIssue, ca.SpanSign, ca.SpanAuditCommit}, failed: ca.SpanAuditCommit, wantReason: ca.ReasonAuditDown},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rec := tracetest.NewSpanRecorder()
			tp := sdktrace.NewTracerProvider(sdktrace.WithSpanProcessor(rec))
			opts := tc.opts
			opts.config = func(c *ca.Config) { c.TracerProvider = tp }
			h := newHarness(t, opts)
			ctx := context.Background()
			var parentEnd func()
			if tc.parent {
				pctx, span := tp.Tracer("test").Start(ctx, "caller")
				ctx, parentEnd = pctx, func() { span.End() }
			}
			_, _ = h.issuer.IssueGrant(ctx, ca.GrantRequest{Method: "kubernetes.test", Authorize: grant})
			if parentEnd != nil {
				parentEnd()
			}
			spans := rec.Ended()
			byName := map[string]sdktrace.ReadOnlySpan{}
			for _, s := range spans {
				byName[s.Name()] = s
			}
			if len(spans) != len(tc.wantSpans) {
				t.Fatalf("%d spans, want %v", len(spans), tc.wantSpans)
			}
			root := byName[tc.wantSpans[0]]
			if root == nil || root.Parent().IsValid() {
				t.Fatalf("no root span %q", tc.wantSpans[0])
			}
			for _, name := range tc.wantSpans[1:] {
				s := byName[name]
				if s == nil || s.Parent().SpanID() != root.SpanContext().SpanID() {
					t.Errorf("span %q missing or not a child of %q", name, root.Name())
				}
			}
			attrs := func(s sdktrace.ReadOnlySpan) map[otelattr.Key]otelattr.Value {
				m := map[otelattr.Key]otelattr.Value{}
				for _, kv := range s.Attributes() {
					m[kv.Key] = kv.Value
				}
				return m
			}
			if a := attrs(byName[ca.SpanSign]); a[ca.AttrSigner].AsString() != "selfsigned" {
				t.Errorf("%s attributes %v, want the backend", ca.SpanSign, a)
			}
			wantOutcome, wantReason := storage.OutcomeIssued, ""
			if tc.failed != "" {
				wantOutcome, wantReason = storage.OutcomeFailed, tc.wantReason
			}
			if a := attrs(root); a[ca.AttrRequestID].AsString() == "" || a[ca.AttrOutcome].AsString() != wantOutcome || a[ca.AttrReason].AsString() != wantReason {
				t.Errorf("root attributes %v, want a request id, outcome %q and reason %q", a, wantOutcome, wantReason)
			}
			if tc.failed == "" && attrs(byName[ca.SpanAuditCommit])[groupcommit.AttrBatchRecords].AsInt64() < 1 {
				t.Errorf("%s attributes %v, want the batch size", ca.SpanAuditCommit, attrs(byName[ca.SpanAuditCommit]))
			}
			for _, s := range spans {
				st := s.Status()
				if s.Name() == tc.failed {
					if st.Code != otelcodes.Error || st.Description != tc.wantReason || attrs(s)[ca.AttrReason].AsString() != tc.wantReason {
						t.Errorf("span %q status %+v, want Error %q", s.Name(), st, tc.wantReason)
					}
				} else if st.Code == otelcodes.Error {
					t.Errorf("span %q status %+v, want no error", s.Name(), st)
				}
				if text := fmt.Sprint(s.Attributes(), s.Status(), s.Events()); strings.Contains(text, "secret-cause") {
					t.Errorf("span %q shows the error's text: %s", s.Name(), text)
				}
			}
		})
	}
}
