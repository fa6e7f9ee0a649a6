package proxy

import (
	"bufio"
	"bytes"
	"io"
	"maps"
	"net/http"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/meshlite/meshlite/proto/l7"
	"github.com/meshlite/meshlite/waypoint/circuit"
)

func TestWaypoint_RetriesHideHalfFailingEndpoint(t *testing.T) {
	m := newMesh(t)
	m.addService("echo", vip)
	var n atomic.Int64
	// Fails every other request it gets: 50% of the time.
	m.addEndpoint("echo", true, func(w http.ResponseWriter, r *http.Request) {
		if n.Add(1)%2 == 0 {
			w.WriteHeader(http.StatusServiceUnavailable)
			return
		}
		io.WriteString(w, "ok")
	})
	rule := &l7.HTTPRouteRule{BackendRefs: []*l7.BackendRef{ref("echo", 1)}}
	m.bind("echo", &l7.ServiceConfig{HttpRoutes: []*l7.HTTPRoute{{Namespace: "default", Name: "r", Rules: []*l7.HTTPRouteRule{rule}}}})
	c := m.client(false)
	failed := 0
	for i := 0; i < 100; i++ {
		if code, _, _ := get(t, c, "/"); code != 200 {
			failed++
		}
	}
	if failed < 40 {
		t.Fatalf("without retries only %d of 100 failed; the backend is not failing half the time", failed)
	}
	rule.Retry = &l7.Retry{Attempts: 3, Codes: []uint32{503}, Backoff: durationpb.New(time.Millisecond)}
	m.bind("echo", &l7.ServiceConfig{HttpRoutes: []*l7.HTTPRoute{{Namespace: "default", Name: "r", Rules: []*l7.HTTPRouteRule{rule}}}})
	failed = 0
	for i := 0; i < 200; i++ {
		if code, _, _ := get(t, c, "/"); code != 200 {
			failed++
		}
	}
	if failed != 0 {
		t.Errorf("with attempts=3, %d of 200 requests failed, want 0", failed)
	}
}

func TestWaypoint_RetriesOnConnectFailure(t *testing.T) {
	m := newMesh(t)
	m.addService("echo", vip)
	m.addEndpoint("echo", true, named("alive"))
	dead := m.addEndpoint("echo", true, named("dead"))
	dead.dead.Store(true) // hangs up before any response

	rule := &l7.HTTPRouteRule{BackendRefs: []*l7.BackendRef{ref("echo", 1)},
		Retry: &l7.Retry{Attempts: 2, Backoff: durationpb.New(time.Millisecond), RetryOnConnectFailure: true}}
	m.bind("echo", &l7.ServiceConfig{HttpRoutes: []*l7.HTTPRoute{{Namespace: "default", Name: "r", Rules: []*l7.HTTPRouteRule{rule}}}})
	c := m.client(false)
	for i := 0; i < 20; i++ {
		if code, body, _ := get(t, c, "/"); code != 200 || body != "alive" {
			t.Fatalf("request %d: %d %q", i, code, body)
		}
	}
}

func TestWaypoint_RateLimit10RPS(t *testing.T) {
	m := newMesh(t)
	m.addService("echo", vip)
	m.addEndpoint("echo", true, named("ok"))
	m.bind("echo", &l7.ServiceConfig{Resilience: &l7.ResiliencePolicy{Name: "tp", RateLimit: &l7.RateLimit{RequestsPerSecond: 10, Burst: 10}}})
	c := m.client(false)
	ok, limited := 0, 0
	start := time.Now()
	// A client sending 50 requests per second for 2 s.
	for i := 0; time.Since(start) < 2*time.Second; i++ {
		time.Sleep(time.Until(start.Add(time.Duration(i) * 20 * time.Millisecond)))
		code, _, h := get(t, c, "/")
		switch code {
		case 200:
			ok++
		case 429:
			limited++
			if h.Get("Retry-After") == "" {
				t.Fatal("429 without retry-after")
			}
		default:
			t.Fatalf("status %d", code)
		}
	}
	el := time.Since(start).Seconds()
	// Burst 10 plus 10/s.
	want := 10 + 10*el
	if float64(ok) > want+2 || float64(ok) < want-5 || limited == 0 {
		t.Errorf("in %.1fs: %d allowed (want ~%.0f), %d limited", el, ok, want, limited)
	}
	t.Logf("in %.2fs: %d allowed, %d answered 429", el, ok, limited)
}

func TestWaypoint_TimeoutCutsSlowBackend(t *testing.T) {
	m := newMesh(t)
	m.addService("echo", vip)
	release := make(chan struct{})
	defer close(release)
	m.addEndpoint("echo", true, func(w http.ResponseWriter, r *http.Request) {
		select {
		case <-release:
		case <-r.Context().Done():
		case <-time.After(5 * time.Second):
		}
	})
	m.bind("echo", &l7.ServiceConfig{HttpRoutes: []*l7.HTTPRoute{{Namespace: "default", Name: "r", Rules: []*l7.HTTPRouteRule{{
		BackendRefs: []*l7.BackendRef{ref("echo", 1)}, Timeouts: &l7.Timeouts{Request: durationpb.New(200 * time.Millisecond)},
	}}}}})
	start := time.Now()
	code, _, _ := get(t, m.client(false), "/")
	if el := time.Since(start); code != http.StatusGatewayTimeout || el > time.Second || el < 190*time.Millisecond {
		t.Errorf("slow backend: %d after %v, want 504 after ~200ms", code, el)
	}
}

func TestWaypoint_CircuitBreakerOpensAtLimit(t *testing.T) {
	m := newMesh(t)
	m.addService("echo", vip)
	release := make(chan struct{})
	var inBackend atomic.Int64
	m.addEndpoint("echo", true, func(w http.ResponseWriter, r *http.Request) {
		inBackend.Add(1)
		<-release
		io.WriteString(w, "done")
	})
	m.bind("echo", &l7.ServiceConfig{Resilience: &l7.ResiliencePolicy{CircuitBreaker: &l7.CircuitBreaker{MaxConnections: 2, MaxPendingRequests: 1}}})
	c := m.client(false)
	var wg sync.WaitGroup
	codes := make(chan int, 3)
	for i := 0; i < 3; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			code, _, _ := get(t, c, "/")
			codes <- code
		}()
	}
	waitFor(t, func() bool { return inBackend.Load() == 2 }, "two requests in the backend")
	time.Sleep(50 * time.Millisecond) // the third is now pending
	code, _, h := get(t, c, "/")
	if code != 503 || h.Get(circuit.OverloadHeader) != circuit.OverloadValue {
		t.Errorf("fourth request: %d %q, want 503 with %s: %s", code, h.Get(circuit.OverloadHeader), circuit.OverloadHeader, circuit.OverloadValue)
	}
	close(release)
	wg.Wait()
	close(codes)
	for code := range codes {
		if code != 200 {
			t.Errorf("admitted request got %d", code)
		}
	}
	if code, _, _ := get(t, c, "/"); code != 200 {
		t.Errorf("after the load went: %d", code)
	}
}

func TestWaypoint_FaultInjectionHitsConfiguredShare(t *testing.T) {
	m := newMesh(t)
	m.addService("echo", vip)
	m.addEndpoint("echo", true, named("ok"))
	m.bind("echo", &l7.ServiceConfig{Resilience: &l7.ResiliencePolicy{Fault: &l7.FaultInjection{
		Abort: &l7.FaultAbort{HttpStatus: 418, Percentage: 30},
		Delay: &l7.FaultDelay{FixedDelay: durationpb.New(20 * time.Millisecond), Percentage: 20},
	}}})
	c := m.client(false)
	const n = 400
	aborted, delayed := 0, 0
	for i := 0; i < n; i++ {
		start := time.Now()
		code, _, _ := get(t, c, "/")
		if code == 418 {
			aborted++
		} else if code != 200 {
			t.Fatalf("status %d", code)
		}
		if time.Since(start) >= 20*time.Millisecond {
			delayed++
		}
	}
	// Binomial(400, .3): sd 9.2; (400, .2): sd 8.
	if aborted < 120-30 || aborted > 120+30 || delayed < 80-26 || delayed > 80+30 {
		t.Errorf("aborted %d (want ~120), delayed %d (want ~80) of %d", aborted, delayed, n)
	}
	t.Logf("aborted %d, delayed %d of %d", aborted, delayed, n)
}

func TestWaypoint_L7DenyByPath(t *testing.T) {
	m := newMesh(t)
	m.addService("echo", vip)
	ep := m.addEndpoint("echo", true, named("ok"))
	m.bind("echo", &l7.ServiceConfig{AuthorizationPolicies: []*l7.AuthorizationPolicy{{
		Name: "deny-admin", Namespace: "default", Action: l7.AuthorizationPolicy_DENY,
		Rules: []*l7.AuthorizationRule{{To: []*l7.Operation{{Paths: []string{"/admin*"}}}}},
	}}})
	c := m.client(false)
	if code, _, _ := get(t, c, "/admin/users"); code != 403 {
		t.Errorf("/admin/users: %d, want 403", code)
	}
	if ep.hits.Load() != 0 {
		t.Error("a denied request reached the backend")
	}
	if code, _, _ := get(t, c, "/public"); code != 200 {
		t.Errorf("/public: %d, want 200", code)
	}
	logs := m.logs.String()
	if !strings.Contains(logs, `msg="request denied" src.identity=cluster.local/ns/default/sa/client src.addr=127.77.0.2:40000 dst.service=default/echo.default.svc.cluster.local policy=default/deny-admin rule=0`) {
		t.Errorf("deny not logged with who, what and which policy:\n%s", tail(logs, 10))
	}
}

func TestWaypoint_OutlierEjectsFailingEndpoint(t *testing.T) {
	m := newMesh(t)
	m.addService("echo", vip)
	m.addEndpoint("echo", true, named("good"))
	bad := m.addEndpoint("echo", true, func(w http.ResponseWriter, r *http.Request) { w.WriteHeader(500) })
	m.bind("echo", &l7.ServiceConfig{Resilience: &l7.ResiliencePolicy{OutlierDetection: &l7.OutlierDetection{
		Consecutive_5Xx: 3, BaseEjectionTime: durationpb.New(time.Minute), MaxEjectionPercent: 50}}})
	c := m.client(false)
	for i := 0; i < 40; i++ {
		get(t, c, "/")
	}
	if h := bad.hits.Load(); h != 3 {
		t.Errorf("failing endpoint got %d requests, want 3 then ejection", h)
	}
}

func TestWaypoint_BadInputKeepsServingOthers(t *testing.T) {
	m := newMesh(t)
	m.addService("echo", vip)
	m.addEndpoint("echo", true, named("ok"))
	m.bind("echo", &l7.ServiceConfig{Ports: nil})
	good := m.client(false)

	status := func(raw string) string {
		c := m.rawTunnel()
		defer c.Close()
		c.SetDeadline(time.Now().Add(3 * time.Second))
		io.WriteString(c, raw)
		line, err := bufio.NewReader(c).ReadString('\n')
		if err != nil {
			return "closed: " + err.Error()
		}
		return strings.TrimSpace(line)
	}
	if s := status("GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n"); !strings.HasPrefix(s, "HTTP/1.1 400") {
		t.Errorf("malformed header: %q", s)
	}
	if s := status("GET /\x00 HTTP/1.1\r\nHost: x\r\n\r\n"); !strings.HasPrefix(s, "HTTP/1.1 400") {
		t.Errorf("bad request line: %q", s)
	}
	huge := "GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + strings.Repeat("a", 200<<10) + "\r\n\r\n"
	if s := status(huge); !strings.HasPrefix(s, "HTTP/1.1 431") {
		t.Errorf("huge header: %q", s)
	}
	// Slowloris: a request line, then nothing; the connection is closed
	// after the read-header timeout while others are served meanwhile.
	slow := m.rawTunnel()
	defer slow.Close()
	io.WriteString(slow, "GET / HTTP/1.1\r\nHost: x\r\n")
	for i := 0; i < 5; i++ {
		if code, _, _ := get(t, good, "/"); code != 200 {
			t.Fatalf("a good client got %d while a slowloris holds a connection", code)
		}
	}
	slow.SetReadDeadline(time.Now().Add(3 * time.Second))
	start := time.Now()
	b, err := io.ReadAll(slow)
	if el := time.Since(start); el > 2*time.Second {
		t.Errorf("slowloris connection not closed after %v: %v", el, err)
	}
	if len(b) > 0 && !strings.HasPrefix(string(b), "HTTP/1.1 408") {
		t.Errorf("slowloris answered %q", b)
	}
	// Garbage that is not HTTP on an unspecified port: relayed as TCP to the
	// app, which answers 400 itself; the waypoint stays up.
	if code, _, _ := get(t, good, "/"); code != 200 {
		t.Errorf("after bad input: %d", code)
	}
}

func TestWaypoint_BadHTTP2InputClosesOnlyThatConnection(t *testing.T) {
	m := newMesh(t)
	m.addService("echo", vip)
	m.addEndpoint("echo", true, named("ok"))
	m.bind("echo", nil)
	good := m.client(true)
	// The preface, then frames that are not frames.
	c := m.rawTunnel()
	defer c.Close()
	c.SetDeadline(time.Now().Add(3 * time.Second))
	io.WriteString(c, "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
	c.Write([]byte{0xff, 0xff, 0xff, 0x01, 0x00, 0x00, 0x00, 0x00, 0x01, 'x', 'y', 'z'})
	start := time.Now()
	b, err := io.ReadAll(c) // the server's SETTINGS, then GOAWAY and close
	// x/net's server gives the client 1 s to read its GOAWAY before closing.
	if el := time.Since(start); el > 2*time.Second || !bytes.Contains(b, []byte{0x07}) {
		t.Errorf("a connection sending garbage frames was not closed (%v, %d bytes, %v)", el, len(b), err)
	}
	// Huge header block on h2: refused, the connection survives or closes,
	// the waypoint keeps serving.
	req, _ := http.NewRequest("GET", "http://echo"+domain+"/", nil)
	req.Header.Set("X-Big", strings.Repeat("a", 200<<10))
	if resp, err := good.Do(req); err == nil {
		resp.Body.Close()
		if resp.StatusCode < 400 {
			t.Errorf("a 200 KiB header over h2 got %d", resp.StatusCode)
		}
	}
	for i := 0; i < 5; i++ {
		if code, _, _ := get(t, m.client(true), "/"); code != 200 {
			t.Fatalf("after bad h2 input: %d", code)
		}
	}
}

func TestWaypoint_MaxOneRequestPerConnectionOpensATunnelEach(t *testing.T) {
	m := newMesh(t)
	m.addService("echo", vip)
	ep := m.addEndpoint("echo", true, named("ok"))
	m.bind("echo", nil)
	c := m.client(false)
	for i := 0; i < 10; i++ {
		get(t, c, "/")
	}
	if n := ep.tunnels.Load(); n != 1 {
		t.Fatalf("without a limit 10 requests used %d upstream tunnels, want 1 (reuse)", n)
	}
	m.bind("echo", &l7.ServiceConfig{Resilience: &l7.ResiliencePolicy{CircuitBreaker: &l7.CircuitBreaker{MaxRequestsPerConnection: 1}}})
	for i := 0; i < 10; i++ {
		if code, _, _ := get(t, c, "/"); code != 200 {
			t.Fatalf("status %d", code)
		}
	}
	if n := ep.tunnels.Load(); n != 11 {
		t.Errorf("with maxRequestsPerConnection 1, 10 requests used %d new tunnels, want 10", n-1)
	}
}

func TestWaypoint_MaxRequestsPerConnectionClosesAfterN(t *testing.T) {
	for _, h2 := range []bool{false, true} {
		name := "http1"
		if h2 {
			name = "h2c"
		}
		t.Run(name, func(t *testing.T) {
			m := newMesh(t)
			m.addService("echo", vip)
			var mu sync.Mutex
			perConn := map[string]int{} // upstream connection (as the app sees it) -> requests
			var wrongProto atomic.Int64
			ep := m.addEndpoint("echo", true, func(w http.ResponseWriter, r *http.Request) {
				if (r.ProtoMajor == 2) != h2 {
					wrongProto.Add(1)
				}
				mu.Lock()
				perConn[r.RemoteAddr]++
				mu.Unlock()
				if d := r.URL.Query().Get("sleep"); d != "" {
					dur, _ := time.ParseDuration(d)
					time.Sleep(dur)
				}
				io.WriteString(w, "ok")
			})
			m.bind("echo", &l7.ServiceConfig{Resilience: &l7.ResiliencePolicy{CircuitBreaker: &l7.CircuitBreaker{MaxRequestsPerConnection: 3}}})
			c := m.client(h2)
			for i := 0; i < 10; i++ {
				if code, _, _ := get(t, c, "/"); code != 200 {
					t.Fatalf("request %d: status %d", i, code)
				}
			}
			if n := ep.tunnels.Load(); n != 4 {
				t.Errorf("with maxRequestsPerConnection 3, 10 sequential requests used %d upstream tunnels, want 4", n)
			}
			mu.Lock()
			counts := slices.Sorted(maps.Values(perConn))
			mu.Unlock()
			if !slices.Equal(counts, []int{1, 3, 3, 3}) {
				t.Errorf("requests per upstream connection %v, want [1 3 3 3]", counts)
			}
			// The three full connections are closed; the fourth stays for reuse.
			waitFor(t, func() bool { return m.proxy.cfg.Tunnels.Stats().Tunnels == 1 }, "the used-up upstream tunnels to close")

			// Concurrent requests: no connection ever carries more than 3, and
			// the ones in flight when a connection is used up still finish.
			clear(perConn)
			var wg sync.WaitGroup
			var failed atomic.Int64
			for g := 0; g < 6; g++ {
				wg.Add(1)
				go func() {
					defer wg.Done()
					for i := 0; i < 10; i++ {
						req, _ := http.NewRequest("GET", "http://echo"+domain+"/?sleep=5ms", nil)
						resp, err := c.Do(req)
						if err != nil {
							failed.Add(1)
							continue
						}
						io.Copy(io.Discard, resp.Body)
						resp.Body.Close()
						if resp.StatusCode != 200 {
							failed.Add(1)
						}
					}
				}()
			}
			wg.Wait()
			if n := failed.Load(); n != 0 {
				t.Errorf("%d of 60 concurrent requests failed", n)
			}
			mu.Lock()
			total := 0
			for conn, n := range perConn {
				total += n
				if n > 3 {
					t.Errorf("upstream connection %s carried %d requests, want at most 3", conn, n)
				}
			}
			mu.Unlock()
			if total != 60 {
				t.Errorf("the app saw %d requests, want 60", total)
			}
			if n := wrongProto.Load(); n != 0 {
				t.Errorf("%d requests went upstream in the wrong HTTP version", n)
			}
			waitFor(t, func() bool { return m.proxy.cfg.Tunnels.Stats().Tunnels <= 6 }, "the used-up upstream tunnels to close")
		})
	}
}

func TestWaypoint_BufferedBodyIsSentOnTheFirstTry(t *testing.T) {
	m := newMesh(t)
	m.addService("echo", vip)
	m.addEndpoint("echo", true, func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		io.WriteString(w, "got:"+string(b))
	})
	// Retries make the waypoint keep the body for another try.
	rule := &l7.HTTPRouteRule{BackendRefs: []*l7.BackendRef{ref("echo", 1)},
		Retry: &l7.Retry{Attempts: 2, Codes: []uint32{503}, Backoff: durationpb.New(time.Millisecond)}}
	m.bind("echo", &l7.ServiceConfig{HttpRoutes: []*l7.HTTPRoute{{Namespace: "default", Name: "r", Rules: []*l7.HTTPRouteRule{rule}}}})
	for _, h2 := range []bool{false, true} {
		resp, err := m.client(h2).Post("http://echo"+domain+"/", "text/plain", strings.NewReader("hello"))
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 200 || string(b) != "got:hello" {
			t.Errorf("h2=%v: POST with a retry policy answered %d %q, want the body to reach the app", h2, resp.StatusCode, b)
		}
	}
}
