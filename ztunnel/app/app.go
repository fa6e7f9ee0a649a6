// Package app assembles ztunnel from its parts: the mesh roots and the
// certificate manager (certs), the Workload API state fed by a Delta ADS
// client of istiod-lite (state, internal/xds, with on-demand lookups of
// unknown destinations), the data path (proxy), the DNS proxy (dns), the
// CNI agent's pods (inpod), the redirection check (redirection) and the node
// endpoints (admin). It owns the order in which they start and stop, the
// hand-over to a successor ztunnel on stop, and the glue between them (a
// pod handed over by ZDS gets a certificate and is served by the proxy and
// the DNS proxy); it holds no logic of its own beyond that.
package app

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"runtime/debug"
	"sync"
	"sync/atomic"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"golang.org/x/sys/unix"
	"google.golang.org/protobuf/types/known/structpb"

	"github.com/meshlite/meshlite/internal/caclient"
	"github.com/meshlite/meshlite/internal/identity"
	"github.com/meshlite/meshlite/internal/xds"
	"github.com/meshlite/meshlite/ztunnel/admin"
	"github.com/meshlite/meshlite/ztunnel/certs"
	"github.com/meshlite/meshlite/ztunnel/dns"
	"github.com/meshlite/meshlite/ztunnel/inpod"
	"github.com/meshlite/meshlite/ztunnel/podnet"
	"github.com/meshlite/meshlite/ztunnel/proxy"
	"github.com/meshlite/meshlite/ztunnel/redirection"
	"github.com/meshlite/meshlite/ztunnel/state"
)

// Config is everything ztunnel is told at start.
type Config struct {
	// XDSAddress and CAAddress are istiod-lite's gRPC endpoints
	// ("host:port"; an IP works where there is no DNS). XDSServerName and
	// CAServerName are the names its certificate must hold (default: the
	// host of the address; the CA's is XDSServerName when CAAddress is
	// unset, since it is then the same server).
	XDSAddress, XDSServerName string
	CAAddress, CAServerName   string
	// RootCert is the mesh root PEM file; TokenPath ztunnel's projected
	// service-account token (audience istio-ca).
	RootCert, TokenPath string
	// ZDSSocket is the CNI agent's socket.
	ZDSSocket string
	Tunnel    proxy.Tunnel
	// NodeName is the node ztunnel serves.
	NodeName string
	// ClusterID, TrustDomain and DomainSuffix are the mesh's (Kubernetes,
	// cluster.local, cluster.local).
	ClusterID, TrustDomain, DomainSuffix string
	// Network is this node's network ("" = default).
	Network string
	// PodName, PodNamespace, PodIP and ServiceAccount are ztunnel's own,
	// sent to istiod-lite in the xDS node.
	PodName, PodNamespace, PodIP, ServiceAccount string
	// AdminAddr, MetricsAddr and ReadyAddr are the node endpoints ("" = off).
	AdminAddr, MetricsAddr, ReadyAddr string
	// CertTTL is the workload certificate lifetime asked for (0: the CA's).
	CertTTL time.Duration
	// ResolvConf names the upstream resolvers of the DNS proxy
	// (/etc/resolv.conf); DNSTimeout bounds one forward (2 s).
	ResolvConf string
	DNSTimeout time.Duration
	// HandoverTimeout bounds how long a stopping ztunnel keeps accepting
	// while it waits for a successor to listen in every pod it holds;
	// DrainTimeout how long established connections then run on.
	HandoverTimeout, DrainTimeout time.Duration
	// CertWait bounds how long a new pod's handover waits for its first
	// certificate (4 s, under the CNI agent's 5 s wait for the answer),
	// and then how long each of the pod's connections waits for it. A
	// successor that takes a pod without its certificate shares the pod's
	// listeners with its predecessor (as when an upgrade rolls istiod-lite
	// at the same time); its connections are late, not refused.
	CertWait time.Duration
	LogLevel *slog.LevelVar
	Log      *slog.Logger
}

// NodeID is the xDS node id: ztunnel~<ip>~<pod>.<ns>~<ns>.svc.<domain>.
func (c *Config) NodeID() string {
	return fmt.Sprintf("ztunnel~%s~%s.%s~%s.svc.%s", c.PodIP, c.PodName, c.PodNamespace, c.PodNamespace, c.DomainSuffix)
}

func (c *Config) check() error {
	var missing []string
	for name, v := range map[string]string{
		"xds address": c.XDSAddress, "root cert": c.RootCert, "token path": c.TokenPath,
		"ZDS socket": c.ZDSSocket, "cluster id": c.ClusterID, "trust domain": c.TrustDomain,
		"domain suffix": c.DomainSuffix, "pod name": c.PodName, "pod namespace": c.PodNamespace,
		"pod IP": c.PodIP, "service account": c.ServiceAccount,
	} {
		if v == "" {
			missing = append(missing, name)
		}
	}
	if len(missing) > 0 {
		return fmt.Errorf("ztunnel config: missing %v", missing)
	}
	return nil
}

// defaults fills what was left unset. The CA is istiod-lite's xDS endpoint
// unless told otherwise, and then it is the same server with the same
// certificate: it inherits the xDS server name too, or dialling istiod by
// IP (no cluster DNS) would check the CA's certificate for that IP.
func (c *Config) defaults() {
	if c.XDSServerName == "" {
		c.XDSServerName = caclient.ServerName(c.XDSAddress)
	}
	if c.CAAddress == "" {
		c.CAAddress = c.XDSAddress
		if c.CAServerName == "" {
			c.CAServerName = c.XDSServerName
		}
	}
	if c.CAServerName == "" {
		c.CAServerName = caclient.ServerName(c.CAAddress)
	}
	if c.CertWait <= 0 {
		c.CertWait = 4 * time.Second
	}
	if c.LogLevel == nil {
		c.LogLevel = new(slog.LevelVar)
	}
	if c.Log == nil {
		c.Log = slog.New(slog.DiscardHandler)
	}
}

// App is a configured ztunnel.
type App struct {
	cfg      Config
	log      *slog.Logger
	registry *prometheus.Registry
	roots    *caclient.Roots
	ca       *caclient.Client
	certs    *certs.Manager
	store    *state.Store
	ondemand *onDemand
	xds      *xds.Client
	proxy    *proxy.Proxy
	dns      *dns.Proxy
	inpod    *inpod.Client
	admin    *admin.Server

	// served maps the Workload API uid of each pod being served to the
	// Kubernetes uid of the pod instance serving it.
	servedMu sync.Mutex
	served   map[string]string

	// netns holds, by Workload uid, the netns of each pod being served,
	// for the redirection check; a check holds nsMu's read lock, so the
	// netns cannot close under it.
	nsMu     sync.RWMutex
	netns    map[string]*podnet.NS
	redirect redirection.Checker

	draining atomic.Bool
	// wasReady: Ready held once; from then on only draining unreadies.
	wasReady atomic.Bool
}

// New builds every part; nothing runs until Run. Listeners of the admin
// endpoints are opened here so a busy port fails the start.
func New(cfg Config) (*App, error) {
	if err := cfg.check(); err != nil {
		return nil, err
	}
	cfg.defaults()
	td, err := spiffeid.TrustDomainFromString(cfg.TrustDomain)
	if err != nil {
		return nil, fmt.Errorf("ztunnel config: trust domain: %w", err)
	}
	a := &App{cfg: cfg, log: cfg.Log, registry: prometheus.NewRegistry(), served: map[string]string{}, netns: map[string]*podnet.NS{}}
	a.registry.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	part := func(name string) *slog.Logger { return cfg.Log.With("part", name) }
	ok := false
	defer func() {
		if !ok {
			a.closeParts()
		}
	}()

	if a.roots, err = caclient.LoadRoots(cfg.RootCert, td, part("roots")); err != nil {
		return nil, err
	}
	token := caclient.TokenFile(cfg.TokenPath)
	if a.ca, err = caclient.New(caclient.Config{Address: cfg.CAAddress, TLS: caclient.ControlPlaneTLS(a.roots, cfg.CAServerName),
		Token: token, ClusterID: cfg.ClusterID}); err != nil {
		return nil, err
	}
	if a.certs, err = certs.New(certs.Config{Signer: a.ca, Bundle: a.roots.Bundle(), TTL: cfg.CertTTL,
		Log: part("certs"), Registerer: a.registry}); err != nil {
		return nil, err
	}
	a.store = state.New(part("state"))
	a.ondemand = newOnDemand(a.store, cfg.Network, part("ondemand"))
	meta, err := structpb.NewStruct(map[string]any{
		xds.MetadataNamespace: cfg.PodNamespace, xds.MetadataServiceAccount: cfg.ServiceAccount,
		xds.MetadataName: cfg.PodName, xds.MetadataClusterID: cfg.ClusterID, "NODE_NAME": cfg.NodeName,
	})
	if err != nil {
		return nil, fmt.Errorf("xDS node metadata: %w", err)
	}
	if a.xds, err = xds.NewClient(xds.ClientConfig{
		Target: cfg.XDSAddress, TLS: caclient.ControlPlaneTLS(a.roots, cfg.XDSServerName), Token: token,
		Node:          &corev3.Node{Id: cfg.NodeID(), Cluster: cfg.ClusterID, Metadata: meta},
		Subscriptions: []xds.Subscription{{TypeURL: xds.TypeAddress}, {TypeURL: xds.TypeAuthorization}},
		Handler:       a.ondemand, Log: part("xds"),
	}); err != nil {
		return nil, err
	}
	a.ondemand.xds = a.xds
	metrics, err := proxy.NewMetrics(a.registry)
	if err != nil {
		return nil, err
	}
	if a.proxy, err = proxy.New(proxy.Config{State: a.store, Bundle: a.roots.Bundle(), TrustDomain: cfg.TrustDomain,
		Network: cfg.Network, Tunnel: cfg.Tunnel, Metrics: metrics, DrainTimeout: cfg.DrainTimeout, CertWait: cfg.CertWait,
		Lookup: a.ondemand.Lookup, Log: part("proxy")}); err != nil {
		return nil, err
	}
	var upstreams []netip.AddrPort
	if cfg.ResolvConf != "" {
		if upstreams, err = dns.ReadResolvConf(cfg.ResolvConf); err != nil {
			// Mesh names are still answered; the rest is SERVFAIL.
			a.log.Warn("DNS proxy has no upstream resolvers", "error", err)
		}
	}
	if a.dns, err = dns.New(dns.Config{State: a.store, DomainSuffix: cfg.DomainSuffix, Network: cfg.Network,
		Upstreams: upstreams, Timeout: cfg.DNSTimeout, Log: part("dns")}); err != nil {
		return nil, err
	}
	if a.inpod, err = inpod.New(inpod.Config{Socket: cfg.ZDSSocket, Server: podServer{a}, Log: part("inpod")}); err != nil {
		return nil, err
	}
	a.registry.MustRegister(
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "meshlite_ztunnel_pods", Help: "Pods whose traffic this ztunnel holds."},
			func() float64 { return float64(len(a.inpod.Pods())) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "meshlite_ztunnel_xds_synced", Help: "1 once the first xDS state arrived."},
			func() float64 {
				if a.xdsSynced() {
					return 1
				}
				return 0
			}),
	)
	if a.admin, err = admin.New(admin.Config{
		AdminAddr: cfg.AdminAddr, MetricsAddr: cfg.MetricsAddr, ReadyAddr: cfg.ReadyAddr,
		Snapshot: a.store.Snapshot, LocalPods: a.localPods, Certificates: a.certs.Statuses,
		Connections: a.proxy.Connections, Ready: a.Ready, Gatherer: a.registry, LogLevel: cfg.LogLevel, Log: part("admin"),
		Redirection: a.redirection, Info: a.info,
	}); err != nil {
		return nil, err
	}
	ok = true
	return a, nil
}

// closeParts releases what New built when it fails half way.
func (a *App) closeParts() {
	if a.proxy != nil {
		a.proxy.Close()
	}
	if a.ca != nil {
		a.ca.Close()
	}
}

// Addr is where an admin listener ("admin", "metrics", "ready") is.
func (a *App) Addr(name string) net.Addr { return a.admin.Addr(name) }

func (a *App) xdsSynced() bool {
	select {
	case <-a.xds.Synced():
		return true
	default:
		return false
	}
}

// Ready is nil once the first xDS state arrived and every pod then held
// had its certificate, and stays nil until the hand-over on stop. A later
// pod whose certificate is late does not unready the node's ztunnel: that
// would stop its other pods' traffic in a Service's eyes, and a DaemonSet
// rollout deletes an unready old pod before it starts the new one (the
// certificate's state is in /config_dump).
func (a *App) Ready() error {
	if a.draining.Load() {
		return errors.New("draining: handing the pods over")
	}
	if a.wasReady.Load() {
		return nil
	}
	if !a.xdsSynced() {
		return errors.New("waiting for the first xDS state from " + a.cfg.XDSAddress)
	}
	if err := a.certs.Ready(); err != nil {
		return err
	}
	a.wasReady.Store(true)
	return nil
}

// Run starts the parts in order and, when ctx ends or one fails, stops them
// in reverse order, each after the one started after it has returned: the
// node endpoints first, then the pods' sockets (no new connections), the
// proxy's pooled tunnels, the xDS stream, certificate renewals and the
// root reload.
func (a *App) Run(ctx context.Context) error {
	parts := []struct {
		name string
		run  func(context.Context) error
	}{
		{"roots", a.roots.Run},
		{"certs", a.certs.Run},
		{"xds", a.xds.Run},
		{"proxy", func(ctx context.Context) error { <-ctx.Done(); return a.proxy.Close() }},
		{"inpod", a.inpod.Run},
		{"admin", a.admin.Run},
	}
	defer a.ca.Close()
	failed := make(chan error, len(parts))
	type running struct {
		name   string
		cancel context.CancelFunc
		done   chan struct{}
	}
	var started []running
	for _, p := range parts {
		pctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
		r := running{name: p.name, cancel: cancel, done: make(chan struct{})}
		go func() {
			defer close(r.done)
			err := p.run(pctx)
			if pctx.Err() == nil {
				// Returned on its own: a failure even without an error.
				if err == nil {
					err = errors.New("stopped unexpectedly")
				}
				failed <- fmt.Errorf("%s: %w", p.name, err)
			} else if err != nil {
				a.log.Warn("part stopped with an error", "part", p.name, "error", err)
			}
		}()
		started = append(started, r)
	}
	a.log.Info("ztunnel running", "node", a.cfg.NodeName, "xds", a.cfg.XDSAddress, "ca", a.cfg.CAAddress,
		"tunnel", a.cfg.Tunnel.String(), "zds", a.cfg.ZDSSocket)
	var err error
	select {
	case <-ctx.Done():
		a.log.Info("ztunnel stopping")
		a.handover(failed)
	case err = <-failed:
		a.log.Error("ztunnel stopping: a part failed", "error", err)
	}
	for i := len(started) - 1; i >= 0; i-- {
		started[i].cancel()
		<-started[i].done
	}
	return err
}

// handover runs before a requested stop: this ztunnel stops being ready
// and keeps accepting in every pod it holds until a successor (a new
// ztunnel, handed the pods by the CNI agent) listens there beside it
// (SO_REUSEPORT), or until HandoverTimeout. Then Run stops the parts: the
// pods' listeners close (the successor's take every new connection) and
// established connections drain for up to DrainTimeout.
func (a *App) handover(failed <-chan error) {
	a.draining.Store(true)
	a.admin.CloseReady()
	if a.cfg.HandoverTimeout <= 0 {
		return
	}
	// A rollout may stop this ztunnel a moment before it starts the
	// successor (the DaemonSet controller does when it finds this pod not
	// ready), so no successor yet is no reason to stop accepting: the pods'
	// traffic would be refused until it comes. Wait for one all the same.
	if !a.successorOnNode() {
		a.log.Info("handover: no other ztunnel on this node yet; accepting until one holds the pods", "timeout", a.cfg.HandoverTimeout)
	}
	start := time.Now()
	deadline := time.NewTimer(a.cfg.HandoverTimeout)
	defer deadline.Stop()
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	for {
		waiting := a.podsWithoutSuccessor()
		if len(waiting) == 0 {
			a.log.Info("handover: a successor listens in every pod; stopping accepting", "after", time.Since(start).Round(time.Millisecond))
			return
		}
		select {
		case <-deadline.C:
			a.log.Warn("handover: no successor in time; stopping anyway (the pods' traffic fails closed until one comes)",
				"pods", waiting, "waited", a.cfg.HandoverTimeout)
			return
		case err := <-failed:
			a.log.Error("handover: a part failed", "error", err)
			return
		case <-tick.C:
		}
	}
}

// successorOnNode reports whether another ztunnel runs on the node: its
// readiness listener shares the port this one just closed.
func (a *App) successorOnNode() bool {
	addr := a.admin.Addr("ready")
	tcp, ok := addr.(*net.TCPAddr)
	if !ok {
		return false
	}
	n, err := redirection.ListenersHere(tcp.Port)
	if err != nil {
		a.log.Warn("handover: cannot tell whether a successor runs; waiting for one", "error", err)
		return true
	}
	return n > 0
}

// podsWithoutSuccessor lists the held pods where this ztunnel's outbound
// listener is still the only one.
func (a *App) podsWithoutSuccessor() []string {
	a.nsMu.RLock()
	defer a.nsMu.RUnlock()
	var out []string
	for uid, ns := range a.netns {
		n, err := redirection.Listeners(ns.File(), inpod.PortOutbound)
		if err != nil || n < 2 {
			out = append(out, uid)
		}
	}
	return out
}

// info describes this ztunnel for /config_dump.
func (a *App) info() admin.Info {
	return admin.Info{Node: a.cfg.NodeName, Version: Version(), Tunnel: a.cfg.Tunnel.String(), Draining: a.draining.Load(),
		H2Fallbacks: a.proxy.Fallbacks()}
}

// Version is the build's module version and VCS revision, when known.
func Version() string {
	bi, ok := debug.ReadBuildInfo()
	if !ok {
		return "unknown"
	}
	v := bi.Main.Version
	for _, s := range bi.Settings {
		if s.Key == "vcs.revision" && len(s.Value) >= 12 {
			v += "+" + s.Value[:12]
		}
		if s.Key == "vcs.modified" && s.Value == "true" {
			v += "-dirty"
		}
	}
	return v
}

// redirection checks, in the pod's netns, that its traffic is redirected to
// this ztunnel (uid: Workload uid).
func (a *App) redirection(ctx context.Context, uid string) (string, string) {
	a.nsMu.RLock()
	defer a.nsMu.RUnlock()
	ns := a.netns[uid]
	if ns == nil {
		return redirection.Missing, "ztunnel holds no network namespace for the pod"
	}
	return a.redirect.Status(ctx, uid, ns.File())
}

// localPods lists the Workload API uids of the pods this ztunnel serves.
func (a *App) localPods() []string {
	a.servedMu.Lock()
	defer a.servedMu.Unlock()
	out := make([]string, 0, len(a.served))
	for uid := range a.served {
		out = append(out, uid)
	}
	return out
}

// hold makes pod, the instance with Kubernetes uid podUID, the one the
// proxy serves for its Workload uid.
func (a *App) hold(pod *proxy.Pod, podUID string) {
	a.servedMu.Lock()
	defer a.servedMu.Unlock()
	a.served[pod.UID] = podUID
	a.proxy.AddPod(pod)
}

// release stops serving pod's Workload uid, unless a newer instance of the
// same pod name (a StatefulSet pod recreated) was handed over before this
// one was deleted and holds it now.
func (a *App) release(pod *proxy.Pod, podUID string) {
	a.servedMu.Lock()
	defer a.servedMu.Unlock()
	if a.served[pod.UID] != podUID {
		return
	}
	delete(a.served, pod.UID)
	a.proxy.RemovePod(pod.UID)
}

// podServer serves the pods inpod hands over.
type podServer struct{ a *App }

// workloadUID is the Workload API uid of a pod ZDS hands over. ZDS names a
// pod by its Kubernetes uid, the Workload API by
// "<cluster>//Pod/<namespace>/<name>" (istiod's key), and the proxy and the
// admin dump find local pods through the Workload API.
func (s podServer) workloadUID(p inpod.Pod) string {
	return s.a.cfg.ClusterID + "//Pod/" + p.Info.GetNamespace() + "/" + p.Info.GetName()
}

// identity is a pod's SPIFFE ID: namespace and service account from ZDS,
// trust domain from its Workload when istiod-lite names one.
func (s podServer) identity(p inpod.Pod) (spiffeid.ID, error) {
	td := s.a.cfg.TrustDomain
	if w := s.a.store.Workload(s.workloadUID(p)); w.GetTrustDomain() != "" {
		td = w.GetTrustDomain()
	}
	sa := p.Info.GetServiceAccount()
	if sa == "" {
		sa = "default"
	}
	id, err := identity.NewID(td, p.Info.GetNamespace(), sa)
	if err != nil {
		return spiffeid.ID{}, fmt.Errorf("identity of pod %s (%s/%s): %w", p.UID, p.Info.GetNamespace(), p.Info.GetName(), err)
	}
	return id, nil
}

// Prepare gets the pod's certificate before the handover is acknowledged,
// for at most CertWait: a pod whose certificate is late is still taken (its
// mTLS fails closed until the certificate arrives; readiness says so).
func (s podServer) Prepare(ctx context.Context, p inpod.Pod) error {
	id, err := s.identity(p)
	if err != nil {
		return err
	}
	wctx, cancel := context.WithTimeout(ctx, s.a.cfg.CertWait)
	defer cancel()
	if _, err := s.a.certs.Fetch(wctx, id); err != nil {
		s.a.log.Warn("pod taken without a certificate yet; retrying in the background", "uid", p.UID, "identity", id.String(), "error", err)
	}
	return nil
}

// bindQUIC waits for a predecessor ztunnel to release the pod's QUIC
// socket and binds it; nil when ctx ends first or binding fails otherwise.
func (a *App) bindQUIC(ctx context.Context, podUID string, ns *podnet.NS) *net.UDPConn {
	a.log.Info("pod's QUIC socket still held by the previous ztunnel; binding it once released", "uid", podUID)
	start := time.Now()
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-tick.C:
		}
		if ctx.Err() != nil {
			return nil // stopping: the netns may be closing
		}
		udp, err := inpod.ListenHBONEUDP(ctx, ns)
		if err == nil {
			a.log.Info("pod's QUIC socket bound", "uid", podUID, "waited", time.Since(start).Round(time.Millisecond))
			return udp
		}
		if !errors.Is(err, unix.EADDRINUSE) {
			a.log.Error("pod listener failed", "uid", podUID, "listener", "hbone-quic", "error", err)
			return nil
		}
	}
}

// Serve serves the pod's sockets until ctx ends.
func (s podServer) Serve(ctx context.Context, p inpod.Pod, socks *inpod.Sockets) {
	id, err := s.identity(p)
	if err != nil {
		s.a.log.Error("pod not served", "uid", p.UID, "error", err)
		return
	}
	a := s.a
	uid := s.workloadUID(p)
	// Certificates are tracked per pod instance, the proxy's pods by
	// Workload uid (see hold).
	pod := &proxy.Pod{UID: uid, SVID: a.certs.AddPod(p.UID, id), Net: socks.NS}
	a.hold(pod, p.UID)
	defer a.certs.RemovePod(p.UID)
	defer a.release(pod, p.UID)
	a.nsMu.Lock()
	a.netns[uid] = socks.NS
	a.nsMu.Unlock()
	defer func() {
		a.nsMu.Lock()
		if a.netns[uid] == socks.NS {
			delete(a.netns, uid)
			a.redirect.Forget(uid)
		}
		a.nsMu.Unlock()
	}()
	var wg sync.WaitGroup
	serve := func(what string, f func() error) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := f(); err != nil && ctx.Err() == nil {
				a.log.Error("pod listener failed", "uid", p.UID, "workload", uid, "listener", what, "error", err)
			}
		}()
	}
	serve("outbound", func() error { return a.proxy.ServeOutbound(ctx, socks.Outbound, uid) })
	serve("plaintext", func() error { return a.proxy.ServePlaintext(ctx, socks.Plaintext, uid) })
	serve("hbone", func() error { return a.proxy.ServeHBONE(ctx, socks.HBONE) })
	// QUIC: the pod's UDP socket is held by one ztunnel at a time (see
	// inpod.ListenHBONEUDP). While a predecessor still holds it, bind it
	// as soon as the predecessor lets it go; when this one stops, its QUIC
	// connections drain (GOAWAY, tunnels run on) before the socket closes
	// for the successor.
	wg.Add(1)
	go func() {
		defer wg.Done()
		udp := socks.HBONEUDP
		if udp == nil {
			if udp = a.bindQUIC(ctx, p.UID, socks.NS); udp == nil {
				return
			}
		}
		if err := a.proxy.ServeHBONEQUIC(ctx, udp); err != nil && ctx.Err() == nil {
			a.log.Error("pod listener failed", "uid", p.UID, "workload", uid, "listener", "hbone-quic", "error", err)
		}
		// Drained: let the successor bind it now rather than after the
		// TCP listeners' drain.
		udp.Close()
	}()
	serve("dns-udp", func() error { return a.dns.ServeUDP(ctx, socks.DNSUDP, socks.NS) })
	serve("dns-tcp", func() error { return a.dns.ServeTCP(ctx, socks.DNSTCP, socks.NS) })
	wg.Wait()
}
