// Package proxy is ztunnel's data path: outbound capture (15001) to HBONE,
// a waypoint or plain TCP passthrough; inbound HBONE (15008) with the
// identity, waypoint and L4 policy checks; inbound plaintext (15006) when
// policy allows it (PERMISSIVE).
//
// It owns per-connection decisions and relaying, the table of live
// connections (Connections) and their metrics (istio_tcp_*, Metrics).
// Where sockets live (pod network namespaces) is given to it per pod
// through Net; what the mesh looks like comes from package state; it never
// opens listeners itself.
package proxy

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"syscall"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/meshlite/meshlite/internal/hbone"
	"github.com/meshlite/meshlite/internal/identity"
	"github.com/meshlite/meshlite/proto/workload"
	"github.com/meshlite/meshlite/ztunnel/podnet"
	"github.com/meshlite/meshlite/ztunnel/state"
)

// Tunnel selects the HBONE transport for outbound tunnels.
type Tunnel uint8

const (
	// TunnelH2 uses HTTP/2 over TLS over TCP.
	TunnelH2 Tunnel = iota
	// TunnelQUIC uses HTTP/3 over QUIC.
	TunnelQUIC
	// TunnelAuto tries QUIC and falls back to HTTP/2 per endpoint,
	// remembering the fallback for a while.
	TunnelAuto
)

// ParseTunnel parses the --tunnel flag: h2, quic or auto.
func ParseTunnel(s string) (Tunnel, error) {
	switch s {
	case "h2":
		return TunnelH2, nil
	case "quic":
		return TunnelQUIC, nil
	case "auto":
		return TunnelAuto, nil
	}
	return 0, fmt.Errorf("tunnel %q: want h2, quic or auto", s)
}

func (t Tunnel) String() string {
	switch t {
	case TunnelQUIC:
		return "quic"
	case TunnelAuto:
		return "auto"
	}
	return "h2"
}

// Net opens sockets where a pod's traffic must originate: in its network
// namespace, marked so the pod's redirection skips them (podnet.NS).
type Net interface {
	// DialTCP connects to dst; a valid src binds it, transparent lets src
	// be a non-local address.
	DialTCP(ctx context.Context, src netip.Addr, dst netip.AddrPort, transparent bool) (*net.TCPConn, error)
	ListenUDP(ctx context.Context, addr netip.AddrPort) (*net.UDPConn, error)
}

// Pod is a local workload the proxy serves.
type Pod struct {
	// UID is the pod's Workload API uid ("<cluster>//Pod/<ns>/<name>"; ZDS
	// names pods by their Kubernetes uid instead).
	UID string
	// SVID is the pod's identity.
	SVID x509svid.Source
	Net  Net
}

// Config configures a Proxy.
type Config struct {
	State  *state.Store
	Bundle x509bundle.Source
	// TrustDomain is the mesh default trust domain (cluster.local).
	TrustDomain string
	// Network is this node's network name ("" = default).
	Network string
	Tunnel  Tunnel
	// OriginalDst reads a captured connection's original destination
	// (default podnet.OriginalDst).
	OriginalDst func(net.Conn) (netip.AddrPort, error)
	// HBONEPort is where pods' inbound HBONE listens (15008).
	HBONEPort uint16
	// ConnectTimeout bounds establishing an upstream (10 s).
	ConnectTimeout time.Duration
	// QUICAttemptTimeout bounds the QUIC attempt in auto mode (1 s);
	// FallbackTTL is how long an endpoint that failed QUIC gets HTTP/2 (10 min).
	QUICAttemptTimeout time.Duration
	FallbackTTL        time.Duration
	// Lookup, if set, asks the control plane about a destination IP the
	// state does not know (on demand) and returns once it was answered or
	// ctx ends; the proxy then resolves again.
	Lookup func(ctx context.Context, ip netip.Addr)
	// LookupTimeout bounds the wait for Lookup (1 s).
	LookupTimeout time.Duration
	// CertWait is how long a connection waits for its pod's first
	// certificate when the pod is served before the CA answered (a new
	// ztunnel taking pods over while istiod-lite is slow): the connection
	// is late rather than refused (0: refused at once).
	CertWait time.Duration
	// DrainTimeout is how long established connections may run on once
	// their listener stops accepting (ztunnel stopping; 0: closed at once).
	DrainTimeout time.Duration
	Log          *slog.Logger
	// Metrics receives connection metrics (NewMetrics); nil keeps them
	// unregistered.
	Metrics *Metrics
	// hboneClient overrides the client's config (tests).
	hboneClient func(*hbone.ClientConfig)
}

// Proxy carries connections for the local pods.
type Proxy struct {
	cfg     Config
	log     *slog.Logger
	client  *hbone.Client
	server  *hbone.Server
	metrics *Metrics
	conns   connTable

	mu   sync.RWMutex
	pods map[string]*Pod
	// srcIPs are local pods' addresses seen as the source of their own
	// captured outbound connections, for a pod whose Workload has not
	// arrived from istiod-lite yet (a pod's first connections right after
	// it starts).
	srcIPs map[netip.Addr]*Pod

	fbMu     sync.Mutex
	fallback map[netip.AddrPort]time.Time // endpoint -> use h2 until
}

// New builds a proxy.
func New(cfg Config) (*Proxy, error) {
	if cfg.State == nil || cfg.Bundle == nil {
		return nil, errors.New("proxy: state and bundle are required")
	}
	if cfg.TrustDomain == "" {
		cfg.TrustDomain = identity.DefaultTrustDomain
	}
	if cfg.OriginalDst == nil {
		cfg.OriginalDst = podnet.OriginalDst
	}
	if cfg.HBONEPort == 0 {
		cfg.HBONEPort = state.DefaultHBONEPort
	}
	if cfg.ConnectTimeout <= 0 {
		cfg.ConnectTimeout = 10 * time.Second
	}
	if cfg.QUICAttemptTimeout <= 0 {
		cfg.QUICAttemptTimeout = time.Second
	}
	if cfg.LookupTimeout <= 0 {
		cfg.LookupTimeout = time.Second
	}
	if cfg.FallbackTTL <= 0 {
		cfg.FallbackTTL = 10 * time.Minute
	}
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	td, err := spiffeid.TrustDomainFromString(cfg.TrustDomain)
	if err != nil {
		return nil, fmt.Errorf("proxy: trust domain: %w", err)
	}
	if cfg.Metrics == nil {
		if cfg.Metrics, err = NewMetrics(nil); err != nil {
			return nil, err
		}
	}
	p := &Proxy{cfg: cfg, log: cfg.Log, pods: map[string]*Pod{}, srcIPs: map[netip.Addr]*Pod{}, fallback: map[netip.AddrPort]time.Time{},
		metrics: cfg.Metrics, conns: connTable{conns: map[uint64]*tracked{}}}
	ccfg := hbone.ClientConfig{
		Bundle:           cfg.Bundle,
		DialTCP:          p.dialFromPod,
		ListenUDP:        p.listenUDPInPod,
		HandshakeTimeout: cfg.ConnectTimeout,
		Logger:           cfg.Log,
	}
	if cfg.hboneClient != nil {
		cfg.hboneClient(&ccfg)
	}
	if p.client, err = hbone.NewClient(ccfg); err != nil {
		return nil, fmt.Errorf("proxy: hbone client: %w", err)
	}
	p.server, err = hbone.NewServer(hbone.ServerConfig{
		Certificates: p.certificate,
		Bundle:       cfg.Bundle,
		// Any workload of the mesh's trust domain may connect; who may
		// reach what is policy's job, after the handshake.
		Authorize:    identity.AuthorizeMemberOf(td),
		Handler:      p.countRefusals(p.inbound),
		Logger:       cfg.Log,
		DrainTimeout: cfg.DrainTimeout,
	})
	if err != nil {
		p.client.Close()
		return nil, fmt.Errorf("proxy: hbone server: %w", err)
	}
	return p, nil
}

// Close closes pooled outbound tunnels.
func (p *Proxy) Close() error { return p.client.Close() }

// AddPod starts serving a local pod (its listeners are served separately).
func (p *Proxy) AddPod(pod *Pod) {
	p.mu.Lock()
	p.pods[pod.UID] = pod
	p.mu.Unlock()
}

// RemovePod stops serving a pod.
func (p *Proxy) RemovePod(uid string) {
	p.mu.Lock()
	delete(p.pods, uid)
	for ip, pod := range p.srcIPs {
		if pod != nil && pod.UID == uid {
			delete(p.srcIPs, ip)
		}
	}
	p.mu.Unlock()
}

// learnSrcIP records ip as pod's: the source of a connection captured on
// the pod's own outbound listener, inside its netns, is the pod's address.
// An address seen from two pods is ambiguous and kept as nil: neither pod
// gets it (fail closed rather than start a tunnel in the wrong pod).
func (p *Proxy) learnSrcIP(ip netip.Addr, pod *Pod) {
	if !ip.IsValid() || ip.IsUnspecified() {
		return
	}
	p.mu.RLock()
	cur, seen := p.srcIPs[ip]
	p.mu.RUnlock()
	if seen && (cur == pod || cur == nil) {
		return
	}
	p.mu.Lock()
	if cur, seen := p.srcIPs[ip]; seen && cur != pod {
		p.srcIPs[ip] = nil
	} else if p.pods[pod.UID] == pod {
		p.srcIPs[ip] = pod
	}
	p.mu.Unlock()
}

func (p *Proxy) pod(uid string) *Pod {
	p.mu.RLock()
	defer p.mu.RUnlock()
	return p.pods[uid]
}

// podByIP finds the local pod that owns ip.
func (p *Proxy) podByIP(ip netip.Addr) (*Pod, *workload.Workload) {
	w := p.cfg.State.WorkloadByIP(p.cfg.Network, ip)
	if w == nil {
		return nil, nil
	}
	return p.pod(w.GetUid()), w
}

// sourcePod is the local pod a tunnel from src starts in: by its Workload,
// or, before that arrived, by the addresses its connections came from.
func (p *Proxy) sourcePod(src netip.Addr) *Pod {
	if pod, _ := p.podByIP(src); pod != nil {
		return pod
	}
	p.mu.RLock()
	defer p.mu.RUnlock()
	return p.srcIPs[src]
}

func (p *Proxy) dialFromPod(ctx context.Context, src netip.Addr, dst netip.AddrPort) (net.Conn, error) {
	pod := p.sourcePod(src)
	if pod == nil {
		return nil, fmt.Errorf("no local pod with IP %s", src)
	}
	return pod.Net.DialTCP(ctx, src, dst, false)
}

func (p *Proxy) listenUDPInPod(ctx context.Context, src netip.Addr) (net.PacketConn, error) {
	pod := p.sourcePod(src)
	if pod == nil {
		return nil, fmt.Errorf("no local pod with IP %s", src)
	}
	return pod.Net.ListenUDP(ctx, netip.AddrPortFrom(src, 0))
}

// certificate picks the certificate of the local pod the connection came
// to (by its local IP).
func (p *Proxy) certificate(local netip.Addr) (*tls.Certificate, error) {
	pod, _ := p.podByIP(local)
	if pod == nil {
		return nil, fmt.Errorf("%w for %s: no local pod", identity.ErrNoCertificate, local)
	}
	// crypto/tls gives GetCertificate no context; the handshake timeout
	// of the peer bounds it as much as CertWait does.
	svid, err := p.podSVID(context.Background(), pod)
	if err != nil {
		return nil, fmt.Errorf("%w for %s: %v", identity.ErrNoCertificate, local, err)
	}
	return identity.TLSCertificate(svid), nil
}

// waitingSource is a certificate source that can wait for a certificate
// still being issued (certs.Manager's).
type waitingSource interface {
	WaitX509SVID(ctx context.Context) (*x509svid.SVID, error)
}

// podSVID is pod's certificate, waiting up to CertWait for a first one.
func (p *Proxy) podSVID(ctx context.Context, pod *Pod) (*x509svid.SVID, error) {
	svid, err := pod.SVID.GetX509SVID()
	if err == nil || p.cfg.CertWait <= 0 {
		return svid, err
	}
	w, ok := pod.SVID.(waitingSource)
	if !ok {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(ctx, p.cfg.CertWait)
	defer cancel()
	return w.WaitX509SVID(ctx)
}

// ServeHBONE serves inbound HBONE over HTTP/2 on ln (a pod's 15008 TCP
// listener) until ctx ends.
func (p *Proxy) ServeHBONE(ctx context.Context, ln net.Listener) error {
	return p.server.ServeH2(ctx, ln)
}

// ServeHBONEQUIC serves inbound HBONE over HTTP/3 on pc (a pod's 15008 UDP
// socket) until ctx ends.
func (p *Proxy) ServeHBONEQUIC(ctx context.Context, pc net.PacketConn) error {
	return p.server.ServeH3(ctx, pc)
}

// tracker runs one goroutine per accepted connection. When ctx ends it
// closes the listener, lets the connections run on for drain, then closes
// them and waits for them.
type tracker struct {
	wg    sync.WaitGroup
	drain time.Duration
}

func (t *tracker) serve(ctx context.Context, ln net.Listener, log *slog.Logger, handle func(ctx context.Context, c net.Conn)) error {
	stop := context.AfterFunc(ctx, func() { ln.Close() })
	defer stop()
	// Connections outlive ctx by up to the drain period.
	connCtx, cancelConns := context.WithCancel(context.WithoutCancel(ctx))
	defer cancelConns()
	wait := func() {
		done := make(chan struct{})
		go func() { t.wg.Wait(); close(done) }()
		timer := time.NewTimer(t.drain)
		defer timer.Stop()
		select {
		case <-done:
			return
		case <-timer.C:
		}
		cancelConns()
		<-done
	}
	var delay time.Duration
	for {
		c, err := ln.Accept()
		if err != nil {
			if ctx.Err() != nil {
				wait()
				return nil
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() || errors.Is(err, syscall.EMFILE) || errors.Is(err, syscall.ENFILE) {
				// Out of descriptors or similar: back off instead of spinning.
				delay = min(max(2*delay, 5*time.Millisecond), time.Second)
				log.Warn("accept failed; retrying", "error", err, "delay", delay)
				time.Sleep(delay)
				continue
			}
			cancelConns()
			t.wg.Wait()
			return fmt.Errorf("accept on %s: %w", ln.Addr(), err)
		}
		delay = 0
		t.wg.Add(1)
		go func() {
			defer t.wg.Done()
			cctx, cancel := context.WithCancel(connCtx)
			defer cancel()
			stopc := context.AfterFunc(cctx, func() { c.Close() })
			defer stopc()
			handle(cctx, c)
		}()
	}
}

// reset closes c with a TCP RST, telling the client its connection was
// refused rather than served and closed.
func reset(c net.Conn) {
	if tc, ok := c.(*net.TCPConn); ok {
		_ = tc.SetLinger(0)
	}
	c.Close()
}
