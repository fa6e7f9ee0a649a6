package xds

import (
	"strings"

	"github.com/prometheus/client_golang/prometheus"

	ixds "github.com/meshlite/meshlite/internal/xds"
)

// metrics use istiod's names where istiod has one.
type metrics struct {
	clients  prometheus.Gauge
	pushes   *prometheus.CounterVec
	pushTime *prometheus.HistogramVec
	rejects  *prometheus.CounterVec
	authFail prometheus.Counter
}

func newMetrics(reg prometheus.Registerer) *metrics {
	m := &metrics{
		clients: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "pilot_xds", Help: "Number of connected xDS clients.",
		}),
		pushes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "pilot_xds_pushes", Help: "Delta xDS responses sent, by type.",
		}, []string{"type"}),
		pushTime: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "pilot_xds_push_time",
			Help:    "Seconds from a configuration change to its push reaching a client's stream, by type.",
			Buckets: []float64{.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10},
		}, []string{"type"}),
		rejects: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "pilot_total_xds_rejects", Help: "Responses NACKed by clients, by type.",
		}, []string{"type"}),
		authFail: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "meshlite_istiod_xds_auth_failures_total", Help: "xDS streams refused for bad credentials or node metadata.",
		}),
	}
	if reg != nil {
		reg.MustRegister(m.clients, m.pushes, m.pushTime, m.rejects, m.authFail)
	}
	return m
}

// metricType is the short type label: "address", "authorization".
func metricType(typeURL string) string {
	switch typeURL {
	case ixds.TypeAddress:
		return "address"
	case ixds.TypeAuthorization:
		return "authorization"
	}
	if i := strings.LastIndexByte(typeURL, '.'); i >= 0 {
		return strings.ToLower(typeURL[i+1:])
	}
	return typeURL
}
