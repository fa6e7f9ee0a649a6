package hbone

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"runtime/debug"
	"sync"
	"time"

	"github.com/quic-go/quic-go"
	"github.com/quic-go/quic-go/http3"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"

	"github.com/meshlite/meshlite/internal/identity"
)

// Handler decides one tunnel. It returns the upstream connection (the server
// answers 200 and relays bytes both ways, half-close and reset included), or
// an error: one wrapping ErrDenied answers 401, ErrBadRequest 400, anything
// else 503. A handler that processes the stream itself calls req.Accept and
// returns (nil, nil). ctx ends when the tunnel or its connection does.
type Handler func(ctx context.Context, req *Request) (net.Conn, error)

// ServerConfig configures a Server.
type ServerConfig struct {
	// Certificates picks the certificate to present by the local
	// (original destination) IP of each connection.
	Certificates identity.CertSelector
	// Bundle verifies client certificates.
	Bundle x509bundle.Source
	// Authorize decides which client SPIFFE IDs may connect at all, e.g.
	// identity.AuthorizeMemberOf(trustDomain). Per-request policy belongs in
	// the Handler.
	Authorize tlsconfig.Authorizer
	// Handler is called for every valid CONNECT.
	Handler Handler
	// Logger defaults to slog.Default().
	Logger *slog.Logger
	// MaxStreamsPerConn limits concurrent tunnels per HTTP/2 connection
	// (SETTINGS_MAX_CONCURRENT_STREAMS). Default 100.
	MaxStreamsPerConn int
	// MaxQUICStreams limits concurrent tunnels per QUIC connection
	// (all tunnels of one pool key share it). Default 1000.
	MaxQUICStreams int
	// HandshakeTimeout bounds the TLS handshake and the HTTP/2 preface.
	// Default 10s.
	HandshakeTimeout time.Duration
	// DrainTimeout is how long tunnels may run on after the serving context
	// ends (GOAWAY is sent at once). Default 0: close at once.
	DrainTimeout time.Duration
}

// Server terminates HBONE: TLS 1.3 + HTTP/2 on TCP and QUIC + HTTP/3 on UDP.
type Server struct {
	cfg   ServerConfig
	log   *slog.Logger
	tlsH2 *tls.Config
	tlsH3 *tls.Config
	quic  *quic.Config
}

// NewServer checks cfg and builds a Server.
func NewServer(cfg ServerConfig) (*Server, error) {
	if cfg.Handler == nil {
		return nil, errors.New("hbone server: no handler")
	}
	base, err := identity.ServerConfig(cfg.Certificates, cfg.Bundle, cfg.Authorize)
	if err != nil {
		return nil, fmt.Errorf("hbone server: %w", err)
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.MaxStreamsPerConn <= 0 {
		cfg.MaxStreamsPerConn = 100
	}
	if cfg.MaxQUICStreams <= 0 {
		cfg.MaxQUICStreams = 1000
	}
	if cfg.HandshakeTimeout <= 0 {
		cfg.HandshakeTimeout = 10 * time.Second
	}
	s := &Server{cfg: cfg, log: cfg.Logger}
	s.tlsH2 = base.Clone()
	s.tlsH2.NextProtos = []string{"h2"}
	s.tlsH3 = base.Clone()
	s.tlsH3.NextProtos = []string{http3.NextProtoH3}
	s.quic = quicConfig(cfg.HandshakeTimeout, int64(cfg.MaxQUICStreams))
	return s, nil
}

// quicConfig sizes QUIC flow control like the HTTP/2 windows (4 MiB per
// stream, 16 MiB per connection; quic-go may auto-tune up to twice that).
func quicConfig(handshake time.Duration, maxStreams int64) *quic.Config {
	return &quic.Config{
		HandshakeIdleTimeout:           handshake,
		MaxIdleTimeout:                 60 * time.Second,
		KeepAlivePeriod:                15 * time.Second,
		InitialStreamReceiveWindow:     h2StreamWindow,
		MaxStreamReceiveWindow:         2 * h2StreamWindow,
		InitialConnectionReceiveWindow: h2ConnWindow,
		MaxConnectionReceiveWindow:     2 * h2ConnWindow,
		MaxIncomingStreams:             maxStreams,
		MaxIncomingUniStreams:          16, // HTTP/3 control and QPACK streams
	}
}

// connInfo is what every request on one connection shares.
type connInfo struct {
	transport     Transport
	peer          spiffeid.ID
	local, remote netip.AddrPort
}

// ServeH2 accepts TCP connections from ln and serves HBONE over TLS and
// HTTP/2 until ctx ends; then it closes ln, drains and returns nil. It
// returns early with an error if accepting fails for good.
func (s *Server) ServeH2(ctx context.Context, ln net.Listener) error {
	var (
		mu    sync.Mutex
		conns = map[*h2Conn]struct{}{}
		wg    sync.WaitGroup
	)
	stop := context.AfterFunc(ctx, func() { ln.Close() })
	defer stop()
	var acceptErr error
	backoff := 5 * time.Millisecond
	for {
		nc, err := ln.Accept()
		if err != nil {
			if ctx.Err() != nil {
				break
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() || isTemporary(err) {
				s.log.Warn("hbone: accept failed, retrying", "listener", ln.Addr(), "error", err)
				time.Sleep(backoff)
				backoff = min(2*backoff, time.Second)
				continue
			}
			acceptErr = fmt.Errorf("hbone: accept on %s: %w", ln.Addr(), err)
			break
		}
		backoff = 5 * time.Millisecond
		wg.Add(1)
		go func() {
			defer wg.Done()
			c := s.handshakeH2(ctx, nc)
			if c == nil {
				return
			}
			mu.Lock()
			conns[c] = struct{}{}
			mu.Unlock()
			s.serveH2Conn(ctx, c)
			mu.Lock()
			delete(conns, c)
			mu.Unlock()
		}()
	}
	_ = ln.Close()
	if acceptErr != nil { // not a shutdown: close everything at once
		mu.Lock()
		for c := range conns {
			c.Close()
		}
		mu.Unlock()
	}
	wg.Wait()
	return acceptErr
}

func isTemporary(err error) bool {
	var t interface{ Temporary() bool }
	return errors.As(err, &t) && t.Temporary()
}

// handshakeH2 runs the TLS handshake and reads the client preface.
func (s *Server) handshakeH2(ctx context.Context, nc net.Conn) *h2Conn {
	// A connection accepted just before shutdown still completes its
	// handshake (bounded by the timeout) and is then drained, rather than
	// failed half way.
	hctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), s.cfg.HandshakeTimeout)
	defer cancel()
	sock := newSockConn(nc)
	tc := tls.Server(sock.underTLS(nc), s.tlsH2)
	if err := tc.HandshakeContext(hctx); err != nil {
		s.log.Info("hbone: TLS handshake failed", "transport", H2, "remote", nc.RemoteAddr(), "local", nc.LocalAddr(), "error", err)
		nc.Close()
		return nil
	}
	cs := tc.ConnectionState()
	info, err := newConnInfo(H2, cs, nc.LocalAddr(), nc.RemoteAddr())
	if err != nil {
		s.log.Info("hbone: rejecting connection", "transport", H2, "remote", nc.RemoteAddr(), "error", err)
		tc.Close()
		return nil
	}
	if cs.NegotiatedProtocol != "h2" && cs.NegotiatedProtocol != "" {
		s.log.Info("hbone: rejecting connection: ALPN is not h2", "remote", nc.RemoteAddr(), "alpn", cs.NegotiatedProtocol)
		tc.Close()
		return nil
	}
	_ = tc.SetReadDeadline(time.Now().Add(s.cfg.HandshakeTimeout))
	c := newH2Conn(tc, sock, false, s.log)
	preface := make([]byte, len(h2Preface))
	if _, err := io.ReadFull(tc, preface); err != nil || string(preface) != string(h2Preface) {
		s.log.Info("hbone: bad HTTP/2 client preface", "remote", nc.RemoteAddr(), "peer", info.peer, "error", err)
		tc.Close()
		return nil
	}
	_ = tc.SetReadDeadline(time.Time{})
	c.info = info
	return c
}

func newConnInfo(t Transport, cs tls.ConnectionState, local, remote net.Addr) (*connInfo, error) {
	peer, err := identity.PeerID(cs)
	if err != nil {
		return nil, err
	}
	l, err := identity.AddrPort(local)
	if err != nil {
		return nil, fmt.Errorf("local address: %w", err)
	}
	r, err := identity.AddrPort(remote)
	if err != nil {
		return nil, fmt.Errorf("remote address: %w", err)
	}
	return &connInfo{transport: t, peer: peer, local: l, remote: r}, nil
}

// serveH2Conn runs one HTTP/2 connection until it closes or ctx ends.
func (s *Server) serveH2Conn(ctx context.Context, c *h2Conn) {
	var handlers sync.WaitGroup
	// Handlers outlive ctx while the connection drains: a tunnel being set
	// up when the server stops (its handler dialling the app) completes;
	// the context ends when the connection does.
	connCtx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	defer cancel()
	readDone := make(chan struct{})
	c.newStream = func(st *h2Stream, fields []hpack.HeaderField) {
		defer handlers.Done()
		s.serveH2Stream(connCtx, c, st, fields)
	}
	c.onNewStream = func() { handlers.Add(1) }
	c.readDone = readDone
	if err := c.start(s.cfg.MaxStreamsPerConn); err != nil {
		s.log.Debug("hbone: start HTTP/2 connection", "remote", c.info.remote, "error", err)
		return
	}
	select {
	case <-c.done:
	case <-ctx.Done():
		dctx, dcancel := context.WithTimeout(context.Background(), s.cfg.DrainTimeout)
		c.drain(dctx)
		dcancel()
	}
	c.Close()
	<-readDone // no new handlers after this
	cancel()
	handlers.Wait()
}

func (s *Server) serveH2Stream(ctx context.Context, c *h2Conn, st *h2Stream, fields []hpack.HeaderField) {
	sctx, cancel := context.WithCancel(ctx)
	defer cancel()
	c.mu.Lock()
	if st.done {
		cancel()
	} else {
		st.onFinish = cancel
	}
	c.mu.Unlock()
	head := headFromFields(fields)
	req := &Request{Transport: H2, PeerID: c.info.peer, LocalAddr: c.info.local, RemoteAddr: c.info.remote}
	s.dispatch(sctx, req, head, h2Responder{st})
}

// headFromFields collects an HTTP/2 request head; the Framer has already
// checked pseudo-header order, duplicates and field syntax.
func headFromFields(fields []hpack.HeaderField) connectHead {
	head := connectHead{header: make(http.Header, len(fields))}
	for _, f := range fields {
		switch f.Name {
		case ":method":
			head.method = f.Value
		case ":authority":
			head.authority = f.Value
		case ":path":
			head.hasPath = true
		case ":scheme":
			head.hasScheme = true
		case ":protocol":
			head.protocol = f.Value
		default:
			if len(f.Name) > 0 && f.Name[0] != ':' {
				k := http.CanonicalHeaderKey(f.Name)
				head.header[k] = append(head.header[k], f.Value)
			}
		}
	}
	return head
}

// responder answers one request on either transport.
type responder interface {
	respond(status int) // a final non-200 response; the stream is then over
	accept() (Conn, error)
}

type h2Responder struct{ st *h2Stream }

func (r h2Responder) respond(status int) {
	st, c := r.st, r.st.c
	c.wmu.Lock()
	c.mu.Lock()
	skip := st.rstSent || c.closed
	c.mu.Unlock()
	if !skip {
		err := c.writeHeadersLocked(st, [][2]string{{":status", fmt.Sprint(status)}}, nil, true)
		if err == nil {
			err = c.writeCtrlLocked()
		}
		if err == nil {
			err = c.flushLocked()
		}
		if err != nil {
			c.wmu.Unlock()
			c.closeWithError(err)
			return
		}
	}
	c.wmu.Unlock()
	c.mu.Lock()
	if !st.remoteEnded {
		// Done answering; tell the client to stop sending (RFC 9113 §8.1).
		st.resetLocked(http2.ErrCodeNo, &streamError{code: http2.ErrCodeNo})
	}
	st.finishLocked()
	c.mu.Unlock()
	st.Close()
}

func (r h2Responder) accept() (Conn, error) {
	st, c := r.st, r.st.c
	c.wmu.Lock()
	defer c.wmu.Unlock()
	c.mu.Lock()
	if st.resetErr != nil || c.closed {
		err := st.resetErr
		if err == nil {
			err = c.err
		}
		c.mu.Unlock()
		return nil, err
	}
	c.mu.Unlock()
	err := c.writeHeadersLocked(st, [][2]string{{":status", "200"}}, nil, false)
	if err == nil {
		err = c.writeCtrlLocked()
	}
	if err == nil {
		err = c.flushLocked()
	}
	if err != nil {
		c.closeWithError(err)
		return nil, err
	}
	return st, nil
}

// dispatch validates a request head, runs the handler and answers.
func (s *Server) dispatch(ctx context.Context, req *Request, head connectHead, r responder) {
	ignored, err := parseConnect(head, req)
	if err != nil {
		s.log.Info("hbone: bad CONNECT request", "transport", req.Transport, "peer", req.PeerID, "remote", req.RemoteAddr, "local", req.LocalAddr, "error", err)
		r.respond(http.StatusBadRequest)
		return
	}
	if ignored != nil {
		s.log.Debug("hbone: ignoring malformed tracing header", "peer", req.PeerID, "remote", req.RemoteAddr, "error", ignored)
	}
	accepted := false
	req.accept = func() (Conn, error) {
		accepted = true
		return r.accept()
	}
	up, err := s.callHandler(ctx, req)
	if accepted {
		if up != nil {
			s.log.Error("hbone: handler accepted the tunnel and also returned a connection; closing it", "target", req.Target)
			up.Close()
		}
		return
	}
	req.accept = nil
	if err != nil {
		status := statusFor(err)
		s.log.Debug("hbone: tunnel refused", "transport", req.Transport, "peer", req.PeerID, "target", req.Target, "status", status, "error", err)
		r.respond(status)
		return
	}
	if up == nil {
		s.log.Error("hbone: handler returned neither a connection nor an error", "target", req.Target)
		r.respond(http.StatusServiceUnavailable)
		return
	}
	tun, err := r.accept()
	if err != nil {
		abort(up)
		s.log.Debug("hbone: tunnel gone before 200 was sent", "peer", req.PeerID, "target", req.Target, "error", err)
		return
	}
	_, _, err = Relay(tun, up)
	if err != nil {
		s.log.Debug("hbone: tunnel aborted", "transport", req.Transport, "peer", req.PeerID, "target", req.Target, "error", err)
	}
}

func (s *Server) callHandler(ctx context.Context, req *Request) (up net.Conn, err error) {
	defer func() {
		if p := recover(); p != nil {
			s.log.Error("hbone: handler panicked", "target", req.Target, "panic", p, "stack", string(debug.Stack()))
			up, err = nil, fmt.Errorf("handler panic: %v", p)
		}
	}()
	return s.cfg.Handler(ctx, req)
}

type quicInfoKey struct{}

// ServeH3 serves HBONE over QUIC and HTTP/3 on pc until ctx ends; then it
// drains and returns nil. The caller keeps ownership of pc.
func (s *Server) ServeH3(ctx context.Context, pc net.PacketConn) error {
	tr := &quic.Transport{Conn: pc}
	defer tr.Close()
	ln, err := tr.Listen(s.tlsH3, s.quic)
	if err != nil {
		return fmt.Errorf("hbone: listen QUIC on %s: %w", pc.LocalAddr(), err)
	}
	h3 := &http3.Server{
		Handler:        http.HandlerFunc(s.serveH3Request),
		MaxHeaderBytes: h2MaxHeaderList,
		Logger:         s.log,
		ConnContext: func(ctx context.Context, c *quic.Conn) context.Context {
			info, err := newConnInfo(H3, c.ConnectionState().TLS, c.LocalAddr(), c.RemoteAddr())
			if err != nil { // cannot happen after our handshake; fail closed anyway
				c.CloseWithError(quic.ApplicationErrorCode(http3.ErrCodeInternalError), "")
			}
			return context.WithValue(ctx, quicInfoKey{}, info)
		},
	}
	var (
		mu    sync.Mutex
		conns = map[*quic.Conn]struct{}{}
		wg    sync.WaitGroup
	)
	var acceptErr error
	for {
		qc, err := ln.Accept(ctx)
		if err != nil {
			if ctx.Err() == nil {
				acceptErr = fmt.Errorf("hbone: accept QUIC on %s: %w", pc.LocalAddr(), err)
			}
			break
		}
		if _, err := identity.PeerID(qc.ConnectionState().TLS); err != nil {
			s.log.Info("hbone: rejecting connection", "transport", H3, "remote", qc.RemoteAddr(), "error", err)
			qc.CloseWithError(quic.ApplicationErrorCode(http3.ErrCodeInternalError), "no peer identity")
			continue
		}
		mu.Lock()
		conns[qc] = struct{}{}
		mu.Unlock()
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := h3.ServeQUICConn(qc); err != nil && !errors.Is(err, http.ErrServerClosed) {
				s.log.Debug("hbone: QUIC connection ended", "remote", qc.RemoteAddr(), "error", err)
			}
			qc.CloseWithError(quic.ApplicationErrorCode(http3.ErrCodeNoError), "")
			mu.Lock()
			delete(conns, qc)
			mu.Unlock()
		}()
	}
	ln.Close()
	// Graceful part: GOAWAY to every client, then wait for the drain.
	if acceptErr == nil && s.cfg.DrainTimeout > 0 {
		dctx, cancel := context.WithTimeout(context.Background(), s.cfg.DrainTimeout)
		_ = h3.Shutdown(dctx)
		cancel()
	}
	mu.Lock()
	for qc := range conns {
		qc.CloseWithError(quic.ApplicationErrorCode(http3.ErrCodeNoError), "shutdown")
	}
	mu.Unlock()
	_ = h3.Close()
	wg.Wait()
	return acceptErr
}

func (s *Server) serveH3Request(w http.ResponseWriter, r *http.Request) {
	info, _ := r.Context().Value(quicInfoKey{}).(*connInfo)
	if info == nil {
		w.WriteHeader(http.StatusInternalServerError)
		return
	}
	head := connectHead{method: r.Method, authority: r.Host, header: r.Header}
	if r.Method == http.MethodConnect && r.Proto != "HTTP/3.0" {
		head.protocol = r.Proto // extended CONNECT
	}
	if r.Method != http.MethodConnect && r.URL != nil && r.URL.Path != "" {
		head.hasPath = true
	}
	req := &Request{Transport: H3, PeerID: info.peer, LocalAddr: info.local, RemoteAddr: info.remote}
	s.dispatch(r.Context(), req, head, &h3Responder{w: w, info: info})
}

type h3Responder struct {
	w    http.ResponseWriter
	info *connInfo
}

func (r *h3Responder) respond(status int) {
	// Returning from the handler ends the stream (FIN, STOP_SENDING).
	r.w.WriteHeader(status)
}

func (r *h3Responder) accept() (Conn, error) {
	r.w.WriteHeader(http.StatusOK)
	hs, ok := r.w.(http3.HTTPStreamer)
	if !ok {
		return nil, errors.New("hbone h3: response writer cannot hand over the stream")
	}
	str, err := hs.HTTPStream()
	if err != nil {
		return nil, fmt.Errorf("hbone h3: send 200: %w", err)
	}
	return newH3Conn(str, net.UDPAddrFromAddrPort(r.info.local), net.UDPAddrFromAddrPort(r.info.remote), nil), nil
}
