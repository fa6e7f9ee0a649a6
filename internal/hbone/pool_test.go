package hbone

import (
	"context"
	"io"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// countingDialer wraps the default dialers and remembers the sockets.
type countingDialer struct {
	mu    sync.Mutex
	n     atomic.Int32
	conns []io.Closer
}

func (d *countingDialer) install(cfg *ClientConfig) {
	cfg.DialTCP = func(ctx context.Context, src netip.Addr, dst netip.AddrPort) (net.Conn, error) {
		c, err := defaultDialTCP(ctx, src, dst)
		if err == nil {
			d.n.Add(1)
			d.mu.Lock()
			d.conns = append(d.conns, c)
			d.mu.Unlock()
		}
		return c, err
	}
	cfg.ListenUDP = func(ctx context.Context, src netip.Addr) (net.PacketConn, error) {
		c, err := defaultListenUDP(ctx, src)
		if err == nil {
			d.n.Add(1)
			d.mu.Lock()
			d.conns = append(d.conns, c)
			d.mu.Unlock()
		}
		return c, err
	}
}

func (d *countingDialer) breakAll() {
	d.mu.Lock()
	defer d.mu.Unlock()
	for _, c := range d.conns {
		c.Close()
	}
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func conns(e *env) int { s := e.client.Stats(); return s.H2Conns + s.H3Conns }

func TestPool_Keying(t *testing.T) {
	e := newEnv(t)
	echo := echoServer(t)
	other, _ := e.ca.NewSVID(mustID(t, "default", "other-client"), time.Hour)
	steps := []struct {
		name      string
		mod       func(d *DialRequest)
		wantConns PoolStats
	}{
		{"first", func(*DialRequest) {}, PoolStats{H2Conns: 1}},
		{"same key reuses", func(*DialRequest) {}, PoolStats{H2Conns: 1}},
		{"other source identity", func(d *DialRequest) { d.Source = other }, PoolStats{H2Conns: 2}},
		{"other destination identities", func(d *DialRequest) { d.PeerIDs = []spiffeid.ID{e.serverID, mustID(t, "x", "y")} }, PoolStats{H2Conns: 3}},
		{"other source IP", func(d *DialRequest) { d.SourceAddr = netip.MustParseAddr("127.0.0.2") }, PoolStats{H2Conns: 4}},
		{"same source IP again", func(d *DialRequest) { d.SourceAddr = netip.MustParseAddr("127.0.0.2") }, PoolStats{H2Conns: 4}},
		{"QUIC", func(d *DialRequest) { d.Transport = H3; d.Endpoint = e.h3Addr }, PoolStats{H2Conns: 4, H3Conns: 1}},
		{"QUIC other source identity", func(d *DialRequest) { d.Transport = H3; d.Endpoint = e.h3Addr; d.Source = other }, PoolStats{H2Conns: 4, H3Conns: 2}},
	}
	for _, s := range steps {
		d := e.dialReq(H2, echo)
		s.mod(&d)
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		c, err := e.client.Dial(ctx, d)
		cancel()
		if err != nil {
			t.Fatalf("%s: %v", s.name, err)
		}
		if s.name == "other source IP" {
			if la := c.LocalAddr().(*net.TCPAddr); la.IP.String() != "127.0.0.2" {
				t.Fatalf("tunnel bound to %v, want 127.0.0.2", la)
			}
		}
		roundTrip(t, c, []byte(s.name))
		c.Close()
		got := e.client.Stats()
		got.Tunnels = 0
		if got != s.wantConns {
			t.Fatalf("after %q: %+v, want %+v", s.name, got, s.wantConns)
		}
	}
}

func TestPool_StreamLimitOpensAnotherConnection(t *testing.T) {
	cases := []struct {
		name                 string
		serverMax, clientMax int
		tunnels, wantConns   int
	}{
		{"client limit 100", 0, 0, 101, 2},
		{"server SETTINGS limit", 10, 0, 25, 3},
		{"client limit below server", 0, 7, 15, 3},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t, func(o *envOpts) {
				o.serverCfg = func(c *ServerConfig) { c.MaxStreamsPerConn = tc.serverMax }
				o.clientCfg = func(c *ClientConfig) { c.MaxStreamsPerConn = tc.clientMax }
			})
			echo := echoServer(t)
			var open []Conn
			for i := 0; i < tc.tunnels; i++ {
				c, err := e.dial(H2, echo)
				if err != nil {
					t.Fatalf("tunnel %d: %v", i, err)
				}
				open = append(open, c)
			}
			if got := e.client.Stats(); got.H2Conns != tc.wantConns || got.Tunnels != tc.tunnels {
				t.Fatalf("%d open tunnels: %+v, want %d connections", tc.tunnels, got, tc.wantConns)
			}
			for _, c := range open {
				roundTrip(t, c, []byte("x"))
				c.Close()
			}
			waitFor(t, "tunnel slots released", func() bool { return e.client.Stats().Tunnels == 0 })
		})
	}
}

func TestPool_IdleConnectionsClosed(t *testing.T) {
	forEachTransport(t, func(t *testing.T, tr Transport) {
		var d countingDialer
		e := newEnv(t, func(o *envOpts) {
			o.clientCfg = func(c *ClientConfig) { c.IdleTimeout = 300 * time.Millisecond; d.install(c) }
		})
		echo := echoServer(t)
		c, err := e.dial(tr, echo)
		if err != nil {
			t.Fatal(err)
		}
		// A connection with an open tunnel is not idle, however long it waits.
		time.Sleep(600 * time.Millisecond)
		if conns(e) != 1 {
			t.Fatalf("busy connection closed: %+v", e.client.Stats())
		}
		roundTrip(t, c, []byte("x"))
		c.Close()
		waitFor(t, "idle connection closed", func() bool { return conns(e) == 0 })
		c, err = e.dial(tr, echo)
		if err != nil {
			t.Fatal(err)
		}
		roundTrip(t, c, []byte("y"))
		c.Close()
		if d.n.Load() != 2 {
			t.Fatalf("%d dials, want a fresh connection after the idle close", d.n.Load())
		}
	})
}

func TestPool_BrokenConnectionEvicted(t *testing.T) {
	forEachTransport(t, func(t *testing.T, tr Transport) {
		var d countingDialer
		e := newEnv(t, func(o *envOpts) { o.clientCfg = func(c *ClientConfig) { d.install(c) } })
		echo := echoServer(t)
		c, err := e.dial(tr, echo)
		if err != nil {
			t.Fatal(err)
		}
		roundTrip(t, c, []byte("x"))
		c.Close()
		d.breakAll() // the socket under the pooled connection dies
		waitFor(t, "broken connection evicted", func() bool { return conns(e) == 0 })
		c, err = e.dial(tr, echo)
		if err != nil {
			t.Fatalf("dial after eviction: %v", err)
		}
		roundTrip(t, c, []byte("y"))
		c.Close()
		if d.n.Load() != 2 {
			t.Fatalf("%d dials, want 2", d.n.Load())
		}
	})
}

func TestPool_ConcurrentDialsShareOneHandshake(t *testing.T) {
	forEachTransport(t, func(t *testing.T, tr Transport) {
		var d countingDialer
		e := newEnv(t, func(o *envOpts) { o.clientCfg = func(c *ClientConfig) { d.install(c) } })
		echo := echoServer(t)
		var wg sync.WaitGroup
		start := make(chan struct{})
		for i := 0; i < 50; i++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				<-start
				c, err := e.dial(tr, echo)
				if err != nil {
					t.Error(err)
					return
				}
				roundTrip(t, c, []byte("x"))
				c.Close()
			}()
		}
		close(start)
		wg.Wait()
		if d.n.Load() != 1 {
			t.Fatalf("50 concurrent dials made %d connections, want 1", d.n.Load())
		}
	})
}
