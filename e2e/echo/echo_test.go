package echo

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
)

func startServer(t *testing.T) *Server {
	t.Helper()
	s, err := NewServer(ServerConfig{
		Host: "127.0.0.1", HTTPPorts: []int{0}, GRPCPorts: []int{0}, TCPPorts: []int{0},
		Identity: Identity{Pod: "echo-1", Namespace: "demo", PodIP: "10.244.0.9", Node: "node-0", Version: "v2"},
		Log:      slog.New(slog.NewTextHandler(io.Discard, nil)),
	})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("server: %v", err)
			}
		case <-time.After(10 * time.Second):
			t.Error("server did not stop")
		}
	})
	return s
}

func run(t *testing.T, cfg ClientConfig) ([]Result, string, error) {
	t.Helper()
	var out bytes.Buffer
	cfg.Out = &out
	res, err := RunClient(context.Background(), cfg)
	return res, out.String(), err
}

func TestHTTP1_EchoesRequestIdentityAndPeer(t *testing.T) {
	s := startServer(t)
	addr := s.Addrs("http")[0]
	res, out, err := run(t, ClientConfig{
		URL: "http://" + addr + "/hello?x=1", Count: 2, Body: "line1\nline2",
		Headers: []string{"X-Test: a", "Host: echo.demo.svc"},
	})
	if err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	f := res[0].Fields
	checks := map[string]string{
		FieldProtocol: "HTTP/1.1", FieldMethod: "POST", FieldURL: "/hello?x=1", FieldHost: "echo.demo.svc",
		FieldPod: "echo-1", FieldNamespace: "demo", FieldPodIP: "10.244.0.9", FieldNode: "node-0", FieldVersion: "v2",
		FieldBody: "line1\nline2",
	}
	for k, want := range checks {
		if got := f.Get(k); got != want {
			t.Errorf("%s = %q, want %q", k, got, want)
		}
	}
	if f.Header("x-test") != "a" {
		t.Errorf("request header not echoed: %v", f[FieldRequestHeader])
	}
	if peer := f.Get(FieldPeer); !strings.HasPrefix(peer, "127.0.0.1:") {
		t.Errorf("peer %q", peer)
	}
	if !strings.Contains(out, "2/2 requests ok") || !strings.Contains(out, "[1] Pod=echo-1") {
		t.Errorf("client output:\n%s", out)
	}
}

func TestH2C_SamePortSpeaksHTTP2(t *testing.T) {
	s := startServer(t)
	res, out, err := run(t, ClientConfig{URL: "h2c://" + s.Addrs("http")[0] + "/"})
	if err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	if p := res[0].Fields.Get(FieldProtocol); p != "HTTP/2.0" {
		t.Fatalf("proto %q", p)
	}
}

func TestGRPC_OnGRPCPortAndHTTPPort(t *testing.T) {
	s := startServer(t)
	for _, addr := range []string{s.Addrs("grpc")[0], s.Addrs("http")[0]} {
		res, out, err := run(t, ClientConfig{URL: "grpc://" + addr, Body: "ping", Headers: []string{"X-Trace: 7"}, Count: 2})
		if err != nil {
			t.Fatalf("%s: %v\n%s", addr, err, out)
		}
		f := res[1].Fields
		if f.Get(FieldProtocol) != "GRPC" || f.Get(FieldMessage) != "ping" || f.Get(FieldPod) != "echo-1" || f.Header("x-trace") != "7" {
			t.Errorf("%s: fields %v", addr, f)
		}
	}
	conn, err := grpc.NewClient("passthrough:///"+s.Addrs("grpc")[0], grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	hr, err := healthpb.NewHealthClient(conn).Check(context.Background(), &healthpb.HealthCheckRequest{Service: echoService})
	if err != nil || hr.Status != healthpb.HealthCheckResponse_SERVING {
		t.Fatalf("health: %v %v", hr, err)
	}
}

func TestTCP_EchoesBytes(t *testing.T) {
	s := startServer(t)
	res, out, err := run(t, ClientConfig{URL: "tcp://" + s.Addrs("tcp")[0], Body: strings.Repeat("abc", 10000), Count: 3, NewConnPerRequest: true})
	if err != nil || len(res) != 3 || !strings.Contains(res[0].Status, "echoed 30000 bytes") {
		t.Fatalf("%v\n%s", err, out)
	}
}

func TestHTTP1_UpgradeAnswers101ThenEchoesBytes(t *testing.T) {
	s := startServer(t)
	c, err := net.Dial("tcp", s.Addrs("http")[0])
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.WriteString(c, "GET /ws HTTP/1.1\r\nHost: echo\r\nConnection: keep-alive, Upgrade\r\nUpgrade: websocket\r\n\r\nearly"); err != nil {
		t.Fatal(err)
	}
	br := bufio.NewReader(c)
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatal(err)
	}
	if resp.StatusCode != http.StatusSwitchingProtocols || resp.Header.Get("Upgrade") != "websocket" || resp.Header.Get("X-Echo-Pod") != "echo-1" {
		t.Fatalf("answer %d %v", resp.StatusCode, resp.Header)
	}
	if _, err := io.WriteString(c, " and late"); err != nil {
		t.Fatal(err)
	}
	c.(*net.TCPConn).CloseWrite()
	got, err := io.ReadAll(br)
	if err != nil || string(got) != "early and late" {
		t.Fatalf("echoed %q, %v; want the bytes sent behind the request and after the 101, then EOF", got, err)
	}
	// A plain request on the same port is still answered as before.
	res, out, err := run(t, ClientConfig{URL: "http://" + s.Addrs("http")[0] + "/"})
	if err != nil || len(res) != 1 || res[0].Fields.Get(FieldPod) != "echo-1" {
		t.Fatalf("plain request after an upgrade: %v\n%s", err, out)
	}
}

func TestHTTP_StatusDelaySizeAndHeaders(t *testing.T) {
	s := startServer(t)
	base := "http://" + s.Addrs("http")[0]
	// A 503 fails by default and succeeds when expected.
	_, _, err := run(t, ClientConfig{URL: base + "/?status=503"})
	if !errors.Is(err, ErrFailed) {
		t.Fatalf("503 counted as success: %v", err)
	}
	res, _, err := run(t, ClientConfig{URL: base + "/?status=503", ExpectStatus: 503})
	if err != nil || res[0].Code != 503 {
		t.Fatalf("expected 503: %v %+v", err, res)
	}
	// The per-request timeout bounds a delayed answer.
	_, out, err := run(t, ClientConfig{URL: base + "/?delay=2s", Timeout: 200 * time.Millisecond})
	if !errors.Is(err, ErrFailed) || !strings.Contains(out, "error:") {
		t.Fatalf("delay beyond timeout: %v\n%s", err, out)
	}
	resp, err := http.Get(base + "/?size=1000&header=X-Out:yes")
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.Header.Get("X-Out") != "yes" || !strings.Contains(string(b), "Payload="+strings.Repeat("x", 1000)+"\n") {
		t.Fatalf("size/header: %v %d bytes", resp.Header, len(b))
	}
	for _, bad := range []string{"/?status=99", "/?delay=forever", "/?size=-1", "/?header=nocolon"} {
		resp, err := http.Get(base + bad)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != 400 {
			t.Errorf("%s: %d, want 400", bad, resp.StatusCode)
		}
	}
}

func TestRunClient_Errors(t *testing.T) {
	ln, _ := net.Listen("tcp", "127.0.0.1:0")
	closed := ln.Addr().String()
	ln.Close()
	for _, u := range []string{"http://" + closed + "/", "tcp://" + closed, "grpc://" + closed} {
		res, _, err := run(t, ClientConfig{URL: u, Timeout: time.Second})
		if !errors.Is(err, ErrFailed) || len(res) != 1 || res[0].OK {
			t.Errorf("%s: %v %+v", u, err, res)
		}
	}
	for _, u := range []string{"ftp://x:1", "not a url", "http://"} {
		if _, _, err := run(t, ClientConfig{URL: u}); err == nil || errors.Is(err, ErrFailed) {
			t.Errorf("%q: want a usage error, got %v", u, err)
		}
	}
	if _, _, err := run(t, ClientConfig{URL: "http://127.0.0.1:1/", Headers: []string{"bad"}}); err == nil {
		t.Error("bad header accepted")
	}
}

func TestNewServer_RejectsBadPortsAndNoPorts(t *testing.T) {
	if _, err := NewServer(ServerConfig{HTTPPorts: []int{70000}}); err == nil {
		t.Error("port 70000 accepted")
	}
	if _, err := NewServer(ServerConfig{}); err == nil {
		t.Error("no ports accepted")
	}
}

func TestParseFields(t *testing.T) {
	f := ParseFields("Pod=a\nRequestHeader=X: 1\nRequestHeader=Y: 2\nnoise\n=skip\nBody=multi\nline=body\n")
	if f.Get(FieldPod) != "a" || len(f[FieldRequestHeader]) != 2 || f.Header("y") != "2" || f.Get(FieldBody) != "multi\nline=body\n" {
		t.Fatalf("%v", f)
	}
	if _, ok := f["line"]; ok {
		t.Fatal("body content parsed as a field")
	}
	var w fieldWriter
	w.add("K", "a\nb")
	if got := ParseFields(w.String()).Get("K"); got != `a\nb` {
		t.Fatalf("newline in a value must stay in its line: %q", got)
	}
}

func FuzzParseFields(f *testing.F) {
	f.Add("Pod=a\nBody=x\ny")
	f.Add("Body=")
	f.Add("=\n==\nk=v=w")
	f.Fuzz(func(t *testing.T, s string) {
		fs := ParseFields(s)
		for k, vs := range fs {
			if k == "" || strings.Contains(k, "\n") {
				t.Fatalf("bad key %q", k)
			}
			if k != FieldBody {
				for _, v := range vs {
					if strings.Contains(v, "\n") {
						t.Fatalf("value with newline %q", v)
					}
				}
			}
		}
	})
}
