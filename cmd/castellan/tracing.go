package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"runtime/debug"
	"strings"
	"time"

	"go.opentelemetry.io/contrib/instrumentation/google.golang.org/grpc/otelgrpc"
	"go.opentelemetry.io/contrib/instrumentation/google.golang.org/grpc/otelgrpc/filters"
	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/exporters/otlp/otlptrace/otlptracegrpc"
	"go.opentelemetry.io/otel/exporters/otlp/otlptrace/otlptracehttp"
	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/sdk/resource"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	semconv "go.opentelemetry.io/otel/semconv/v1.43.0"
	"google.golang.org/grpc"
)

// The OpenTelemetry environment variables that switch tracing on and pick the
// exporter (the OTLP exporters, the SDK's sampler and batch processor read
// the rest themselves: headers, TLS, timeout, compression, sampler).
const (
	envSDKDisabled     = "OTEL_SDK_DISABLED"
	envTracesExporter  = "OTEL_TRACES_EXPORTER"
	envEndpoint        = "OTEL_EXPORTER_OTLP_ENDPOINT"
	envTracesEndpoint  = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
	envProtocol        = "OTEL_EXPORTER_OTLP_PROTOCOL"
	envTracesProtocol  = "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"
	protocolGRPC       = "grpc"
	protocolHTTP       = "http/protobuf"
	tracingServiceName = "castellan"
)

// tracingFlushTimeout bounds the export of the spans still buffered at shutdown.
const tracingFlushTimeout = 5 * time.Second

// tracingEnv is what the environment says about trace export.
type tracingEnv struct {
	enabled  bool
	protocol string // protocolGRPC or protocolHTTP
	endpoint string // for the log line; the exporter reads it itself
}

// tracingFromEnv decides from the standard OpenTelemetry variables whether
// traces are exported, and how. Tracing is on only when an OTLP endpoint is
// set, OTEL_SDK_DISABLED is not true and OTEL_TRACES_EXPORTER is otlp (or
// unset). The protocol defaults to http/protobuf, as the specification says.
// A value Castellan cannot honour is an error naming the variable.
func tracingFromEnv(getenv func(string) string) (tracingEnv, error) {
	if strings.EqualFold(strings.TrimSpace(getenv(envSDKDisabled)), "true") {
		return tracingEnv{}, nil
	}
	switch exp := strings.TrimSpace(getenv(envTracesExporter)); exp {
	case "", "otlp":
	case "none":
		return tracingEnv{}, nil
	default:
		return tracingEnv{}, fmt.Errorf("%s: %q is not supported (otlp or none)", envTracesExporter, exp)
	}
	endpoint := cmpOr(getenv(envTracesEndpoint), getenv(envEndpoint))
	if endpoint == "" {
		return tracingEnv{}, nil
	}
	protoVar, protocol := envTracesProtocol, getenv(envTracesProtocol)
	if protocol == "" {
		protoVar, protocol = envProtocol, getenv(envProtocol)
	}
	switch protocol = strings.TrimSpace(protocol); protocol {
	case "":
		protocol = protocolHTTP
	case protocolGRPC, protocolHTTP:
	default:
		return tracingEnv{}, fmt.Errorf("%s: %q is not supported (grpc or http/protobuf)", protoVar, protocol)
	}
	return tracingEnv{enabled: true, protocol: protocol, endpoint: endpoint}, nil
}

// cmpOr is the first of a, b that is not blank.
func cmpOr(a, b string) string {
	if strings.TrimSpace(a) != "" {
		return a
	}
	return strings.TrimSpace(b)
}

// startTracing builds the tracer provider when the environment asks for
// trace export (tracingFromEnv), as the first component, so that it stops
// last: its shutdown exports the spans of every call the gRPC server
// drained. With tracing off it leaves s.tracing nil and nothing runs.
func (s *server) startTracing(ctx context.Context) error {
	env, err := tracingFromEnv(os.Getenv)
	if err != nil || !env.enabled {
		return err
	}
	var exp sdktrace.SpanExporter
	switch env.protocol {
	case protocolGRPC:
		exp, err = otlptracegrpc.New(ctx)
	default:
		exp, err = otlptracehttp.New(ctx)
	}
	if err != nil {
		return fmt.Errorf("tracing: OTLP exporter: %w", err)
	}
	res, err := resource.New(ctx,
		resource.WithAttributes(semconv.ServiceName(tracingServiceName), semconv.ServiceVersion(buildVersion())),
		resource.WithFromEnv(), // OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES win over the defaults above
		resource.WithTelemetrySDK(),
	)
	if err != nil && !errors.Is(err, resource.ErrPartialResource) {
		return fmt.Errorf("tracing: resource: %w", err)
	}
	// Export failures reach the log; the SDK's default handler would print
	// them with the standard logger instead.
	logger := s.logger.With("component", "tracing")
	otel.SetErrorHandler(otel.ErrorHandlerFunc(func(err error) { logger.Warn("trace export", "error", err) }))
	// The sampler comes from OTEL_TRACES_SAMPLER (default parentbased_always_on),
	// the batch limits from OTEL_BSP_*, both read by the SDK.
	tp := sdktrace.NewTracerProvider(sdktrace.WithBatcher(exp), sdktrace.WithResource(res))
	s.tracing = tp // set only here: a nil *TracerProvider in the interface would not read as off
	s.lc.start("tracing").onStop(func() {
		closeWithin(ctx, tracingFlushTimeout, func(ctx context.Context) error {
			if err := tp.Shutdown(ctx); err != nil {
				logger.Warn("trace flush at shutdown", "error", err)
			}
			return nil
		})
	})
	logger.Info("tracing enabled", "protocol", env.protocol, "endpoint", env.endpoint)
	return nil
}

// tracingOptions are the gRPC server options that trace calls: none when
// tracing is off, so that the hot path carries no stats handler at all.
// Calls are server spans of otelgrpc, which records the method, status code
// and peer address, never metadata (the authorization header) or messages
// (the CSR, the certificates). Health checks are not traced (probes would
// drown the traces). The CA's callers are untrusted: a caller's trace
// context is linked, never made the parent, so it cannot pick the trace or
// its sampling.
func (s *server) tracingOptions() []grpc.ServerOption {
	if s.tracing == nil {
		return nil
	}
	return []grpc.ServerOption{grpc.StatsHandler(otelgrpc.NewServerHandler(
		otelgrpc.WithTracerProvider(s.tracing),
		otelgrpc.WithPropagators(propagation.TraceContext{}),
		otelgrpc.WithPublicEndpoint(),
		otelgrpc.WithMessageEvents(), // none: not even message sizes
		otelgrpc.WithFilter(filters.Not(filters.HealthCheck())),
	))}
}

// buildVersion is the module version the binary was built from ("(devel)"
// for a build from a work tree).
func buildVersion() string {
	if bi, ok := debug.ReadBuildInfo(); ok && bi.Main.Version != "" {
		return bi.Main.Version
	}
	return "unknown"
}
