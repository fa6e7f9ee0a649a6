// Package telemetry owns what the waypoint reports about the traffic it
// handles: Istio's request and TCP metrics (reporter="waypoint"), W3C
// traceparent propagation (continue a trace or start one) with span records
// handed to an optional exporter, and the per-request access log line. It
// observes and never changes a request's outcome.
package telemetry

import (
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// Labels are Istio's standard metric labels.
type Labels struct {
	SourceWorkload, SourceNamespace, SourcePrincipal, SourceCanonical string
	DestWorkload, DestNamespace, DestPrincipal, DestCanonical         string
	DestService, DestServiceName, DestServiceNamespace                string
	Protocol, ResponseFlags, SecurityPolicy                           string
	ResponseCode                                                      int
	GRPCStatus                                                        string
}

var requestLabelNames = []string{
	"reporter", "source_workload", "source_workload_namespace", "source_principal", "source_canonical_service",
	"destination_workload", "destination_workload_namespace", "destination_principal", "destination_canonical_service",
	"destination_service", "destination_service_name", "destination_service_namespace",
	"request_protocol", "response_code", "grpc_response_status", "response_flags", "connection_security_policy",
}

var tcpLabelNames = []string{
	"reporter", "source_workload", "source_workload_namespace", "source_principal",
	"destination_workload", "destination_workload_namespace", "destination_principal",
	"destination_service", "destination_service_name", "destination_service_namespace",
	"request_protocol", "response_flags", "connection_security_policy",
}

// Metrics are the waypoint's Istio metrics.
type Metrics struct {
	requests  *prometheus.CounterVec
	duration  *prometheus.HistogramVec
	reqBytes  *prometheus.HistogramVec
	respBytes *prometheus.HistogramVec

	tcpOpened, tcpClosed, tcpSent, tcpReceived *prometheus.CounterVec

	series sync.Map // Labels -> *requestSeries
	cached atomic.Int64
}

// Istio's bucket boundaries.
var (
	durationBuckets = []float64{0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000, 300000, 600000, 1800000, 3600000}
	sizeBuckets     = prometheus.ExponentialBuckets(1, 10, 9)
)

// NewMetrics registers the metrics on reg.
func NewMetrics(reg prometheus.Registerer) (*Metrics, error) {
	m := &Metrics{
		requests:    prometheus.NewCounterVec(prometheus.CounterOpts{Name: "istio_requests_total", Help: "Requests handled by the waypoint."}, requestLabelNames),
		duration:    prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: "istio_request_duration_milliseconds", Help: "Request duration.", Buckets: durationBuckets}, requestLabelNames),
		reqBytes:    prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: "istio_request_bytes", Help: "Request size (headers and body).", Buckets: sizeBuckets}, requestLabelNames),
		respBytes:   prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: "istio_response_bytes", Help: "Response size (headers and body).", Buckets: sizeBuckets}, requestLabelNames),
		tcpOpened:   prometheus.NewCounterVec(prometheus.CounterOpts{Name: "istio_tcp_connections_opened_total", Help: "TCP connections relayed by the waypoint, opened."}, tcpLabelNames),
		tcpClosed:   prometheus.NewCounterVec(prometheus.CounterOpts{Name: "istio_tcp_connections_closed_total", Help: "TCP connections relayed by the waypoint, closed."}, tcpLabelNames),
		tcpSent:     prometheus.NewCounterVec(prometheus.CounterOpts{Name: "istio_tcp_sent_bytes_total", Help: "Bytes sent to the client on relayed TCP connections."}, tcpLabelNames),
		tcpReceived: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "istio_tcp_received_bytes_total", Help: "Bytes received from the client on relayed TCP connections."}, tcpLabelNames),
	}
	for _, c := range []prometheus.Collector{m.requests, m.duration, m.reqBytes, m.respBytes, m.tcpOpened, m.tcpClosed, m.tcpSent, m.tcpReceived} {
		if err := reg.Register(c); err != nil {
			return nil, err
		}
	}
	return m, nil
}

func orUnknown(s string) string {
	if s == "" {
		return "unknown"
	}
	return s
}

func (l *Labels) request() prometheus.Labels {
	return prometheus.Labels{
		"reporter": "waypoint", "source_workload": orUnknown(l.SourceWorkload), "source_workload_namespace": orUnknown(l.SourceNamespace),
		"source_principal": orUnknown(l.SourcePrincipal), "source_canonical_service": orUnknown(l.SourceCanonical),
		"destination_workload": orUnknown(l.DestWorkload), "destination_workload_namespace": orUnknown(l.DestNamespace),
		"destination_principal": orUnknown(l.DestPrincipal), "destination_canonical_service": orUnknown(l.DestCanonical),
		"destination_service": orUnknown(l.DestService), "destination_service_name": orUnknown(l.DestServiceName),
		"destination_service_namespace": orUnknown(l.DestServiceNamespace), "request_protocol": orUnknown(l.Protocol),
		"response_code": strconv.Itoa(l.ResponseCode), "grpc_response_status": l.GRPCStatus,
		"response_flags": orDash(l.ResponseFlags), "connection_security_policy": orUnknown(l.SecurityPolicy),
	}
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

func (l *Labels) tcp() prometheus.Labels {
	return prometheus.Labels{
		"reporter": "waypoint", "source_workload": orUnknown(l.SourceWorkload), "source_workload_namespace": orUnknown(l.SourceNamespace),
		"source_principal":     orUnknown(l.SourcePrincipal),
		"destination_workload": orUnknown(l.DestWorkload), "destination_workload_namespace": orUnknown(l.DestNamespace),
		"destination_principal": orUnknown(l.DestPrincipal),
		"destination_service":   orUnknown(l.DestService), "destination_service_name": orUnknown(l.DestServiceName),
		"destination_service_namespace": orUnknown(l.DestServiceNamespace), "request_protocol": "tcp",
		"response_flags": orDash(l.ResponseFlags), "connection_security_policy": orUnknown(l.SecurityPolicy),
	}
}

// requestSeries are the four request metrics of one label set.
type requestSeries struct {
	requests                      prometheus.Counter
	duration, reqBytes, respBytes prometheus.Observer
}

// maxCachedSeries bounds the series cache; label sets beyond it are
// looked up in the vectors each time (correct, only slower).
const maxCachedSeries = 10000

// Request records one finished request.
func (m *Metrics) Request(l *Labels, d time.Duration, reqBytes, respBytes int64) {
	if m == nil {
		return
	}
	s := m.seriesFor(l)
	s.requests.Inc()
	s.duration.Observe(float64(d) / float64(time.Millisecond))
	s.reqBytes.Observe(float64(reqBytes))
	s.respBytes.Observe(float64(respBytes))
}

// seriesFor finds l's series. Building the label map and hashing 17
// labels four times was a tenth of the waypoint's CPU per request; the
// cache keyed by the Labels value itself skips both after the first
// request of a label set.
func (m *Metrics) seriesFor(l *Labels) *requestSeries {
	if v, ok := m.series.Load(*l); ok {
		return v.(*requestSeries)
	}
	pl := l.request()
	s := &requestSeries{requests: m.requests.With(pl), duration: m.duration.With(pl), reqBytes: m.reqBytes.With(pl), respBytes: m.respBytes.With(pl)}
	if m.cached.Load() < maxCachedSeries {
		if _, loaded := m.series.LoadOrStore(*l, s); !loaded {
			m.cached.Add(1)
		}
	}
	return s
}

// TCPOpened records a relayed connection's start.
func (m *Metrics) TCPOpened(l *Labels) {
	if m != nil {
		m.tcpOpened.With(l.tcp()).Inc()
	}
}

// TCPClosed records its end with the bytes relayed each way.
func (m *Metrics) TCPClosed(l *Labels, fromClient, toClient int64) {
	if m == nil {
		return
	}
	pl := l.tcp()
	m.tcpClosed.With(pl).Inc()
	m.tcpReceived.With(pl).Add(float64(fromClient))
	m.tcpSent.With(pl).Add(float64(toClient))
}

// RequestsCounter exposes istio_requests_total (tests, admin).
func (m *Metrics) RequestsCounter() *prometheus.CounterVec { return m.requests }
