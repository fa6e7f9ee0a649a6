package hbone

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/meshlite/meshlite/internal/identity"
)

var testLog = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))

var tdLocal = spiffeid.RequireTrustDomainFromString("cluster.local")

// env is a CA, identities and a running HBONE server on loopback (TCP and
// UDP on 127.0.0.1, wildcard-free so each test has its own ports).
type env struct {
	t           testing.TB
	ca          *identity.Authority
	clientID    spiffeid.ID
	serverID    spiffeid.ID
	clientSVID  *x509svid.SVID
	serverSVID  *x509svid.SVID
	srv         *Server
	h2Addr      netip.AddrPort
	h3Addr      netip.AddrPort
	client      *Client
	handler     Handler
	handlerMu   sync.Mutex
	cancelServe context.CancelFunc
	serveDone   sync.WaitGroup
}

func mustID(t testing.TB, ns, sa string) spiffeid.ID {
	t.Helper()
	id, err := identity.NewID("cluster.local", ns, sa)
	if err != nil {
		t.Fatal(err)
	}
	return id
}

type envOpts struct {
	serverCfg func(*ServerConfig)
	clientCfg func(*ClientConfig)
}

func newEnv(t testing.TB, opts ...func(*envOpts)) *env {
	t.Helper()
	var o envOpts
	for _, f := range opts {
		f(&o)
	}
	ca, err := identity.NewAuthority(tdLocal, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	e := &env{t: t, ca: ca, clientID: mustID(t, "default", "sleep"), serverID: mustID(t, "default", "httpbin")}
	if e.clientSVID, err = ca.NewSVID(e.clientID, time.Hour); err != nil {
		t.Fatal(err)
	}
	if e.serverSVID, err = ca.NewSVID(e.serverID, time.Hour); err != nil {
		t.Fatal(err)
	}
	scfg := ServerConfig{
		Certificates: identity.StaticCertificates(map[netip.Addr]*x509svid.SVID{netip.MustParseAddr("127.0.0.1"): e.serverSVID}),
		Bundle:       ca.Bundle(),
		Authorize:    identity.AuthorizeMemberOf(tdLocal),
		Handler: func(ctx context.Context, req *Request) (net.Conn, error) {
			e.handlerMu.Lock()
			h := e.handler
			e.handlerMu.Unlock()
			return h(ctx, req)
		},
		Logger: testLog,
	}
	if o.serverCfg != nil {
		o.serverCfg(&scfg)
	}
	e.handler = dialTarget
	if e.srv, err = NewServer(scfg); err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	udp, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	e.h2Addr = ln.Addr().(*net.TCPAddr).AddrPort()
	e.h3Addr = udp.LocalAddr().(*net.UDPAddr).AddrPort()
	ctx, cancel := context.WithCancel(context.Background())
	e.cancelServe = cancel
	e.serveDone.Add(2)
	go func() {
		defer e.serveDone.Done()
		if err := e.srv.ServeH2(ctx, ln); err != nil {
			t.Errorf("ServeH2: %v", err)
		}
	}()
	go func() {
		defer e.serveDone.Done()
		if err := e.srv.ServeH3(ctx, udp); err != nil {
			t.Errorf("ServeH3: %v", err)
		}
		udp.Close()
	}()
	ccfg := ClientConfig{Bundle: ca.Bundle(), Logger: testLog}
	if o.clientCfg != nil {
		o.clientCfg(&ccfg)
	}
	if e.client, err = NewClient(ccfg); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(e.close)
	return e
}

func (e *env) close() {
	e.client.Close()
	e.cancelServe()
	e.serveDone.Wait()
}

func (e *env) setHandler(h Handler) {
	e.handlerMu.Lock()
	e.handler = h
	e.handlerMu.Unlock()
}

func (e *env) endpoint(tr Transport) netip.AddrPort {
	if tr == H3 {
		return e.h3Addr
	}
	return e.h2Addr
}

func (e *env) dialReq(tr Transport, target netip.AddrPort) DialRequest {
	return DialRequest{
		Transport: tr,
		Endpoint:  e.endpoint(tr),
		Target:    target,
		Source:    e.clientSVID,
		PeerIDs:   []spiffeid.ID{e.serverID},
	}
}

func (e *env) dial(tr Transport, target netip.AddrPort) (Conn, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	return e.client.Dial(ctx, e.dialReq(tr, target))
}

// dialTarget is the default handler: connect to the CONNECT target.
func dialTarget(ctx context.Context, req *Request) (net.Conn, error) {
	var d net.Dialer
	c, err := d.DialContext(ctx, "tcp", req.Target.String())
	if err != nil {
		return nil, errors.Join(ErrUpstream, err)
	}
	return c, nil
}

// tcpServer runs fn for every connection accepted on a loopback listener.
func tcpServer(t testing.TB, fn func(c *net.TCPConn)) netip.AddrPort {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	// The accept loop counts itself, so its wg.Add for a connection never
	// races the cleanup's wg.Wait on an empty group.
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				fn(c.(*net.TCPConn))
			}()
		}
	}()
	t.Cleanup(func() { ln.Close(); wg.Wait() })
	return ln.Addr().(*net.TCPAddr).AddrPort()
}

// echoServer echoes until EOF, then half-closes.
func echoServer(t testing.TB) netip.AddrPort {
	return tcpServer(t, func(c *net.TCPConn) {
		defer c.Close()
		io.Copy(c, c)
		c.CloseWrite()
	})
}

var transports = []Transport{H2, H3}
