package main

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/castellan-ca/castellan/ca"
	"github.com/castellan-ca/castellan/cmd/internal/servetest"
	adminpb "github.com/castellan-ca/castellan/proto/castellan/admin/v1"
	authpb "github.com/castellan-ca/castellan/proto/istio/v1/auth"
	"github.com/castellan-ca/castellan/storage/groupcommit"
	"github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"
	collectortracepb "go.opentelemetry.io/proto/otlp/collector/trace/v1"
	commonpb "go.opentelemetry.io/proto/otlp/common/v1"
	tracepb "go.opentelemetry.io/proto/otlp/trace/v1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
)

// otlpReceiver is an OTLP trace receiver speaking the real protocol (the
// collector's TraceService over gRPC, or POST /v1/traces with protobuf
// bodies over HTTP), keeping every span it is sent.
type otlpReceiver struct {
	collectortracepb.UnimplementedTraceServiceServer

	addr  string
	conns atomic.Int32 // connections accepted

	mu      sync.Mutex
	spans   []*tracepb.Span
	res     []*tracepb.ResourceSpans
	headers []string // the value of testHeader on each export
}

// testHeader is the header OTEL_EXPORTER_OTLP_HEADERS makes the exporter send.
const testHeader = "x-castellan-test"

// countingListener counts the connections it accepts.
type countingListener struct {
	net.Listener
	n *atomic.Int32
}

func (l countingListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err == nil {
		l.n.Add(1)
	}
	return c, err
}

// startReceiver serves an OTLP receiver for protocol (grpc or http/protobuf)
// on a loopback port until the test ends.
func startReceiver(t *testing.T, protocol string) *otlpReceiver {
	t.Helper()
	raw, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	r := &otlpReceiver{addr: raw.Addr().String()}
	lis := countingListener{raw, &r.conns}
	switch protocol {
	case protocolGRPC:
		srv := grpc.NewServer()
		collectortracepb.RegisterTraceServiceServer(srv, r)
		go func() { _ = srv.Serve(lis) }()
		t.Cleanup(srv.Stop)
	default:
		srv := &http.Server{Handler: http.HandlerFunc(r.serveHTTP), ReadHeaderTimeout: callTimeout}
		go func() { _ = srv.Serve(lis) }()
		t.Cleanup(func() { _ = srv.Close() })
	}
	return r
}

// Export implements the collector's TraceService.
func (r *otlpReceiver) Export(ctx context.Context, req *collectortracepb.ExportTraceServiceRequest) (*collectortracepb.ExportTraceServiceResponse, error) {
	md, _ := metadata.FromIncomingContext(ctx)
	r.keep(req, strings.Join(md.Get(testHeader), ","))
	return &collectortracepb.ExportTraceServiceResponse{}, nil
}

// serveHTTP is OTLP/HTTP's POST /v1/traces with a protobuf body.
func (r *otlpReceiver) serveHTTP(w http.ResponseWriter, hr *http.Request) {
	body, err := io.ReadAll(hr.Body)
	req := &collectortracepb.ExportTraceServiceRequest{}
	if err != nil || hr.URL.Path != "/v1/traces" || hr.Header.Get("Content-Type") != "application/x-protobuf" || proto.Unmarshal(body, req) != nil {
		http.Error(w, "bad export", http.StatusBadRequest)
		return
	}
	r.keep(req, hr.Header.Get(testHeader))
	out, _ := proto.Marshal(&collectortracepb.ExportTraceServiceResponse{}) // cannot fail
	w.Header().Set("Content-Type", "application/x-protobuf")
	_, _ = w.Write(out)
}

func (r *otlpReceiver) keep(req *collectortracepb.ExportTraceServiceRequest, header string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.headers = append(r.headers, header)
	for _, rs := range req.GetResourceSpans() {
		r.res = append(r.res, rs)
		for _, ss := range rs.GetScopeSpans() {
			r.spans = append(r.spans, ss.GetSpans()...)
		}
	}
}

// clearOTelEnv empties every variable that could change what the test sees.
func clearOTelEnv(t *testing.T) {
	for _, v := range []string{envSDKDisabled, envTracesExporter, envEndpoint, envTracesEndpoint, envProtocol, envTracesProtocol,
		"OTEL_EXPORTER_OTLP_HEADERS", "OTEL_EXPORTER_OTLP_TRACES_HEADERS", "OTEL_SERVICE_NAME", "OTEL_RESOURCE_ATTRIBUTES",
		"OTEL_TRACES_SAMPLER", "OTEL_TRACES_SAMPLER_ARG", "OTEL_EXPORTER_OTLP_INSECURE", "OTEL_EXPORTER_OTLP_TRACES_INSECURE"} {
		t.Setenv(v, "")
	}
}

// oidcFixture is an OIDC issuer known only by its JWKS file: a token of it
// authenticates a CreateCertificate like pilot-agent's bearer token.
type oidcFixture struct {
	config string // the serve configuration file
	key    *ecdsa.PrivateKey
}

const (
	tracedIssuer = "https://issuer.castellan.test"
	tracedSA     = "system:serviceaccount:traced:app"
	tracedID     = "spiffe://cluster.local/ns/traced/sa/app"
)

func newOIDCFixture(t *testing.T) *oidcFixture {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	jwks, err := json.Marshal(jose.JSONWebKeySet{Keys: []jose.JSONWebKey{{Key: key.Public(), KeyID: "k1", Algorithm: string(jose.ES256), Use: "sig"}}})
	if err != nil {
		t.Fatal(err)
	}
	jwksPath := filepath.Join(dir, "jwks.json")
	if err := os.WriteFile(jwksPath, jwks, 0o600); err != nil {
		t.Fatal(err)
	}
	cfg := fmt.Sprintf("oidc:\n  issuers:\n  - issuerURL: %s\n    jwksFile: %s\n    audiences: [istio-ca]\n    allowedAlgorithms: [ES256]\n", tracedIssuer, jwksPath)
	return &oidcFixture{config: writeConfig(t, cfg), key: key}
}

// token signs a JWT of the fixture's issuer for audience.
func (f *oidcFixture) token(t *testing.T, audience string) string {
	t.Helper()
	sig, err := jose.NewSigner(jose.SigningKey{Algorithm: jose.ES256, Key: jose.JSONWebKey{Key: f.key, KeyID: "k1"}}, (&jose.SignerOptions{}).WithType("JWT"))
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	tok, err := jwt.Signed(sig).Claims(map[string]any{"iss": tracedIssuer, "sub": tracedSA, "aud": audience,
		"iat": now.Unix(), "nbf": now.Unix(), "exp": now.Add(time.Hour).Unix()}).Serialize()
	if err != nil {
		t.Fatal(err)
	}
	return tok
}

// tracedCSR is a CSR and the secrets a span must never show: its PEM, its
// DER in base64, and its private key.
type tracedCSR struct {
	pem     string
	secrets map[string]string // what → value
}

func newTracedCSR(t *testing.T) tracedCSR {
	t.Helper()
	p, der, key := newCSR(t)
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	scalar, err := key.Bytes()
	if err != nil {
		t.Fatal(err)
	}
	return tracedCSR{pem: p, secrets: map[string]string{
		"CSR PEM":              p,
		"CSR DER (base64)":     base64.StdEncoding.EncodeToString(der),
		"private key (PKCS8)":  base64.StdEncoding.EncodeToString(keyDER),
		"private key (hex)":    hex.EncodeToString(scalar),
		"private key (base64)": base64.StdEncoding.EncodeToString(scalar),
	}}
}

// TestTracingExport runs serve with the standard OTLP environment pointing at
// an in-test receiver, once per protocol, sends a CreateCertificate that is
// issued and one that is refused (a token for another audience), stops the
// server (which flushes the spans) and checks what arrived: the span names
// and their parent/child structure, the attributes, the resource, the
// headers from OTEL_EXPORTER_OTLP_HEADERS; and that no secret (the tokens,
// the Authorization value, the CSR, its key, the certificate, the exporter's
// header) appears anywhere in any span.
func TestTracingExport(t *testing.T) {
	for _, protocol := range []string{protocolGRPC, protocolHTTP} {
		t.Run(protocol, func(t *testing.T) {
			clearOTelEnv(t)
			recv := startReceiver(t, protocol)
			const headerSecret = "tenant-secret-5a1d"
			t.Setenv(envEndpoint, "http://"+recv.addr)
			t.Setenv(envProtocol, protocol)
			t.Setenv("OTEL_EXPORTER_OTLP_HEADERS", testHeader+"="+headerSecret)

			oidc := newOIDCFixture(t)
			s := startServe(t, filepath.Join(t.TempDir(), "data"), "--config", oidc.config)
			if !strings.Contains(s.logs.String(), "tracing enabled") {
				t.Fatal("serve did not log that tracing is enabled")
			}
			client := authpb.NewIstioCertificateServiceClient(s.conn(t, false))
			good, bad := oidc.token(t, "istio-ca"), oidc.token(t, "another-audience")
			csr := newTracedCSR(t)
			call := func(token string) ([]string, error) {
				ctx, cancel := context.WithTimeout(context.Background(), callTimeout)
				defer cancel()
				ctx = metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+token)
				resp, err := client.CreateCertificate(ctx, &authpb.IstioCertificateRequest{Csr: csr.pem, ValidityDuration: 3600})
				return resp.GetCertChain(), err
			}
			chain, err := call(good)
			if err != nil {
				t.Fatalf("CreateCertificate with a good token: %v", err)
			}
			if _, err := call(bad); status.Code(err) != codes.Unauthenticated {
				t.Fatalf("CreateCertificate with a token for another audience: %v, want Unauthenticated", err)
			}
			audited := map[string]string{} // request id → outcome
			for _, r := range auditRecords(t, adminpb.NewAdminServiceClient(s.conn(t, true))) {
				audited[r.GetRequestId()] = r.GetOutcome()
			}
			if err := s.stop(); err != nil { // flushes the spans
				t.Fatalf("serve: %v", err)
			}

			secrets := csr.secrets
			secrets["leaf certificate"] = chain[0]
			secrets["leaf certificate (base64 line)"] = strings.Split(chain[0], "\n")[1]
			secrets["exporter header"] = headerSecret
			for name, tok := range map[string]string{"token": good, "refused token": bad} {
				secrets[name] = tok
				for i, part := range strings.Split(tok, ".") {
					secrets[fmt.Sprintf("%s part %d", name, i)] = part
				}
			}
			secrets["authorization value"] = "Bearer " + good
			checkTraces(t, recv, secrets, headerSecret, audited)
		})
	}
}

// checkTraces checks what recv received (see TestTracingExport).
// audited maps the audit log's request ids to their outcomes.
func checkTraces(t *testing.T, recv *otlpReceiver, secrets map[string]string, header string, audited map[string]string) {
	t.Helper()
	recv.mu.Lock()
	defer recv.mu.Unlock()
	for _, h := range recv.headers {
		if h != header {
			t.Errorf("export with %s %q, want %q (from OTEL_EXPORTER_OTLP_HEADERS)", testHeader, h, header)
		}
	}
	for _, rs := range recv.res {
		if got := attr(rs.GetResource().GetAttributes(), "service.name"); got != "castellan" {
			t.Errorf("resource service.name %q, want castellan", got)
		}
	}

	// Every span, whole, as JSON: names, attributes, events, links, status.
	for _, sp := range recv.spans {
		js := protojson.Format(sp)
		for what, secret := range secrets {
			if strings.Contains(js, secret) {
				t.Errorf("span %q contains the %s", sp.GetName(), what)
			}
		}
		if len(sp.GetEvents()) > 0 {
			t.Errorf("span %q has events %v, want none", sp.GetName(), sp.GetEvents())
		}
	}

	// Steps are never orphans: a run no call started (the serving
	// certificate, the operator credential) has a castellan.issue root.
	ids := map[string]bool{}
	for _, sp := range recv.spans {
		ids[string(sp.GetSpanId())] = true
	}
	var internal int
	for _, sp := range recv.spans {
		switch {
		case sp.GetName() == ca.SpanIssue:
			internal++
			if len(sp.GetParentSpanId()) != 0 || attr(sp.GetAttributes(), string(ca.AttrPurpose)) == "" {
				t.Errorf("%s span %v: want a root with a purpose", ca.SpanIssue, sp)
			}
		case sp.GetKind() != tracepb.Span_SPAN_KIND_SERVER && !ids[string(sp.GetParentSpanId())]:
			t.Errorf("span %q has no parent among the spans received", sp.GetName())
		}
	}
	if internal == 0 {
		t.Errorf("no %s span for the certificates serve issues itself", ca.SpanIssue)
	}

	const method = "istio.v1.auth.IstioCertificateService/CreateCertificate"
	var calls []*tracepb.Span
	for _, sp := range recv.spans {
		if sp.GetName() == method {
			calls = append(calls, sp)
		}
	}
	if len(calls) != 2 {
		t.Fatalf("%d %s spans, want 2 (issued, refused); got spans %v", len(calls), method, spanNames(recv.spans))
	}
	for _, call := range calls {
		outcome := attr(call.GetAttributes(), string(ca.AttrOutcome))
		if call.GetKind() != tracepb.Span_SPAN_KIND_SERVER || len(call.GetParentSpanId()) != 0 {
			t.Errorf("call span %v: want a root server span", call)
		}
		if id := attr(call.GetAttributes(), string(ca.AttrRequestID)); audited[id] != outcome {
			t.Errorf("call span with request id %q and outcome %q: the audit log says %q", id, outcome, audited[id])
		}
		children := map[string]*tracepb.Span{}
		for _, sp := range recv.spans {
			if string(sp.GetTraceId()) == string(call.GetTraceId()) && sp != call {
				if string(sp.GetParentSpanId()) != string(call.GetSpanId()) {
					t.Errorf("span %q is not a child of its call's span", sp.GetName())
				}
				children[sp.GetName()] = sp
			}
		}
		authn, sign, audit := children[ca.SpanAuthenticate], children[ca.SpanSign], children[ca.SpanAuditCommit]
		if authn == nil || audit == nil {
			t.Fatalf("%s call: children %v, want %s and %s", outcome, keys(children), ca.SpanAuthenticate, ca.SpanAuditCommit)
		}
		if got := attr(authn.GetAttributes(), string(ca.AttrAuthMethod)); got != "oidc" {
			t.Errorf("%s: %s %q, want oidc", ca.SpanAuthenticate, ca.AttrAuthMethod, got)
		}
		if attr(audit.GetAttributes(), string(groupcommit.AttrBatchRecords)) == "" || attr(audit.GetAttributes(), string(ca.AttrOutcome)) != outcome {
			t.Errorf("%s attributes %v: want the batch size and outcome %s", ca.SpanAuditCommit, audit.GetAttributes(), outcome)
		}
		switch outcome {
		case "issued":
			if sign == nil || attr(sign.GetAttributes(), string(ca.AttrSigner)) == "" {
				t.Errorf("issued call: %s span %v, want one naming the backend", ca.SpanSign, sign)
			}
			if attr(call.GetAttributes(), "rpc.response.status_code") != "OK" || len(children) != 3 {
				t.Errorf("issued call: span %v with children %v", call, keys(children))
			}
		case "refused":
			if sign != nil {
				t.Errorf("refused call was signed: %v", sign)
			}
			if got := attr(call.GetAttributes(), string(ca.AttrReason)); got != ca.ReasonAuthnFailed {
				t.Errorf("refused call: reason %q, want %s", got, ca.ReasonAuthnFailed)
			}
			if authn.GetStatus().GetCode() != tracepb.Status_STATUS_CODE_ERROR || authn.GetStatus().GetMessage() != ca.ReasonAuthnFailed {
				t.Errorf("refused call: %s status %v, want an error with the reason code only", ca.SpanAuthenticate, authn.GetStatus())
			}
		default:
			t.Errorf("call span with outcome %q", outcome)
		}
	}
}

// attr returns the value of key in attrs as a string ("" if absent).
func attr(attrs []*commonpb.KeyValue, key string) string {
	for _, kv := range attrs {
		if kv.GetKey() == key {
			v := kv.GetValue()
			if s, ok := v.GetValue().(*commonpb.AnyValue_StringValue); ok {
				return s.StringValue
			}
			return protojson.Format(v)
		}
	}
	return ""
}

func spanNames(spans []*tracepb.Span) []string {
	out := make([]string, len(spans))
	for i, sp := range spans {
		out[i] = sp.GetName()
	}
	return out
}

func keys[V any](m map[string]V) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	return out
}

// TestTracingOff runs serve with tracing switched off three ways: no OTEL
// variable at all, OTEL_SDK_DISABLED=true beside an endpoint, and
// OTEL_TRACES_EXPORTER=none beside an endpoint. A certificate is issued,
// serve does not say that tracing is on, and nothing ever connects to the
// receiver the endpoint names.
func TestTracingOff(t *testing.T) {
	for _, tc := range []struct {
		name string
		env  map[string]string // beside the endpoint; nil: no endpoint either
	}{
		{name: "no OTEL variables"},
		{name: "SDK disabled", env: map[string]string{envSDKDisabled: "true"}},
		{name: "exporter none", env: map[string]string{envTracesExporter: "none"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			clearOTelEnv(t)
			recv := startReceiver(t, protocolGRPC)
			if tc.env != nil {
				t.Setenv(envEndpoint, "http://"+recv.addr)
				t.Setenv(envProtocol, protocolGRPC)
				for k, v := range tc.env {
					t.Setenv(k, v)
				}
			}
			s := startServe(t, filepath.Join(t.TempDir(), "data"))
			admin := adminpb.NewAdminServiceClient(s.conn(t, true))
			ctx, cancel := context.WithTimeout(context.Background(), callTimeout)
			defer cancel()
			if _, err := admin.IssueCertificate(ctx, &adminpb.IssueCertificateRequest{Csr: csrPEM(t), Identity: tracedID, ValiditySeconds: 3600}); err != nil {
				t.Fatalf("issue: %v", err)
			}
			if err := s.stop(); err != nil {
				t.Fatalf("serve: %v", err)
			}
			if n := recv.conns.Load(); n != 0 {
				t.Errorf("%d connections to the OTLP receiver, want none", n)
			}
			if strings.Contains(s.logs.String(), "tracing enabled") {
				t.Error("serve logged that tracing is enabled")
			}
		})
	}
}

// TestTracingFromEnv: which standard variables switch tracing on, and which
// values are refused at start-up naming the variable.
func TestTracingFromEnv(t *testing.T) {
	const ep = "http://collector:4318"
	tests := []struct {
		name    string
		env     map[string]string
		want    tracingEnv
		wantErr string // the variable the error names
	}{
		{name: "nothing set: off", env: nil},
		{name: "endpoint: on, http/protobuf by default", env: map[string]string{envEndpoint: ep},
			want: tracingEnv{enabled: true, protocol: protocolHTTP, endpoint: ep}},
		{name: "traces endpoint wins", env: map[string]string{envEndpoint: "http://a:4317", envTracesEndpoint: ep, envProtocol: "grpc"},
			want: tracingEnv{enabled: true, protocol: protocolGRPC, endpoint: ep}},
		{name: "traces protocol wins", env: map[string]string{envEndpoint: ep, envProtocol: "grpc", envTracesProtocol: "http/protobuf"},
			want: tracingEnv{enabled: true, protocol: protocolHTTP, endpoint: ep}},
		{name: "SDK disabled", env: map[string]string{envEndpoint: ep, envSDKDisabled: "TRUE"}},
		{name: "SDK disabled false", env: map[string]string{envEndpoint: ep, envSDKDisabled: "false"},
			want: tracingEnv{enabled: true, protocol: protocolHTTP, endpoint: ep}},
		{name: "exporter none", env: map[string]string{envEndpoint: ep, envTracesExporter: "none"}},
		{name: "exporter otlp", env: map[string]string{envEndpoint: ep, envTracesExporter: "otlp"},
			want: tracingEnv{enabled: true, protocol: protocolHTTP, endpoint: ep}},
		{name: "blank endpoint", env: map[string]string{envEndpoint: "  "}},
		{name: "exporter zipkin", env: map[string]string{envEndpoint: ep, envTracesExporter: "zipkin"}, wantErr: envTracesExporter},
		{name: "http/json", env: map[string]string{envEndpoint: ep, envProtocol: "http/json"}, wantErr: envProtocol},
		{name: "bad traces protocol", env: map[string]string{envEndpoint: ep, envTracesProtocol: "udp"}, wantErr: envTracesProtocol},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := tracingFromEnv(func(k string) string { return tc.env[k] })
			if tc.wantErr != "" {
				if err == nil || !strings.HasPrefix(err.Error(), tc.wantErr+":") {
					t.Fatalf("error %v, want one naming %s", err, tc.wantErr)
				}
				return
			}
			if err != nil || got != tc.want {
				t.Fatalf("tracingFromEnv = %+v, %v; want %+v", got, err, tc.want)
			}
		})
	}
}

// TestTracingRefusedEnv: serve refuses to start on an OTEL value it cannot
// honour, naming the variable, instead of running without the traces the
// operator asked for.
func TestTracingRefusedEnv(t *testing.T) {
	for _, tc := range []struct{ name, variable, value string }{
		{"zipkin exporter", envTracesExporter, "zipkin"},
		{"http/json protocol", envProtocol, "http/json"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			clearOTelEnv(t)
			t.Setenv(envEndpoint, "http://127.0.0.1:1")
			t.Setenv(tc.variable, tc.value)
			var logs servetest.SyncBuffer
			ctx, cancel := context.WithTimeout(context.Background(), startTimeout)
			defer cancel()
			err := serve(ctx, []string{"--data-dir", filepath.Join(t.TempDir(), "data"), "--listen", "127.0.0.1:0", "--monitoring-listen", "127.0.0.1:0"}, &logs)
			if err == nil || !strings.Contains(err.Error(), tc.variable) {
				t.Fatalf("serve = %v, want an error naming %s", err, tc.variable)
			}
			if strings.Contains(logs.String(), "castellan serving") {
				t.Error("server reported serving")
			}
		})
	}
}
