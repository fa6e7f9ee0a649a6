// Package controlplane assembles istiod-lite from a Config: the Kubernetes
// clients and informers, the mesh CA, the registry, the Delta ADS server and
// the certificate service on one TLS gRPC port, the root-certificate
// publisher and the debug HTTP endpoints; Run starts them and stops them in
// reverse order. It holds no logic of its own.
package controlplane

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/keepalive"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	gatewayclient "sigs.k8s.io/gateway-api/pkg/client/clientset/versioned"

	"github.com/meshlite/meshlite/internal/identity"
	"github.com/meshlite/meshlite/internal/kube"
	ixds "github.com/meshlite/meshlite/internal/xds"
	"github.com/meshlite/meshlite/istiod-lite/authn"
	"github.com/meshlite/meshlite/istiod-lite/ca"
	"github.com/meshlite/meshlite/istiod-lite/debug"
	"github.com/meshlite/meshlite/istiod-lite/leader"
	"github.com/meshlite/meshlite/istiod-lite/model"
	"github.com/meshlite/meshlite/istiod-lite/registry"
	"github.com/meshlite/meshlite/istiod-lite/routestatus"
	"github.com/meshlite/meshlite/istiod-lite/waypoints"
	"github.com/meshlite/meshlite/istiod-lite/xds"
	"github.com/meshlite/meshlite/proto/l7"
)

// Config is everything istiod-lite is told.
type Config struct {
	// RESTConfig reaches the apiserver.
	RESTConfig *rest.Config
	// Namespace and ServiceAccount istiod-lite runs as: the CA Secret lives
	// in Namespace, and the serving certificate is for this identity.
	Namespace, ServiceAccount string
	Mesh                      model.Config

	// GRPCAddr serves xDS and the CA over TLS (":15012").
	GRPCAddr string
	// DebugAddr serves debug endpoints and metrics ("127.0.0.1:15014"; empty: off).
	DebugAddr string
	// ReadyAddr serves only /ready, for kubelet probes (empty: off).
	ReadyAddr string
	// ServingHosts are the DNS names and IPs in the serving certificate.
	ServingHosts []string

	// TrustedNodeAccounts may impersonate pods on their node ("ns/sa").
	TrustedNodeAccounts []string
	RootTTL             time.Duration
	ServingTTL          time.Duration
	WorkloadTTL         time.Duration
	MaxWorkloadTTL      time.Duration

	// Waypoints configures the waypoint Deployments (image, where they reach
	// istiod-lite); the mesh fields come from Mesh.
	Waypoints waypoints.Config
	// LeaderElection, when set, runs the waypoint controller only on the
	// replica holding Lease LeaseName in Namespace (Identity: this replica,
	// its pod name). Without it this replica always leads.
	LeaderElection bool
	LeaseName      string
	Identity       string

	// Debounce and MaxPushDelay shape pushes.
	Debounce, MaxPushDelay time.Duration
	// Resync of the informers (0: none).
	Resync time.Duration
	Log    *slog.Logger
}

// ControlPlane is a configured istiod-lite.
type ControlPlane struct {
	cfg       Config
	log       *slog.Logger
	authority *identity.Authority
	serving   *ca.ServingCert
	informers *registry.Informers
	cmFactory informers.SharedInformerFactory
	registry  *registry.Registry
	cache     *xds.Cache
	xds       *xds.Server
	caService *ca.Service
	publisher *ca.RootPublisher
	// waypoints and routes exist once the Gateway API is served (at New,
	// or later from the informers' CRD watcher); gatewayAPI is closed then.
	waypoints  *waypoints.Controller
	routes     *routestatus.Writer
	gatewayAPI chan struct{}
	elector    *leader.Elector
	promReg    *prometheus.Registry

	grpcLis, debugLis, readyLis net.Listener
}

// New loads (or creates) the mesh CA, builds every part and opens the
// listeners; nothing is served until Run.
func New(ctx context.Context, cfg Config) (*ControlPlane, error) {
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	if cfg.RESTConfig == nil {
		return nil, errors.New("no Kubernetes client configuration")
	}
	if cfg.Namespace == "" {
		cfg.Namespace = kube.DefaultRootNamespace
	}
	if cfg.ServiceAccount == "" {
		cfg.ServiceAccount = "istiod"
	}
	cfg.Mesh = cfg.Mesh.WithDefaults()
	if cfg.RootTTL <= 0 {
		cfg.RootTTL = 10 * 365 * 24 * time.Hour
	}
	if cfg.ServingTTL <= 0 {
		cfg.ServingTTL = 24 * time.Hour
	}
	if len(cfg.ServingHosts) == 0 {
		cfg.ServingHosts = DefaultServingHosts(cfg.Namespace, cfg.Mesh.DomainSuffix)
	}
	log := cfg.Log
	cp := &ControlPlane{cfg: cfg, log: log, promReg: prometheus.NewRegistry(), gatewayAPI: make(chan struct{})}
	cp.promReg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))

	kc, err := kubernetes.NewForConfig(cfg.RESTConfig)
	if err != nil {
		return nil, fmt.Errorf("kubernetes client: %w", err)
	}
	gc, err := gatewayclient.NewForConfig(cfg.RESTConfig)
	if err != nil {
		return nil, fmt.Errorf("gateway API client: %w", err)
	}
	dc, err := dynamic.NewForConfig(cfg.RESTConfig)
	if err != nil {
		return nil, fmt.Errorf("dynamic client: %w", err)
	}

	td, err := spiffeid.TrustDomainFromString(cfg.Mesh.TrustDomain)
	if err != nil {
		return nil, fmt.Errorf("trust domain %q: %w", cfg.Mesh.TrustDomain, err)
	}
	cp.authority, err = ca.LoadOrCreate(ctx, kc, cfg.Namespace, td, cfg.RootTTL, log.With("part", "ca"))
	if err != nil {
		return nil, err
	}
	selfID, err := identity.NewID(td.Name(), cfg.Namespace, cfg.ServiceAccount)
	if err != nil {
		return nil, fmt.Errorf("istiod identity: %w", err)
	}
	cp.serving, err = ca.NewServingCert(cp.authority, selfID, cfg.ServingHosts, cfg.ServingTTL, log.With("part", "serving-cert"))
	if err != nil {
		return nil, err
	}

	cp.informers, err = registry.NewInformers(kc, gc, dc, cfg.Resync, log.With("part", "informers"))
	if err != nil {
		return nil, err
	}
	pods, err := ca.NewInformerPods(cp.informers.Pods)
	if err != nil {
		return nil, err
	}
	cp.cache = xds.NewCache(ixds.TypeAddress, ixds.TypeAuthorization, l7.TypeURL)
	cp.registry, err = registry.New(cfg.Mesh, cp.informers, cp.cache, log.With("part", "registry"), cp.promReg)
	if err != nil {
		return nil, err
	}
	auth := authn.New(kc)
	cp.xds = xds.NewServer(cp.cache, auth, xds.Options{
		Debounce: cfg.Debounce, MaxDelay: cfg.MaxPushDelay, Log: log.With("part", "xds"), Registerer: cp.promReg,
	})
	cp.caService = ca.NewService(ca.ServiceConfig{
		Authority: cp.authority, Auth: auth, Pods: pods, ClusterID: cfg.Mesh.ClusterID,
		TrustedNodeAccounts: cfg.TrustedNodeAccounts, DefaultTTL: cfg.WorkloadTTL, MaxTTL: cfg.MaxWorkloadTTL,
		Log: log.With("part", "ca"), Registerer: cp.promReg,
	})
	cp.cmFactory = informers.NewSharedInformerFactoryWithOptions(kc, cfg.Resync,
		informers.WithTweakListOptions(func(o *metav1.ListOptions) { o.FieldSelector = "metadata.name=" + kube.CARootConfigMap }))
	cp.publisher, err = ca.NewRootPublisher(kc, ca.RootPEM(cp.authority), cp.informers.Namespaces,
		cp.cmFactory.Core().V1().ConfigMaps().Informer(), log.With("part", "root-publisher"))
	if err != nil {
		return nil, err
	}

	wcfg := cfg.Waypoints
	wcfg.TrustDomain, wcfg.ClusterID, wcfg.DomainSuffix = cfg.Mesh.TrustDomain, cfg.Mesh.ClusterID, cfg.Mesh.DomainSuffix
	if wcfg.XDSAddress == "" {
		wcfg.XDSAddress = "istiod." + cfg.Namespace + ".svc:15012"
	}
	if wcfg.XDSServerName == "" {
		wcfg.XDSServerName = "istiod." + cfg.Namespace + ".svc"
	}
	// The waypoint controller and the route status writer need the
	// Gateway API; without it the mesh is L4 only until its CRDs come.
	gatewayParts := func() error {
		wp, err := waypoints.New(kc, gc, cp.informers.Gateways, wcfg, log.With("part", "waypoints"))
		if err != nil {
			return err
		}
		rs, err := routestatus.New(gc, routestatus.Informers{
			HTTPRoutes: cp.informers.HTTPRoutes, GRPCRoutes: cp.informers.GRPCRoutes, Services: cp.informers.Services,
			Namespaces: cp.informers.Namespaces, Gateways: cp.informers.Gateways, ReferenceGrants: cp.informers.ReferenceGrants,
		}, cfg.Mesh, log.With("part", "route-status"))
		if err != nil {
			return err
		}
		cp.waypoints, cp.routes = wp, rs
		close(cp.gatewayAPI)
		return nil
	}
	if cp.informers.Served(registry.GatewayAPI) {
		if err := gatewayParts(); err != nil {
			return nil, err
		}
	} else {
		log.Info("waypoints disabled until the Gateway API CRDs are installed (gateway.networking.k8s.io/v1 Gateway, HTTPRoute, GRPCRoute: Gateway API v1.1 or later)")
	}
	// Runs on the informers' CRD watcher, before the new informers start.
	cp.informers.OnServed(func(a registry.API) error {
		switch a {
		case registry.GatewayAPI:
			if err := gatewayParts(); err != nil {
				return err
			}
			log.Info("Gateway API CRDs installed: waypoints enabled")
		case registry.ReferenceGrants:
			if cp.routes != nil {
				return cp.routes.SetReferenceGrants(cp.informers.ReferenceGrants)
			}
		}
		return nil
	})
	if cfg.LeaderElection {
		if cfg.LeaseName == "" {
			cfg.LeaseName = "istiod-lite-leader"
		}
		cp.elector, err = leader.New(leader.Config{Client: kc, Namespace: cfg.Namespace, Name: cfg.LeaseName,
			Identity: cfg.Identity, Log: log.With("part", "leader")})
		if err != nil {
			return nil, err
		}
	}

	if cp.grpcLis, err = net.Listen("tcp", cfg.GRPCAddr); err != nil {
		return nil, fmt.Errorf("listen for gRPC on %s: %w", cfg.GRPCAddr, err)
	}
	if cfg.DebugAddr != "" {
		if cp.debugLis, err = net.Listen("tcp", cfg.DebugAddr); err != nil {
			cp.grpcLis.Close()
			return nil, fmt.Errorf("listen for debug on %s: %w", cfg.DebugAddr, err)
		}
	}
	if cfg.ReadyAddr != "" {
		if cp.readyLis, err = net.Listen("tcp", cfg.ReadyAddr); err != nil {
			cp.grpcLis.Close()
			if cp.debugLis != nil {
				cp.debugLis.Close()
			}
			return nil, fmt.Errorf("listen for readiness on %s: %w", cfg.ReadyAddr, err)
		}
	}
	return cp, nil
}

// DefaultServingHosts are the names clients dial istiod by.
func DefaultServingHosts(ns, domain string) []string {
	return []string{
		"istiod." + ns + ".svc", "istiod." + ns + ".svc." + domain,
		"istiod-lite." + ns + ".svc", "istiod-lite." + ns + ".svc." + domain,
		"localhost", "127.0.0.1",
	}
}

// GRPCAddr is where xDS and the CA listen.
func (cp *ControlPlane) GRPCAddr() net.Addr { return cp.grpcLis.Addr() }

// DebugAddr is where the debug endpoints listen (nil when off).
func (cp *ControlPlane) DebugAddr() net.Addr {
	if cp.debugLis == nil {
		return nil
	}
	return cp.debugLis.Addr()
}

// Authority is the mesh CA.
func (cp *ControlPlane) Authority() *identity.Authority { return cp.authority }

// XDS is the Delta ADS server.
func (cp *ControlPlane) XDS() *xds.Server { return cp.xds }

// Leading reports whether this replica runs the leader's parts now.
func (cp *ControlPlane) Leading() bool { return cp.elector == nil || cp.elector.Leading() }

// lead runs the leader's parts (the waypoint controller and the route
// status writer), once the Gateway API is served, until ctx ends; a part
// that fails is restarted after a pause, as leadership is not given up for
// it.
func (cp *ControlPlane) lead(ctx context.Context) {
	select {
	case <-ctx.Done():
		return
	case <-cp.gatewayAPI:
	}
	var wg sync.WaitGroup
	for _, p := range []struct {
		name string
		run  func(context.Context) error
	}{{"waypoint controller", cp.waypoints.Run}, {"route status writer", cp.routes.Run}} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for ctx.Err() == nil {
				err := p.run(ctx)
				if ctx.Err() != nil {
					return
				}
				cp.log.Error("leader part stopped; restarting it", "part", p.name, "err", err)
				select {
				case <-ctx.Done():
				case <-time.After(time.Second):
				}
			}
		}()
	}
	wg.Wait()
}

// Run serves until ctx ends, then stops the parts in reverse order.
func (cp *ControlPlane) Run(ctx context.Context) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var (
		wg       sync.WaitGroup
		errOnce  sync.Once
		firstErr error
	)
	fail := func(name string, err error) {
		if err == nil || ctx.Err() != nil {
			return
		}
		errOnce.Do(func() { firstErr = fmt.Errorf("%s: %w", name, err) })
		cp.log.Error("part failed; stopping", "part", name, "err", err)
		cancel()
	}
	goRun := func(name string, f func(context.Context) error) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			fail(name, f(ctx))
		}()
	}

	// Informers first: everything else reads them.
	informerCtx, stopInformers := context.WithCancel(context.Background())
	cp.informers.Start(informerCtx)
	cp.cmFactory.Start(informerCtx.Done())

	goRun("registry", cp.registry.Run)
	goRun("xds-push", cp.xds.Run)
	goRun("serving-cert", cp.serving.Run)
	goRun("root-publisher", cp.publisher.Run)
	// The waypoint controller and the route status writer write cluster
	// state: on the leader only.
	if cp.elector != nil {
		goRun("leader-election", func(ctx context.Context) error { return cp.elector.Run(ctx, cp.lead) })
	} else {
		wg.Add(1)
		go func() { defer wg.Done(); cp.lead(ctx) }()
	}

	g := grpc.NewServer(
		grpc.Creds(credentials.NewTLS(cp.serving.TLSConfig())),
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: 15 * time.Second, PermitWithoutStream: true}),
		grpc.KeepaliveParams(keepalive.ServerParameters{Time: 30 * time.Second, Timeout: 10 * time.Second}),
		grpc.MaxConcurrentStreams(1000),
		// Delta ADS responses are written pre-encoded (xds.Codec); every
		// other message goes through the proto codec as usual.
		grpc.ForceServerCodecV2(xds.Codec{}),
	)
	cp.xds.Register(g)
	cp.caService.Register(g)
	wg.Add(1)
	go func() {
		defer wg.Done()
		if err := g.Serve(cp.grpcLis); err != nil && !errors.Is(err, grpc.ErrServerStopped) {
			fail("grpc", err)
		}
	}()
	var httpServers []*http.Server
	serveHTTP := func(name string, lis net.Listener, h http.Handler) {
		if lis == nil {
			return
		}
		hs := &http.Server{Handler: h, ReadHeaderTimeout: 10 * time.Second}
		httpServers = append(httpServers, hs)
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := hs.Serve(lis); err != nil && !errors.Is(err, http.ErrServerClosed) {
				fail(name, err)
			}
		}()
	}
	dbg := debug.Handler(cp.xds, cp.promReg)
	serveHTTP("debug", cp.debugLis, dbg)
	if cp.readyLis != nil {
		readyMux := http.NewServeMux()
		readyMux.Handle("GET /ready", dbg)
		serveHTTP("ready", cp.readyLis, readyMux)
	}
	cp.log.Info("istiod-lite serving", "grpc", cp.grpcLis.Addr().String(), "debug", cp.cfg.DebugAddr,
		"cluster", cp.cfg.Mesh.ClusterID, "trust_domain", cp.cfg.Mesh.TrustDomain)

	<-ctx.Done()
	// Reverse order: stop taking requests, then the workers, then the informers.
	shutdownCtx, done := context.WithTimeout(context.Background(), 5*time.Second)
	defer done()
	for _, hs := range httpServers {
		_ = hs.Shutdown(shutdownCtx)
	}
	stopped := make(chan struct{})
	go func() { g.GracefulStop(); close(stopped) }()
	select {
	case <-stopped:
	case <-shutdownCtx.Done():
		g.Stop() // xDS streams never end by themselves
	}
	wg.Wait()
	stopInformers()
	cp.informers.Shutdown()
	cp.cmFactory.Shutdown()
	cp.log.Info("istiod-lite stopped")
	return firstErr
}
