package kubelet

import (
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	v1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
)

type probeKind string

const (
	readinessProbe probeKind = "readiness"
	livenessProbe  probeKind = "liveness"
	startupProbe   probeKind = "startup"
)

// probeTracker turns probe outcomes into a result by the probe's thresholds.
// Readiness starts false, liveness true, startup false ("not started yet").
type probeTracker struct {
	kind             probeKind
	successThreshold int32
	failureThreshold int32
	successes        int32
	failures         int32
	result           bool
}

func newProbeTracker(kind probeKind, p *v1.Probe) *probeTracker {
	t := &probeTracker{kind: kind, successThreshold: p.SuccessThreshold, failureThreshold: p.FailureThreshold}
	if t.successThreshold <= 0 || kind != readinessProbe {
		// Liveness and startup probes must use 1 (API validation).
		t.successThreshold = 1
	}
	if t.failureThreshold <= 0 {
		t.failureThreshold = 3
	}
	t.result = kind == livenessProbe
	return t
}

// probeVerdict is what one observation means for the container.
type probeVerdict struct {
	result  bool // ready / alive / started
	changed bool
	kill    bool // liveness failed, or startup failed before success
}

func (t *probeTracker) observe(ok bool) probeVerdict {
	before := t.result
	if ok {
		t.failures = 0
		t.successes++
		if t.successes >= t.successThreshold {
			t.result = true
		}
		return probeVerdict{result: t.result, changed: t.result != before}
	}
	t.successes = 0
	t.failures++
	var kill bool
	if t.failures >= t.failureThreshold {
		switch t.kind {
		case readinessProbe:
			t.result = false
		case livenessProbe:
			// The container is restarted; count afresh for the next one.
			kill = true
			t.failures = 0
		case startupProbe:
			kill = !t.result
			t.failures = 0
		}
	}
	return probeVerdict{result: t.result, changed: t.result != before, kill: kill}
}

func probePeriod(p *v1.Probe) time.Duration {
	if p.PeriodSeconds <= 0 {
		return 10 * time.Second
	}
	return time.Duration(p.PeriodSeconds) * time.Second
}

func probeTimeout(p *v1.Probe) time.Duration {
	if p.TimeoutSeconds <= 0 {
		return time.Second
	}
	return time.Duration(p.TimeoutSeconds) * time.Second
}

// probeTarget is where a probe goes: the pod IP, seen from the node (as a
// kubelet probes), named ports of the container, and a way to exec in it.
type probeTarget struct {
	host  string
	ports []v1.ContainerPort
	exec  func(ctx context.Context, cmd []string) (exitCode int, out []byte, err error)
}

func resolvePort(p intstr.IntOrString, ports []v1.ContainerPort) (int, error) {
	if p.Type == intstr.Int {
		if p.IntVal <= 0 || p.IntVal > 65535 {
			return 0, fmt.Errorf("invalid port %d", p.IntVal)
		}
		return int(p.IntVal), nil
	}
	for _, cp := range ports {
		if cp.Name == p.StrVal {
			return int(cp.ContainerPort), nil
		}
	}
	if n, err := strconv.Atoi(p.StrVal); err == nil && n > 0 && n <= 65535 {
		return n, nil
	}
	return 0, fmt.Errorf("no container port named %q", p.StrVal)
}

// runProbe runs one probe attempt. msg says why it failed.
func runProbe(ctx context.Context, p *v1.Probe, t probeTarget) (ok bool, msg string) {
	ctx, cancel := context.WithTimeout(ctx, probeTimeout(p))
	defer cancel()
	switch {
	case p.HTTPGet != nil:
		return probeHTTP(ctx, p.HTTPGet, t)
	case p.TCPSocket != nil:
		host := p.TCPSocket.Host
		if host == "" {
			host = t.host
		}
		port, err := resolvePort(p.TCPSocket.Port, t.ports)
		if err != nil {
			return false, err.Error()
		}
		var d net.Dialer
		c, err := d.DialContext(ctx, "tcp", net.JoinHostPort(host, strconv.Itoa(port)))
		if err != nil {
			return false, fmt.Sprintf("dial tcp %s:%d: %v", host, port, err)
		}
		c.Close()
		return true, ""
	case p.Exec != nil:
		if t.exec == nil {
			return false, "exec probes are not available"
		}
		code, out, err := t.exec(ctx, p.Exec.Command)
		if err != nil {
			return false, fmt.Sprintf("exec %v: %v", p.Exec.Command, err)
		}
		if code != 0 {
			return false, fmt.Sprintf("exec %v: exit code %d: %s", p.Exec.Command, code, truncate(out, 256))
		}
		return true, ""
	case p.GRPC != nil:
		return probeGRPC(ctx, p.GRPC, t.host)
	}
	return false, "probe has no handler"
}

func probeHTTP(ctx context.Context, g *v1.HTTPGetAction, t probeTarget) (bool, string) {
	host := g.Host
	if host == "" {
		host = t.host
	}
	port, err := resolvePort(g.Port, t.ports)
	if err != nil {
		return false, err.Error()
	}
	scheme := "http"
	if g.Scheme == v1.URISchemeHTTPS {
		scheme = "https"
	}
	u := &url.URL{Scheme: scheme, Host: net.JoinHostPort(host, strconv.Itoa(port))}
	path := g.Path
	if path == "" {
		path = "/"
	}
	ref, err := url.Parse(path)
	if err != nil {
		return false, fmt.Sprintf("bad probe path %q: %v", path, err)
	}
	u = u.ResolveReference(ref)
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u.String(), nil)
	if err != nil {
		return false, err.Error()
	}
	req.Header.Set("User-Agent", "kube-probe/1.34")
	req.Header.Set("Accept", "*/*")
	for _, h := range g.HTTPHeaders {
		if http.CanonicalHeaderKey(h.Name) == "Host" {
			req.Host = h.Value
			continue
		}
		req.Header.Add(h.Name, h.Value)
	}
	client := &http.Client{
		Transport: &http.Transport{
			// A probe trusts nothing and verifies nothing, as a kubelet's.
			TLSClientConfig:   &tls.Config{InsecureSkipVerify: true}, //nolint:gosec // probe semantics
			DisableKeepAlives: true,
			Proxy:             nil,
		},
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
	}
	resp, err := client.Do(req)
	if err != nil {
		return false, fmt.Sprintf("GET %s: %v", u, err)
	}
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 10<<10))
	resp.Body.Close()
	if resp.StatusCode >= 200 && resp.StatusCode < 400 {
		return true, ""
	}
	return false, fmt.Sprintf("GET %s: HTTP %d: %s", u, resp.StatusCode, truncate(body, 256))
}

func probeGRPC(ctx context.Context, g *v1.GRPCAction, host string) (bool, string) {
	addr := net.JoinHostPort(host, strconv.Itoa(int(g.Port)))
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return false, fmt.Sprintf("grpc %s: %v", addr, err)
	}
	defer conn.Close()
	svc := ""
	if g.Service != nil {
		svc = *g.Service
	}
	resp, err := healthpb.NewHealthClient(conn).Check(ctx, &healthpb.HealthCheckRequest{Service: svc})
	if err != nil {
		return false, fmt.Sprintf("grpc health %s: %v", addr, err)
	}
	if resp.GetStatus() != healthpb.HealthCheckResponse_SERVING {
		return false, fmt.Sprintf("grpc health %s: %s", addr, resp.GetStatus())
	}
	return true, ""
}

func truncate(b []byte, n int) string {
	if len(b) > n {
		return string(b[:n]) + "..."
	}
	return string(b)
}
