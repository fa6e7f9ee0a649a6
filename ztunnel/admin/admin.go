package admin

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/http/pprof"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/meshlite/meshlite/ztunnel/certs"
	"github.com/meshlite/meshlite/ztunnel/proxy"
	"github.com/meshlite/meshlite/ztunnel/state"
)

// Default addresses, as Istio's ztunnel uses them.
const (
	DefaultAdminAddr   = "127.0.0.1:15000"
	DefaultMetricsAddr = ":15020"
	DefaultReadyAddr   = ":15021"
)

// Config configures a Server. An empty address turns that listener off.
type Config struct {
	AdminAddr, MetricsAddr, ReadyAddr string

	Snapshot     func() state.Snapshot
	LocalPods    func() []string
	Certificates func() []certs.Status
	Connections  func() []proxy.ConnInfo
	// Ready is nil when ztunnel is ready to serve.
	Ready    func() error
	Gatherer prometheus.Gatherer
	// Redirection, if set, checks a local pod's redirection by Workload
	// uid (see Workload.Redirection).
	Redirection func(ctx context.Context, uid string) (status, why string)
	// Info, if set, describes this ztunnel (the dump's "ztunnel" object).
	Info func() Info
	// LogLevel is changed by POST /logging?level=...
	LogLevel *slog.LevelVar
	Log      *slog.Logger
}

// Server is the set of HTTP listeners.
type Server struct {
	cfg     Config
	servers []*http.Server
	lns     []net.Listener
	names   []string
	addrs   map[string]net.Addr
}

// New opens the listeners (so a busy port is an error at start, not later).
func New(cfg Config) (*Server, error) {
	if cfg.Snapshot == nil || cfg.LocalPods == nil || cfg.Certificates == nil || cfg.Connections == nil ||
		cfg.Ready == nil || cfg.Gatherer == nil || cfg.LogLevel == nil {
		return nil, errors.New("admin: incomplete config")
	}
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	s := &Server{cfg: cfg, addrs: map[string]net.Addr{}}
	for _, l := range []struct {
		name, addr string
		h          http.Handler
	}{
		{"admin", cfg.AdminAddr, s.adminMux()},
		{"metrics", cfg.MetricsAddr, s.metricsMux()},
		{"ready", cfg.ReadyAddr, s.readyMux()},
	} {
		if l.addr == "" {
			continue
		}
		ln, err := reusePort.Listen(context.Background(), "tcp", l.addr)
		if err != nil {
			s.closeListeners()
			return nil, fmt.Errorf("admin: listen for %s on %s: %w", l.name, l.addr, err)
		}
		s.lns = append(s.lns, ln)
		s.names = append(s.names, l.name)
		s.addrs[l.name] = ln.Addr()
		s.servers = append(s.servers, &http.Server{Handler: l.h, ReadHeaderTimeout: 10 * time.Second,
			ErrorLog: slog.NewLogLogger(cfg.Log.Handler(), slog.LevelDebug)})
	}
	return s, nil
}

// reusePort lets a ztunnel that replaces this one on the node (a rolling
// update with surge) open the node endpoints while this one drains.
var reusePort = net.ListenConfig{Control: func(network, address string, c syscall.RawConn) error {
	var serr error
	if err := c.Control(func(fd uintptr) {
		serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_REUSEPORT, 1)
	}); err != nil {
		return err
	}
	if serr != nil {
		return fmt.Errorf("set SO_REUSEPORT: %w", serr)
	}
	return nil
}}

// CloseReady closes the readiness listener: a draining ztunnel leaves the
// node's readiness probes to its successor.
func (s *Server) CloseReady() {
	for i, l := range s.names {
		if l == "ready" {
			s.lns[i].Close()
		}
	}
}

func (s *Server) closeListeners() {
	for _, ln := range s.lns {
		ln.Close()
	}
}

// Addr returns where the "admin", "metrics" or "ready" listener is (nil if
// off).
func (s *Server) Addr(name string) net.Addr { return s.addrs[name] }

// Run serves until ctx ends, then shuts the servers down (in-flight
// requests get a second to finish).
func (s *Server) Run(ctx context.Context) error {
	var wg sync.WaitGroup
	errc := make(chan error, len(s.servers))
	for i, srv := range s.servers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := srv.Serve(s.lns[i]); err != nil && !errors.Is(err, http.ErrServerClosed) && !errors.Is(err, net.ErrClosed) {
				errc <- fmt.Errorf("admin: serve on %s: %w", s.lns[i].Addr(), err)
			}
		}()
	}
	var err error
	select {
	case <-ctx.Done():
	case err = <-errc:
	}
	sctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	for _, srv := range s.servers {
		if serr := srv.Shutdown(sctx); serr != nil {
			srv.Close()
		}
	}
	wg.Wait()
	return err
}

func writeJSON(w http.ResponseWriter, v any) {
	w.Header().Set("Content-Type", "application/json")
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	_ = enc.Encode(v)
}

func (s *Server) adminMux() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /config_dump", func(w http.ResponseWriter, r *http.Request) {
		d := BuildDump(s.cfg.Snapshot(), s.cfg.LocalPods(), s.cfg.Certificates(), s.cfg.Connections())
		if s.cfg.Info != nil {
			info := s.cfg.Info()
			d.Ztunnel = &info
		}
		if s.cfg.Redirection != nil {
			for i := range d.Workloads {
				if w := &d.Workloads[i]; w.Local {
					w.Redirection, w.RedirectionError = s.cfg.Redirection(r.Context(), w.UID)
				}
			}
		}
		writeJSON(w, d)
	})
	mux.HandleFunc("GET /debug/connections", func(w http.ResponseWriter, r *http.Request) {
		conns := s.cfg.Connections()
		if conns == nil {
			conns = []proxy.ConnInfo{}
		}
		writeJSON(w, conns)
	})
	mux.HandleFunc("GET /debug/certificates", func(w http.ResponseWriter, r *http.Request) {
		cs := s.cfg.Certificates()
		if cs == nil {
			cs = []certs.Status{}
		}
		writeJSON(w, cs)
	})
	mux.HandleFunc("/logging", s.logging)
	mux.HandleFunc("GET /healthz/ready", s.ready)
	mux.HandleFunc("GET /debug/pprof/", pprof.Index)
	mux.HandleFunc("GET /debug/pprof/cmdline", pprof.Cmdline)
	mux.HandleFunc("GET /debug/pprof/profile", pprof.Profile)
	mux.HandleFunc("GET /debug/pprof/symbol", pprof.Symbol)
	mux.HandleFunc("GET /debug/pprof/trace", pprof.Trace)
	mux.HandleFunc("GET /{$}", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintln(w, "ztunnel admin: /config_dump /debug/connections /debug/certificates /debug/pprof/ /logging[?level=debug|info|warn|error] /healthz/ready")
	})
	return mux
}

// logging shows the log level, and changes it on POST ?level=.
func (s *Server) logging(w http.ResponseWriter, r *http.Request) {
	switch r.Method {
	case http.MethodGet:
	case http.MethodPost:
		var lvl slog.Level
		if err := lvl.UnmarshalText([]byte(r.URL.Query().Get("level"))); err != nil {
			http.Error(w, fmt.Sprintf("bad level %q: want debug, info, warn or error", r.URL.Query().Get("level")), http.StatusBadRequest)
			return
		}
		old := s.cfg.LogLevel.Level()
		s.cfg.LogLevel.Set(lvl)
		s.cfg.Log.Info("log level changed", "from", old.String(), "to", lvl.String())
	default:
		w.Header().Set("Allow", "GET, POST")
		http.Error(w, "use GET or POST", http.StatusMethodNotAllowed)
		return
	}
	fmt.Fprintf(w, "level: %s\n", s.cfg.LogLevel.Level())
}

func (s *Server) metricsMux() http.Handler {
	mux := http.NewServeMux()
	h := promhttp.HandlerFor(s.cfg.Gatherer, promhttp.HandlerOpts{ErrorLog: slog.NewLogLogger(s.cfg.Log.Handler(), slog.LevelWarn)})
	mux.Handle("GET /metrics", h)
	mux.Handle("GET /stats/prometheus", h)
	return mux
}

func (s *Server) readyMux() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /healthz/ready", s.ready)
	return mux
}

func (s *Server) ready(w http.ResponseWriter, r *http.Request) {
	if err := s.cfg.Ready(); err != nil {
		http.Error(w, "not ready: "+err.Error(), http.StatusServiceUnavailable)
		return
	}
	fmt.Fprintln(w, "ready")
}
