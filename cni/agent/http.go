package agent

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

type metrics struct {
	reg            *prometheus.Registry
	pluginRequests *prometheus.CounterVec
	enrollErrors   prometheus.Counter
}

func newMetrics(a *Agent) *metrics {
	reg := prometheus.NewRegistry()
	m := &metrics{
		reg: reg,
		pluginRequests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "meshlite_cni_agent_plugin_requests_total",
			Help: "CNI plugin requests answered, by command and resulting state.",
		}, []string{"command", "state"}),
		enrollErrors: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "meshlite_cni_agent_enroll_errors_total",
			Help: "Pods that could not be redirected.",
		}),
	}
	reg.MustRegister(m.pluginRequests, m.enrollErrors,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "meshlite_cni_agent_pods_enrolled",
			Help: "Pods on this node whose traffic the agent redirects.",
		}, func() float64 {
			a.mu.Lock()
			defer a.mu.Unlock()
			return float64(len(a.pods))
		}),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "meshlite_cni_agent_pods_held",
			Help: "Enrolled pods ztunnel holds.",
		}, func() float64 {
			a.mu.Lock()
			uids := make([]string, 0, len(a.pods))
			for uid := range a.pods {
				uids = append(uids, uid)
			}
			a.mu.Unlock()
			n := 0
			for _, uid := range uids {
				if a.zds.Held(uid) {
					n++
				}
			}
			return float64(n)
		}),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "meshlite_cni_agent_ztunnel_connections",
			Help: "ztunnel connections that completed their snapshot.",
		}, func() float64 { return float64(a.zds.Connected()) }),
	)
	return m
}

// serveHTTP serves /readyz on ReadyAddr and /metrics on MetricsAddr (one
// server when they are equal).
func (a *Agent) serveHTTP(ctx context.Context) error {
	ready := http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		ok, why := a.Ready()
		if !ok {
			http.Error(w, why, http.StatusServiceUnavailable)
			return
		}
		fmt.Fprintln(w, why)
	})
	muxes := map[string]*http.ServeMux{}
	mux := func(addr string) *http.ServeMux {
		if muxes[addr] == nil {
			muxes[addr] = http.NewServeMux()
		}
		return muxes[addr]
	}
	if a.cfg.ReadyAddr != "" {
		mux(a.cfg.ReadyAddr).Handle("/readyz", ready)
	}
	if a.cfg.MetricsAddr != "" {
		mux(a.cfg.MetricsAddr).Handle("/metrics", promhttp.HandlerFor(a.metrics.reg, promhttp.HandlerOpts{}))
	}
	errc := make(chan error, len(muxes))
	var servers []*http.Server
	for addr, m := range muxes {
		ln, err := net.Listen("tcp", addr)
		if err != nil {
			for _, s := range servers {
				s.Close()
			}
			return fmt.Errorf("listen on %s: %w", addr, err)
		}
		s := &http.Server{Handler: m, ReadHeaderTimeout: 5 * time.Second}
		servers = append(servers, s)
		go func() { errc <- s.Serve(ln) }()
	}
	select {
	case <-ctx.Done():
	case err := <-errc:
		if !errors.Is(err, http.ErrServerClosed) {
			return err
		}
	}
	sctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	for _, s := range servers {
		s.Shutdown(sctx)
	}
	return nil
}
