package ca

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"time"

	"github.com/castellan-ca/castellan/authn"
	"github.com/castellan-ca/castellan/signer"
	"github.com/castellan-ca/castellan/storage"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"go.opentelemetry.io/otel/trace"
	"google.golang.org/grpc/codes"
)

// Reason codes the pipeline itself assigns (CSR reasons live in csr.go).
const (
	ReasonNoCredentials  = "authn.no_credentials"
	ReasonAuthnFailed    = "authn.failed"
	ReasonAuthnDown      = "authn.unavailable"
	ReasonImpersonation  = "authz.impersonation"
	ReasonNotOperator    = "authz.not_operator"
	ReasonBadIdentity    = "authz.bad_identity"
	ReasonMetadata       = "request.metadata"
	ReasonTTL            = "ttl.too_long"
	ReasonOverload       = "overload"
	ReasonNoSigner       = "signer.none"
	ReasonSignerDown     = "signer.unavailable"
	ReasonSignerError    = "signer.error"
	ReasonSignerBadChain = "signer.bad_result"
	ReasonAuditDown      = "audit.unavailable"
	// ReasonCallerGone: the caller hung up (or its deadline passed) before
	// the answer; not a failure of the CA, nor counted as a signing error.
	ReasonCallerGone = "request.cancelled"
)

// Authenticator proves who the caller is (implemented in package authn).
type Authenticator interface {
	Authenticate(ctx context.Context) (*authn.Caller, error)
}

// NodeAuthorizer decides whether caller may obtain id on behalf of a workload
// (ztunnel asking for a pod on its node). A nil NodeAuthorizer refuses all.
type NodeAuthorizer interface {
	Authorize(ctx context.Context, caller *authn.Caller, id spiffeid.ID) error
}

// AuditLog durably records outcomes; Append returns only once rec is committed.
type AuditLog interface {
	Append(ctx context.Context, rec *storage.Record) error
}

// Config wires an Issuer. Zero values get the defaults of DESIGN.md §4.
type Config struct {
	TrustDomain    spiffeid.TrustDomain
	TTL            TTLPolicy
	ClockSkew      time.Duration // NotBefore backdating; default 2 min
	Authenticator  Authenticator
	NodeAuthorizer NodeAuthorizer
	Audit          AuditLog
	Authority      *Authority
	Metrics        *Metrics
	Logger         *slog.Logger
	// MaxInFlight bounds concurrent calls; beyond it callers get ResourceExhausted
	// at once instead of queueing (Istio's client sets no deadline). Default 512.
	MaxInFlight int
	// AuditTimeout bounds each audit write, which outlives a caller that hung
	// up (see Auditor). Default DefaultAuditTimeout.
	AuditTimeout time.Duration
	// Limits are the admission checks (rate limits, open calls, read
	// timeout); the zero value limits nothing.
	Limits AdmissionConfig
	// BeforeSign, if set, runs in the pipeline just before the signer with
	// the granted identity: a test seam for faults (a panic, a delay). Nil
	// in production.
	BeforeSign func(ctx context.Context, grant spiffeid.ID)
	// TracerProvider, if set, traces the pipeline's steps (SpanAuthenticate,
	// SpanSign, SpanAuditCommit) as children of the call's span. Nil turns
	// tracing off at the cost of a nil check per step.
	TracerProvider trace.TracerProvider
	Now            func() time.Time
	Rand           io.Reader
}

// Issuer is the single issuance pipeline: authenticate → scope → CSR checks →
// profile → sign → verify the result → audit → respond.
type Issuer struct {
	cfg    Config
	tracer trace.Tracer // nil: tracing off
	audit  *Auditor
	adm    *Admission
	slots  chan struct{}
	// paths remembers verified issuer paths for CheckIssued's work on each leaf.
	paths issuerPathCache
}

// NewIssuer checks cfg and fills defaults.
func NewIssuer(cfg Config) (*Issuer, error) {
	switch {
	case cfg.TrustDomain.IsZero():
		return nil, errors.New("issuer: trust domain is required")
	case cfg.Authenticator == nil:
		return nil, errors.New("issuer: authenticator is required")
	case cfg.Audit == nil:
		return nil, errors.New("issuer: audit log is required")
	case cfg.Authority == nil:
		return nil, errors.New("issuer: authority is required")
	}
	if cfg.ClockSkew == 0 {
		cfg.ClockSkew = signer.DefaultClockSkew
	}
	if cfg.MaxInFlight <= 0 {
		cfg.MaxInFlight = 512
	}
	if cfg.AuditTimeout <= 0 {
		cfg.AuditTimeout = DefaultAuditTimeout
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.Rand == nil {
		cfg.Rand = rand.Reader
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.Metrics == nil {
		cfg.Metrics = NewMetrics(nil)
	}
	tracer := newTracer(cfg.TracerProvider)
	audit := &Auditor{Log: cfg.Audit, Timeout: cfg.AuditTimeout, Now: cfg.Now, Rand: cfg.Rand, Logger: cfg.Logger, Metrics: cfg.Metrics, Tracer: tracer}
	is := &Issuer{cfg: cfg, tracer: tracer, audit: audit, slots: make(chan struct{}, cfg.MaxInFlight)}
	is.adm = newAdmission(cfg.Limits, is)
	return is, nil
}

// Admission returns the admission checks of this issuer, for the gRPC edge
// (Tap, Unary) and the lifecycle (Run).
func (is *Issuer) Admission() *Admission { return is.adm }

// Auditor returns the auditor of this issuer's audit log, for the operator
// actions of the admin API.
func (is *Issuer) Auditor() *Auditor { return is.audit }

// TrustDomain returns the trust domain the issuer grants identities in.
func (is *Issuer) TrustDomain() spiffeid.TrustDomain { return is.cfg.TrustDomain }

// State returns the CA state requests use now, or a refusal (Unavailable)
// before the first signer is in use.
func (is *Issuer) State() (*State, error) {
	if st := is.cfg.Authority.Current(); st != nil {
		return st, nil
	}
	return nil, Refuse(ErrUnavailable, ReasonNoSigner, errors.New("no active signer"))
}

// Request is one certificate request, from Istio's API or the admin API.
type Request struct {
	// CSR is the PEM CSR, untrusted.
	CSR string
	// ValiditySeconds is the requested lifetime; ≤ 0 means the default.
	ValiditySeconds int64
	// Metadata holds Istio's request metadata (ImpersonatedIdentity, CertSigner).
	Metadata map[string]any
	// Identity is an explicitly requested identity (admin API); empty otherwise.
	Identity string
	// OperatorOnly restricts the call to operator credentials (admin API).
	OperatorOnly bool
	// Peer and ClusterID describe the connection, for the audit record.
	Peer      string
	ClusterID string
}

// Issued is a successful result: the chain and the response elements.
type Issued struct {
	Chain *signer.Chain
	// Elements is [leaf, intermediates…, root bundle], one PEM certificate per
	// element except the last, which is the whole bundle.
	Elements []string
	// Record is the committed audit record of this issuance.
	Record storage.Record
}

// Issue runs the pipeline. Every outcome is audited; a certificate is returned
// only once its record is committed, and an audit failure turns success into
// ErrUnavailable. Returned errors are classified for Status.
func (is *Issuer) Issue(ctx context.Context, req Request) (*Issued, error) {
	rec := is.newRecord(req.Peer, req.ClusterID)
	return is.run(ctx, rec, func(ctx context.Context) (*Issued, error) { return is.issue(ctx, req, rec) })
}

// newRecord starts the audit record of one certificate request.
func (is *Issuer) newRecord(peer, clusterID string) *storage.Record {
	return &storage.Record{
		Time:      is.cfg.Now().UTC(),
		Kind:      storage.KindCSR,
		RequestID: newRequestID(is.cfg.Rand),
		Peer:      storage.Sanitize(peer, storage.MaxNameLen),
		ClusterID: storage.Sanitize(clusterID, storage.MaxNameLen),
	}
}

// run is what every certificate request shares, whichever interface it came
// through: an in-flight slot or an immediate ErrOverloaded, work (which fills
// rec), the outcome in rec, the audit append (a certificate whose record is
// not committed is withheld) and the metrics.
func (is *Issuer) run(ctx context.Context, rec *storage.Record, work func(context.Context) (*Issued, error)) (*Issued, error) {
	if is.tracer != nil {
		var span trace.Span
		if ctx, span = is.startRun(ctx); span != nil {
			defer span.End()
		}
	}
	start := is.cfg.Now()
	m := is.cfg.Metrics
	m.csrCount.Inc()
	var out *Issued
	var err error
	shed := is.adm.overloaded()
	if !shed {
		select {
		case is.slots <- struct{}{}:
			m.inFlight.Inc()
			out, err = is.guarded(ctx, rec, work)
			err = callerGone(ctx, err)
			<-is.slots
			m.inFlight.Dec()
			is.adm.completed()
		default:
			shed = true
		}
	}
	if shed {
		m.overloadRefused.Inc()
		is.adm.refuseOverload(rec.Peer)
		err = Refuse(ErrOverloaded, ReasonOverload, fmt.Errorf("%d requests in flight", len(is.slots)))
	}
	if r := ReasonOf(err); r == ReasonRateCaller || r == ReasonOverload {
		// Counted by the Admission, audited in its next summary: a flood
		// (or an overload) must not cost one record per call.
		rec.Outcome, rec.Reason, rec.Code = storage.OutcomeRefused, r, Status(err).Code().String()
		is.annotateRequest(ctx, rec, err)
		is.observe(rec, err, start)
		return nil, err
	}
	if err == nil {
		rec.Outcome = storage.OutcomeIssued
	} else {
		out = nil
		rec.Outcome = storage.OutcomeRefused
		if isTransient(err) {
			rec.Outcome = storage.OutcomeFailed
		}
		rec.Reason = ReasonOf(err)
		rec.Detail = storage.Sanitize(err.Error(), storage.MaxDetailLen)
	}
	rec.Code = Status(err).Code().String()

	if aerr := is.audit.Append(ctx, rec); aerr != nil {
		is.cfg.Logger.Error("audit append failed; certificate withheld", "request_id", rec.RequestID, "error", aerr)
		if err == nil {
			err = Refuse(ErrUnavailable, ReasonAuditDown, fmt.Errorf("audit append: %w", aerr))
			out = nil
		}
	}
	if out != nil {
		out.Record = *rec
	}
	is.annotateRequest(ctx, rec, err)
	is.observe(rec, err, start)
	return out, err
}

func (is *Issuer) observe(rec *storage.Record, err error, start time.Time) {
	m := is.cfg.Metrics
	code := Status(err).Code()
	reason := ReasonOf(err)
	outcome := rec.Outcome
	if err != nil && outcome == storage.OutcomeIssued {
		outcome = storage.OutcomeFailed // issued but the audit failed: withheld
	}
	m.outcomes.WithLabelValues(outcome, code.String(), reason).Inc()
	m.duration.WithLabelValues(outcome).Observe(is.cfg.Now().Sub(start).Seconds())
	switch {
	case reason == ReasonRateCaller || reason == ReasonOverload:
		return // summarised by the Admission, not logged per call
	case err == nil:
		m.issued.Inc()
		is.cfg.Logger.Debug("certificate issued", "request_id", rec.RequestID, "identity", rec.GrantedIdentity, "serial", rec.Serial)
		return
	case code == codes.Unauthenticated:
		m.authnFailures.Inc()
	case code == codes.Canceled || code == codes.DeadlineExceeded:
		// The caller hung up: no dependency and no signer failed.
	default:
		m.signErrors.WithLabelValues(reason).Inc()
	}
	// The error's text can quote what the caller sent: sanitised like the record's fields.
	is.cfg.Logger.Info("certificate request refused", "request_id", rec.RequestID, "peer", rec.Peer,
		"caller", rec.Caller, "code", code.String(), "reason", reason, "error", storage.Sanitize(err.Error(), storage.MaxDetailLen))
}

// guarded runs work (issue or issueGrant), turning a panic into
// ErrInternal (ReasonPanic), so that the request is audited like any other
// failure and the server goes on serving.
func (is *Issuer) guarded(ctx context.Context, rec *storage.Record, work func(context.Context) (*Issued, error)) (out *Issued, err error) {
	defer func() {
		if r := recover(); r != nil {
			out, err = nil, is.recovered(r, "request_id", rec.RequestID)
		}
	}()
	return work(ctx)
}

// issue does the work of Issue between admission and audit, filling rec.
func (is *Issuer) issue(ctx context.Context, req Request, rec *storage.Record) (*Issued, error) {
	caller, err := is.authenticate(ctx)
	if err != nil {
		if f := (*authn.Failure)(nil); errors.As(err, &f) {
			rec.AuthMethod = f.Method
		}
		return nil, err
	}
	rec.AuthMethod, rec.Caller = caller.Method, storage.Sanitize(caller.Name, storage.MaxNameLen)
	if req.OperatorOnly {
		if err := requireOperator(caller); err != nil {
			return nil, err
		}
	}

	requested, err := requestedIdentity(req)
	if err != nil {
		return nil, err
	}
	rec.RequestedIdentity = storage.Sanitize(requested, storage.MaxNameLen)
	if err := is.adm.allowCaller(caller, requested, rec.Peer); err != nil {
		return nil, err
	}
	grant, err := is.scope(ctx, caller, requested)
	if err != nil {
		return nil, err
	}
	rec.GrantedIdentity = grant.String()

	csr, err := ParseCSR(req.CSR, grant)
	if err != nil {
		return nil, err
	}
	ttl, err := is.cfg.TTL.Grant(req.ValiditySeconds)
	if err != nil {
		return nil, Refuse(ErrInvalidRequest, ReasonTTL, err)
	}
	st, err := is.State()
	if err != nil {
		return nil, err
	}
	rec.Signer = st.Backend
	if is.cfg.BeforeSign != nil {
		is.cfg.BeforeSign(ctx, grant)
	}
	chain, err := is.sign(ctx, st, signer.SignRequest{PublicKey: csr.PublicKey, CSR: csr.Raw, Identity: grant, TTL: ttl}, nil)
	if err != nil {
		return nil, err
	}
	fillRecord(rec, chain)
	return &Issued{Chain: chain, Elements: Elements(chain, st)}, nil
}

// sign builds the leaf profile (unless tmpl is given), has the backend sign it
// and checks what came back. Shared by workload issuance and internal
// certificates (serving, operator) so every certificate gets the same checks.
func (is *Issuer) sign(ctx context.Context, st *State, sreq signer.SignRequest, tmpl *x509.Certificate) (*signer.Chain, error) {
	now := is.cfg.Now()
	serial, err := signer.NewSerial(is.cfg.Rand)
	if err != nil {
		return nil, Refuse(ErrInternal, ReasonSignerError, err)
	}
	if tmpl == nil {
		tmpl = LeafTemplate(sreq.Identity, sreq.PublicKey, serial, now.Add(-is.cfg.ClockSkew), now.Add(sreq.TTL))
		if s, ok := st.Signer.(signer.Subjecter); ok {
			tmpl.Subject = s.LeafSubject(sreq.Identity)
		}
	} else {
		tmpl.SerialNumber = serial
		tmpl.NotBefore = now.Add(-is.cfg.ClockSkew).UTC()
		tmpl.NotAfter = now.Add(sreq.TTL).UTC()
	}
	// RFC 5280 4.2.1.2: end-entity certificates SHOULD carry a subject key
	// identifier; it is derived from the key, so one SHA-256 of it.
	if tmpl.SubjectKeyId, err = signer.KeyID(sreq.PublicKey); err != nil {
		return nil, Refuse(ErrInternal, ReasonSignerError, err)
	}
	sreq.Template = tmpl
	chain, err := is.callSigner(ctx, st, sreq)
	if err != nil {
		return nil, err
	}
	if err := is.paths.checkIssued(chain, tmpl, sreq.PublicKey, st.Pool, now); err != nil {
		return nil, Refuse(ErrInternal, ReasonSignerBadChain, err)
	}
	is.cfg.Metrics.observeState(st, issuerNotAfter(chain, st))
	return chain, nil
}

// callSigner has the backend sign sreq (span SpanSign) and classifies its failure.
func (is *Issuer) callSigner(ctx context.Context, st *State, sreq signer.SignRequest) (*signer.Chain, error) {
	ctx, span := startSpan(ctx, is.tracer, SpanSign)
	if span != nil {
		span.SetAttributes(AttrSigner.String(st.Backend)) // a panicking backend is named too
		defer endOnPanic(span)
	}
	chain, err := st.Signer.Sign(ctx, sreq)
	switch {
	case err == nil:
	case errors.Is(err, signer.ErrSignerUnavailable) || errors.Is(err, context.DeadlineExceeded) || errors.Is(err, context.Canceled):
		err = Refuse(ErrUnavailable, ReasonSignerDown, err)
	case errors.Is(err, signer.ErrUnsupportedKey):
		err = Refuse(ErrKeyType, "csr.key", err)
	default:
		err = Refuse(ErrInternal, ReasonSignerError, err)
	}
	endSpan(span, err, AttrSigner.String(st.Backend))
	if err != nil {
		return nil, err
	}
	return chain, nil
}

// scope decides the one identity this caller may receive.
func (is *Issuer) scope(ctx context.Context, caller *authn.Caller, requested string) (spiffeid.ID, error) {
	if requested == "" {
		if caller.Operator || caller.Identity.IsZero() {
			return spiffeid.ID{}, Refuse(ErrInvalidRequest, ReasonBadIdentity, errors.New("operator credentials must name the identity to issue"))
		}
		return caller.Identity, nil
	}
	id, err := authn.ParseWorkloadID(is.cfg.TrustDomain, requested)
	if err != nil {
		if caller.Operator {
			return spiffeid.ID{}, Refuse(ErrInvalidRequest, ReasonBadIdentity, err)
		}
		return spiffeid.ID{}, Refuse(ErrUnauthenticated, ReasonImpersonation, err)
	}
	switch {
	case caller.Operator, id == caller.Identity:
		return id, nil
	case is.cfg.NodeAuthorizer == nil:
		return spiffeid.ID{}, Refuse(ErrUnauthenticated, ReasonImpersonation, fmt.Errorf("caller %s may not impersonate %s", caller.Name, id))
	}
	if err := is.cfg.NodeAuthorizer.Authorize(ctx, caller, id); err != nil {
		if errors.Is(err, authn.ErrUnavailable) {
			return spiffeid.ID{}, Refuse(ErrUnavailable, ReasonAuthnDown, err)
		}
		return spiffeid.ID{}, Refuse(ErrUnauthenticated, ReasonImpersonation, err)
	}
	return id, nil
}

// Metadata keys Istio's clients send.
const (
	MetaImpersonatedIdentity = "ImpersonatedIdentity"
	MetaCertSigner           = "CertSigner"
)

// requestedIdentity reads the explicitly requested identity. Known metadata
// keys must hold strings; unknown keys are ignored, as Istio's clients add their own.
func requestedIdentity(req Request) (string, error) {
	for _, k := range []string{MetaImpersonatedIdentity, MetaCertSigner} {
		if v, ok := req.Metadata[k]; ok {
			if _, isString := v.(string); !isString {
				return "", Refuse(ErrInvalidRequest, ReasonMetadata, fmt.Errorf("metadata %q must be a string, got %T", k, v))
			}
		}
	}
	imp, _ := req.Metadata[MetaImpersonatedIdentity].(string)
	switch {
	case imp != "" && req.Identity != "" && imp != req.Identity:
		return "", Refuse(ErrInvalidRequest, ReasonMetadata, errors.New("two different identities requested"))
	case imp != "":
		return imp, nil
	}
	return req.Identity, nil
}

// Elements lays out a response: one PEM certificate per element for the leaf and
// each intermediate, then the whole root bundle, unsplit, as the last element.
func Elements(chain *signer.Chain, st *State) []string {
	out := make([]string, 0, len(chain.Intermediates)+2)
	out = append(out, signer.EncodePEM(chain.Leaf))
	for _, c := range chain.Intermediates {
		out = append(out, signer.EncodePEM(c))
	}
	return append(out, st.BundlePEM)
}

func fillRecord(rec *storage.Record, chain *signer.Chain) {
	leaf := chain.Leaf
	sum := sha256.Sum256(leaf.Raw)
	rec.Serial = leaf.SerialNumber.Text(16)
	rec.NotBefore, rec.NotAfter = leaf.NotBefore.UTC(), leaf.NotAfter.UTC()
	rec.CertSHA256 = hex.EncodeToString(sum[:])
	rec.IssuerKeyID = hex.EncodeToString(leaf.AuthorityKeyId)
	if chain.BackendRef != "" {
		// Appended, so an operator action keeps what it did (its purpose).
		ref := "backend_ref=" + chain.BackendRef
		if rec.Detail != "" {
			ref = rec.Detail + "; " + ref
		}
		rec.Detail = storage.Sanitize(ref, storage.MaxDetailLen)
	}
}

func issuerNotAfter(chain *signer.Chain, st *State) time.Time {
	if iss := chain.Issuer(); iss != nil {
		return iss.NotAfter
	}
	return st.EarliestRootExpiry()
}

// callerGone reclassifies a failure to reach a dependency (signer,
// authenticator) while the caller's context had already ended: the caller
// hung up, and that is neither the dependency's fault nor a signing error.
func callerGone(ctx context.Context, err error) error {
	var r *Refusal
	cerr := ctx.Err()
	if cerr == nil || !errors.As(err, &r) || !errors.Is(r.Kind, ErrUnavailable) {
		return err
	}
	return Refuse(cerr, ReasonCallerGone, r.Err)
}

func isTransient(err error) bool {
	return errors.Is(err, ErrUnavailable) || errors.Is(err, ErrOverloaded) || errors.Is(err, ErrInternal) ||
		errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded)
}
