package telemetry

import (
	"context"
	"encoding/hex"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	collectorpb "go.opentelemetry.io/proto/otlp/collector/trace/v1"
	tracepb "go.opentelemetry.io/proto/otlp/trace/v1"
	"google.golang.org/grpc"
)

func TestStartSpan_ContinuesOrStartsATrace(t *testing.T) {
	in := "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
	s := StartSpan("x", in, time.Now())
	if got := s.Context.String(); got[:36] != in[:36] || got[36:52] == in[36:52] || got[52:] != "-01" {
		t.Errorf("continued span %s from %s: want the same trace id and flags, a new span id", got, in)
	}
	if s.Parent.String() != in {
		t.Errorf("parent %s", s.Parent)
	}
	for _, bad := range []string{"", "garbage", "00-00000000000000000000000000000000-00f067aa0ba902b7-01"} {
		n := StartSpan("x", bad, time.Now())
		if !n.Parent.IsZero() || n.Context.TraceID == [16]byte{} || !n.Sampled() {
			t.Errorf("from %q: want a new sampled trace, got %s (parent %s)", bad, n.Context, n.Parent)
		}
	}
}

func TestMetrics_IstioNamesAndLabels(t *testing.T) {
	reg := prometheus.NewRegistry()
	m, err := NewMetrics(reg)
	if err != nil {
		t.Fatal(err)
	}
	m.Request(&Labels{SourcePrincipal: "spiffe://cluster.local/ns/a/sa/b", DestServiceName: "echo", ResponseCode: 503, Protocol: "http", ResponseFlags: "UF"}, 12*time.Millisecond, 100, 200)
	m.TCPOpened(&Labels{})
	m.TCPClosed(&Labels{}, 10, 20)
	names := map[string]bool{}
	mfs, _ := reg.Gather()
	for _, mf := range mfs {
		names[mf.GetName()] = true
		if mf.GetName() == "istio_requests_total" {
			l := map[string]string{}
			for _, lp := range mf.GetMetric()[0].GetLabel() {
				l[lp.GetName()] = lp.GetValue()
			}
			if l["reporter"] != "waypoint" || l["response_code"] != "503" || l["response_flags"] != "UF" || l["destination_service_name"] != "echo" ||
				l["source_workload"] != "unknown" || l["connection_security_policy"] != "unknown" {
				t.Errorf("labels %v", l)
			}
		}
	}
	for _, n := range []string{"istio_requests_total", "istio_request_duration_milliseconds", "istio_request_bytes", "istio_response_bytes",
		"istio_tcp_connections_opened_total", "istio_tcp_connections_closed_total", "istio_tcp_sent_bytes_total", "istio_tcp_received_bytes_total"} {
		if !names[n] {
			t.Errorf("metric %s missing", n)
		}
	}
	if v := testutil.ToFloat64(m.tcpSent); v != 20 {
		t.Errorf("tcp sent %v", v)
	}
}

// collector is a real OTLP/gRPC trace receiver on loopback.
type collector struct {
	collectorpb.UnimplementedTraceServiceServer
	mu    sync.Mutex
	spans []*tracepb.Span
	got   chan struct{}
}

func (c *collector) Export(_ context.Context, req *collectorpb.ExportTraceServiceRequest) (*collectorpb.ExportTraceServiceResponse, error) {
	c.mu.Lock()
	for _, rs := range req.GetResourceSpans() {
		for _, ss := range rs.GetScopeSpans() {
			c.spans = append(c.spans, ss.GetSpans()...)
		}
	}
	c.mu.Unlock()
	select {
	case c.got <- struct{}{}:
	default:
	}
	return &collectorpb.ExportTraceServiceResponse{}, nil
}

func TestOTLP_ExportsSpansWithTheWireIDs(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	c := &collector{got: make(chan struct{}, 1)}
	srv := grpc.NewServer()
	collectorpb.RegisterTraceServiceServer(srv, c)
	go srv.Serve(ln)
	defer srv.Stop()
	o, err := NewOTLP(context.Background(), ln.Addr().String(), "waypoint.test")
	if err != nil {
		t.Fatal(err)
	}
	s := StartSpan("GET 10.96.0.10:80", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", time.Now())
	s.End, s.Status, s.Attrs = s.Start.Add(time.Millisecond), 200, map[string]string{"http.method": "GET"}
	o.Export(s)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := o.Shutdown(ctx); err != nil {
		t.Fatal(err)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if len(c.spans) != 1 {
		t.Fatalf("collector got %d spans", len(c.spans))
	}
	sp := c.spans[0]
	if hex.EncodeToString(sp.GetTraceId()) != "4bf92f3577b34da6a3ce929d0e0e4736" || hex.EncodeToString(sp.GetParentSpanId()) != "00f067aa0ba902b7" ||
		hex.EncodeToString(sp.GetSpanId()) != hex.EncodeToString(s.Context.ParentID[:]) || sp.GetName() != "GET 10.96.0.10:80" {
		t.Errorf("exported span %v does not carry the propagated ids", sp)
	}
}
