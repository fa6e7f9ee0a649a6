// Package debug serves istiod-lite's debug and metrics endpoints over HTTP
// (meant for localhost): the connected xDS clients with their last ACKed
// versions, the configuration one client holds, every resource served,
// readiness and Prometheus metrics. It only reads.
package debug

import (
	"encoding/json"
	"net/http"
	"net/http/pprof"
	"sort"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"google.golang.org/protobuf/encoding/protojson"

	ixds "github.com/meshlite/meshlite/internal/xds"
	"github.com/meshlite/meshlite/istiod-lite/xds"

	// The resource types, so their JSON form can be rendered.
	"github.com/meshlite/meshlite/proto/l7"
	_ "github.com/meshlite/meshlite/proto/security"
	_ "github.com/meshlite/meshlite/proto/workload"
)

// Handler returns the debug mux:
//
//	/debug/connections                 connected clients (JSON)
//	/debug/config_dump?client=ID       what client ID holds, with content (JSON)
//	/debug/resources[?type=address]    every resource served (JSON; types address, authorization, l7)
//	/ready                             200 once the first full picture is published
//	/metrics                           Prometheus
//	/debug/pprof/                      Go profiles
func Handler(srv *xds.Server, g prometheus.Gatherer) http.Handler {
	mux := http.NewServeMux()
	cache := srv.Cache()
	mux.HandleFunc("GET /debug/connections", func(w http.ResponseWriter, _ *http.Request) {
		writeJSON(w, srv.Clients())
	})
	mux.HandleFunc("GET /debug/config_dump", func(w http.ResponseWriter, r *http.Request) {
		id := r.URL.Query().Get("client")
		held, ok := srv.ClientResources(id)
		if !ok {
			http.Error(w, "no connected client "+id+" (see /debug/connections)", http.StatusNotFound)
			return
		}
		out := map[string][]entry{}
		for t, m := range held {
			out[shortType(t)] = entries(cache, t, m)
		}
		writeJSON(w, out)
	})
	mux.HandleFunc("GET /debug/resources", func(w http.ResponseWriter, r *http.Request) {
		out := map[string][]entry{}
		for _, t := range []string{ixds.TypeAddress, ixds.TypeAuthorization, l7.TypeURL} {
			if q := r.URL.Query().Get("type"); q != "" && q != shortType(t) {
				continue
			}
			m := map[string]string{}
			for _, n := range cache.Names(t) {
				if res := cache.Get(t, n); res != nil {
					m[n] = res.Version
				}
			}
			out[shortType(t)] = entries(cache, t, m)
		}
		writeJSON(w, out)
	})
	mux.HandleFunc("GET /ready", func(w http.ResponseWriter, _ *http.Request) {
		select {
		case <-cache.Ready():
			_, _ = w.Write([]byte("ready\n"))
		default:
			http.Error(w, "not synced yet", http.StatusServiceUnavailable)
		}
	})
	mux.Handle("GET /metrics", promhttp.HandlerFor(g, promhttp.HandlerOpts{}))
	mux.HandleFunc("/debug/pprof/", pprof.Index)
	mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
	mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
	mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	return mux
}

// entry is one resource as a client holds it; Current is false when the
// served version moved on (a push is on its way or was NACKed).
type entry struct {
	Name     string          `json:"name"`
	Version  string          `json:"version"`
	Current  bool            `json:"current"`
	Resource json.RawMessage `json:"resource,omitempty"`
}

func entries(cache *xds.Cache, t string, held map[string]string) []entry {
	out := make([]entry, 0, len(held))
	for n, v := range held {
		e := entry{Name: n, Version: v}
		if r := cache.Get(t, n); r != nil {
			e.Current = r.Version == v
			if b, err := protojson.Marshal(r.Body); err == nil {
				e.Resource = b
			}
		}
		out = append(out, e)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out
}

func shortType(t string) string {
	switch t {
	case ixds.TypeAddress:
		return "address"
	case ixds.TypeAuthorization:
		return "authorization"
	case l7.TypeURL:
		return "l7"
	}
	return t
}

func writeJSON(w http.ResponseWriter, v any) {
	w.Header().Set("Content-Type", "application/json")
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	_ = enc.Encode(v)
}
