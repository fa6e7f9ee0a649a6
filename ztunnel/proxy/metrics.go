package proxy

import (
	"fmt"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/meshlite/meshlite/proto/workload"
)

// Istio's TCP metric labels (the ones ztunnel can fill cheaply; the rest
// of Istio's set is about requests, not connections).
var tcpLabels = []string{
	"reporter",
	"source_workload", "source_workload_namespace", "source_principal",
	"source_canonical_service", "source_canonical_revision", "source_cluster",
	"destination_service", "destination_service_namespace", "destination_service_name",
	"destination_workload", "destination_workload_namespace", "destination_principal",
	"destination_canonical_service", "destination_canonical_revision", "destination_cluster",
	"request_protocol", "response_flags", "connection_security_policy",
}

// Metrics are the proxy's Prometheus metrics: Istio's istio_tcp_* with
// Istio's labels, and meshlite_ztunnel_* for what Istio does not count.
type Metrics struct {
	opened, closed, sent, received *prometheus.CounterVec
	refused                        *prometheus.CounterVec
	active                         *prometheus.GaugeVec
}

// NewMetrics makes the metrics and registers them with reg (nil: kept
// unregistered, e.g. in tests that do not look).
func NewMetrics(reg prometheus.Registerer) (*Metrics, error) {
	cv := func(name, help string) *prometheus.CounterVec {
		return prometheus.NewCounterVec(prometheus.CounterOpts{Name: name, Help: help}, tcpLabels)
	}
	m := &Metrics{
		opened:   cv("istio_tcp_connections_opened_total", "TCP connections opened."),
		closed:   cv("istio_tcp_connections_closed_total", "TCP connections closed."),
		sent:     cv("istio_tcp_sent_bytes_total", "Bytes sent to the client (response direction)."),
		received: cv("istio_tcp_received_bytes_total", "Bytes received from the client (request direction)."),
		refused: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "meshlite_ztunnel_connections_refused_total",
			Help: "Connections refused before reaching their destination, by direction and reason.",
		}, []string{"direction", "reason"}),
		active: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "meshlite_ztunnel_connections_active",
			Help: "Connections being proxied, by direction and security (mutual_tls or none).",
		}, []string{"direction", "security"}),
	}
	if reg != nil {
		for _, c := range []prometheus.Collector{m.opened, m.closed, m.sent, m.received, m.refused, m.active} {
			if err := reg.Register(c); err != nil {
				return nil, fmt.Errorf("proxy: register metrics: %w", err)
			}
		}
	}
	return m, nil
}

// Reasons for meshlite_ztunnel_connections_refused_total.
const (
	refusedPolicy   = "policy"
	refusedNoRoute  = "no_route"
	refusedUpstream = "upstream"
	refusedBad      = "bad_request"
	refusedNoPod    = "no_pod"
)

func (m *Metrics) refuse(dir Direction, reason string) {
	m.refused.WithLabelValues(dir.String(), reason).Inc()
}

func orUnknown(s string) string {
	if s == "" {
		return "unknown"
	}
	return s
}

func principal(id spiffeid.ID) string {
	if id.IsZero() {
		return "unknown"
	}
	return id.String()
}

// labelValues fills tcpLabels, in order, for one connection.
func labelValues(reporter string, src, dst *workload.Workload, srcID, dstID spiffeid.ID, svc *workload.Service, mtls bool) []string {
	sec := "none"
	if mtls {
		sec = "mutual_tls"
	}
	svcHost, svcNS, svcName := "unknown", "unknown", "unknown"
	if svc != nil {
		svcHost, svcNS, svcName = orUnknown(svc.GetHostname()), orUnknown(svc.GetNamespace()), orUnknown(svc.GetName())
	}
	return []string{
		reporter,
		orUnknown(workloadNameOf(src)), orUnknown(src.GetNamespace()), principal(srcID),
		orUnknown(src.GetCanonicalName()), orUnknown(src.GetCanonicalRevision()), orUnknown(src.GetClusterId()),
		svcHost, svcNS, svcName,
		orUnknown(workloadNameOf(dst)), orUnknown(dst.GetNamespace()), principal(dstID),
		orUnknown(dst.GetCanonicalName()), orUnknown(dst.GetCanonicalRevision()), orUnknown(dst.GetClusterId()),
		"tcp", "-", sec,
	}
}

// workloadNameOf is Istio's workload name: the owner's (Deployment...)
// when istiod sent one, else the pod's.
func workloadNameOf(w *workload.Workload) string {
	if n := w.GetWorkloadName(); n != "" {
		return n
	}
	return w.GetName()
}
