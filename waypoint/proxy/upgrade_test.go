package proxy

import (
	"bufio"
	"crypto/sha1"
	"encoding/base64"
	"io"
	"net"
	"net/http"
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
	line := regexp.MustCompile(`msg=access method=GET [^\n]*path=/ws/chat [^\n]*`).FindString(m.logs.String())
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
