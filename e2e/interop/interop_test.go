package interop

// Interop between meshlite's HBONE (internal/hbone) and Istio's
// (istio.io/istio/pkg/hbone), both ways, over HTTP/2 with TLS 1.3 mTLS and
// SPIFFE certificates from our identity authority. Istio's pkg/hbone has no
// HTTP/3 path (its client and server are HTTP/2 only), so HBONE over QUIC has
// no counterpart to test against here.

import (
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/meshlite/meshlite/internal/hbone"
)

// concurrentTunnels are held open at once: more than one HTTP/2 connection
// carries (100 streams on each side), so both pools must open a second one.
const (
	concurrentTunnels = 150
	wantConns         = 2
)

// holdOpen opens n tunnels with dial, keeps them all open until every one is
// up, then checks an echo exchange on each and closes them.
func holdOpen(t *testing.T, n int, dial func(i int) (net.Conn, error)) {
	t.Helper()
	var (
		dialed, done sync.WaitGroup
		release      = make(chan struct{})
	)
	dialed.Add(n)
	for i := range n {
		done.Go(func() {
			c, err := dial(i)
			dialed.Done()
			if err != nil {
				t.Errorf("tunnel %d: %v", i, err)
				return
			}
			defer c.Close()
			<-release
			exchange(t, c, payload(uint64(1000+i), 16<<10))
		})
	}
	waitTimeout(t, &dialed, testTimeout, "opening concurrent tunnels")
	close(release)
	waitTimeout(t, &done, testTimeout, "concurrent tunnels")
}

func payload(seed uint64, n int) []byte {
	r := rand.New(rand.NewChaCha8([32]byte{byte(seed), byte(seed >> 8)}))
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	return b
}

// waitTimeout waits for wg or fails after d.
func waitTimeout(t *testing.T, wg *sync.WaitGroup, d time.Duration, what string) {
	t.Helper()
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(d):
		t.Fatalf("%s did not finish within %v", what, d)
	}
}

// Istio's HBONE client (HTTP/2) -> our HBONE server -> TCP echo.
func TestIstioClientToOurServer(t *testing.T) {
	m := newMesh(t, "cluster.local")
	tg := startTarget(t, echo)
	srv := startOurServer(t, m, nil)
	d := istioDialer(srv.addr.String(), m.clientTLS(t, m.clientSVID, m.serverID),
		http.Header{"Baggage": {"k8s.namespace.name=default"}})
	ctx := testContext(t)

	t.Run("single", func(t *testing.T) {
		c, err := d.DialContext(ctx, "tcp", tg.addr.String())
		if err != nil {
			t.Fatalf("Istio client CONNECT via our server: %v", err)
		}
		exchange(t, c, payload(1, 1<<20))
		_ = c.Close()

		reqs := srv.requests()
		if len(reqs) != 1 {
			t.Fatalf("our server saw %d CONNECTs, want 1", len(reqs))
		}
		r := reqs[0]
		if r.transport != hbone.H2 {
			t.Errorf("transport = %v, want h2", r.transport)
		}
		if r.peer != m.clientID {
			t.Errorf("peer SPIFFE ID = %q, want %q", r.peer, m.clientID)
		}
		if r.target != tg.addr {
			t.Errorf("CONNECT target = %v, want %v", r.target, tg.addr)
		}
		// Istio's dialer documents Config.Headers but never puts them on the
		// request; record what it does send.
		t.Logf("request headers from Istio's client: %v", r.header)
	})

	t.Run("concurrent", func(t *testing.T) {
		holdOpen(t, concurrentTunnels, func(int) (net.Conn, error) {
			return d.DialContext(ctx, "tcp", tg.addr.String())
		})
		if got := len(srv.requests()); got != 1+concurrentTunnels {
			t.Errorf("our server saw %d CONNECTs, want %d", got, 1+concurrentTunnels)
		}
		for _, r := range srv.requests() {
			if r.peer != m.clientID || r.target != tg.addr {
				t.Errorf("request peer %q target %v, want %q %v", r.peer, r.target, m.clientID, tg.addr)
			}
		}
		// x/net's Transport pools by proxy address and honours our
		// SETTINGS_MAX_CONCURRENT_STREAMS (100): the tunnels share two TLS
		// connections.
		if n := srv.l.accepted.Load(); n != wantConns {
			t.Errorf("Istio's client opened %d TLS connections to our server for %d concurrent tunnels, want %d", n, concurrentTunnels, wantConns)
		}
		// Closing the client ends tears every tunnel down to the target.
		waitTimeout(t, &tg.wg, 10*time.Second, "target connections closing")
	})
}

// Our HBONE client (HTTP/2) -> Istio's HBONE server -> TCP echo.
func TestOurClientToIstioServer(t *testing.T) {
	m := newMesh(t, "cluster.local")
	tg := startTarget(t, echo)
	is := startIstioServer(t, m.serverTLS(t))
	cl := ourClient(t, m)
	ctx := testContext(t)
	endpoint := is.addrPort()

	t.Run("single", func(t *testing.T) {
		// With every optional HBONE header we send; Istio's server must
		// accept them (it ignores them).
		c, err := cl.Dial(ctx, hbone.DialRequest{
			Transport:   hbone.H2,
			Endpoint:    endpoint,
			Target:      tg.addr,
			Source:      m.clientSVID,
			PeerIDs:     []spiffeid.ID{m.serverID},
			Forwarded:   netip.MustParseAddrPort("127.0.0.1:40000"),
			TraceParent: "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
			Baggage:     "k8s.namespace.name=default",
		})
		if err != nil {
			t.Fatalf("our client CONNECT via Istio's server: %v", err)
		}
		exchange(t, c, payload(2, 1<<20))
		_ = c.Close()
		if n := tg.accepted.Load(); n != 1 {
			t.Errorf("target accepted %d connections, want 1", n)
		}
	})

	t.Run("concurrent", func(t *testing.T) {
		holdOpen(t, concurrentTunnels, func(int) (net.Conn, error) {
			return dialOurs(ctx, cl, m, endpoint, tg.addr)
		})
		if n := tg.accepted.Load(); n != 1+concurrentTunnels {
			t.Errorf("target accepted %d connections, want %d", n, 1+concurrentTunnels)
		}
		// Our pool puts up to 100 tunnels on one connection.
		if n := is.l.accepted.Load(); n != wantConns {
			t.Errorf("our client opened %d TLS connections to Istio's server for %d concurrent tunnels, want %d", n, concurrentTunnels, wantConns)
		}
		waitTimeout(t, &tg.wg, 10*time.Second, "target connections closing")
	})
}

// Half-close (FIN) across the pair, in every direction Istio supports.
func TestHalfClose(t *testing.T) {
	m := newMesh(t, "cluster.local")
	ctx := testContext(t)

	// replyAfterEOF reads the whole request, answers, then half-closes.
	type result struct {
		got []byte
		err error
	}
	replyAfterEOF := func(results chan<- result) func(*net.TCPConn) {
		return func(c *net.TCPConn) {
			b, err := io.ReadAll(c)
			results <- result{b, err}
			if err != nil {
				return
			}
			_, _ = c.Write(append([]byte("ack:"), b...))
			_ = c.CloseWrite()
			_, _ = io.Copy(io.Discard, c)
		}
	}
	// sendFirst half-closes towards the client first, then reads what is left.
	sendFirst := func(results chan<- result) func(*net.TCPConn) {
		return func(c *net.TCPConn) {
			_, _ = c.Write([]byte("greeting"))
			_ = c.CloseWrite()
			b, err := io.ReadAll(c)
			results <- result{b, err}
		}
	}
	recv := func(t *testing.T, ch <-chan result) result {
		t.Helper()
		select {
		case r := <-ch:
			return r
		case <-time.After(testTimeout):
			t.Fatal("target got no result")
		}
		return result{}
	}

	t.Run("istio client FIN reaches target through our server", func(t *testing.T) {
		results := make(chan result, 1)
		tg := startTarget(t, replyAfterEOF(results))
		srv := startOurServer(t, m, nil)
		d := istioDialer(srv.addr.String(), m.clientTLS(t, m.clientSVID, m.serverID), nil)
		c, err := d.DialContext(ctx, "tcp", tg.addr.String())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(testTimeout))
		if _, err := c.Write([]byte("request")); err != nil {
			t.Fatal(err)
		}
		cw, canHalfClose := c.(interface{ CloseWrite() error })
		if canHalfClose {
			if err := cw.CloseWrite(); err != nil {
				t.Fatal(err)
			}
		} else {
			// Istio's dialer returns one end of a net.Pipe: no CloseWrite.
			// Close is the only way to send END_STREAM, and it also ends
			// reading on this side.
			t.Logf("Istio's client conn (%T) has no CloseWrite; sending FIN by Close", c)
			_ = c.Close()
		}
		r := recv(t, results)
		if r.err != nil || string(r.got) != "request" {
			t.Fatalf("target read %q, %v; want %q then a clean EOF", r.got, r.err, "request")
		}
		if canHalfClose {
			if got := readAll(t, c); string(got) != "ack:request" {
				t.Fatalf("client read %q after half-close, want %q", got, "ack:request")
			}
		}
	})

	t.Run("target FIN reaches istio client through our server", func(t *testing.T) {
		results := make(chan result, 1)
		tg := startTarget(t, sendFirst(results))
		srv := startOurServer(t, m, nil)
		d := istioDialer(srv.addr.String(), m.clientTLS(t, m.clientSVID, m.serverID), nil)
		c, err := d.DialContext(ctx, "tcp", tg.addr.String())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(testTimeout))
		if got := readAll(t, c); string(got) != "greeting" {
			t.Fatalf("Istio client read %q, want %q then EOF", got, "greeting")
		}
		// Istio's client closes its whole pipe when the response body ends,
		// so the tunnel cannot carry data the other way afterwards.
		if _, err := c.Write([]byte("late")); err == nil {
			t.Logf("Istio's client still accepted a write after EOF")
		} else {
			t.Logf("Istio's client write after EOF: %v", err)
		}
		_ = c.Close()
		// The target's read side then ends with EOF or with a reset: when the
		// response ends first, Istio's client closes the response body while
		// its request body may still be open, and x/net/http2 then cancels the
		// stream (RST_STREAM CANCEL), which our server turns into a TCP RST as
		// RFC 9113 section 8.5 asks. Which one wins is timing.
		r := recv(t, results)
		switch {
		case len(r.got) != 0:
			t.Fatalf("target read %q after its FIN, want nothing", r.got)
		case r.err == nil:
			t.Logf("target saw EOF")
		case errors.Is(r.err, syscall.ECONNRESET):
			t.Logf("target saw a reset (Istio's client cancelled the stream)")
		default:
			t.Fatalf("target read after its FIN: %v, want EOF or a reset", r.err)
		}
	})

	t.Run("our client FIN reaches target through istio server and reply comes back", func(t *testing.T) {
		results := make(chan result, 1)
		tg := startTarget(t, replyAfterEOF(results))
		is := startIstioServer(t, m.serverTLS(t))
		cl := ourClient(t, m)
		c, err := dialOurs(ctx, cl, m, is.addrPort(), tg.addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(testTimeout))
		if _, err := c.Write([]byte("request")); err != nil {
			t.Fatal(err)
		}
		if err := c.CloseWrite(); err != nil {
			t.Fatalf("CloseWrite: %v", err)
		}
		r := recv(t, results)
		if r.err != nil || string(r.got) != "request" {
			t.Fatalf("target read %q, %v; want %q then a clean EOF", r.got, r.err, "request")
		}
		if got := readAll(t, c); string(got) != "ack:request" {
			t.Fatalf("our client read %q after half-close, want %q then EOF", got, "ack:request")
		}
	})

	t.Run("target FIN ends the tunnel at istio server", func(t *testing.T) {
		results := make(chan result, 1)
		tg := startTarget(t, sendFirst(results))
		is := startIstioServer(t, m.serverTLS(t))
		cl := ourClient(t, m)
		c, err := dialOurs(ctx, cl, m, is.addrPort(), tg.addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(testTimeout))
		if got := readAll(t, c); string(got) != "greeting" {
			t.Fatalf("our client read %q, want %q then EOF", got, "greeting")
		}
		// Istio's server stops reading the request body once the target's
		// FIN arrives and then ends the stream, so nothing sent afterwards
		// reaches the target, which sees EOF instead.
		_, werr := c.Write([]byte("late"))
		t.Logf("our client write after EOF from Istio's server: %v", werr)
		_ = c.CloseWrite()
		r := recv(t, results)
		if r.err != nil || len(r.got) != 0 {
			t.Fatalf("target read %q, %v after its FIN; want EOF with nothing (Istio ends the tunnel on the target's FIN)", r.got, r.err)
		}
	})
}

// Istio's server (net/http's HTTP/2) follows a complete response with
// RST_STREAM(NO_ERROR) while the request body is still open. RFC 9113 section
// 8.1 makes that "stop sending", not an abort: response data that arrived
// before it must stay readable.
func TestIstioServerResetNoErrorKeepsResponse(t *testing.T) {
	m := newMesh(t, "cluster.local")
	ctx := testContext(t)
	// Below our 4 MiB stream receive window, so Istio's server can send it
	// all while our client reads nothing.
	want := payload(3, 1<<20)
	targetDone := make(chan error, 1)
	tg := startTarget(t, func(c *net.TCPConn) {
		_, err := c.Write(want)
		if err == nil {
			err = c.CloseWrite()
		}
		if err == nil {
			_, err = io.Copy(io.Discard, c)
		}
		targetDone <- err
	})
	is := startIstioServer(t, m.serverTLS(t))
	cl := ourClient(t, m)
	c, err := dialOurs(ctx, cl, m, is.addrPort(), tg.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(testTimeout))
	// Read nothing until Istio's handler has finished with the target (it
	// half-closes the target just before returning), so the response, its
	// END_STREAM and the RST_STREAM are all in flight or buffered by now.
	select {
	case err := <-targetDone:
		if err != nil {
			t.Fatalf("target: %v", err)
		}
	case <-time.After(testTimeout):
		t.Fatal("Istio's server never closed the target side")
	}
	// Writes start failing once the RST_STREAM has arrived; probe with small
	// writes (Istio's server discards them) until then, still reading nothing.
	var werr error
	for deadline := time.Now().Add(10 * time.Second); werr == nil; {
		if time.Now().After(deadline) {
			t.Fatal("Istio's server never reset the stream after its response")
		}
		time.Sleep(10 * time.Millisecond)
		_, werr = c.Write([]byte("x"))
	}
	t.Logf("write after Istio's response ended: %v", werr)
	got, err := io.ReadAll(c)
	if err != nil {
		t.Fatalf("read after Istio's RST_STREAM(NO_ERROR): %v (after %d of %d bytes)", err, len(got), len(want))
	}
	if !bytesEqual(got, want) {
		t.Fatalf("read %d bytes, want the %d the target sent", len(got), len(want))
	}
}

// Status codes each side answers when the target cannot be reached or the
// request is denied.
func TestStatus(t *testing.T) {
	m := newMesh(t, "cluster.local")
	ctx := testContext(t)

	t.Run("our server answers 503 to istio client for an unreachable target", func(t *testing.T) {
		srv := startOurServer(t, m, nil)
		d := istioDialer(srv.addr.String(), m.clientTLS(t, m.clientSVID, m.serverID), nil)
		c, err := d.DialContext(ctx, "tcp", deadAddr(t).String())
		if err == nil {
			_ = c.Close()
			t.Fatal("Istio client got a tunnel to an unreachable target")
		}
		if !strings.Contains(err.Error(), "503") {
			t.Fatalf("Istio client error %q does not carry status 503", err)
		}
	})

	t.Run("our server answers 401 to istio client when denied", func(t *testing.T) {
		tg := startTarget(t, echo)
		srv := startOurServer(t, m, fmt.Errorf("%w: test policy", hbone.ErrDenied))
		d := istioDialer(srv.addr.String(), m.clientTLS(t, m.clientSVID, m.serverID), nil)
		c, err := d.DialContext(ctx, "tcp", tg.addr.String())
		if err == nil {
			_ = c.Close()
			t.Fatal("Istio client got a tunnel the handler denied")
		}
		if !strings.Contains(err.Error(), "401") {
			t.Fatalf("Istio client error %q does not carry status 401", err)
		}
		if n := tg.accepted.Load(); n != 0 {
			t.Errorf("target accepted %d connections after a denial", n)
		}
	})

	t.Run("istio server answers 200 then ends the stream for an unreachable target", func(t *testing.T) {
		// Istio's handler flushes the 200 response head before it dials the
		// target, so a failed upstream shows as an empty tunnel, not 503.
		is := startIstioServer(t, m.serverTLS(t))
		cl := ourClient(t, m)
		c, err := dialOurs(ctx, cl, m, is.addrPort(), deadAddr(t))
		if err != nil {
			var se *hbone.StatusError
			if errors.As(err, &se) {
				t.Fatalf("Istio's server answered %d; it used to answer 200 and end the stream (update the findings)", se.Status)
			}
			t.Fatalf("our client CONNECT via Istio's server: %v", err)
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(testTimeout))
		b, err := io.ReadAll(c)
		if len(b) != 0 {
			t.Fatalf("read %q from a tunnel to nowhere", b)
		}
		t.Logf("our client reading a tunnel to an unreachable target via Istio's server: EOF err=%v", err)
	})
}

// Peers from another trust domain get no tunnel.
func TestForeignTrustDomainRejected(t *testing.T) {
	m := newMesh(t, "cluster.local")
	foreign := newMesh(t, "other.example")
	ctx := testContext(t)

	t.Run("istio client with a foreign certificate is refused by our server", func(t *testing.T) {
		tg := startTarget(t, echo)
		srv := startOurServer(t, m, nil)
		// The client trusts our server (m's bundle) but presents a
		// certificate from another trust domain.
		d := istioDialer(srv.addr.String(), m.clientTLS(t, foreign.clientSVID, m.serverID), nil)
		c, err := d.DialContext(ctx, "tcp", tg.addr.String())
		if err == nil {
			_ = c.Close()
			t.Fatal("our server gave a tunnel to a client of another trust domain")
		}
		t.Logf("Istio client with a foreign certificate: %v", err)
		if n := len(srv.requests()); n != 0 {
			t.Errorf("our server's handler saw %d requests from a foreign client", n)
		}
		if n := tg.accepted.Load(); n != 0 {
			t.Errorf("target accepted %d connections from a foreign client", n)
		}
	})

	t.Run("our client refuses istio server with a foreign certificate", func(t *testing.T) {
		tg := startTarget(t, echo)
		is := startIstioServer(t, foreign.serverTLS(t))
		cl := ourClient(t, m)
		c, err := dialOurs(ctx, cl, m, is.addrPort(), tg.addr)
		if err == nil {
			_ = c.Close()
			t.Fatal("our client opened a tunnel through a server of another trust domain")
		}
		t.Logf("our client against a foreign Istio server: %v", err)
		if n := tg.accepted.Load(); n != 0 {
			t.Errorf("target accepted %d connections via a foreign server", n)
		}
	})
}
