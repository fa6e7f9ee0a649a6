package telemetry

import (
	"context"
	"fmt"
	"strconv"
	"time"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/exporters/otlp/otlptrace/otlptracegrpc"
	"go.opentelemetry.io/otel/sdk/resource"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	"go.opentelemetry.io/otel/trace"
	"google.golang.org/grpc"
)

// OTLP exports spans over OTLP/gRPC in batches. The waypoint keeps its own
// span ids (they are on the wire in traceparent), so spans are handed to
// the SDK's batch processor as finished snapshots instead of being started
// through a tracer.
type OTLP struct {
	proc sdktrace.SpanProcessor
	res  *resource.Resource
}

// NewOTLP exports to endpoint ("host:port", plaintext gRPC as collectors
// in a mesh usually listen) as service name service.
func NewOTLP(ctx context.Context, endpoint, service string, opts ...grpc.DialOption) (*OTLP, error) {
	exp, err := otlptracegrpc.New(ctx, otlptracegrpc.WithEndpoint(endpoint), otlptracegrpc.WithInsecure(),
		otlptracegrpc.WithDialOption(opts...), otlptracegrpc.WithTimeout(5*time.Second))
	if err != nil {
		return nil, fmt.Errorf("OTLP exporter for %s: %w", endpoint, err)
	}
	return &OTLP{
		proc: sdktrace.NewBatchSpanProcessor(exp, sdktrace.WithBatchTimeout(time.Second), sdktrace.WithMaxQueueSize(4096)),
		res:  resource.NewSchemaless(attribute.String("service.name", service)),
	}, nil
}

// Export queues s; a full queue drops it (tracing never slows requests).
func (o *OTLP) Export(s *Span) {
	sc := trace.NewSpanContext(trace.SpanContextConfig{TraceID: s.Context.TraceID, SpanID: s.Context.ParentID, TraceFlags: trace.TraceFlags(s.Context.Flags), Remote: false})
	var parent trace.SpanContext
	if !s.Parent.IsZero() {
		parent = trace.NewSpanContext(trace.SpanContextConfig{TraceID: s.Parent.TraceID, SpanID: s.Parent.ParentID, TraceFlags: trace.TraceFlags(s.Parent.Flags), Remote: true})
	}
	attrs := make([]attribute.KeyValue, 0, len(s.Attrs)+1)
	for k, v := range s.Attrs {
		attrs = append(attrs, attribute.String(k, v))
	}
	attrs = append(attrs, attribute.String("http.status_code", strconv.Itoa(s.Status)))
	st := sdktrace.Status{Code: codes.Unset}
	if s.Status >= 500 || s.Status == 0 {
		st.Code = codes.Error
	}
	stub := tracetest.SpanStub{Name: s.Name, SpanContext: sc, Parent: parent, SpanKind: trace.SpanKindServer,
		StartTime: s.Start, EndTime: s.End, Attributes: attrs, Status: st, Resource: o.res}
	o.proc.OnEnd(stub.Snapshot())
}

// Shutdown flushes and stops the exporter.
func (o *OTLP) Shutdown(ctx context.Context) error { return o.proc.Shutdown(ctx) }
