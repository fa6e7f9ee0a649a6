package proxy

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/http"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/meshlite/meshlite/internal/hbone"
	"github.com/meshlite/meshlite/internal/identity"
	"github.com/meshlite/meshlite/proto/l7"
	"github.com/meshlite/meshlite/proto/workload"
	"github.com/meshlite/meshlite/waypoint/circuit"
	"github.com/meshlite/meshlite/waypoint/config"
	"github.com/meshlite/meshlite/waypoint/ratelimit"
	"github.com/meshlite/meshlite/waypoint/telemetry"
)

// Config configures a Proxy.
type Config struct {
	Store *config.Store
	// SVID is the waypoint's own identity, presented upstream.
	SVID x509svid.Source
	// Tunnels opens upstream HBONE tunnels (pooled).
	Tunnels *hbone.Client
	// UpstreamTransport is hbone.H2 (default) or hbone.H3.
	UpstreamTransport hbone.Transport
	// HBONEPort is where endpoints' ztunnels listen (15008).
	HBONEPort uint16
	// DialTCP reaches endpoints without HBONE. Default: net.Dialer.
	DialTCP func(ctx context.Context, addr netip.AddrPort) (net.Conn, error)

	Metrics  *telemetry.Metrics
	Exporter telemetry.Exporter
	Log      *slog.Logger
	// AccessLog gets one record per request (nil: through Log).
	AccessLog telemetry.AccessLogger

	// Limits on what clients send.
	MaxHeaderBytes    int           // 64 KiB
	ReadHeaderTimeout time.Duration // 10 s (slowloris)
	IdleTimeout       time.Duration // 5 min between requests on a connection
	SniffTimeout      time.Duration // 5 s to see the first bytes
	// MaxBufferedBody is how much of a request body is kept for retries
	// and mirrors (1 MiB); larger bodies are streamed and not retried.
	MaxBufferedBody int64
	// UpgradeIdleTimeout closes an upgraded (WebSocket) stream in which
	// neither side sent anything for this long (5 min, like Envoy's stream
	// idle timeout), so a half-dead peer does not hold both connections, a
	// goroutine and the circuit-breaker slot forever.
	UpgradeIdleTimeout time.Duration
	// Rand returns uniform values in [0,1) (weights, fault shares, mirror).
	Rand func() float64
}

// Proxy serves tunnels. Create with New, run with Run.
type Proxy struct {
	cfg  Config
	log  *slog.Logger
	alog telemetry.AccessLogger

	h1    *http.Server // serves HTTP/1.1 and h2c
	conns chan net.Conn
	ln    *chanListener

	limiter  *ratelimit.Limiter
	breakers *circuit.Breakers
	outliers *circuit.Outliers

	rr sync.Map // destination key -> *atomic.Uint64 (round robin)

	upMu       sync.Mutex
	transports map[transportKey]http.RoundTripper

	mirrors chan struct{}
	// stopping ends when Run stops: upgraded streams close then.
	stopping context.Context
	stop     context.CancelFunc
	wg       sync.WaitGroup // mirrors and upgraded streams; Add only through track
	wgMu     sync.Mutex     // orders track's Add before Run's Wait
	wgClosed bool           // under wgMu: Run waits on wg, no more Adds
	closed   atomic.Bool
}

// New checks cfg and builds a Proxy.
func New(cfg Config) (*Proxy, error) {
	if cfg.Store == nil || cfg.SVID == nil || cfg.Tunnels == nil {
		return nil, errors.New("waypoint proxy: store, SVID and tunnel client are required")
	}
	if cfg.UpstreamTransport == 0 {
		cfg.UpstreamTransport = hbone.H2
	}
	if cfg.HBONEPort == 0 {
		cfg.HBONEPort = 15008
	}
	if cfg.DialTCP == nil {
		cfg.DialTCP = func(ctx context.Context, addr netip.AddrPort) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "tcp", addr.String())
		}
	}
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	if cfg.AccessLog == nil {
		cfg.AccessLog = telemetry.SlogAccess(cfg.Log)
	}
	if cfg.MaxHeaderBytes <= 0 {
		cfg.MaxHeaderBytes = 64 << 10
	}
	if cfg.ReadHeaderTimeout <= 0 {
		cfg.ReadHeaderTimeout = 10 * time.Second
	}
	if cfg.IdleTimeout <= 0 {
		cfg.IdleTimeout = 5 * time.Minute
	}
	if cfg.SniffTimeout <= 0 {
		cfg.SniffTimeout = 5 * time.Second
	}
	if cfg.MaxBufferedBody <= 0 {
		cfg.MaxBufferedBody = 1 << 20
	}
	if cfg.UpgradeIdleTimeout <= 0 {
		cfg.UpgradeIdleTimeout = 5 * time.Minute
	}
	if cfg.Rand == nil {
		cfg.Rand = rand.Float64
	}
	p := &Proxy{
		cfg: cfg, log: cfg.Log, alog: cfg.AccessLog,
		conns:      make(chan net.Conn),
		limiter:    ratelimit.New(),
		breakers:   circuit.NewBreakers(),
		outliers:   circuit.NewOutliers(),
		transports: map[transportKey]http.RoundTripper{},
		mirrors:    make(chan struct{}, 64),
	}
	p.stopping, p.stop = context.WithCancel(context.Background())
	p.ln = &chanListener{conns: p.conns, done: make(chan struct{})}
	p.h1 = &http.Server{
		Handler:           p,
		ReadHeaderTimeout: cfg.ReadHeaderTimeout,
		IdleTimeout:       cfg.IdleTimeout,
		MaxHeaderBytes:    cfg.MaxHeaderBytes,
		ConnContext: func(ctx context.Context, c net.Conn) context.Context {
			if tc, ok := c.(*tunnelConn); ok {
				return withConnInfo(ctx, tc.info)
			}
			return ctx
		},
		ErrorLog: slog.NewLogLogger(cfg.Log.Handler(), slog.LevelDebug),
		// HTTP/1.1 and HTTP/2 with prior knowledge (h2c, gRPC) on the
		// same tunnels; net/http tells them apart by the preface.
		Protocols: new(http.Protocols),
		HTTP2: &http.HTTP2Config{
			MaxConcurrentStreams: 250,
			MaxReadFrameSize:     1 << 20,
			SendPingTimeout:      cfg.IdleTimeout,
		},
	}
	p.h1.Protocols.SetHTTP1(true)
	p.h1.Protocols.SetUnencryptedHTTP2(true)
	return p, nil
}

// Run serves the HTTP connections handed over by HandleTunnel until ctx
// ends, then stops accepting, closes idle connections and upgraded streams
// and waits for them and for mirrors.
func (p *Proxy) Run(ctx context.Context) error {
	errc := make(chan error, 1)
	go func() { errc <- p.h1.Serve(p.ln) }()
	<-ctx.Done()
	p.closed.Store(true)
	sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_ = p.h1.Shutdown(sctx)
	<-errc
	// Handlers the 5 s Shutdown gave up on may still be running: from now
	// on they start no mirror or upgraded stream (track refuses), so no
	// wg.Add can race the Wait below.
	p.wgMu.Lock()
	p.wgClosed = true
	p.wgMu.Unlock()
	p.stop()
	p.upMu.Lock()
	for _, t := range p.transports {
		if c, ok := t.(interface{ CloseIdleConnections() }); ok {
			c.CloseIdleConnections()
		}
	}
	p.upMu.Unlock()
	p.wg.Wait()
	return nil
}

// track counts one more mirror or upgraded stream for Run to wait on, or
// reports false once Run has begun waiting (the work must then not start).
func (p *Proxy) track() bool {
	p.wgMu.Lock()
	defer p.wgMu.Unlock()
	if p.wgClosed {
		return false
	}
	p.wg.Add(1)
	return true
}

// connInfo is what one tunnel tells about every request on it.
type connInfo struct {
	peer      string // source principal without spiffe://
	peerID    string // with spiffe:// (metrics label)
	peerNS    string
	src       netip.AddrPort // original source (Forwarded) or the peer
	srcStr    string         // src as text, made once per tunnel (logs)
	target    netip.AddrPort
	svcKey    string
	svcPort   uint32
	direct    *workload.Workload // the target is this pod (addressed by its IP), not a Service VIP
	transport string
}

type connInfoKey struct{}

func withConnInfo(ctx context.Context, ci *connInfo) context.Context {
	return context.WithValue(ctx, connInfoKey{}, ci)
}

func connInfoFrom(ctx context.Context) *connInfo {
	ci, _ := ctx.Value(connInfoKey{}).(*connInfo)
	return ci
}

// HandleTunnel is the hbone.Handler of the waypoint's 15008 listener.
func (p *Proxy) HandleTunnel(ctx context.Context, req *hbone.Request) (net.Conn, error) {
	if p.closed.Load() {
		return nil, fmt.Errorf("%w: waypoint shutting down", hbone.ErrUpstream)
	}
	snap := p.cfg.Store.Snapshot()
	svc, port, wl := snap.Resolve(req.Target)
	if svc == nil && wl == nil {
		p.log.Info("tunnel refused: unknown destination", "src.identity", req.PeerID.String(), "target", req.Target)
		return nil, fmt.Errorf("%w: %s is not a Service or workload this waypoint serves", hbone.ErrBadRequest, req.Target)
	}
	ci := &connInfo{peer: trimSpiffe(req.PeerID.String()), target: req.Target, transport: req.Transport.String()}
	if id, err := identity.FromID(req.PeerID); err == nil {
		ci.peerNS = id.Namespace
	}
	ci.peerID = "spiffe://" + ci.peer
	ci.src = req.RemoteAddr
	if f := req.Forwarded; f.IsValid() {
		// A ztunnel dials from inside the client pod's netns, so Forwarded
		// names the tunnel's own source IP and adds the app's port. Any other
		// IP would let a pod with a valid certificate pose as another
		// address (L7 policy ipBlocks, logs): keep the tunnel's source then.
		if f.Addr().Unmap() == req.RemoteAddr.Addr().Unmap() {
			ci.src = f
		} else {
			p.log.Warn("ignoring Forwarded naming another address than the tunnel's source",
				"src.identity", req.PeerID.String(), "forwarded", f.String(), "remote", req.RemoteAddr.String())
		}
	}
	ci.srcStr = ci.src.String()
	// A pod IP target (waypoint-for workload or all) goes to that pod: the
	// policies of its bound Service apply, its routes do not (as in Istio,
	// routes attach to Service traffic).
	ci.direct = wl
	ci.svcPort = uint32(req.Target.Port())
	if svc != nil {
		ci.svcKey, ci.svcPort = svc.Key, port
	}
	conn, err := req.Accept()
	if err != nil {
		return nil, nil
	}
	p.serveTunnel(ctx, conn, ci, svc)
	return nil, nil
}

func trimSpiffe(s string) string {
	const pfx = "spiffe://"
	if len(s) >= len(pfx) && s[:len(pfx)] == pfx {
		return s[len(pfx):]
	}
	return s
}

// h2Preface starts every HTTP/2 connection with prior knowledge (RFC 9113 3.4).
var h2Preface = []byte("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")

type sniffed int

const (
	sniffTCP sniffed = iota
	sniffH1
	sniffH2
)

// serveTunnel decides the protocol and serves the tunnel until it ends.
func (p *Proxy) serveTunnel(ctx context.Context, conn hbone.Conn, ci *connInfo, svc *config.Service) {
	hint := l7.Protocol_PROTOCOL_UNSPECIFIED
	if svc != nil {
		if sp := svc.Port(ci.svcPort); sp != nil {
			hint = sp.GetProtocol()
		}
	}
	br := bufio.NewReaderSize(conn, 4096)
	kind := sniffTCP
	if hint != l7.Protocol_TCP {
		kind = p.sniff(conn, br, hint)
	}
	tc := &tunnelConn{Conn: conn, r: br, info: ci, done: make(chan struct{})}
	switch kind {
	case sniffH1, sniffH2:
		select {
		case p.conns <- tc:
		case <-p.ln.done:
			tc.Close()
			return
		}
		<-tc.done
	default:
		p.serveTCP(ctx, tc, ci, svc)
	}
}

// sniff peeks at the first bytes: the HTTP/2 preface, an HTTP/1 request
// line, or anything else (TCP). Nothing within SniffTimeout is TCP (a
// server-first protocol) unless the port says HTTP.
func (p *Proxy) sniff(conn net.Conn, br *bufio.Reader, hint l7.Protocol) sniffed {
	_ = conn.SetReadDeadline(time.Now().Add(p.cfg.SniffTimeout))
	defer conn.SetReadDeadline(time.Time{})
	want := 1
	for {
		b, err := br.Peek(want)
		switch {
		case len(b) >= len(h2Preface) && bytes.Equal(b[:len(h2Preface)], h2Preface):
			return sniffH2
		case bytes.HasPrefix(h2Preface, b) && err == nil && len(b) < len(h2Preface):
			// Could still be the preface ("PRI ..."); also a valid start of
			// "PRI" as an HTTP/1 method, which net/http rejects anyway.
		default:
			if k, sure := looksHTTP1(b); sure {
				if k == sniffTCP && httpHint(hint) {
					return sniffH1 // a declared HTTP port: net/http answers 400
				}
				return k
			}
		}
		if err != nil {
			if len(b) > 0 {
				if k, _ := looksHTTP1(b); k == sniffH1 {
					return sniffH1
				}
			}
			if httpHint(hint) {
				if len(b) == 0 {
					return sniffTCP
				}
				return sniffH1 // let net/http answer 400 to the garbage
			}
			return sniffTCP
		}
		if want >= 64 {
			if httpHint(hint) {
				return sniffH1
			}
			return sniffTCP
		}
		want = max(want+1, br.Buffered())
	}
}

func httpHint(h l7.Protocol) bool {
	return h == l7.Protocol_HTTP || h == l7.Protocol_HTTP2 || h == l7.Protocol_GRPC
}

// looksHTTP1 reports a request line start: a token method then a space.
// sure is false while more bytes could change the answer.
func looksHTTP1(b []byte) (sniffed, bool) {
	for i, c := range b {
		if c == ' ' {
			if i == 0 {
				return sniffTCP, true
			}
			return sniffH1, true
		}
		if c < 'A' || c > 'Z' {
			if c == '-' || c == '_' || (c >= 'a' && c <= 'z') {
				continue
			}
			return sniffTCP, true
		}
		if i >= 20 {
			return sniffTCP, true
		}
	}
	return sniffTCP, false
}

// tunnelConn is a tunnel with the sniffed bytes put back in front.
type tunnelConn struct {
	hbone.Conn
	r    *bufio.Reader
	info *connInfo
	once sync.Once
	done chan struct{}
}

func (c *tunnelConn) Read(b []byte) (int, error) { return c.r.Read(b) }

func (c *tunnelConn) Close() error {
	var err error
	c.once.Do(func() {
		err = c.Conn.Close()
		close(c.done)
	})
	return err
}

// chanListener feeds the HTTP/1 server the tunnels HandleTunnel accepted.
type chanListener struct {
	conns chan net.Conn
	done  chan struct{}
	once  sync.Once
}

func (l *chanListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.conns:
		return c, nil
	case <-l.done:
		return nil, net.ErrClosed
	}
}

func (l *chanListener) Close() error {
	l.once.Do(func() { close(l.done) })
	return nil
}

func (l *chanListener) Addr() net.Addr { return &net.TCPAddr{} }

var _ io.Reader = (*tunnelConn)(nil)
