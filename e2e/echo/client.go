package echo

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
)

// ClientConfig is one run of the client.
type ClientConfig struct {
	// URL is http://host:port/path (HTTP/1.1), h2c://host:port/path (HTTP/2
	// without TLS, prior knowledge), grpc://host:port or tcp://host:port.
	URL      string
	Count    int           // requests (at least 1)
	Interval time.Duration // between requests
	Timeout  time.Duration // per request
	// Headers are "Name: value" (HTTP headers, gRPC metadata).
	Headers []string
	Method  string // HTTP method, default GET (POST with a body)
	// Body is the HTTP request body, or the message for tcp and grpc
	// (default "hello").
	Body string
	// ExpectStatus is the HTTP status that counts as success; 0 means any
	// 2xx.
	ExpectStatus int
	// NewConnPerRequest opens a new connection for each request, so an L4
	// balancer sees every request.
	NewConnPerRequest bool
	// Out receives the results as text (nil: discard).
	Out io.Writer
}

// Result is the outcome of one request.
type Result struct {
	Index    int
	OK       bool
	Status   string // "200 OK", "OK" (gRPC), "echoed 5 bytes" (tcp)
	Code     int    // HTTP status code
	Fields   Fields // the server's answer (http, grpc)
	Err      error
	Duration time.Duration
}

// ErrFailed is returned when some request did not succeed.
var ErrFailed = errors.New("requests failed")

// RunClient sends the requests one after another and reports each. It
// returns an error wrapping ErrFailed when any failed.
func RunClient(ctx context.Context, cfg ClientConfig) ([]Result, error) {
	if cfg.Count <= 0 {
		cfg.Count = 1
	}
	if cfg.Timeout <= 0 {
		cfg.Timeout = 5 * time.Second
	}
	out := cfg.Out
	if out == nil {
		out = io.Discard
	}
	u, err := url.Parse(cfg.URL)
	if err != nil || u.Host == "" {
		return nil, fmt.Errorf("bad URL %q: want http://, h2c://, grpc:// or tcp://host:port", cfg.URL)
	}
	headers := http.Header{}
	for _, h := range cfg.Headers {
		k, v, ok := strings.Cut(h, ":")
		if !ok || strings.TrimSpace(k) == "" {
			return nil, fmt.Errorf("bad header %q: want \"Name: value\"", h)
		}
		headers.Add(strings.TrimSpace(k), strings.TrimSpace(v))
	}
	var do func(ctx context.Context) Result
	var cleanup func()
	switch u.Scheme {
	case "http", "h2c":
		do, cleanup = httpRequester(cfg, u, headers)
	case "grpc":
		do, cleanup, err = grpcRequester(cfg, u, headers)
	case "tcp":
		do, cleanup = tcpRequester(cfg, u)
	default:
		return nil, fmt.Errorf("unsupported scheme %q: want http, h2c, grpc or tcp", u.Scheme)
	}
	if err != nil {
		return nil, err
	}
	defer cleanup()

	var results []Result
	failed := 0
	for i := 0; i < cfg.Count; i++ {
		if i > 0 && cfg.Interval > 0 {
			select {
			case <-time.After(cfg.Interval):
			case <-ctx.Done():
				return results, ctx.Err()
			}
		}
		rctx, cancel := context.WithTimeout(ctx, cfg.Timeout)
		start := time.Now()
		res := do(rctx)
		cancel()
		res.Index, res.Duration = i, time.Since(start)
		if !res.OK {
			failed++
		}
		printResult(out, res)
		results = append(results, res)
	}
	fmt.Fprintf(out, "%d/%d requests ok\n", cfg.Count-failed, cfg.Count)
	if failed > 0 {
		return results, fmt.Errorf("%d of %d %w", failed, cfg.Count, ErrFailed)
	}
	return results, nil
}

func printResult(w io.Writer, r Result) {
	if r.Err != nil {
		fmt.Fprintf(w, "[%d] error: %v\n", r.Index, r.Err)
		return
	}
	fmt.Fprintf(w, "[%d] %s (%s)\n", r.Index, r.Status, r.Duration.Round(time.Microsecond))
	for _, k := range []string{FieldPod, FieldNamespace, FieldPodIP, FieldNode, FieldVersion, FieldProtocol, FieldPeer} {
		if v := r.Fields.Get(k); v != "" {
			fmt.Fprintf(w, "[%d] %s=%s\n", r.Index, k, v)
		}
	}
}

func httpRequester(cfg ClientConfig, u *url.URL, headers http.Header) (func(context.Context) Result, func()) {
	tr := &http.Transport{DisableKeepAlives: cfg.NewConnPerRequest, Proxy: nil}
	target := *u
	if u.Scheme == "h2c" {
		var p http.Protocols
		p.SetUnencryptedHTTP2(true)
		tr.Protocols = &p
		target.Scheme = "http"
	}
	client := &http.Client{Transport: tr}
	method := cfg.Method
	if method == "" {
		method = http.MethodGet
		if cfg.Body != "" {
			method = http.MethodPost
		}
	}
	do := func(ctx context.Context) Result {
		var body io.Reader
		if cfg.Body != "" {
			body = strings.NewReader(cfg.Body)
		}
		req, err := http.NewRequestWithContext(ctx, method, target.String(), body)
		if err != nil {
			return Result{Err: err}
		}
		for k, vs := range headers {
			for _, v := range vs {
				if strings.EqualFold(k, "Host") {
					req.Host = v
					continue
				}
				req.Header.Add(k, v)
			}
		}
		resp, err := client.Do(req)
		if err != nil {
			return Result{Err: err}
		}
		defer resp.Body.Close()
		b, err := io.ReadAll(io.LimitReader(resp.Body, maxResponse+1<<20))
		if err != nil {
			return Result{Err: fmt.Errorf("read response: %w", err), Status: resp.Status, Code: resp.StatusCode}
		}
		ok := resp.StatusCode >= 200 && resp.StatusCode < 300
		if cfg.ExpectStatus != 0 {
			ok = resp.StatusCode == cfg.ExpectStatus
		}
		return Result{OK: ok, Status: resp.Status, Code: resp.StatusCode, Fields: ParseFields(string(b))}
	}
	return do, tr.CloseIdleConnections
}

func grpcRequester(cfg ClientConfig, u *url.URL, headers http.Header) (func(context.Context) Result, func(), error) {
	dial := func() (*grpc.ClientConn, error) {
		return grpc.NewClient("passthrough:///"+u.Host, grpc.WithTransportCredentials(insecure.NewCredentials()))
	}
	var shared *grpc.ClientConn
	if !cfg.NewConnPerRequest {
		c, err := dial()
		if err != nil {
			return nil, nil, fmt.Errorf("grpc client for %s: %w", u.Host, err)
		}
		shared = c
	}
	msg := cfg.Body
	if msg == "" {
		msg = "hello"
	}
	md := metadata.MD{}
	for k, vs := range headers {
		md[strings.ToLower(k)] = vs
	}
	do := func(ctx context.Context) Result {
		conn := shared
		if conn == nil {
			c, err := dial()
			if err != nil {
				return Result{Err: err}
			}
			defer c.Close()
			conn = c
		}
		ans, err := callEcho(metadata.NewOutgoingContext(ctx, md), conn, msg)
		if err != nil {
			return Result{Err: err}
		}
		f := ParseFields(ans)
		if got := f.Get(FieldMessage); got != msg {
			return Result{Err: fmt.Errorf("echoed message %q, sent %q", got, msg), Fields: f}
		}
		return Result{OK: true, Status: "OK", Fields: f}
	}
	cleanup := func() {
		if shared != nil {
			shared.Close()
		}
	}
	return do, cleanup, nil
}

func tcpRequester(cfg ClientConfig, u *url.URL) (func(context.Context) Result, func()) {
	msg := cfg.Body
	if msg == "" {
		msg = "hello"
	}
	do := func(ctx context.Context) Result {
		var d net.Dialer
		c, err := d.DialContext(ctx, "tcp", u.Host)
		if err != nil {
			return Result{Err: err}
		}
		defer c.Close()
		if dl, ok := ctx.Deadline(); ok {
			_ = c.SetDeadline(dl)
		}
		if _, err := io.WriteString(c, msg); err != nil {
			return Result{Err: fmt.Errorf("write: %w", err)}
		}
		if tc, ok := c.(*net.TCPConn); ok {
			_ = tc.CloseWrite()
		}
		got, err := io.ReadAll(io.LimitReader(c, int64(len(msg))+1))
		if err != nil {
			return Result{Err: fmt.Errorf("read: %w", err)}
		}
		if !bytes.Equal(got, []byte(msg)) {
			return Result{Err: fmt.Errorf("echo mismatch: sent %d bytes, got %q", len(msg), truncateString(string(got), 64))}
		}
		return Result{OK: true, Status: fmt.Sprintf("echoed %d bytes (%s -> %s)", len(got), c.LocalAddr(), c.RemoteAddr())}
	}
	return do, func() {}
}

func truncateString(s string, n int) string {
	if len(s) > n {
		return s[:n] + "..."
	}
	return s
}

func splitHostPort(hp string) (string, string, error) { return net.SplitHostPort(hp) }
