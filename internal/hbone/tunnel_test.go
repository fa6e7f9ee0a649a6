//lint:file-ignore SA1019 Istio's Go HBONE uses x/net's HTTP/2 Transport and Server; the interop tests use them on purpose.

package hbone

import (
	"bytes"
	"context"
	crand "crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/big"
	"math/rand/v2"
	"net"
	"net/http"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/quic-go/quic-go/http3"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"golang.org/x/net/http2"

	"github.com/meshlite/meshlite/internal/identity"
)

func forEachTransport(t *testing.T, fn func(t *testing.T, tr Transport)) {
	for _, tr := range transports {
		t.Run(tr.String(), func(t *testing.T) { fn(t, tr) })
	}
}

func TestTunnel_RequestSeenByHandler(t *testing.T) {
	forEachTransport(t, func(t *testing.T, tr Transport) {
		e := newEnv(t)
		echo := echoServer(t)
		reqs := make(chan *Request, 1)
		e.setHandler(func(ctx context.Context, r *Request) (net.Conn, error) {
			reqs <- r
			return dialTarget(ctx, r)
		})
		d := e.dialReq(tr, echo)
		d.Forwarded = netip.MustParseAddrPort("10.1.2.3:4567")
		d.TraceParent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
		d.Baggage = "k8s.namespace.name=default,service.name=sleep"
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		c, err := e.client.Dial(ctx, d)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		r := <-reqs
		if r.Transport != tr || r.PeerID != e.clientID || r.Target != echo {
			t.Fatalf("request = %+v", r)
		}
		if r.LocalAddr != e.endpoint(tr) {
			t.Fatalf("LocalAddr = %v, want the tunnel endpoint %v", r.LocalAddr, e.endpoint(tr))
		}
		if r.RemoteAddr.Addr() != netip.MustParseAddr("127.0.0.1") || r.RemoteAddr.Port() == 0 {
			t.Fatalf("RemoteAddr = %v", r.RemoteAddr)
		}
		if r.Forwarded != d.Forwarded || r.Header.Get("Forwarded") != `for="10.1.2.3:4567"` {
			t.Fatalf("Forwarded = %v / %q", r.Forwarded, r.Header.Get("Forwarded"))
		}
		if r.TraceParent.String() != d.TraceParent {
			t.Fatalf("TraceParent = %v", r.TraceParent)
		}
		if v, _ := r.Baggage.Get("service.name"); v != "sleep" {
			t.Fatalf("Baggage = %v", r.Baggage)
		}
		if c.LocalAddr() == nil || c.RemoteAddr().String() != e.endpoint(tr).String() {
			t.Fatalf("conn addrs local=%v remote=%v", c.LocalAddr(), c.RemoteAddr())
		}
	})
}

func TestTunnel_StatusCodes(t *testing.T) {
	forEachTransport(t, func(t *testing.T, tr Transport) {
		e := newEnv(t, func(o *envOpts) { // the panic and nil-conn cases log errors on purpose
			o.serverCfg = func(c *ServerConfig) { c.Logger = slog.New(slog.DiscardHandler) }
		})
		closedPort := func() netip.AddrPort { // a port nobody listens on
			ln, _ := net.Listen("tcp", "127.0.0.1:0")
			ap := ln.Addr().(*net.TCPAddr).AddrPort()
			ln.Close()
			return ap
		}()
		tests := []struct {
			name    string
			handler Handler
			target  netip.AddrPort
			status  int
			is      error
		}{
			{"denied", func(context.Context, *Request) (net.Conn, error) {
				return nil, fmt.Errorf("policy ns/deny rule 0: %w", ErrDenied)
			}, closedPort, 401, ErrDenied},
			{"upstream refused", dialTarget, closedPort, 503, ErrUpstream},
			{"handler bad request", func(context.Context, *Request) (net.Conn, error) { return nil, ErrBadRequest }, closedPort, 400, ErrBadRequest},
			{"no conn no error", func(context.Context, *Request) (net.Conn, error) { return nil, nil }, closedPort, 503, ErrUpstream},
			{"handler panics", func(context.Context, *Request) (net.Conn, error) { panic("boom") }, closedPort, 503, ErrUpstream},
		}
		for _, tt := range tests {
			t.Run(tt.name, func(t *testing.T) {
				e.setHandler(tt.handler)
				_, err := e.dial(tr, tt.target)
				var se *StatusError
				if !errors.As(err, &se) || se.Status != tt.status {
					t.Fatalf("Dial error = %v, want status %d", err, tt.status)
				}
				if !errors.Is(err, tt.is) {
					t.Fatalf("errors.Is(%v, %v) = false", err, tt.is)
				}
			})
		}
		// The server is still healthy after all that, on the same pooled connection.
		e.setHandler(dialTarget)
		c, err := e.dial(tr, echoServer(t))
		if err != nil {
			t.Fatal(err)
		}
		roundTrip(t, c, []byte("still alive"))
		c.Close()
		if s := e.client.Stats(); s.H2Conns+s.H3Conns != 1 {
			t.Fatalf("pool stats %+v, want one connection reused across errors", s)
		}
	})
}

// roundTrip writes msg, half-closes and expects it echoed back.
func roundTrip(t testing.TB, c Conn, msg []byte) {
	t.Helper()
	if _, err := c.Write(msg); err != nil {
		t.Fatal(err)
	}
	if err := c.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	got, err := io.ReadAll(c)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, msg) {
		t.Fatalf("echo = %q, want %q", got, msg)
	}
}

func TestTunnel_HalfCloseFromClient(t *testing.T) {
	forEachTransport(t, func(t *testing.T, tr Transport) {
		e := newEnv(t)
		gotReq := make(chan []byte, 1)
		up := tcpServer(t, func(c *net.TCPConn) {
			defer c.Close()
			b, err := io.ReadAll(c) // ends only on the client's FIN
			if err != nil {
				t.Errorf("upstream read: %v", err)
			}
			gotReq <- b
			// Our write direction is still open after the peer's FIN.
			c.Write([]byte("answer after your FIN"))
			c.CloseWrite()
		})
		c, err := e.dial(tr, up)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		c.Write([]byte("request"))
		if err := c.CloseWrite(); err != nil {
			t.Fatal(err)
		}
		if _, err := c.Write([]byte("x")); err == nil {
			t.Fatal("Write after CloseWrite succeeded")
		}
		select {
		case b := <-gotReq:
			if string(b) != "request" {
				t.Fatalf("upstream got %q", b)
			}
		case <-time.After(5 * time.Second):
			t.Fatal("upstream never saw EOF")
		}
		resp, err := io.ReadAll(c)
		if err != nil || string(resp) != "answer after your FIN" {
			t.Fatalf("client read %q, %v", resp, err)
		}
	})
}

func TestTunnel_HalfCloseFromUpstream(t *testing.T) {
	forEachTransport(t, func(t *testing.T, tr Transport) {
		e := newEnv(t)
		gotLate := make(chan []byte, 1)
		up := tcpServer(t, func(c *net.TCPConn) {
			defer c.Close()
			c.Write([]byte("greeting"))
			c.CloseWrite() // FIN first, keep reading
			b, err := io.ReadAll(c)
			if err != nil {
				t.Errorf("upstream read: %v", err)
			}
			gotLate <- b
		})
		c, err := e.dial(tr, up)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		got, err := io.ReadAll(c) // EOF from the upstream's FIN
		if err != nil || string(got) != "greeting" {
			t.Fatalf("client read %q, %v", got, err)
		}
		if _, err := c.Write([]byte("late data")); err != nil {
			t.Fatalf("write after the peer's FIN: %v", err)
		}
		c.CloseWrite()
		select {
		case b := <-gotLate:
			if string(b) != "late data" {
				t.Fatalf("upstream got %q", b)
			}
		case <-time.After(5 * time.Second):
			t.Fatal("upstream never got the late data and EOF")
		}
	})
}

func TestTunnel_ResetFromClientResetsUpstream(t *testing.T) {
	forEachTransport(t, func(t *testing.T, tr Transport) {
		e := newEnv(t)
		upErr := make(chan error, 1)
		up := tcpServer(t, func(c *net.TCPConn) {
			defer c.Close()
			buf := make([]byte, 1)
			if _, err := io.ReadFull(c, buf); err != nil {
				upErr <- fmt.Errorf("first byte: %w", err)
				return
			}
			c.Write([]byte("k"))
			_, err := c.Read(buf)
			upErr <- err
		})
		c, err := e.dial(tr, up)
		if err != nil {
			t.Fatal(err)
		}
		c.Write([]byte("x"))
		if _, err := io.ReadFull(c, make([]byte, 1)); err != nil {
			t.Fatal(err)
		}
		c.Reset()
		select {
		case err := <-upErr:
			if !errors.Is(err, syscall.ECONNRESET) {
				t.Fatalf("upstream read after client reset = %v, want ECONNRESET", err)
			}
		case <-time.After(5 * time.Second):
			t.Fatal("upstream not reset")
		}
		c.Close()
	})
}

func TestTunnel_ResetFromUpstreamResetsClient(t *testing.T) {
	forEachTransport(t, func(t *testing.T, tr Transport) {
		e := newEnv(t)
		up := tcpServer(t, func(c *net.TCPConn) {
			c.Write([]byte("x"))
			io.ReadFull(c, make([]byte, 3)) // "ack": the client has the byte
			c.SetLinger(0)
			c.Close() // RST
		})
		c, err := e.dial(tr, up)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		if _, err := io.ReadFull(c, make([]byte, 1)); err != nil {
			t.Fatal(err)
		}
		c.Write([]byte("ack"))
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		_, err = c.Read(make([]byte, 10))
		if err == nil || errors.Is(err, io.EOF) || errors.Is(err, os.ErrDeadlineExceeded) {
			t.Fatalf("client read after upstream RST = %v, want a reset", err)
		}
		var h2e *streamError
		var h3e *http3.Error
		switch {
		case errors.As(err, &h2e):
			if !h2e.remote || h2e.code != http2.ErrCodeConnect {
				t.Fatalf("h2 reset = %+v, want remote CONNECT_ERROR", h2e)
			}
		case errors.As(err, &h3e):
			if !h3e.Remote || h3e.ErrorCode != http3.ErrCodeConnectError {
				t.Fatalf("h3 reset = %+v, want remote H3_CONNECT_ERROR", h3e)
			}
		default:
			t.Fatalf("client read error %T %v is not a stream reset", err, err)
		}
	})
}

// TestTunnel_ConcurrentTunnelsSharePooledConnections opens 500 tunnels at
// once; on HTTP/2 they must share exactly 5 connections (100 streams each),
// on QUIC exactly one.
func TestTunnel_ConcurrentTunnelsSharePooledConnections(t *testing.T) {
	forEachTransport(t, func(t *testing.T, tr Transport) {
		const n = 500
		e := newEnv(t)
		echo := echoServer(t)
		var dials atomic.Int32
		e.client.cfg.DialTCP = func(ctx context.Context, src netip.Addr, dst netip.AddrPort) (net.Conn, error) {
			dials.Add(1)
			return defaultDialTCP(ctx, src, dst)
		}
		e.client.cfg.ListenUDP = func(ctx context.Context, src netip.Addr) (net.PacketConn, error) {
			dials.Add(1)
			return defaultListenUDP(ctx, src)
		}
		var established, release sync.WaitGroup
		established.Add(n)
		release.Add(1)
		errs := make(chan error, n)
		var wg sync.WaitGroup
		for i := 0; i < n; i++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				ok := false
				defer func() {
					if !ok {
						established.Done()
					}
				}()
				c, err := e.dial(tr, echo)
				if err != nil {
					errs <- err
					return
				}
				defer c.Close()
				msg := []byte(fmt.Sprintf("tunnel %d says hello", i))
				c.Write(msg)
				got := make([]byte, len(msg))
				if _, err := io.ReadFull(c, got); err != nil || !bytes.Equal(got, msg) {
					errs <- fmt.Errorf("tunnel %d: echo %q, %v", i, got, err)
					return
				}
				ok = true
				established.Done()
				release.Wait() // keep every tunnel open until all are up
				c.CloseWrite()
				if rest, err := io.ReadAll(c); err != nil || len(rest) != 0 {
					errs <- fmt.Errorf("tunnel %d: close: %q %v", i, rest, err)
				}
			}()
		}
		established.Wait()
		stats := e.client.Stats()
		release.Done()
		wg.Wait()
		close(errs)
		for err := range errs {
			t.Error(err)
		}
		wantConns := 5
		if tr == H3 {
			wantConns = 1
		}
		if got := stats.H2Conns + stats.H3Conns; got != wantConns || stats.Tunnels != n {
			t.Fatalf("with %d tunnels open: %+v, want %d connections", n, stats, wantConns)
		}
		if int(dials.Load()) != wantConns {
			t.Fatalf("%d dials, want %d", dials.Load(), wantConns)
		}
	})
}

// TestTunnel_LargeTransferSHA256 moves data both ways at once through one
// tunnel and checks both streams' SHA-256: 512 MiB each way, 1 GiB through
// the tunnel per transport (32 MiB each way under the race detector).
func TestTunnel_LargeTransferSHA256(t *testing.T) {
	if testing.Short() {
		t.Skip("large transfer skipped in -short mode")
	}
	forEachTransport(t, func(t *testing.T, tr Transport) {
		size := int64(512 << 20)
		if raceEnabled {
			size = 32 << 20
		}
		e := newEnv(t)
		type result struct {
			recvSum, sentSum [32]byte
			recv             int64
			err              error
		}
		upRes := make(chan result, 1)
		up := tcpServer(t, func(c *net.TCPConn) {
			defer c.Close()
			var r result
			var wg sync.WaitGroup
			wg.Add(1)
			go func() { // download direction
				defer wg.Done()
				h := sha256.New()
				if _, err := io.Copy(io.MultiWriter(c, h), newPattern(2, size)); err != nil {
					r.err = err
				}
				c.CloseWrite()
				copy(r.sentSum[:], h.Sum(nil))
			}()
			h := sha256.New()
			n, err := io.Copy(h, c)
			r.recv = n
			if err != nil && r.err == nil {
				r.err = err
			}
			copy(r.recvSum[:], h.Sum(nil))
			wg.Wait()
			upRes <- r
		})
		start := time.Now()
		c, err := e.dial(tr, up)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		var sentSum [32]byte
		sendErr := make(chan error, 1)
		go func() {
			h := sha256.New()
			_, err := io.Copy(io.MultiWriter(c, h), newPattern(1, size))
			copy(sentSum[:], h.Sum(nil))
			if err == nil {
				err = c.CloseWrite()
			}
			sendErr <- err
		}()
		h := sha256.New()
		n, err := io.Copy(h, c)
		if err != nil {
			t.Fatalf("download: %v after %d bytes", err, n)
		}
		if err := <-sendErr; err != nil {
			t.Fatalf("upload: %v", err)
		}
		r := <-upRes
		elapsed := time.Since(start)
		if r.err != nil {
			t.Fatalf("upstream: %v", r.err)
		}
		if n != size || r.recv != size {
			t.Fatalf("sizes: client got %d, upstream got %d, want %d each", n, r.recv, size)
		}
		var recvSum [32]byte
		copy(recvSum[:], h.Sum(nil))
		if recvSum != r.sentSum {
			t.Fatal("download SHA-256 mismatch")
		}
		if sentSum != r.recvSum {
			t.Fatal("upload SHA-256 mismatch")
		}
		t.Logf("%s: %d MiB each way in %s (%.0f MB/s per direction)", tr, size>>20, elapsed.Round(time.Millisecond), float64(size)/elapsed.Seconds()/1e6)
	})
}

// pattern is a cheap deterministic byte stream: a random 1 MiB block with
// each copy stamped with its index, so lost, duplicated or reordered blocks
// change the hash.
type pattern struct {
	block     []byte
	remaining int64
	off       int
	idx       uint64
}

func newPattern(seed uint64, size int64) *pattern {
	r := rand.New(rand.NewPCG(seed, seed))
	b := make([]byte, 1<<20)
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	return &pattern{block: b, remaining: size}
}

func (p *pattern) Read(b []byte) (int, error) {
	if p.remaining == 0 {
		return 0, io.EOF
	}
	if p.off == 0 {
		for i := 0; i < 8; i++ {
			p.block[i] = byte(p.idx >> (8 * i))
		}
		p.idx++
	}
	n := copy(b, p.block[p.off:])
	if int64(n) > p.remaining {
		n = int(p.remaining)
	}
	p.off = (p.off + n) % len(p.block)
	p.remaining -= int64(n)
	return n, nil
}

type badIdentity int

const (
	clientNoSPIFFEID badIdentity = iota
	clientOtherTrustDomain
	clientUnknownCA
	serverIDMismatch
)

func TestTunnel_IdentityRejections(t *testing.T) {
	cases := []struct {
		name string
		kind badIdentity
	}{
		{"client without SPIFFE ID", clientNoSPIFFEID},
		{"client from other trust domain", clientOtherTrustDomain},
		{"client from unknown CA in our trust domain", clientUnknownCA},
		{"expected destination ID mismatch", serverIDMismatch},
	}
	forEachTransport(t, func(t *testing.T, tr Transport) {
		e := newEnv(t)
		var called atomic.Bool
		e.setHandler(func(context.Context, *Request) (net.Conn, error) {
			called.Store(true)
			return nil, ErrDenied
		})
		for _, tc := range cases {
			t.Run(tc.name, func(t *testing.T) {
				d := e.dialReq(tr, netip.MustParseAddrPort("127.0.0.1:9"))
				switch tc.kind {
				case clientNoSPIFFEID:
					d.Source = noSPIFFESVID(t, e)
				case clientOtherTrustDomain:
					other, _ := identity.NewAuthority(spiffeid.RequireTrustDomainFromString("evil.example"), time.Hour)
					id, _ := identity.NewID("evil.example", "default", "sleep")
					d.Source, _ = other.NewSVID(id, time.Hour)
				case clientUnknownCA:
					other, _ := identity.NewAuthority(tdLocal, time.Hour)
					d.Source, _ = other.NewSVID(e.clientID, time.Hour)
				case serverIDMismatch:
					d.PeerIDs = []spiffeid.ID{mustID(t, "default", "not-httpbin")}
				}
				ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
				defer cancel()
				c, err := e.client.Dial(ctx, d)
				if err == nil {
					c.Close()
					t.Fatal("tunnel established")
				}
				var se *StatusError
				if errors.As(err, &se) {
					t.Fatalf("got an HTTP answer (%v); the handshake should have failed", err)
				}
				t.Logf("refused: %v", err)
			})
		}
		if called.Load() {
			t.Fatal("handler ran for a rejected peer")
		}
	})
}

// noSPIFFESVID is a certificate signed by the mesh CA but without a URI SAN,
// dressed up as an SVID so the client presents it.
func noSPIFFESVID(t *testing.T, e *env) *x509svid.SVID {
	chainPEM, keyPEM, err := e.ca.MarshalPEM()
	if err != nil {
		t.Fatal(err)
	}
	caCerts, _ := identity.ParseCertsPEM(chainPEM)
	caKey, _ := identity.ParseKeyPEM(keyPEM)
	key, _ := identity.GenerateKey()
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(99), NotBefore: time.Now().Add(-time.Minute), NotAfter: time.Now().Add(time.Hour),
		KeyUsage:    x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
		DNSNames:    []string{"sleep.default.svc.cluster.local"},
	}
	der, err := x509.CreateCertificate(crand.Reader, tmpl, caCerts[0], key.Public(), caKey)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	return &x509svid.SVID{ID: e.clientID, Certificates: []*x509.Certificate{cert}, PrivateKey: key}
}

func TestTunnel_ServerFromOtherTrustDomainRejected(t *testing.T) {
	forEachTransport(t, func(t *testing.T, tr Transport) {
		other, _ := identity.NewAuthority(spiffeid.RequireTrustDomainFromString("evil.example"), time.Hour)
		id, _ := identity.NewID("evil.example", "default", "httpbin")
		evil, _ := other.NewSVID(id, time.Hour)
		e := newEnv(t, func(o *envOpts) {
			o.serverCfg = func(c *ServerConfig) {
				c.Certificates = identity.StaticCertificates(map[netip.Addr]*x509svid.SVID{netip.MustParseAddr("127.0.0.1"): evil})
			}
		})
		d := e.dialReq(tr, netip.MustParseAddrPort("127.0.0.1:9"))
		d.PeerIDs = []spiffeid.ID{id} // even when asking for exactly that ID, our bundle does not trust it
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if c, err := e.client.Dial(ctx, d); err == nil {
			c.Close()
			t.Fatal("tunnel to a server from an untrusted trust domain")
		}
	})
}

func TestTunnel_TLS12Refused(t *testing.T) {
	e := newEnv(t)
	cfg, err := identity.ClientConfig(e.clientSVID, e.ca.Bundle(), identity.AuthorizeID(e.serverID))
	if err != nil {
		t.Fatal(err)
	}
	cfg.MinVersion, cfg.MaxVersion = tls.VersionTLS12, tls.VersionTLS12
	cfg.VerifyConnection = nil
	cfg.NextProtos = []string{"h2"}
	c, err := tls.Dial("tcp", e.h2Addr.String(), cfg)
	if err == nil {
		c.Close()
		t.Fatal("TLS 1.2 handshake accepted")
	}
	t.Logf("TLS 1.2 refused: %v", err)
	// QUIC mandates TLS 1.3 (RFC 9001); quic-go cannot even offer 1.2.
}

func TestTunnel_CertificateAndLocalAddrByDestinationIP(t *testing.T) {
	forEachTransport(t, func(t *testing.T, tr Transport) {
		ca, _ := identity.NewAuthority(tdLocal, time.Hour)
		clientSVID, _ := ca.NewSVID(mustID(t, "default", "sleep"), time.Hour)
		podA, podB := mustID(t, "a", "app-a"), mustID(t, "b", "app-b")
		svidA, _ := ca.NewSVID(podA, time.Hour)
		svidB, _ := ca.NewSVID(podB, time.Hour)
		locals := make(chan netip.AddrPort, 2)
		srv, err := NewServer(ServerConfig{
			Certificates: identity.StaticCertificates(map[netip.Addr]*x509svid.SVID{
				netip.MustParseAddr("127.0.0.1"): svidA,
				netip.MustParseAddr("127.0.0.2"): svidB,
			}),
			Bundle:    ca.Bundle(),
			Authorize: identity.AuthorizeMemberOf(tdLocal),
			Handler: func(ctx context.Context, r *Request) (net.Conn, error) {
				locals <- r.LocalAddr
				return nil, ErrDenied
			},
			Logger: testLog,
		})
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithCancel(context.Background())
		var port uint16
		var serveDone sync.WaitGroup
		serveDone.Add(1)
		if tr == H2 {
			ln, err := net.Listen("tcp", "0.0.0.0:0")
			if err != nil {
				t.Fatal(err)
			}
			port = uint16(ln.Addr().(*net.TCPAddr).Port)
			go func() { defer serveDone.Done(); srv.ServeH2(ctx, ln) }()
		} else {
			udp, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4zero})
			if err != nil {
				t.Fatal(err)
			}
			port = uint16(udp.LocalAddr().(*net.UDPAddr).Port)
			go func() { defer serveDone.Done(); srv.ServeH3(ctx, udp); udp.Close() }()
		}
		defer func() { cancel(); serveDone.Wait() }()
		cl, _ := NewClient(ClientConfig{Bundle: ca.Bundle(), Logger: testLog})
		defer cl.Close()
		for _, c := range []struct {
			ip   string
			want spiffeid.ID
		}{{"127.0.0.1", podA}, {"127.0.0.2", podB}} {
			ep := netip.AddrPortFrom(netip.MustParseAddr(c.ip), port)
			dctx, dcancel := context.WithTimeout(context.Background(), 10*time.Second)
			_, err := cl.Dial(dctx, DialRequest{Transport: tr, Endpoint: ep, Target: netip.MustParseAddrPort("127.0.0.1:9"), Source: clientSVID, PeerIDs: []spiffeid.ID{c.want}})
			dcancel()
			if !errors.Is(err, ErrDenied) {
				t.Fatalf("dial %s expecting %s: %v (want the handler's 401, i.e. the handshake with the right identity worked)", ep, c.want, err)
			}
			if got := <-locals; got != ep {
				t.Fatalf("Request.LocalAddr = %v, want %v", got, ep)
			}
		}
		// An address with no workload gets no certificate.
		ep := netip.AddrPortFrom(netip.MustParseAddr("127.0.0.3"), port)
		dctx, dcancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer dcancel()
		if _, err := cl.Dial(dctx, DialRequest{Transport: tr, Endpoint: ep, Target: netip.MustParseAddrPort("127.0.0.1:9"), Source: clientSVID, PeerIDs: []spiffeid.ID{podA, podB}}); err == nil || errors.Is(err, ErrDenied) {
			t.Fatalf("dial to an address without certificate: %v, want handshake failure", err)
		}
	})
}

func TestTunnel_AcceptedByHandler(t *testing.T) {
	forEachTransport(t, func(t *testing.T, tr Transport) {
		e := newEnv(t)
		var handlerWG sync.WaitGroup
		e.setHandler(func(ctx context.Context, r *Request) (net.Conn, error) {
			c, err := r.Accept()
			if err != nil {
				return nil, err
			}
			if _, err := r.Accept(); err == nil {
				t.Error("second Accept succeeded")
			}
			handlerWG.Add(1)
			go func() { // a waypoint-style handler: serve the stream itself
				defer handlerWG.Done()
				defer c.Close()
				b, _ := io.ReadAll(c)
				c.Write(bytes.ToUpper(b))
				c.CloseWrite()
			}()
			return nil, nil
		})
		c, err := e.dial(tr, netip.MustParseAddrPort("127.0.0.1:9"))
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		c.Write([]byte("shout"))
		c.CloseWrite()
		got, err := io.ReadAll(c)
		if err != nil || string(got) != "SHOUT" {
			t.Fatalf("got %q, %v", got, err)
		}
		handlerWG.Wait()
	})
}

func TestTunnel_ReadDeadline(t *testing.T) {
	forEachTransport(t, func(t *testing.T, tr Transport) {
		e := newEnv(t)
		c, err := e.dial(tr, echoServer(t))
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		c.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
		start := time.Now()
		if _, err := c.Read(make([]byte, 1)); !errors.Is(err, os.ErrDeadlineExceeded) {
			t.Fatalf("Read = %v, want deadline exceeded", err)
		}
		if d := time.Since(start); d > 2*time.Second {
			t.Fatalf("deadline fired after %s", d)
		}
		c.SetReadDeadline(time.Time{})
		roundTrip(t, c, []byte("after deadline"))
	})
}

func TestClient_DialCancelled(t *testing.T) {
	forEachTransport(t, func(t *testing.T, tr Transport) {
		e := newEnv(t)
		// An endpoint that accepts the connection but never answers.
		var ep netip.AddrPort
		if tr == H2 {
			ln, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			defer ln.Close()
			go func() {
				for {
					c, err := ln.Accept()
					if err != nil {
						return
					}
					defer c.Close()
				}
			}()
			ep = ln.Addr().(*net.TCPAddr).AddrPort()
		} else {
			udp, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
			if err != nil {
				t.Fatal(err)
			}
			defer udp.Close()
			ep = udp.LocalAddr().(*net.UDPAddr).AddrPort()
		}
		d := e.dialReq(tr, netip.MustParseAddrPort("127.0.0.1:9"))
		d.Endpoint = ep
		ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
		defer cancel()
		start := time.Now()
		_, err := e.client.Dial(ctx, d)
		if !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("Dial = %v, want deadline exceeded", err)
		}
		if el := time.Since(start); el > 2*time.Second {
			t.Fatalf("Dial returned after %s", el)
		}
		// The abandoned handshake is stopped, leaving nothing in the pool.
		deadline := time.Now().Add(3 * time.Second)
		for {
			e.client.pool.mu.Lock()
			n := len(e.client.pool.entries)
			e.client.pool.mu.Unlock()
			if n == 0 {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("pool still has %d entries after the dial was cancelled", n)
			}
			time.Sleep(10 * time.Millisecond)
		}
	})
}

func TestServer_GracefulDrain(t *testing.T) {
	forEachTransport(t, func(t *testing.T, tr Transport) {
		e := newEnv(t, func(o *envOpts) {
			o.serverCfg = func(c *ServerConfig) { c.DrainTimeout = 5 * time.Second }
		})
		c, err := e.dial(tr, echoServer(t))
		if err != nil {
			t.Fatal(err)
		}
		c.Write([]byte("before"))
		buf := make([]byte, 6)
		io.ReadFull(c, buf)
		e.cancelServe() // shutdown starts: GOAWAY, listeners closed
		time.Sleep(100 * time.Millisecond)
		// The open tunnel keeps working while draining.
		roundTrip(t, c, []byte("during drain"))
		c.Close()
		done := make(chan struct{})
		go func() { e.serveDone.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(4 * time.Second):
			t.Fatal("server did not finish draining after the last tunnel closed")
		}
		dctx, dcancel := context.WithTimeout(context.Background(), time.Second)
		defer dcancel()
		if _, err := e.client.Dial(dctx, e.dialReq(tr, netip.MustParseAddrPort("127.0.0.1:9"))); err == nil {
			t.Fatal("new tunnel accepted after shutdown")
		}
	})
}

// x/net's HTTP/2 client (what Istio's Go HBONE client is built on) against our server.
func TestInterop_XNetClient(t *testing.T) {
	e := newEnv(t)
	echo := echoServer(t)
	cfg, _ := identity.ClientConfig(e.clientSVID, e.ca.Bundle(), identity.AuthorizeID(e.serverID))
	cfg.NextProtos = []string{"h2"}
	tr := &http2.Transport{
		DialTLSContext: func(ctx context.Context, _, _ string, _ *tls.Config) (net.Conn, error) {
			d := tls.Dialer{Config: cfg}
			return d.DialContext(ctx, "tcp", e.h2Addr.String())
		},
	}
	defer tr.CloseIdleConnections()
	do := func(method, authority string, body io.Reader) (*http.Response, error) {
		req, _ := http.NewRequest(method, "https://"+authority, body)
		req.Host = authority
		req.Header.Set("X-Extra", "ignored")
		return tr.RoundTrip(req)
	}

	pr, pw := io.Pipe()
	resp, err := do(http.MethodConnect, echo.String(), pr)
	if err != nil {
		t.Fatal(err)
	}
	if resp.StatusCode != 200 {
		t.Fatalf("status %d", resp.StatusCode)
	}
	pw.Write([]byte("x/net says hi"))
	pw.Close()
	got, err := io.ReadAll(resp.Body)
	if err != nil || string(got) != "x/net says hi" {
		t.Fatalf("echo %q, %v", got, err)
	}

	for _, c := range []struct{ method, authority string }{
		{http.MethodConnect, "httpbin.default.svc:80"},
		{http.MethodGet, echo.String()},
	} {
		resp, err := do(c.method, c.authority, nil)
		if err != nil {
			t.Fatalf("%s %s: %v", c.method, c.authority, err)
		}
		resp.Body.Close()
		if resp.StatusCode != 400 {
			t.Fatalf("%s %s: status %d, want 400", c.method, c.authority, resp.StatusCode)
		}
	}
}

// quic-go's generic HTTP/3 client sending malformed requests to our server.
func TestInterop_HTTP3BadRequests(t *testing.T) {
	e := newEnv(t)
	cfg, _ := identity.ClientConfig(e.clientSVID, e.ca.Bundle(), identity.AuthorizeID(e.serverID))
	tr := &http3.Transport{TLSClientConfig: cfg}
	defer tr.Close()
	for _, c := range []struct{ method, authority string }{
		{http.MethodConnect, "httpbin.default.svc:80"},
		{http.MethodGet, "127.0.0.1:9"},
	} {
		req, _ := http.NewRequest(c.method, "https://"+e.h3Addr.String(), nil)
		req.Host = c.authority
		resp, err := tr.RoundTrip(req)
		if err != nil {
			t.Fatalf("%s %s: %v", c.method, c.authority, err)
		}
		resp.Body.Close()
		if resp.StatusCode != 400 {
			t.Fatalf("%s %s: status %d, want 400", c.method, c.authority, resp.StatusCode)
		}
	}
}

// Our client against x/net's HTTP/2 server, an independent implementation.
func TestInterop_XNetServer(t *testing.T) {
	e := newEnv(t)
	srvCfg, _ := identity.ServerConfig(identity.StaticCertificates(map[netip.Addr]*x509svid.SVID{netip.MustParseAddr("127.0.0.1"): e.serverSVID}), e.ca.Bundle(), identity.AuthorizeMemberOf(tdLocal))
	srvCfg.NextProtos = []string{"h2"}
	ln, err := tls.Listen("tcp", "127.0.0.1:0", srvCfg)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	h2s := &http2.Server{}
	authorities := make(chan string, 1)
	handler := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		authorities <- r.Host
		if r.Method != http.MethodConnect {
			w.WriteHeader(400)
			return
		}
		w.WriteHeader(200)
		w.(http.Flusher).Flush()
		buf := make([]byte, 1024)
		for {
			n, err := r.Body.Read(buf)
			if n > 0 {
				w.Write(buf[:n])
				w.(http.Flusher).Flush()
			}
			if err != nil {
				return
			}
		}
	})
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				if err := c.(*tls.Conn).Handshake(); err != nil { // x/net wants a finished handshake
					c.Close()
					return
				}
				h2s.ServeConn(c, &http2.ServeConnOpts{Handler: handler})
			}()
		}
	}()
	d := e.dialReq(H2, netip.MustParseAddrPort("10.9.8.7:6543"))
	d.Endpoint = ln.Addr().(*net.TCPAddr).AddrPort()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := e.client.Dial(ctx, d)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if got := <-authorities; got != "10.9.8.7:6543" {
		t.Fatalf(":authority = %q", got)
	}
	c.Write([]byte("ping"))
	got := make([]byte, 4)
	if _, err := io.ReadFull(c, got); err != nil || string(got) != "ping" {
		t.Fatalf("echo %q, %v", got, err)
	}
	c.CloseWrite()
	if rest, err := io.ReadAll(c); err != nil || len(rest) != 0 {
		t.Fatalf("after half-close: %q, %v", rest, err)
	}
}

// A QUIC connection whose server is draining (GOAWAY) takes no new streams:
// a tunnel asked for then goes on a fresh connection, which reaches the
// server that took over the endpoint (a restarted ztunnel binds the port
// once its predecessor's drain ends), instead of failing.
func TestClient_H3TunnelAfterGoAwayGoesOnAFreshConnection(t *testing.T) {
	e := newEnv(t, func(o *envOpts) {
		o.serverCfg = func(c *ServerConfig) { c.DrainTimeout = 5 * time.Second }
	})
	echo := echoServer(t)
	c1, err := e.dial(H3, echo)
	if err != nil {
		t.Fatal(err)
	}
	// Used without half-closing, so the tunnel stays open through the drain.
	buf := make([]byte, 6)
	if _, err := c1.Write([]byte("before")); err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(c1, buf); err != nil {
		t.Fatal(err)
	}
	e.cancelServe() // GOAWAY; c1 drains
	time.Sleep(200 * time.Millisecond)
	if st := e.client.Stats(); st.H3Conns != 1 {
		t.Fatalf("pool %+v: the draining connection should still be pooled", st)
	}

	type result struct {
		c   Conn
		err error
	}
	res := make(chan result, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 8*time.Second)
		defer cancel()
		c, err := e.client.Dial(ctx, e.dialReq(H3, echo))
		res <- result{c, err}
	}()
	time.Sleep(200 * time.Millisecond)
	c1.Close() // the drain ends; the old server releases the port
	e.serveDone.Wait()
	udp, err := net.ListenUDP("udp", net.UDPAddrFromAddrPort(e.h3Addr))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		e.srv.ServeH3(ctx, udp)
	}()
	t.Cleanup(func() { cancel(); <-done; udp.Close() })

	r := <-res
	if r.err != nil {
		t.Fatalf("tunnel asked for during the drain: %v", r.err)
	}
	roundTrip(t, r.c, []byte("on the successor"))
	r.c.Close()
}
