package interop

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/meshlite/meshlite/internal/hbone"
	"github.com/meshlite/meshlite/internal/identity"
)

// seen is what our server's handler was given for one CONNECT.
type seen struct {
	transport hbone.Transport
	peer      spiffeid.ID
	target    netip.AddrPort
	header    map[string][]string
}

// ourServer is meshlite's HBONE server on loopback. Its handler records each
// request and connects to the target, unless deny is set.
type ourServer struct {
	addr netip.AddrPort
	l    *countingListener

	mu   sync.Mutex
	reqs []seen
}

func (s *ourServer) requests() []seen {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]seen(nil), s.reqs...)
}

func testLogger(t *testing.T) *slog.Logger {
	return slog.New(slog.NewTextHandler(newTestWriter(t), &slog.HandlerOptions{Level: slog.LevelWarn}))
}

// testWriter sends log lines to the test log (shown on failure or with -v)
// and drops those written after the test has finished, which testing would
// turn into a panic.
type testWriter struct {
	mu   sync.Mutex
	t    *testing.T
	done bool
}

func newTestWriter(t *testing.T) *testWriter {
	w := &testWriter{t: t}
	t.Cleanup(func() {
		w.mu.Lock()
		defer w.mu.Unlock()
		w.done = true
	})
	return w
}

func (w *testWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if !w.done {
		w.t.Log(strings.TrimSuffix(string(p), "\n"))
	}
	return len(p), nil
}

func startOurServer(t *testing.T, m *mesh, deny error) *ourServer {
	t.Helper()
	s := &ourServer{}
	handler := func(ctx context.Context, req *hbone.Request) (net.Conn, error) {
		s.mu.Lock()
		s.reqs = append(s.reqs, seen{transport: req.Transport, peer: req.PeerID, target: req.Target, header: req.Header.Clone()})
		s.mu.Unlock()
		if deny != nil {
			return nil, deny
		}
		var d net.Dialer
		c, err := d.DialContext(ctx, "tcp", req.Target.String())
		if err != nil {
			return nil, fmt.Errorf("%w: %v", hbone.ErrUpstream, err)
		}
		return c, nil
	}
	srv, err := hbone.NewServer(hbone.ServerConfig{
		Certificates: identity.StaticCertificates(map[netip.Addr]*x509svid.SVID{loopback: m.serverSVID}),
		Bundle:       m.ca.Bundle(),
		Authorize:    identity.AuthorizeMemberOf(m.ca.TrustDomain()),
		Handler:      handler,
		Logger:       testLogger(t),
	})
	if err != nil {
		t.Fatalf("our HBONE server: %v", err)
	}
	s.l = listenLoopback(t)
	s.addr = netip.MustParseAddrPort(s.l.Addr().String())
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.ServeH2(ctx, s.l) }()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("our server ServeH2: %v", err)
			}
		case <-time.After(10 * time.Second):
			t.Errorf("our server did not stop within 10s")
		}
	})
	return s
}

// ourClient is meshlite's HBONE client with m's trust bundle.
func ourClient(t *testing.T, m *mesh) *hbone.Client {
	t.Helper()
	cl, err := hbone.NewClient(hbone.ClientConfig{Bundle: m.ca.Bundle(), Logger: testLogger(t)})
	if err != nil {
		t.Fatalf("our HBONE client: %v", err)
	}
	t.Cleanup(func() { _ = cl.Close() })
	return cl
}

// dialOurs opens a tunnel from m's client workload to target through endpoint,
// expecting the endpoint to be m's server workload.
func dialOurs(ctx context.Context, cl *hbone.Client, m *mesh, endpoint, target netip.AddrPort) (hbone.Conn, error) {
	return cl.Dial(ctx, hbone.DialRequest{
		Transport: hbone.H2,
		Endpoint:  endpoint,
		Target:    target,
		Source:    m.clientSVID,
		PeerIDs:   []spiffeid.ID{m.serverID},
	})
}
