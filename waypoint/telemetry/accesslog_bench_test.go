package telemetry

import (
	"context"
	"io"
	"log/slog"
	"testing"
	"time"
)

func sampleAccess() *Access {
	return &Access{Method: "GET", Authority: "echo.default.svc.cluster.local", Path: "/api/x?y=1", Protocol: "HTTP/1.1", Status: 200,
		Duration: 1234567 * time.Nanosecond, BytesIn: 0, BytesOut: 2, SourceAddr: "10.244.0.5:40000", SourcePrincipal: "cluster.local/ns/default/sa/client",
		DestService: "default/echo.default.svc.cluster.local", Route: "HTTPRoute/default/r/rule-0", Upstream: "10.244.1.7:8080",
		UpstreamPrincipal: "spiffe://cluster.local/ns/default/sa/echo", Attempts: 1, TraceID: "4bf92f3577b34da6a3ce929d0e0e4736"}
}

// go test ./waypoint/telemetry -run '^$' -bench AccessLog
func BenchmarkAccessLog(b *testing.B) {
	l := slog.New(slog.NewJSONHandler(io.Discard, nil)).With("component", "waypoint", "part", "access")
	a := sampleAccess()
	b.ReportAllocs()
	for b.Loop() {
		LogAccess(context.Background(), l, a)
	}
}

func BenchmarkAccessLogJSON(b *testing.B) {
	l := NewJSONAccess(io.Discard, nil, "component", "waypoint", "part", "access")
	a := sampleAccess()
	b.ReportAllocs()
	for b.Loop() {
		l.LogAccess(context.Background(), a)
	}
}
