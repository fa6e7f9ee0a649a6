package proxy

import (
	"bufio"
	"context"
	"crypto/sha1"
	"encoding/base64"
	"errors"
	"io"
	"net"
	"net/http"
	"os"
	"regexp"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/meshlite/meshlite/proto/l7"
)

// wsAccept is the Sec-WebSocket-Accept answer to key (RFC 6455 4.2.2).
func wsAccept(key string) string {
	h := sha1.Sum([]byte(key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"))
	return base64.StdEncoding.EncodeToString(h[:])
}

// wsEchoApp answers a WebSocket handshake with 101, greets right behind it,
// echoes what it reads until the client half-closes, then says bye and
// closes. It hands the handshake it saw to seen. A request without an
// upgrade gets "plain".
func wsEchoApp(t *testing.T, seen chan<- http.Header, delay time.Duration) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("Upgrade") == "" {
			io.WriteString(w, "plain")
			return
		}
		select {
		case seen <- r.Header.Clone():
		default:
		}
		time.Sleep(delay)
		conn, brw, err := http.NewResponseController(w).Hijack()
		if err != nil {
			t.Errorf("app: hijack: %v", err)
			return
		}
		defer conn.Close()
		brw.WriteString("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n" +
			"Sec-WebSocket-Accept: " + wsAccept(r.Header.Get("Sec-WebSocket-Key")) + "\r\nX-App: ws\r\n\r\nhi\n")
		if err := brw.Flush(); err != nil {
			return
		}
		// The server's reader must not read on after a hijack: what it holds, then the connection.
		in := io.MultiReader(io.LimitReader(brw.Reader, int64(brw.Reader.Buffered())), conn)
		if _, err := io.Copy(conn, in); err != nil {
			return
		}
		io.WriteString(conn, "bye\n")
	}
}

const wsHandshake = "GET %s HTTP/1.1\r\nHost: echo.default.svc.cluster.local\r\n" +
	"Connection: keep-alive, Upgrade, X-Hop\r\nUpgrade: websocket\r\nX-Hop: drop-me\r\n" +
	"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"

func TestWaypoint_WebSocketUpgradeIsSplicedToTheRoutedBackend(t *testing.T) {
	m := newMesh(t)
	m.addService("echo", vip)
	m.addService("ws", "")
	m.addEndpoint("echo", true, named("echo"))
	seen := make(chan http.Header, 4)
	m.addEndpoint("ws", true, wsEchoApp(t, seen, 0))
	slow := make(chan http.Header, 4)
	m.addService("ws-slow", "")
	m.addEndpoint("ws-slow", true, wsEchoApp(t, slow, 2*time.Second))
	// A request timeout and retries on the WebSocket routes: they hold until
	// the 101, never after.
	timeouts := &l7.Timeouts{Request: durationpb.New(300 * time.Millisecond)}
	retry := &l7.Retry{Attempts: 2, Codes: []uint32{503}, Backoff: durationpb.New(time.Millisecond)}
	m.bind("echo", &l7.ServiceConfig{HttpRoutes: []*l7.HTTPRoute{{Namespace: "default", Name: "r", Rules: []*l7.HTTPRouteRule{
		{Matches: []*l7.HTTPRouteMatch{{Path: &l7.PathMatch{Value: "/ws"}}}, BackendRefs: []*l7.BackendRef{ref("ws", 1)}, Timeouts: timeouts, Retry: retry},
		{Matches: []*l7.HTTPRouteMatch{{Path: &l7.PathMatch{Value: "/slow"}}}, BackendRefs: []*l7.BackendRef{ref("ws-slow", 1)}, Timeouts: timeouts},
		{Matches: []*l7.HTTPRouteMatch{{Path: &l7.PathMatch{Value: "/"}}}, BackendRefs: []*l7.BackendRef{ref("echo", 1)}},
	}}}})

	c := m.rawTunnel()
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.WriteString(c, strings.Replace(wsHandshake, "%s", "/ws/chat", 1)); err != nil {
		t.Fatal(err)
	}
	br := bufio.NewReader(c)
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatalf("reading the handshake answer: %v", err)
	}
	if resp.StatusCode != http.StatusSwitchingProtocols || !strings.EqualFold(resp.Header.Get("Upgrade"), "websocket") ||
		!strings.EqualFold(resp.Header.Get("Connection"), "upgrade") || resp.Header.Get("X-App") != "ws" ||
		resp.Header.Get("Sec-Websocket-Accept") != wsAccept("dGhlIHNhbXBsZSBub25jZQ==") {
		t.Fatalf("handshake answer %d %v, want the backend's 101", resp.StatusCode, resp.Header)
	}
	h := <-seen
	if !strings.EqualFold(h.Get("Upgrade"), "websocket") || !hasToken(h["Connection"], "upgrade") ||
		h.Get("Sec-Websocket-Key") != "dGhlIHNhbXBsZSBub25jZQ==" || h.Get("X-Hop") != "" {
		t.Errorf("the backend saw the handshake headers %v: want Upgrade and Connection passed on, X-Hop (named in Connection) dropped", h)
	}
	readLine := func(want string) {
		t.Helper()
		line, err := br.ReadString('\n')
		if err != nil || line != want {
			t.Fatalf("read %q (%v), want %q", line, err, want)
		}
	}
	readLine("hi\n") // sent right behind the 101
	for i, msg := range []string{"ping 1\n", "ping 2\n", "ping 3\n"} {
		if i == 2 {
			// Well past the route's 300 ms request timeout.
			time.Sleep(500 * time.Millisecond)
		}
		if _, err := io.WriteString(c, msg); err != nil {
			t.Fatalf("write on the upgraded stream: %v", err)
		}
		readLine(msg)
	}
	// Half-close: the backend reads EOF, answers, and closes.
	if err := c.(interface{ CloseWrite() error }).CloseWrite(); err != nil {
		t.Fatal(err)
	}
	rest, err := io.ReadAll(br)
	if err != nil || string(rest) != "bye\n" {
		t.Fatalf("after half-close read %q (%v), want \"bye\\n\" then EOF", rest, err)
	}

	// Counted as a request: metrics and an access log line with status 101.
	want := "response_code=101"
	waitFor(t, func() bool { return strings.Contains(requestSeries(t, m), want) }, "istio_requests_total with "+want)
	// The access line is written right after the metric: wait for it too.
	accessRe := regexp.MustCompile(`msg=access method=GET [^\n]*path=/ws/chat [^\n]*`)
	waitFor(t, func() bool { return accessRe.MatchString(m.logs.String()) }, "the access log line for /ws/chat")
	line := accessRe.FindString(m.logs.String())
	if !strings.Contains(line, "status=101") || !strings.Contains(line, "bytes_in=21 ") || !strings.Contains(line, "bytes_out=28 ") {
		t.Errorf("access log line %q: want status 101, the stream's 21 bytes in and 28 out", line)
	}

	// The timeout holds until the 101: a backend slow to switch gets 504.
	s := m.rawTunnel()
	defer s.Close()
	s.SetDeadline(time.Now().Add(10 * time.Second))
	start := time.Now()
	io.WriteString(s, strings.Replace(wsHandshake, "%s", "/slow", 1))
	resp, err = http.ReadResponse(bufio.NewReader(s), nil)
	if err != nil || resp.StatusCode != http.StatusGatewayTimeout || time.Since(start) > 1500*time.Millisecond {
		t.Errorf("a backend answering the upgrade after 2 s: %v %v after %v, want 504 after ~300ms", resp.StatusCode, err, time.Since(start))
	}

	// Ordinary requests on the same routes are untouched.
	if code, body, _ := get(t, m.client(false), "/ws"); code != 200 || body != "plain" {
		t.Errorf("a plain request to /ws: %d %q", code, body)
	}
}

// requestSeries is istio_requests_total's series as text.
func requestSeries(t *testing.T, m *mesh) string {
	mfs, err := m.registry.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var b strings.Builder
	for _, mf := range mfs {
		if mf.GetName() != "istio_requests_total" {
			continue
		}
		for _, mt := range mf.GetMetric() {
			for _, l := range mt.GetLabel() {
				b.WriteString(l.GetName() + "=" + l.GetValue() + " ")
			}
			b.WriteString("\n")
		}
	}
	return b.String()
}

func TestWaypoint_WebSocketResetOnOneSideResetsTheOther(t *testing.T) {
	m := newMesh(t)
	m.addService("echo", vip)
	var appConn atomic.Pointer[net.Conn]
	m.addEndpoint("echo", true, func(w http.ResponseWriter, r *http.Request) {
		conn, brw, _ := http.NewResponseController(w).Hijack()
		brw.WriteString("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
		brw.Flush()
		appConn.Store(&conn)
	})
	// Registered after the mesh: runs first, so a failed test does not
	// leave the fake ztunnel waiting on this connection.
	t.Cleanup(func() {
		if c := appConn.Load(); c != nil {
			(*c).Close()
		}
	})
	m.bind("echo", nil)
	c := m.rawTunnel()
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	io.WriteString(c, strings.Replace(wsHandshake, "%s", "/", 1))
	br := bufio.NewReader(c)
	if resp, err := http.ReadResponse(br, nil); err != nil || resp.StatusCode != 101 {
		t.Fatalf("handshake: %v %v", resp, err)
	}
	waitFor(t, func() bool { return appConn.Load() != nil }, "the app to take the connection")
	// The app dies abruptly (RST): the client's stream must end too, not hang.
	ac := *appConn.Load()
	ac.(*net.TCPConn).SetLinger(0)
	ac.Close()
	start := time.Now()
	_, err := io.ReadAll(br)
	if time.Since(start) > 3*time.Second {
		t.Fatalf("client stream still open %v after the backend reset (%v)", time.Since(start), err)
	}
	// A reset, not a clean end: io.ReadAll reports io.EOF as nil.
	if err == nil || errors.Is(err, io.EOF) || os.IsTimeout(err) || !strings.Contains(err.Error(), "reset") {
		t.Fatalf("client stream ended with %v after the backend reset, want a reset", err)
	}
	t.Logf("client saw: %v", err)
}

// wsHandshakeTo sends a WebSocket handshake for path on a new tunnel and
// returns the answer's head and a reader for the rest.
func wsHandshakeTo(t *testing.T, m *mesh, path string) (net.Conn, *bufio.Reader, *http.Response) {
	t.Helper()
	c := m.rawTunnel()
	t.Cleanup(func() { c.Close() })
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.WriteString(c, strings.Replace(wsHandshake, "%s", path, 1)); err != nil {
		t.Fatal(err)
	}
	br := bufio.NewReader(c)
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatalf("reading the answer to a handshake for %s: %v", path, err)
	}
	return c, br, resp
}

func TestWaypoint_WebSocketDeniedByAuthorizationPolicyGets403AndNoUpstream(t *testing.T) {
	m := newMesh(t)
	m.addService("echo", vip)
	seen := make(chan http.Header, 4)
	ep := m.addEndpoint("echo", true, wsEchoApp(t, seen, 0))
	m.bind("echo", &l7.ServiceConfig{AuthorizationPolicies: []*l7.AuthorizationPolicy{{
		Name: "deny-admin", Namespace: "default", Action: l7.AuthorizationPolicy_DENY,
		Rules: []*l7.AuthorizationRule{{To: []*l7.Operation{{Paths: []string{"/admin*"}}}}},
	}}})
	_, _, resp := wsHandshakeTo(t, m, "/admin/ws")
	if resp.StatusCode != http.StatusForbidden || resp.Header.Get("Upgrade") != "" {
		t.Fatalf("a handshake to a denied path: %d %v, want 403 without Upgrade", resp.StatusCode, resp.Header)
	}
	// The upstream is dialed before any answer, so by now it would show.
	if got := ep.tunnels.Load(); got != 0 {
		t.Errorf("the endpoint's ztunnel accepted %d tunnels for a denied handshake, want none", got)
	}
	if got := ep.hits.Load(); got != 0 {
		t.Errorf("the app saw %d requests for a denied handshake, want none", got)
	}

	// The same handshake to an allowed path goes through (and is counted):
	// the denial was the policy.
	_, _, resp = wsHandshakeTo(t, m, "/ws")
	if resp.StatusCode != http.StatusSwitchingProtocols || ep.tunnels.Load() == 0 || ep.hits.Load() != 1 {
		t.Fatalf("a handshake to an allowed path: %d with %d tunnels, %d requests; want 101 through one",
			resp.StatusCode, ep.tunnels.Load(), ep.hits.Load())
	}
}

func TestWaypoint_WebSocketAboveRateLimitGets429(t *testing.T) {
	m := newMesh(t)
	m.addService("echo", vip)
	seen := make(chan http.Header, 4)
	ep := m.addEndpoint("echo", true, wsEchoApp(t, seen, 0))
	// Nearly no refill: the burst of 2 is all there is during the test.
	m.bind("echo", &l7.ServiceConfig{Resilience: &l7.ResiliencePolicy{Name: "tp",
		RateLimit: &l7.RateLimit{RequestsPerSecond: 0.01, Burst: 2}}})
	for i := range 2 {
		_, _, resp := wsHandshakeTo(t, m, "/ws")
		if resp.StatusCode != http.StatusSwitchingProtocols {
			t.Fatalf("handshake %d within the burst: %d, want 101", i+1, resp.StatusCode)
		}
	}
	_, _, resp := wsHandshakeTo(t, m, "/ws")
	if resp.StatusCode != http.StatusTooManyRequests || resp.Header.Get("Upgrade") != "" {
		t.Fatalf("handshake above the rate limit: %d %v, want 429 without Upgrade", resp.StatusCode, resp.Header)
	}
	if got := ep.hits.Load(); got != 2 {
		t.Errorf("the app saw %d handshakes, want the 2 within the burst", got)
	}
}

func TestWaypoint_IdleUpgradedStreamIsClosed(t *testing.T) {
	const idle = 300 * time.Millisecond
	m := newMesh(t, func(c *Config) { c.UpgradeIdleTimeout = idle })
	m.addService("echo", vip)
	seen := make(chan http.Header, 4)
	m.addEndpoint("echo", true, wsEchoApp(t, seen, 0))
	m.bind("echo", nil)
	c, br, resp := wsHandshakeTo(t, m, "/ws")
	if resp.StatusCode != http.StatusSwitchingProtocols {
		t.Fatalf("handshake: %d, want 101", resp.StatusCode)
	}
	if line, err := br.ReadString('\n'); err != nil || line != "hi\n" {
		t.Fatalf("read %q (%v), want the greeting", line, err)
	}
	// Traffic keeps it open well past the timeout: every read pushes it on.
	start := time.Now()
	for time.Since(start) < 3*idle {
		time.Sleep(idle / 3)
		if _, err := io.WriteString(c, "ping\n"); err != nil {
			t.Fatalf("write on an active stream after %v: %v", time.Since(start), err)
		}
		if line, err := br.ReadString('\n'); err != nil || line != "ping\n" {
			t.Fatalf("echo on an active stream after %v: %q (%v)", time.Since(start), line, err)
		}
	}
	// Then silence: the waypoint closes the stream about idle later.
	start = time.Now()
	_, err := io.ReadAll(br)
	el := time.Since(start)
	if os.IsTimeout(err) || el < idle*2/3 || el > idle+2*time.Second {
		t.Fatalf("idle stream ended after %v (%v), want closed by the waypoint after ~%v", el, err, idle)
	}
}

func TestWaypoint_NonUpgradeRequestStillStripsHopHeaders(t *testing.T) {
	m := newMesh(t)
	m.addService("echo", vip)
	ep := m.addEndpoint("echo", true, named("ok"))
	m.bind("echo", nil)
	for _, tc := range []struct{ name, extra string }{
		// An upgrade to something else than WebSocket is a plain request.
		{"other upgrade", "Connection: X-Custom, Upgrade\r\nUpgrade: foo/1\r\n"},
		// Upgrade without the Connection token asks for nothing.
		{"upgrade not in Connection", "Connection: X-Custom\r\nUpgrade: websocket\r\n"},
	} {
		c := m.rawTunnel()
		c.SetDeadline(time.Now().Add(5 * time.Second))
		io.WriteString(c, "GET /plain HTTP/1.1\r\nHost: echo.default.svc.cluster.local\r\n"+tc.extra+
			"X-Custom: 1\r\nKeep-Alive: timeout=5\r\nProxy-Connection: keep-alive\r\nTE: gzip\r\nX-Kept: yes\r\n\r\n")
		resp, err := http.ReadResponse(bufio.NewReader(c), nil)
		c.Close()
		if err != nil || resp.StatusCode != 200 {
			t.Fatalf("%s: %v %v", tc.name, resp, err)
		}
		seen := ep.lastSeen.Load().Header
		for _, k := range []string{"Connection", "Upgrade", "X-Custom", "Keep-Alive", "Proxy-Connection", "Te"} {
			if v, ok := seen[k]; ok {
				t.Errorf("%s: hop-by-hop header %s: %q reached the backend", tc.name, k, v)
			}
		}
		if seen.Get("X-Kept") != "yes" {
			t.Errorf("%s: an end-to-end header was dropped: %v", tc.name, seen)
		}
	}
}

func TestUpgradeType(t *testing.T) {
	for _, tc := range []struct {
		proto    int
		conn, up []string
		want     string
	}{
		{1, []string{"Upgrade"}, []string{"websocket"}, "websocket"},
		{1, []string{"keep-alive, Upgrade"}, []string{"WebSocket"}, "WebSocket"},
		{1, []string{"keep-alive", "upgrade"}, []string{" websocket "}, "websocket"},
		{1, []string{"keep-alive"}, []string{"websocket"}, ""},     // not asked in Connection
		{1, []string{"Upgrade"}, []string{"h2c"}, ""},              // only WebSocket is passed on
		{1, []string{"Upgrade"}, []string{"websocket", "foo"}, ""}, // ambiguous
		{1, []string{"Upgrade"}, nil, ""},                          // nothing to switch to
		{1, []string{"upgraded"}, []string{"websocket"}, ""},       // a token, not a prefix
		{2, []string{"Upgrade"}, []string{"websocket"}, ""},        // HTTP/2 has no Upgrade
	} {
		r := &http.Request{ProtoMajor: tc.proto, Header: http.Header{}}
		if tc.conn != nil {
			r.Header["Connection"] = tc.conn
		}
		if tc.up != nil {
			r.Header["Upgrade"] = tc.up
		}
		if got := upgradeType(r); got != tc.want {
			t.Errorf("HTTP/%d Connection %q Upgrade %q: %q, want %q", tc.proto, tc.conn, tc.up, got, tc.want)
		}
	}
}

// Once Run waits for mirrors and upgraded streams, none can start: a handler
// the shutdown gave up on gets false from track (and answers 503 or skips
// the mirror) instead of calling wg.Add during wg.Wait.
func TestProxy_TrackRefusesWorkOnceRunWaits(t *testing.T) {
	m := newMesh(t)
	p, err := New(m.proxy.cfg)
	if err != nil {
		t.Fatal(err)
	}
	if !p.track() {
		t.Fatal("track refused work before Run stopped")
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	done := make(chan struct{})
	go func() { p.Run(ctx); close(done) }()
	waitFor(t, func() bool { p.wgMu.Lock(); defer p.wgMu.Unlock(); return p.wgClosed }, "Run to start waiting")
	select {
	case <-done:
		t.Fatal("Run returned while tracked work was still running")
	default:
	}
	if p.track() {
		t.Fatal("track accepted work after Run began waiting")
	}
	p.wg.Done()
	<-done
}
