// Package app assembles the waypoint from its parts: the mesh roots and its
// own certificate (cert), the configuration fed by a Delta ADS client of
// istiod-lite (config, internal/xds), the HBONE listener on 15008 (h2 and
// QUIC, internal/hbone) handing tunnels to the data path (proxy), and the
// metrics, readiness and admin endpoints. It owns start and stop order and
// holds no logic beyond that glue.
package app

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/pprof"
	"net/netip"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/types/known/structpb"

	"github.com/meshlite/meshlite/internal/caclient"
	"github.com/meshlite/meshlite/internal/hbone"
	"github.com/meshlite/meshlite/internal/identity"
	"github.com/meshlite/meshlite/internal/xds"
	"github.com/meshlite/meshlite/proto/l7"
	"github.com/meshlite/meshlite/waypoint/cert"
	"github.com/meshlite/meshlite/waypoint/config"
	"github.com/meshlite/meshlite/waypoint/proxy"
	"github.com/meshlite/meshlite/waypoint/telemetry"
)

// Config is everything the waypoint is told at start.
type Config struct {
	// istiod-lite: xDS and CA ("host:port") and the names their
	// certificates must hold (default: the host of the address; the CA
	// defaults to the xDS server).
	XDSAddress, XDSServerName string
	CAAddress, CAServerName   string
	RootCert, TokenPath       string
	ClusterID, TrustDomain    string
	DomainSuffix              string
	// The waypoint pod and its Gateway.
	PodName, PodNamespace, PodIP, ServiceAccount, GatewayName string
	// Listeners: HBONE (TCP for h2 and UDP for QUIC on the same address),
	// metrics, readiness, admin ("" = off, except HBONE).
	HBONEAddr, MetricsAddr, ReadyAddr, AdminAddr string
	// UpstreamTunnel is "h2" or "quic" for tunnels to endpoints.
	UpstreamTunnel string
	// OTLPEndpoint, when set, receives spans over OTLP/gRPC ("host:port").
	OTLPEndpoint string
	CertTTL      time.Duration
	LogLevel     *slog.LevelVar
	Log          *slog.Logger
	// AccessLogOut, when set, gets the per-request access log as JSON
	// lines (written when LogLevel allows Info), buffered and flushed
	// every second; unset, the access log goes unbuffered through Log.
	AccessLogOut io.Writer
}

// NodeID is waypoint~<ip>~<pod>.<ns>~<ns>.svc.<domain>.
func (c *Config) NodeID() string {
	return fmt.Sprintf("%s~%s~%s.%s~%s.svc.%s", l7.NodeType, c.PodIP, c.PodName, c.PodNamespace, c.PodNamespace, c.DomainSuffix)
}

func (c *Config) check() error {
	var missing []string
	for name, v := range map[string]string{
		"xds address": c.XDSAddress, "root cert": c.RootCert, "token path": c.TokenPath, "cluster id": c.ClusterID,
		"trust domain": c.TrustDomain, "domain suffix": c.DomainSuffix, "pod name": c.PodName, "pod namespace": c.PodNamespace,
		"pod IP": c.PodIP, "service account": c.ServiceAccount, "gateway name": c.GatewayName, "HBONE address": c.HBONEAddr,
	} {
		if v == "" {
			missing = append(missing, name)
		}
	}
	if len(missing) > 0 {
		return fmt.Errorf("waypoint config: missing %v", missing)
	}
	if c.XDSServerName == "" {
		c.XDSServerName = caclient.ServerName(c.XDSAddress)
	}
	// The CA is istiod-lite's xDS server unless told otherwise; when it
	// is the same server (unset, or the same address, as istiod-lite's
	// waypoint Deployment sets CA_ADDR) it has the same certificate, so it
	// inherits the xDS server name: dialling it by pod IP must not check
	// the certificate for that IP.
	if c.CAAddress == "" {
		c.CAAddress = c.XDSAddress
	}
	if c.CAServerName == "" && c.CAAddress == c.XDSAddress {
		c.CAServerName = c.XDSServerName
	}
	if c.CAServerName == "" {
		c.CAServerName = caclient.ServerName(c.CAAddress)
	}
	if c.Log == nil {
		c.Log = slog.New(slog.DiscardHandler)
	}
	return nil
}

// App is a configured waypoint.
type App struct {
	cfg      Config
	log      *slog.Logger
	registry *prometheus.Registry
	roots    *caclient.Roots
	certs    *cert.Manager
	store    *config.Store
	xds      *xds.Client
	tunnels  *hbone.Client
	proxy    *proxy.Proxy
	server   *hbone.Server
	otlp     *telemetry.OTLP
	alogBuf  *telemetry.LogBuffer

	h2ln  net.Listener
	h3pc  net.PacketConn
	admin []adminServer
}

type adminServer struct {
	name string
	ln   net.Listener
	srv  *http.Server
}

// New builds the parts and opens the listeners.
func New(cfg Config) (*App, error) {
	if err := cfg.check(); err != nil {
		return nil, err
	}
	a := &App{cfg: cfg, log: cfg.Log, registry: prometheus.NewRegistry()}
	a.registry.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	td, err := spiffeid.TrustDomainFromString(cfg.TrustDomain)
	if err != nil {
		return nil, fmt.Errorf("trust domain: %w", err)
	}
	id, err := identity.NewID(cfg.TrustDomain, cfg.PodNamespace, cfg.ServiceAccount)
	if err != nil {
		return nil, err
	}
	part := func(name string) *slog.Logger { return cfg.Log.With("part", name) }
	if a.roots, err = caclient.LoadRoots(cfg.RootCert, td, part("roots")); err != nil {
		return nil, err
	}
	token := caclient.TokenFile(cfg.TokenPath)
	if a.certs, err = cert.New(cert.Config{ID: id, CAAddress: cfg.CAAddress, TLS: caclient.ControlPlaneTLS(a.roots, cfg.CAServerName),
		Token: token, ClusterID: cfg.ClusterID, Bundle: a.roots.Bundle(), TTL: cfg.CertTTL, Log: part("cert")}); err != nil {
		return nil, err
	}
	a.store = config.NewStore(cfg.TrustDomain, part("config"))
	meta, err := structpb.NewStruct(map[string]any{
		xds.MetadataNamespace: cfg.PodNamespace, xds.MetadataServiceAccount: cfg.ServiceAccount, xds.MetadataName: cfg.PodName,
		xds.MetadataClusterID: cfg.ClusterID, l7.MetadataGatewayName: cfg.GatewayName,
	})
	if err != nil {
		return nil, err
	}
	if a.xds, err = xds.NewClient(xds.ClientConfig{
		Target: cfg.XDSAddress, TLS: caclient.ControlPlaneTLS(a.roots, cfg.XDSServerName), Token: token,
		Node:          &corev3.Node{Id: cfg.NodeID(), Cluster: cfg.ClusterID, Metadata: meta},
		Subscriptions: []xds.Subscription{{TypeURL: l7.TypeURL}, {TypeURL: xds.TypeAddress}},
		Handler:       a.store, Log: part("xds"),
	}); err != nil {
		return nil, err
	}
	if a.tunnels, err = hbone.NewClient(hbone.ClientConfig{Bundle: a.roots.Bundle(), Logger: part("upstream")}); err != nil {
		return nil, err
	}
	metrics, err := telemetry.NewMetrics(a.registry)
	if err != nil {
		return nil, err
	}
	up := hbone.H2
	switch cfg.UpstreamTunnel {
	case "", "h2":
	case "quic":
		up = hbone.H3
	default:
		return nil, fmt.Errorf("upstream tunnel %q: want h2 or quic", cfg.UpstreamTunnel)
	}
	alog := telemetry.SlogAccess(cfg.Log.With("part", "access"))
	if cfg.AccessLogOut != nil {
		a.alogBuf = telemetry.NewLogBuffer(cfg.AccessLogOut, 0, 0, 0)
		var lvl slog.Leveler
		if cfg.LogLevel != nil {
			lvl = cfg.LogLevel
		}
		alog = telemetry.NewJSONAccess(a.alogBuf, lvl, "component", "waypoint", "part", "access")
	}
	pcfg := proxy.Config{Store: a.store, SVID: a.certs, Tunnels: a.tunnels, UpstreamTransport: up,
		Metrics: metrics, Log: part("proxy"), AccessLog: alog}
	if cfg.OTLPEndpoint != "" {
		if a.otlp, err = telemetry.NewOTLP(context.Background(), cfg.OTLPEndpoint, cfg.GatewayName+"."+cfg.PodNamespace); err != nil {
			return nil, err
		}
		pcfg.Exporter = a.otlp
	}
	if a.proxy, err = proxy.New(pcfg); err != nil {
		return nil, err
	}
	if a.server, err = hbone.NewServer(hbone.ServerConfig{
		Certificates: func(netip.Addr) (*tls.Certificate, error) { return a.certs.TLSCertificate() },
		Bundle:       a.roots.Bundle(), Authorize: identity.AuthorizeMemberOf(td),
		Handler: a.proxy.HandleTunnel, Logger: part("hbone"), DrainTimeout: 5 * time.Second,
	}); err != nil {
		return nil, err
	}
	if err := a.listen(); err != nil {
		a.closeListeners()
		return nil, err
	}
	return a, nil
}

func (a *App) listen() error {
	var err error
	if a.h2ln, err = net.Listen("tcp", a.cfg.HBONEAddr); err != nil {
		return fmt.Errorf("listen HBONE (h2) on %s: %w", a.cfg.HBONEAddr, err)
	}
	if a.h3pc, err = net.ListenPacket("udp", a.cfg.HBONEAddr); err != nil {
		return fmt.Errorf("listen HBONE (QUIC) on %s: %w", a.cfg.HBONEAddr, err)
	}
	endpoints := []struct {
		name, addr string
		mux        func() *http.ServeMux
	}{
		{"metrics", a.cfg.MetricsAddr, func() *http.ServeMux {
			m := http.NewServeMux()
			m.Handle("/metrics", promhttp.HandlerFor(a.registry, promhttp.HandlerOpts{}))
			m.Handle("/stats/prometheus", promhttp.HandlerFor(a.registry, promhttp.HandlerOpts{}))
			return m
		}},
		{"ready", a.cfg.ReadyAddr, func() *http.ServeMux {
			m := http.NewServeMux()
			m.HandleFunc("/healthz/ready", func(w http.ResponseWriter, r *http.Request) {
				if err := a.Ready(); err != nil {
					http.Error(w, err.Error(), http.StatusServiceUnavailable)
					return
				}
				fmt.Fprintln(w, "ready")
			})
			return m
		}},
		{"admin", a.cfg.AdminAddr, func() *http.ServeMux {
			m := http.NewServeMux()
			m.HandleFunc("/config_dump", a.configDump)
			// CPU and heap profiles (the bench fetches /debug/pprof/profile
			// when a goal is missed); localhost only, like the rest of admin.
			m.HandleFunc("GET /debug/pprof/", pprof.Index)
			m.HandleFunc("GET /debug/pprof/cmdline", pprof.Cmdline)
			m.HandleFunc("GET /debug/pprof/profile", pprof.Profile)
			m.HandleFunc("GET /debug/pprof/symbol", pprof.Symbol)
			m.HandleFunc("GET /debug/pprof/trace", pprof.Trace)
			m.HandleFunc("/logging", func(w http.ResponseWriter, r *http.Request) {
				if lvl := r.URL.Query().Get("level"); lvl != "" && a.cfg.LogLevel != nil {
					if err := a.cfg.LogLevel.UnmarshalText([]byte(lvl)); err != nil {
						http.Error(w, err.Error(), http.StatusBadRequest)
						return
					}
				}
				if a.cfg.LogLevel != nil {
					fmt.Fprintln(w, a.cfg.LogLevel.Level().String())
				}
			})
			return m
		}},
	}
	for _, e := range endpoints {
		if e.addr == "" {
			continue
		}
		ln, err := net.Listen("tcp", e.addr)
		if err != nil {
			return fmt.Errorf("listen %s on %s: %w", e.name, e.addr, err)
		}
		a.admin = append(a.admin, adminServer{e.name, ln, &http.Server{Handler: e.mux(), ReadHeaderTimeout: 5 * time.Second}})
	}
	return nil
}

func (a *App) closeListeners() {
	if a.h2ln != nil {
		a.h2ln.Close()
	}
	if a.h3pc != nil {
		a.h3pc.Close()
	}
	for _, s := range a.admin {
		s.ln.Close()
	}
}

// Addr is where a listener ("hbone", "metrics", "ready", "admin") is.
func (a *App) Addr(name string) net.Addr {
	if name == "hbone" {
		return a.h2ln.Addr()
	}
	for _, s := range a.admin {
		if s.name == name {
			return s.ln.Addr()
		}
	}
	return nil
}

// Ready is nil once the first configuration arrived and the waypoint holds
// a valid certificate.
func (a *App) Ready() error {
	select {
	case <-a.xds.Synced():
	default:
		return errors.New("waiting for the first configuration from " + a.cfg.XDSAddress)
	}
	return a.certs.Ready()
}

func (a *App) configDump(w http.ResponseWriter, r *http.Request) {
	d := a.store.Snapshot().Dump()
	out := map[string]any{"node": a.cfg.NodeID(), "gateway": a.cfg.PodNamespace + "/" + a.cfg.GatewayName, "endpoints": d.Endpoints}
	var svcs []json.RawMessage
	for _, s := range d.Services {
		b, err := protojson.Marshal(s)
		if err == nil {
			svcs = append(svcs, b)
		}
	}
	out["services"] = svcs
	if s, err := a.certs.GetX509SVID(); err == nil {
		c := s.Certificates[0]
		out["certificate"] = map[string]any{"identity": s.ID.String(), "serial": c.SerialNumber.Text(16), "not_before": c.NotBefore, "not_after": c.NotAfter}
	} else {
		out["certificate"] = map[string]any{"error": err.Error()}
	}
	w.Header().Set("Content-Type", "application/json")
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	_ = enc.Encode(out)
}

// Run starts the parts and stops them in reverse order when ctx ends or
// one fails.
func (a *App) Run(ctx context.Context) error {
	type part struct {
		name string
		run  func(context.Context) error
	}
	parts := []part{
		{"roots", a.roots.Run},
		{"cert", a.certs.Run},
		{"xds", a.xds.Run},
		{"proxy", a.proxy.Run},
		{"hbone-h2", func(ctx context.Context) error { return a.server.ServeH2(ctx, a.h2ln) }},
		{"hbone-h3", func(ctx context.Context) error { err := a.server.ServeH3(ctx, a.h3pc); a.h3pc.Close(); return err }},
	}
	if a.alogBuf != nil {
		// First in, last out: the proxy's final lines are flushed.
		parts = append([]part{{"accesslog", a.alogBuf.Run}}, parts...)
	}
	for _, s := range a.admin {
		srv, ln := s.srv, s.ln
		parts = append(parts, part{s.name, func(ctx context.Context) error {
			go func() { <-ctx.Done(); _ = srv.Close() }()
			if err := srv.Serve(ln); !errors.Is(err, http.ErrServerClosed) {
				return err
			}
			return nil
		}})
	}
	defer a.tunnels.Close()
	if a.otlp != nil {
		defer func() {
			sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			if err := a.otlp.Shutdown(sctx); err != nil {
				a.log.Warn("flushing spans failed", "error", err)
			}
		}()
	}
	failed := make(chan error, len(parts))
	type running struct {
		cancel context.CancelFunc
		done   chan struct{}
	}
	var started []running
	for _, p := range parts {
		pctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
		r := running{cancel: cancel, done: make(chan struct{})}
		go func() {
			defer close(r.done)
			err := p.run(pctx)
			if pctx.Err() == nil {
				if err == nil {
					err = errors.New("stopped unexpectedly")
				}
				failed <- fmt.Errorf("%s: %w", p.name, err)
			}
		}()
		started = append(started, r)
	}
	a.log.Info("waypoint running", "gateway", a.cfg.PodNamespace+"/"+a.cfg.GatewayName, "hbone", a.cfg.HBONEAddr, "xds", a.cfg.XDSAddress, "node", a.cfg.NodeID())
	var err error
	select {
	case <-ctx.Done():
		a.log.Info("waypoint stopping")
	case err = <-failed:
		a.log.Error("waypoint stopping: a part failed", "error", err)
	}
	for i := len(started) - 1; i >= 0; i-- {
		started[i].cancel()
		<-started[i].done
	}
	return err
}
