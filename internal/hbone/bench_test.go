package hbone

import (
	"context"
	"crypto/tls"
	"io"
	"net"
	"net/netip"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/meshlite/meshlite/internal/identity"
)

// sinkConn is an upstream that swallows what it is written and reports the
// byte count once the tunnel half-closes it.
type sinkConn struct {
	n      int64
	closed chan struct{}
	once   sync.Once
	done   chan int64
}

func newSink() *sinkConn { return &sinkConn{closed: make(chan struct{}), done: make(chan int64, 1)} }

func (s *sinkConn) Write(p []byte) (int, error) { s.n += int64(len(p)); return len(p), nil }
func (s *sinkConn) Read(p []byte) (int, error) {
	<-s.closed
	return 0, io.EOF
}
func (s *sinkConn) CloseWrite() error {
	s.done <- s.n
	s.once.Do(func() { close(s.closed) })
	return nil
}
func (s *sinkConn) Close() error {
	s.once.Do(func() { close(s.closed) })
	return nil
}
func (s *sinkConn) LocalAddr() net.Addr              { return &net.TCPAddr{} }
func (s *sinkConn) RemoteAddr() net.Addr             { return &net.TCPAddr{} }
func (s *sinkConn) SetDeadline(time.Time) error      { return nil }
func (s *sinkConn) SetReadDeadline(time.Time) error  { return nil }
func (s *sinkConn) SetWriteDeadline(time.Time) error { return nil }

const benchChunk = 64 << 10

// BenchmarkTunnelThroughput measures one tunnel's upload throughput on
// loopback: HBONE over HTTP/2 and over HTTP/3, and one plain TLS 1.3
// connection with the same mTLS configuration as the baseline.
func BenchmarkTunnelThroughput(b *testing.B) {
	b.Run("tls", benchRawTLS)
	for _, tr := range transports {
		b.Run(tr.String(), func(b *testing.B) { benchTunnel(b, tr) })
	}
	// The same without the socket buffering under TLS, to see what it buys.
	b.Run("h2-unbuffered", func(b *testing.B) {
		plainSock = true
		defer func() { plainSock = false }()
		benchTunnel(b, H2)
	})
}

// chunkReader yields left bytes in reads of at most benchChunk, then EOF.
type chunkReader struct {
	left int64
}

func (r *chunkReader) Read(p []byte) (int, error) {
	if r.left == 0 {
		return 0, io.EOF
	}
	n := int(min(int64(len(p)), benchChunk, r.left))
	r.left -= int64(n)
	return n, nil
}

// cpuTime is the CPU time (user+system) this process has used so far.
func cpuTime(b *testing.B) time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		b.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// reportCPU reports CPU seconds per GiB moved (both ends of the tunnel are
// in this process): unlike throughput it hardly moves with other load.
func reportCPU(b *testing.B, start time.Duration, bytes int64) {
	if bytes > 0 {
		b.ReportMetric((cpuTime(b)-start).Seconds()/(float64(bytes)/(1<<30)), "cpu-s/GiB")
	}
}

func benchTunnel(b *testing.B, tr Transport) {
	e := newEnv(b)
	sinks := make(chan *sinkConn, 1)
	e.setHandler(func(ctx context.Context, req *Request) (net.Conn, error) {
		s := newSink()
		sinks <- s
		return s, nil
	})
	c, err := e.dial(tr, netip.MustParseAddrPort("127.0.0.1:9"))
	if err != nil {
		b.Fatal(err)
	}
	sink := <-sinks
	b.SetBytes(benchChunk)
	b.ResetTimer()
	cpu0 := cpuTime(b)
	// As the relay sends: from a reader of benchChunk-sized reads.
	src := &chunkReader{left: int64(b.N) * benchChunk}
	var err2 error
	if rf, ok := c.(io.ReaderFrom); ok {
		_, err2 = rf.ReadFrom(src)
	} else {
		_, err2 = copyBuffer(c, src, make([]byte, copyBufSize))
	}
	if err2 != nil {
		b.Fatal(err2)
	}
	c.CloseWrite()
	got := <-sink.done
	b.StopTimer()
	reportCPU(b, cpu0, got)
	if got != int64(b.N)*benchChunk {
		b.Fatalf("sink got %d bytes, want %d", got, int64(b.N)*benchChunk)
	}
	c.Close()
}

func benchRawTLS(b *testing.B) {
	ca, err := identity.NewAuthority(tdLocal, time.Hour)
	if err != nil {
		b.Fatal(err)
	}
	cliSVID, _ := ca.NewSVID(mustID(b, "a", "client"), time.Hour)
	srvID := mustID(b, "a", "server")
	srvSVID, _ := ca.NewSVID(srvID, time.Hour)
	srvCfg, err := identity.ServerConfig(identity.StaticCertificates(map[netip.Addr]*x509svid.SVID{netip.MustParseAddr("127.0.0.1"): srvSVID}), ca.Bundle(), identity.AuthorizeMemberOf(tdLocal))
	if err != nil {
		b.Fatal(err)
	}
	cliCfg, err := identity.ClientConfig(cliSVID, ca.Bundle(), identity.AuthorizeID(srvID))
	if err != nil {
		b.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	defer ln.Close()
	done := make(chan int64, 1)
	go func() {
		nc, err := ln.Accept()
		if err != nil {
			return
		}
		tc := tls.Server(nc, srvCfg)
		defer tc.Close()
		bp := getBuf()
		defer putBuf(bp)
		var n int64
		for {
			k, err := tc.Read(*bp)
			n += int64(k)
			if err != nil {
				break
			}
		}
		done <- n
	}()
	nc, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		b.Fatal(err)
	}
	tc := tls.Client(nc, cliCfg)
	if err := tc.Handshake(); err != nil {
		b.Fatal(err)
	}
	buf := make([]byte, benchChunk)
	b.SetBytes(benchChunk)
	b.ResetTimer()
	cpu0 := cpuTime(b)
	for i := 0; i < b.N; i++ {
		if _, err := tc.Write(buf); err != nil {
			b.Fatal(err)
		}
	}
	tc.CloseWrite()
	got := <-done
	b.StopTimer()
	reportCPU(b, cpu0, got)
	if got != int64(b.N)*benchChunk {
		b.Fatalf("server got %d bytes, want %d", got, int64(b.N)*benchChunk)
	}
	tc.Close()
}

// BenchmarkTunnelOpen measures opening and closing one tunnel on a pooled
// connection (CONNECT, 200, handler, close) — the per-connection cost an
// application pays on top of its own TCP handshake.
func BenchmarkTunnelOpen(b *testing.B) {
	for _, tr := range transports {
		b.Run(tr.String(), func(b *testing.B) {
			e := newEnv(b)
			e.setHandler(func(ctx context.Context, req *Request) (net.Conn, error) { return newSink(), nil })
			c, err := e.dial(tr, netip.MustParseAddrPort("127.0.0.1:9")) // warm the pool
			if err != nil {
				b.Fatal(err)
			}
			c.CloseWrite()
			c.Close()
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				c, err := e.dial(tr, netip.MustParseAddrPort("127.0.0.1:9"))
				if err != nil {
					b.Fatal(err)
				}
				c.CloseWrite()
				io.ReadAll(c)
				c.Close()
			}
		})
	}
}

// BenchmarkTunnelRelayTCP measures the whole proxy path: client writes into
// the tunnel, the server relays to a real TCP upstream on loopback that
// discards. Compare with BenchmarkTunnelThroughput/tls.
func BenchmarkTunnelRelayTCP(b *testing.B) {
	for _, tr := range transports {
		b.Run(tr.String(), func(b *testing.B) {
			e := newEnv(b)
			got := make(chan int64, 1)
			up := tcpServer(b, func(c *net.TCPConn) {
				n, _ := io.Copy(io.Discard, c)
				c.Close()
				got <- n
			})
			c, err := e.dial(tr, up)
			if err != nil {
				b.Fatal(err)
			}
			buf := make([]byte, benchChunk)
			b.SetBytes(benchChunk)
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				if _, err := c.Write(buf); err != nil {
					b.Fatal(err)
				}
			}
			c.CloseWrite()
			n := <-got
			b.StopTimer()
			if n != int64(b.N)*benchChunk {
				b.Fatalf("upstream got %d bytes, want %d", n, int64(b.N)*benchChunk)
			}
			c.Close()
		})
	}
}
