package hbone

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"strings"
	"time"

	"github.com/quic-go/quic-go"
	"github.com/quic-go/quic-go/http3"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/meshlite/meshlite/internal/identity"
)

// ClientConfig configures a Client.
type ClientConfig struct {
	// Bundle verifies tunnel endpoints' certificates.
	Bundle x509bundle.Source
	// DialTCP opens the TCP connection for HTTP/2 from src (zero: any
	// address) to dst; ztunnel opens it inside the source pod's network
	// namespace. Default: a net.Dialer bound to src.
	DialTCP func(ctx context.Context, src netip.Addr, dst netip.AddrPort) (net.Conn, error)
	// ListenUDP opens the UDP socket one QUIC connection from src uses.
	// Default: net.ListenUDP on src, port 0.
	ListenUDP func(ctx context.Context, src netip.Addr) (net.PacketConn, error)
	// MaxStreamsPerConn caps tunnels per HTTP/2 connection; the pool opens
	// another connection when all are full. Default 100.
	MaxStreamsPerConn int
	// IdleTimeout closes a pooled connection that has carried no tunnel for
	// this long. Default 5 minutes.
	IdleTimeout time.Duration
	// HandshakeTimeout bounds connecting, the TLS handshake and the HTTP/2
	// settings exchange. Default 10s.
	HandshakeTimeout time.Duration
	// Logger defaults to slog.Default().
	Logger *slog.Logger
}

// DialRequest describes one tunnel.
type DialRequest struct {
	// Transport is H2 (default when zero) or H3.
	Transport Transport
	// Endpoint is where the tunnel terminates: <dst pod IP>:15008 or a waypoint.
	Endpoint netip.AddrPort
	// Target is the CONNECT :authority, the final destination ip:port.
	Target netip.AddrPort
	// Source is the client identity presented in the handshake.
	Source x509svid.Source
	// SourceAddr is the local IP to connect from (zero: any); part of the pool key.
	SourceAddr netip.Addr
	// PeerIDs are the identities the endpoint may present; at least one.
	PeerIDs []spiffeid.ID
	// Forwarded, if valid, is sent as Forwarded: for="<ip:port>".
	Forwarded netip.AddrPort
	// TraceParent and Baggage, if set, are validated and sent as is.
	TraceParent string
	Baggage     string
}

// Client opens HBONE tunnels over pooled connections. It is safe for
// concurrent use.
type Client struct {
	cfg  ClientConfig
	log  *slog.Logger
	pool *pool
}

// NewClient checks cfg and builds a Client.
func NewClient(cfg ClientConfig) (*Client, error) {
	if cfg.Bundle == nil {
		return nil, errors.New("hbone client: no trust bundle")
	}
	if cfg.DialTCP == nil {
		cfg.DialTCP = defaultDialTCP
	}
	if cfg.ListenUDP == nil {
		cfg.ListenUDP = defaultListenUDP
	}
	if cfg.MaxStreamsPerConn <= 0 {
		cfg.MaxStreamsPerConn = 100
	}
	if cfg.IdleTimeout <= 0 {
		cfg.IdleTimeout = 5 * time.Minute
	}
	if cfg.HandshakeTimeout <= 0 {
		cfg.HandshakeTimeout = 10 * time.Second
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	return &Client{cfg: cfg, log: cfg.Logger, pool: newPool(cfg.MaxStreamsPerConn, cfg.IdleTimeout, cfg.HandshakeTimeout)}, nil
}

func defaultDialTCP(ctx context.Context, src netip.Addr, dst netip.AddrPort) (net.Conn, error) {
	var d net.Dialer
	if src.IsValid() {
		d.LocalAddr = net.TCPAddrFromAddrPort(netip.AddrPortFrom(src, 0))
	}
	return d.DialContext(ctx, "tcp", dst.String())
}

func defaultListenUDP(_ context.Context, src netip.Addr) (net.PacketConn, error) {
	laddr := &net.UDPAddr{}
	if src.IsValid() {
		laddr = net.UDPAddrFromAddrPort(netip.AddrPortFrom(src, 0))
	}
	return net.ListenUDP("udp", laddr)
}

// Close closes every pooled connection; open tunnels fail.
func (cl *Client) Close() error {
	cl.pool.close()
	return nil
}

// Stats reports the pool's connections and tunnels.
func (cl *Client) Stats() PoolStats { return cl.pool.stats() }

// Dial opens a tunnel to req.Target through req.Endpoint. A non-200 answer is
// a *StatusError. Cancelling ctx stops the dial (a connection handshake
// shared with other callers goes on while any of them still waits).
func (cl *Client) Dial(ctx context.Context, req DialRequest) (Conn, error) {
	if req.Transport == 0 {
		req.Transport = H2
	}
	if req.Transport != H2 && req.Transport != H3 {
		return nil, fmt.Errorf("hbone dial: unknown transport %v", req.Transport)
	}
	if !req.Endpoint.IsValid() || !req.Target.IsValid() {
		return nil, errors.New("hbone dial: endpoint and target must be set")
	}
	if req.Source == nil {
		return nil, errors.New("hbone dial: no source identity")
	}
	if len(req.PeerIDs) == 0 {
		return nil, errors.New("hbone dial: no expected peer identity")
	}
	svid, err := req.Source.GetX509SVID()
	if err != nil {
		return nil, fmt.Errorf("hbone dial: source SVID: %w", err)
	}
	hdrs, err := requestHeaderFields(&req)
	if err != nil {
		return nil, fmt.Errorf("hbone dial: %w", err)
	}
	ids := make([]string, len(req.PeerIDs))
	for i, id := range req.PeerIDs {
		ids[i] = id.String()
	}
	key := poolKey{
		transport: req.Transport,
		srcID:     svid.ID.String(),
		dstIDs:    strings.Join(ids, ","),
		srcIP:     req.SourceAddr,
		endpoint:  req.Endpoint,
	}
	authority := req.Target.String()
	for attempt := 0; ; attempt++ {
		pc, err := cl.pool.acquire(ctx, key, func(dctx context.Context, pc *pooledConn) error {
			return cl.dialConn(dctx, pc, &req)
		})
		if err != nil {
			return nil, fmt.Errorf("hbone %s dial %s: %w", req.Transport, req.Endpoint, err)
		}
		conn, status, err := cl.open(ctx, pc, authority, hdrs)
		if err != nil {
			if attempt < 2 && ctx.Err() == nil && retryable(err) {
				// The connection went away under us; try a fresh one (twice:
				// a peer that is draining may refuse a first retry too).
				// HTTP/2 connections leave the pool on GOAWAY by themselves;
				// a QUIC one only when it closes, so take it out here.
				if pc.h3 != nil {
					cl.pool.evict(pc)
				}
				continue
			}
			return nil, fmt.Errorf("hbone %s CONNECT %s via %s: %w", req.Transport, req.Target, req.Endpoint, err)
		}
		if status != 200 {
			return nil, &StatusError{Status: status, Transport: req.Transport, Endpoint: req.Endpoint, Target: req.Target}
		}
		return conn, nil
	}
}

func retryable(err error) bool {
	return errors.Is(err, errGoAway) || errors.Is(err, errRefusedStream) || errors.Is(err, errConnClosed)
}

// open starts a tunnel on a reserved slot of pc; the slot is released when
// the tunnel finishes (or right away if it could not start).
func (cl *Client) open(ctx context.Context, pc *pooledConn, authority string, hdrs [][2]string) (Conn, int, error) {
	if pc.h2 != nil {
		st, status, err := pc.h2.openStream(ctx, authority, hdrs)
		if err != nil {
			return nil, 0, err
		}
		if status != 200 {
			st.Close()
			return nil, status, nil
		}
		return st, status, nil
	}
	var once bool
	release := func() {
		if !once {
			once = true
			cl.pool.release(pc)
		}
	}
	conn, status, err := pc.h3.open(ctx, authority, hdrs, release)
	if err != nil || status != 200 {
		release()
	}
	if err != nil && pc.h3.qc.Context().Err() != nil {
		err = fmt.Errorf("%w: %v", errConnClosed, err)
	}
	return conn, status, err
}

// dialConn connects, handshakes and fills pc.
func (cl *Client) dialConn(ctx context.Context, pc *pooledConn, req *DialRequest) error {
	tlsCfg, err := identity.ClientConfig(req.Source, cl.cfg.Bundle, identity.AuthorizeOneOf(req.PeerIDs...))
	if err != nil {
		return err
	}
	if req.Transport == H3 {
		return cl.dialH3(ctx, pc, tlsCfg)
	}
	return cl.dialH2(ctx, pc, tlsCfg)
}

func (cl *Client) dialH2(ctx context.Context, pc *pooledConn, tlsCfg *tls.Config) error {
	nc, err := cl.cfg.DialTCP(ctx, pc.key.srcIP, pc.key.endpoint)
	if err != nil {
		return fmt.Errorf("connect: %w", err)
	}
	tlsCfg.NextProtos = []string{"h2"}
	sock := newSockConn(nc)
	tc := tls.Client(sock.underTLS(nc), tlsCfg)
	if err := tc.HandshakeContext(ctx); err != nil {
		nc.Close()
		return fmt.Errorf("TLS handshake: %w", err)
	}
	if p := tc.ConnectionState().NegotiatedProtocol; p != "h2" {
		tc.Close()
		return fmt.Errorf("server negotiated ALPN %q, want h2", p)
	}
	c := newH2Conn(tc, sock, true, cl.log)
	c.onStreamDone = func() { cl.pool.release(pc) }
	c.onClose = func(error) { cl.pool.evict(pc) }
	c.onGoAway = func() { cl.pool.evict(pc) }
	pc.h2 = c
	if err := c.start(0); err != nil {
		return err
	}
	select {
	case <-c.settingsCh:
		return nil
	case <-c.done:
		return fmt.Errorf("HTTP/2 settings exchange: %w", c.err)
	case <-ctx.Done():
		c.Close()
		return fmt.Errorf("HTTP/2 settings exchange: %w", ctx.Err())
	}
}

func (cl *Client) dialH3(ctx context.Context, pc *pooledConn, tlsCfg *tls.Config) error {
	udp, err := cl.cfg.ListenUDP(ctx, pc.key.srcIP)
	if err != nil {
		return fmt.Errorf("open UDP socket: %w", err)
	}
	tlsCfg.NextProtos = []string{http3.NextProtoH3}
	qcfg := quicConfig(cl.cfg.HandshakeTimeout, -1) // we accept no streams from the server
	tr := &quic.Transport{Conn: udp}
	qc, err := tr.Dial(ctx, net.UDPAddrFromAddrPort(pc.key.endpoint), tlsCfg, qcfg)
	if err != nil {
		tr.Close()
		udp.Close()
		return fmt.Errorf("QUIC handshake: %w", err)
	}
	h3t := &http3.Transport{DisableCompression: true, MaxResponseHeaderBytes: h2MaxHeaderList, Logger: cl.log}
	pc.h3 = &h3Client{qc: qc, cc: h3t.NewClientConn(qc), tr: tr}
	context.AfterFunc(qc.Context(), func() {
		cl.pool.evict(pc)
		tr.Close()
		udp.Close()
	})
	return nil
}
