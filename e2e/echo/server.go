package echo

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
)

// Limits on what a request may ask of the server.
const (
	maxBody     = 1 << 20
	maxDelay    = time.Minute
	maxResponse = 64 << 20
)

// ServerConfig says where the server listens. Port 0 picks a free port
// (tests); Addrs reports it.
type ServerConfig struct {
	// Host to bind, "" for all addresses.
	Host      string
	HTTPPorts []int // HTTP/1.1, h2c and gRPC, one port each
	GRPCPorts []int // gRPC only
	TCPPorts  []int // raw TCP echo
	Identity  Identity
	Log       *slog.Logger
}

// Server is the echo server.
type Server struct {
	cfg  ServerConfig
	log  *slog.Logger
	grpc *grpc.Server

	lns []listener
}

type listener struct {
	kind string // "http", "grpc", "tcp"
	ln   net.Listener
	port int // the configured port (0 when picked)
}

// NewServer binds all configured ports.
func NewServer(cfg ServerConfig) (*Server, error) {
	if cfg.Log == nil {
		cfg.Log = slog.Default()
	}
	s := &Server{cfg: cfg, log: cfg.Log}
	s.grpc = grpc.NewServer()
	registerEcho(s.grpc, s)
	hs := health.NewServer()
	hs.SetServingStatus("", healthpb.HealthCheckResponse_SERVING)
	hs.SetServingStatus(echoService, healthpb.HealthCheckResponse_SERVING)
	healthpb.RegisterHealthServer(s.grpc, hs)

	bind := func(kind string, ports []int) error {
		for _, p := range ports {
			if p < 0 || p > 65535 {
				return fmt.Errorf("%s port %d out of range", kind, p)
			}
			ln, err := net.Listen("tcp", net.JoinHostPort(cfg.Host, strconv.Itoa(p)))
			if err != nil {
				return fmt.Errorf("listen %s on port %d: %w", kind, p, err)
			}
			s.lns = append(s.lns, listener{kind: kind, ln: ln, port: p})
		}
		return nil
	}
	for _, b := range []struct {
		kind  string
		ports []int
	}{{"http", cfg.HTTPPorts}, {"grpc", cfg.GRPCPorts}, {"tcp", cfg.TCPPorts}} {
		if err := bind(b.kind, b.ports); err != nil {
			s.closeListeners()
			return nil, err
		}
	}
	if len(s.lns) == 0 {
		return nil, errors.New("no ports to serve")
	}
	return s, nil
}

func (s *Server) closeListeners() {
	for _, l := range s.lns {
		l.ln.Close()
	}
}

// Addrs are the bound addresses by kind ("http", "grpc", "tcp").
func (s *Server) Addrs(kind string) []string {
	var out []string
	for _, l := range s.lns {
		if l.kind == kind {
			out = append(out, l.ln.Addr().String())
		}
	}
	return out
}

func actualPort(l net.Listener) int {
	if a, ok := l.Addr().(*net.TCPAddr); ok {
		return a.Port
	}
	return 0
}

// Run serves until ctx ends, then stops: listeners close at once, open
// HTTP and gRPC requests get a few seconds to finish.
func (s *Server) Run(ctx context.Context) error {
	var wg sync.WaitGroup
	var https []*http.Server
	errc := make(chan error, len(s.lns))
	for _, l := range s.lns {
		port := actualPort(l.ln)
		switch l.kind {
		case "http":
			hs := s.httpServer(port)
			https = append(https, hs)
			wg.Add(1)
			go func() {
				defer wg.Done()
				if err := hs.Serve(l.ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
					errc <- fmt.Errorf("serve http on %d: %w", port, err)
				}
			}()
		case "grpc":
			wg.Add(1)
			go func() {
				defer wg.Done()
				if err := s.grpc.Serve(l.ln); err != nil && !errors.Is(err, grpc.ErrServerStopped) {
					errc <- fmt.Errorf("serve grpc on %d: %w", port, err)
				}
			}()
		case "tcp":
			wg.Add(1)
			go func() { defer wg.Done(); s.serveTCP(ctx, l.ln) }()
		}
		s.log.Info("echo listening", "kind", l.kind, "addr", l.ln.Addr().String())
	}
	var err error
	select {
	case <-ctx.Done():
	case err = <-errc:
	}
	shutdownCtx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	for _, hs := range https {
		_ = hs.Shutdown(shutdownCtx)
	}
	stopped := make(chan struct{})
	go func() { s.grpc.GracefulStop(); close(stopped) }()
	select {
	case <-stopped:
	case <-shutdownCtx.Done():
		s.grpc.Stop()
	}
	s.closeListeners()
	wg.Wait()
	return err
}

// httpServer serves HTTP/1.1 and h2c (prior knowledge) on one port, and
// gRPC when an h2c request says application/grpc.
func (s *Server) httpServer(port int) *http.Server {
	var protos http.Protocols
	protos.SetHTTP1(true)
	protos.SetUnencryptedHTTP2(true)
	mux := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.ProtoMajor == 2 && strings.HasPrefix(r.Header.Get("Content-Type"), "application/grpc") {
			s.grpc.ServeHTTP(w, r)
			return
		}
		s.serveHTTP(w, r, port)
	})
	return &http.Server{
		Handler:           mux,
		Protocols:         &protos,
		ReadHeaderTimeout: 10 * time.Second,
		ErrorLog:          slog.NewLogLogger(s.log.Handler(), slog.LevelDebug),
	}
}

// serveHTTP echoes the request. Query parameters shape the answer, for
// tests of retries, timeouts and routing:
//
//	status=503          answer with that code
//	delay=250ms         wait first (at most a minute)
//	size=N              append N bytes of payload
//	header=Name:Value   add a response header (repeatable)
func (s *Server) serveHTTP(w http.ResponseWriter, r *http.Request, port int) {
	if r.URL.Path == "/healthz" {
		_, _ = io.WriteString(w, "ok\n")
		return
	}
	if isUpgrade(r) {
		s.serveUpgrade(w, r)
		return
	}
	q := r.URL.Query()
	status := http.StatusOK
	if v := q.Get("status"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 100 || n > 599 {
			http.Error(w, "status must be an HTTP status code", http.StatusBadRequest)
			return
		}
		status = n
	}
	if v := q.Get("delay"); v != "" {
		d, err := time.ParseDuration(v)
		if err != nil || d < 0 || d > maxDelay {
			http.Error(w, "delay must be a duration up to 1m", http.StatusBadRequest)
			return
		}
		select {
		case <-time.After(d):
		case <-r.Context().Done():
			return
		}
	}
	size := 0
	if v := q.Get("size"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 0 || n > maxResponse {
			http.Error(w, "size must be 0..64Mi", http.StatusBadRequest)
			return
		}
		size = n
	}
	for _, h := range q["header"] {
		k, v, ok := strings.Cut(h, ":")
		if !ok || k == "" {
			http.Error(w, "header must be Name:Value", http.StatusBadRequest)
			return
		}
		w.Header().Add(strings.TrimSpace(k), strings.TrimSpace(v))
	}
	body, err := io.ReadAll(io.LimitReader(r.Body, maxBody+1))
	if err != nil {
		http.Error(w, "read body: "+err.Error(), http.StatusBadRequest)
		return
	}
	if len(body) > maxBody {
		http.Error(w, "body too large", http.StatusRequestEntityTooLarge)
		return
	}

	var f fieldWriter
	f.identity(s.cfg.Identity, port)
	f.add(FieldProtocol, r.Proto)
	f.add(FieldMethod, r.Method)
	f.add(FieldURL, r.URL.RequestURI())
	f.add(FieldHost, r.Host)
	f.add(FieldPeer, r.RemoteAddr)
	f.headers(r.Header)
	out := f.String()
	if size > 0 {
		out += "Payload=" + strings.Repeat("x", size) + "\n"
	}
	if len(body) > 0 {
		out += FieldBody + "=" + string(body)
	}
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	w.WriteHeader(status)
	_, _ = io.WriteString(w, out)
}

// isUpgrade reports an HTTP/1.1 upgrade request (WebSocket's handshake).
func isUpgrade(r *http.Request) bool {
	if r.ProtoMajor != 1 || r.Header.Get("Upgrade") == "" {
		return false
	}
	for _, v := range r.Header.Values("Connection") {
		for _, tok := range strings.Split(v, ",") {
			if strings.EqualFold(strings.TrimSpace(tok), "upgrade") {
				return true
			}
		}
	}
	return false
}

// serveUpgrade accepts any upgrade with 101 (naming the pod in
// X-Echo-Pod) and then echoes raw bytes until the peer half-closes: what
// a test of an upgrade through proxies needs, without WebSocket framing.
func (s *Server) serveUpgrade(w http.ResponseWriter, r *http.Request) {
	rc := http.NewResponseController(w)
	conn, brw, err := rc.Hijack()
	if err != nil {
		http.Error(w, "upgrade: "+err.Error(), http.StatusInternalServerError)
		return
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Time{})
	fmt.Fprintf(brw, "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: %s\r\nX-Echo-Pod: %s\r\n\r\n",
		r.Header.Get("Upgrade"), s.cfg.Identity.Pod)
	if err := brw.Flush(); err != nil {
		return
	}
	// Bytes the client sent right behind the request are in brw's reader.
	buf := make([]byte, 32<<10)
	for {
		n, err := brw.Read(buf)
		if n > 0 {
			if _, werr := conn.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			if tc, ok := conn.(interface{ CloseWrite() error }); ok {
				_ = tc.CloseWrite()
			}
			return
		}
	}
}

// serveTCP echoes every byte back until the peer closes.
func (s *Server) serveTCP(ctx context.Context, ln net.Listener) {
	var wg sync.WaitGroup
	defer wg.Wait()
	conns := map[net.Conn]struct{}{}
	var mu sync.Mutex
	go func() {
		<-ctx.Done()
		ln.Close()
		mu.Lock()
		for c := range conns {
			c.Close()
		}
		mu.Unlock()
	}()
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		mu.Lock()
		conns[c] = struct{}{}
		mu.Unlock()
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer func() { mu.Lock(); delete(conns, c); mu.Unlock(); c.Close() }()
			_, _ = io.Copy(c, c)
		}()
	}
}
