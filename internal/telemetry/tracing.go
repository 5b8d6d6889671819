package telemetry

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strings"

	"github.com/exaring/otelpgx"
	"github.com/jackc/pgx/v5"
	"github.com/redis/go-redis/extra/redisotel/v9"
	"github.com/redis/go-redis/v9"
	"go.opentelemetry.io/contrib/instrumentation/google.golang.org/grpc/otelgrpc"
	"go.opentelemetry.io/contrib/instrumentation/google.golang.org/grpc/otelgrpc/filters"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/exporters/otlp/otlptrace/otlptracegrpc"
	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/sdk/resource"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"google.golang.org/grpc"
)

// TracingConfig configures NewTracing.
type TracingConfig struct {
	// Endpoint is the OTLP/gRPC collector: "http://host:4317" (plaintext),
	// "https://host:4317" (TLS), or "host:port" (plaintext on a loopback
	// host, TLS otherwise).
	Endpoint string
	// SampleRatio is the fraction of new traces recorded (0..1); a call that
	// arrives with a sampled parent is always recorded.
	SampleRatio float64
	// ServiceName is the service.name resource attribute; OTEL_SERVICE_NAME
	// and OTEL_RESOURCE_ATTRIBUTES override it.
	ServiceName string
}

// Tracing is an OpenTelemetry tracer provider exporting over OTLP/gRPC, and
// the instrumentation that uses it: each gRPC call (a stats handler), each
// PostgreSQL query (a pgx tracer) and each Redis command. Everything is
// passed this provider explicitly: no global OpenTelemetry state is set.
type Tracing struct {
	tp   *sdktrace.TracerProvider
	prop propagation.TextMapPropagator
}

// NewTracing starts the exporter. It does not wait for the collector: spans
// are batched and dropped (not blocking calls) while it is unreachable.
func NewTracing(ctx context.Context, c TracingConfig) (*Tracing, error) {
	if c.Endpoint == "" {
		return nil, errors.New("telemetry: no OTLP endpoint")
	}
	if c.SampleRatio < 0 || c.SampleRatio > 1 {
		return nil, fmt.Errorf("telemetry: sample ratio %v is not within 0..1", c.SampleRatio)
	}
	if c.ServiceName == "" {
		c.ServiceName = "tallyd"
	}
	opts := []otlptracegrpc.Option{}
	if strings.Contains(c.Endpoint, "://") {
		opts = append(opts, otlptracegrpc.WithEndpointURL(c.Endpoint))
	} else {
		opts = append(opts, otlptracegrpc.WithEndpoint(c.Endpoint))
		if host, _, err := net.SplitHostPort(c.Endpoint); err == nil && isLoopbackHost(host) {
			opts = append(opts, otlptracegrpc.WithInsecure())
		}
	}
	exp, err := otlptracegrpc.New(ctx, opts...)
	if err != nil {
		return nil, fmt.Errorf("telemetry: OTLP exporter: %w", err)
	}
	res, err := resource.New(ctx,
		resource.WithAttributes(attribute.String("service.name", c.ServiceName)),
		resource.WithTelemetrySDK(),
		resource.WithFromEnv(),
	)
	if err != nil {
		return nil, fmt.Errorf("telemetry: resource: %w", err)
	}
	tp := sdktrace.NewTracerProvider(
		sdktrace.WithBatcher(exp),
		sdktrace.WithResource(res),
		sdktrace.WithSampler(sdktrace.ParentBased(sdktrace.TraceIDRatioBased(c.SampleRatio))),
	)
	return &Tracing{tp: tp, prop: propagation.NewCompositeTextMapPropagator(propagation.TraceContext{}, propagation.Baggage{})}, nil
}

func isLoopbackHost(host string) bool {
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

// ServerOption is the gRPC stats handler that starts a span per call (health
// checks excluded), continuing the caller's trace from its traceparent.
func (t *Tracing) ServerOption() grpc.ServerOption {
	return grpc.StatsHandler(otelgrpc.NewServerHandler(
		otelgrpc.WithTracerProvider(t.tp),
		otelgrpc.WithPropagators(t.prop),
		otelgrpc.WithFilter(filters.Not(filters.HealthCheck())),
	))
}

// PgxTracer traces every PostgreSQL query (statement text, never the
// parameters) as a child of the call's span. A group-commit batch runs
// outside any one call, so its transaction is a trace of its own.
func (t *Tracing) PgxTracer() pgx.QueryTracer {
	return otelpgx.NewTracer(otelpgx.WithTracerProvider(t.tp))
}

// InstrumentRedis traces every command of the cache's Redis client.
func (t *Tracing) InstrumentRedis(c redis.UniversalClient) error {
	return redisotel.InstrumentTracing(c, redisotel.WithTracerProvider(t.tp))
}

// Shutdown flushes the spans still buffered and stops the exporter.
func (t *Tracing) Shutdown(ctx context.Context) error { return t.tp.Shutdown(ctx) }
