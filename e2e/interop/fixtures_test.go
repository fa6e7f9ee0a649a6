package interop

import (
	"context"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	istiolog "istio.io/istio/pkg/log"

	"github.com/meshlite/meshlite/internal/identity"
)

// testTimeout bounds every test; the suite must finish well under two minutes
// even with -race on a busy two-core machine.
const testTimeout = 30 * time.Second

var loopback = netip.MustParseAddr("127.0.0.1")

func TestMain(m *testing.M) {
	// Istio's hbone package logs every CONNECT at info; keep test output to
	// what matters.
	if s := istiolog.FindScope("hbone"); s != nil {
		s.SetOutputLevel(istiolog.WarnLevel)
	}
	os.Exit(m.Run())
}

// mesh is one trust domain's authority with a client and a server workload.
type mesh struct {
	ca                 *identity.Authority
	clientID, serverID spiffeid.ID
	clientSVID         *x509svid.SVID
	serverSVID         *x509svid.SVID
}

func newMesh(t *testing.T, trustDomain string) *mesh {
	t.Helper()
	td := spiffeid.RequireTrustDomainFromString(trustDomain)
	ca, err := identity.NewAuthority(td, time.Hour)
	if err != nil {
		t.Fatalf("new authority for %s: %v", trustDomain, err)
	}
	m := &mesh{ca: ca}
	if m.clientID, err = identity.NewID(trustDomain, "default", "sleep"); err != nil {
		t.Fatal(err)
	}
	if m.serverID, err = identity.NewID(trustDomain, "default", "httpbin"); err != nil {
		t.Fatal(err)
	}
	if m.clientSVID, err = ca.NewSVID(m.clientID, time.Hour); err != nil {
		t.Fatalf("client SVID: %v", err)
	}
	if m.serverSVID, err = ca.NewSVID(m.serverID, time.Hour); err != nil {
		t.Fatalf("server SVID: %v", err)
	}
	return m
}

// clientTLS presents svid and accepts only the server identity serverID,
// verified against this mesh's bundle.
func (m *mesh) clientTLS(t *testing.T, svid *x509svid.SVID, serverID spiffeid.ID) *tls.Config {
	t.Helper()
	cfg, err := identity.ClientConfig(svid, m.ca.Bundle(), identity.AuthorizeID(serverID))
	if err != nil {
		t.Fatalf("client TLS config: %v", err)
	}
	return cfg
}

// serverTLS presents the server SVID on 127.0.0.1 and accepts any client of
// this mesh's trust domain.
func (m *mesh) serverTLS(t *testing.T) *tls.Config {
	t.Helper()
	certs := identity.StaticCertificates(map[netip.Addr]*x509svid.SVID{loopback: m.serverSVID})
	cfg, err := identity.ServerConfig(certs, m.ca.Bundle(), identity.AuthorizeMemberOf(m.ca.TrustDomain()))
	if err != nil {
		t.Fatalf("server TLS config: %v", err)
	}
	return cfg
}

// countingListener counts accepted connections, to see how many TLS
// connections a client used for its tunnels.
type countingListener struct {
	net.Listener
	accepted atomic.Int64
}

func (l *countingListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err == nil {
		l.accepted.Add(1)
	}
	return c, err
}

func listenLoopback(t *testing.T) *countingListener {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("listen: %v", err)
	}
	t.Cleanup(func() { _ = l.Close() })
	return &countingListener{Listener: l}
}

// target is a plain TCP server standing for the application behind the
// tunnel. Each accepted connection is handed to serve; wg counts the ones
// still being served.
type target struct {
	addr     netip.AddrPort
	accepted atomic.Int64
	wg       sync.WaitGroup

	mu     sync.Mutex
	closed bool
}

func startTarget(t *testing.T, serve func(c *net.TCPConn)) *target {
	t.Helper()
	l := listenLoopback(t)
	tg := &target{addr: netip.MustParseAddrPort(l.Addr().String())}
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			tg.mu.Lock()
			if tg.closed {
				tg.mu.Unlock()
				_ = c.Close()
				return
			}
			tg.accepted.Add(1)
			tg.wg.Add(1)
			tg.mu.Unlock()
			go func() {
				defer tg.wg.Done()
				defer c.Close()
				_ = c.SetDeadline(time.Now().Add(testTimeout))
				serve(c.(*net.TCPConn))
			}()
		}
	}()
	t.Cleanup(func() {
		tg.mu.Lock()
		tg.closed = true
		tg.mu.Unlock()
		_ = l.Close()
		tg.wg.Wait()
	})
	return tg
}

// echo copies everything back and half-closes when the client has.
func echo(c *net.TCPConn) {
	_, _ = io.Copy(c, c)
	_ = c.CloseWrite()
	_, _ = io.Copy(io.Discard, c)
}

// deadAddr returns a loopback address with nothing listening.
func deadAddr(t *testing.T) netip.AddrPort {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	a := netip.MustParseAddrPort(l.Addr().String())
	_ = l.Close()
	return a
}

// exchange writes payload on c while reading the same number of bytes back,
// and checks they are identical.
func exchange(t *testing.T, c net.Conn, payload []byte) {
	t.Helper()
	_ = c.SetDeadline(time.Now().Add(testTimeout))
	werr := make(chan error, 1)
	go func() {
		_, err := c.Write(payload)
		werr <- err
	}()
	got := make([]byte, len(payload))
	if _, err := io.ReadFull(c, got); err != nil {
		t.Errorf("reading echo: %v", err)
		return
	}
	if err := <-werr; err != nil {
		t.Errorf("writing payload: %v", err)
		return
	}
	if !bytesEqual(got, payload) {
		t.Errorf("echoed bytes differ from the %d bytes sent", len(payload))
	}
}

func bytesEqual(a, b []byte) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

func testContext(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
	t.Cleanup(cancel)
	return ctx
}

// readAllTimeout reads c to EOF, failing on any other error.
func readAll(t *testing.T, r io.Reader) []byte {
	t.Helper()
	b, err := io.ReadAll(r)
	if err != nil && !errors.Is(err, io.EOF) {
		t.Fatalf("reading to EOF: %v", err)
	}
	return b
}
