// Package l7 is the l7 scenario: HTTP/1.1 from a client pod on node 0 to
// an nginx backend in a server pod on node 1, straight, through an nginx
// reverse proxy, through haproxy, and through meshlite's waypoint (HBONE
// in and out) when one can be deployed: wrk at full speed, fortio at a
// fixed 1000 qps, and the proxy's CPU and memory.
package l7

import (
	"context"
	"fmt"
	"log/slog"
	"math"
	"net"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/meshlite/meshlite/bench/load"
	"github.com/meshlite/meshlite/bench/measure"
	"github.com/meshlite/meshlite/bench/meshenv"
	"github.com/meshlite/meshlite/bench/peers"
	"github.com/meshlite/meshlite/bench/plot"
	"github.com/meshlite/meshlite/bench/profile"
	"github.com/meshlite/meshlite/bench/report"
)

// Name is the scenario's name for `make bench SCENARIO=...`.
const Name = "l7"

// Options set the runs' lengths.
type Options struct {
	WrkDuration  time.Duration
	LoadDuration time.Duration
	Log          *slog.Logger
	Env          *meshenv.Shared
	// WaypointWait bounds the wait for the waypoint pod.
	WaypointWait time.Duration
	// ProfileDir keeps CPU profiles of the waypoint and the ztunnels during
	// the waypoint's wrk run (a temp dir otherwise).
	ProfileDir string
}

// Scenario returns the scenario for the bench runner.
func Scenario(o Options) report.Scenario {
	return report.Scenario{Name: Name, Run: func(ctx context.Context) (report.Result, error) { return run(ctx, o) }}
}

const (
	backendPort  = 8090
	nginxPort    = 8091
	haproxyPort  = 8092
	wrkConns     = 50
	fixedQPS     = 1000
	workers      = 2
	waypointName = "waypoint"
	serviceName  = "bench-backend"
)

// Row is one path's figures.
type Row struct {
	Name string
	URL  string
	// netns the client runs in; proxy is the proxy's process (nil: none).
	netns   string
	proxy   func() ([]int, error)
	Wrk     measure.Wrk
	Fixed   measure.Fortio
	CPU     float64 // proxy vCPU during the wrk run
	PeakRSS uint64  // proxy VmHWM after the runs
	Err     error   // the row could not run: "not available"
	// Config says what was configured on the path beyond the defaults.
	Config string
	// profile names the processes to profile during the wrk run.
	profile    []profile.Target
	profileDir string
	Profiles   []profile.Summary
}

func run(ctx context.Context, o Options) (report.Result, error) {
	e, err := o.Env.Get(ctx)
	if err != nil {
		return report.Result{}, err
	}
	if err := e.SetTunnel(ctx, meshenv.TunnelH2, false); err != nil {
		return report.Result{}, err
	}
	plainSrv, err := e.Netns(ctx, meshenv.PlainNS, meshenv.Server)
	if err != nil {
		return report.Result{}, err
	}
	plainCli, err := e.Netns(ctx, meshenv.PlainNS, meshenv.Client)
	if err != nil {
		return report.Result{}, err
	}
	dir, err := e.TempDir("l7")
	if err != nil {
		return report.Result{}, err
	}
	startNginx := func(netns, name, conf string) (*meshenv.Proc, error) {
		d := filepath.Join(dir, name)
		if err := os.MkdirAll(d, 0o755); err != nil {
			return nil, err
		}
		path := filepath.Join(d, "nginx.conf")
		if err := os.WriteFile(path, []byte(conf), 0o644); err != nil {
			return nil, err
		}
		// -e: its log goes to stderr from the start, not to a file under
		// the prefix (which does not exist).
		return e.Start(netns, name, "nginx", "-e", "stderr", "-c", path, "-p", d)
	}
	backend, err := startNginx(plainSrv, "backend", peers.NginxBackendConfig(filepath.Join(dir, "backend"), fmt.Sprintf("0.0.0.0:%d", backendPort), workers))
	if err != nil {
		return report.Result{}, err
	}
	defer backend.Stop()
	proxy, err := startNginx(plainSrv, "nginx-proxy", peers.NginxProxyConfig(filepath.Join(dir, "nginx-proxy"), fmt.Sprintf("0.0.0.0:%d", nginxPort), fmt.Sprintf("127.0.0.1:%d", backendPort), workers))
	if err != nil {
		return report.Result{}, err
	}
	defer proxy.Stop()
	hcfg := filepath.Join(dir, "haproxy-http.cfg")
	if err := os.WriteFile(hcfg, []byte(peers.HAProxyHTTPConfig(fmt.Sprintf("0.0.0.0:%d", haproxyPort), fmt.Sprintf("127.0.0.1:%d", backendPort), workers)), 0o644); err != nil {
		return report.Result{}, err
	}
	hap, err := e.Start(plainSrv, "haproxy-http", "haproxy", "-db", "-f", hcfg)
	if err != nil {
		return report.Result{}, err
	}
	defer hap.Stop()
	for port, p := range map[int]*meshenv.Proc{backendPort: backend, nginxPort: proxy, haproxyPort: hap} {
		if err := e.WaitListening(ctx, plainSrv, fmt.Sprintf("127.0.0.1:%d", port), p); err != nil {
			return report.Result{}, err
		}
	}
	ip := e.PodIP(meshenv.PlainNS, meshenv.Server)
	url := func(port int) string { return "http://" + net.JoinHostPort(ip, fmt.Sprint(port)) + "/" }
	pidsOf := func(p *meshenv.Proc) func() ([]int, error) {
		return func() ([]int, error) { return []int{p.Pid()}, nil }
	}
	rows := []*Row{
		{Name: "no mesh (nginx backend direct)", URL: url(backendPort), netns: plainCli},
		{Name: "nginx " + ver("nginx", "-v") + " reverse proxy", URL: url(nginxPort), netns: plainCli, proxy: pidsOf(proxy)},
		{Name: "haproxy " + ver("haproxy", "-v") + " HTTP proxy", URL: url(haproxyPort), netns: plainCli, proxy: pidsOf(hap)},
	}
	for _, r := range rows {
		measureRow(ctx, e, o, r)
		if r.Err != nil {
			return report.Result{}, fmt.Errorf("%s: %w", r.Name, r.Err)
		}
	}
	wp := waypointRow(ctx, e, o, dir, startNginx)
	rows = append(rows, wp)
	return result(o, rows), nil
}

// measureRow runs wrk (max req/s, with the proxy's CPU meanwhile) and then
// fortio at a fixed 1000 qps.
func measureRow(ctx context.Context, e *meshenv.Env, o Options, r *Row) {
	var pids []int
	var before meshenv.Usage
	if r.proxy != nil {
		if pids, r.Err = r.proxy(); r.Err != nil {
			return
		}
		if before, r.Err = meshenv.ReadUsage(pids...); r.Err != nil {
			return
		}
	}
	var prof *profile.Capture
	if len(r.profile) > 0 {
		prof = profile.StartTargets(ctx, r.profile, r.profileDir, Name+"-"+shortName(r.Name), o.WrkDuration)
	}
	start := time.Now()
	r.Wrk, r.Err = load.Wrk(ctx, e, r.netns, r.URL, wrkConns, o.WrkDuration)
	if prof != nil {
		r.Profiles = prof.Wait()
	}
	if r.Err != nil {
		return
	}
	if r.proxy != nil {
		after, err := meshenv.ReadUsage(pids...)
		if err != nil {
			r.Err = err
			return
		}
		r.CPU = float64(after.CPUTicks-before.CPUTicks) / meshenv.ClockTicks / time.Since(start).Seconds()
	}
	if r.Fixed, r.Err = load.Fortio(ctx, e, r.netns, r.URL, load.Fixed{QPS: fixedQPS, Connections: 4, Duration: o.LoadDuration}); r.Err != nil {
		return
	}
	if r.proxy != nil {
		u, err := meshenv.ReadUsage(pids...)
		if err != nil {
			r.Err = err
			return
		}
		r.PeakRSS = u.PeakRSS
	}
	o.Log.Info("measured", "scenario", Name, "row", r.Name, "req/s", fmt.Sprintf("%.0f", r.Wrk.RequestsPerSec), "p99", r.Fixed.P99, "cpu", fmt.Sprintf("%.2f", r.CPU))
}

// waypointRow deploys a waypoint for the enrolled namespace (a Gateway of
// class istio-waypoint, which istiod-lite turns into a waypoint pod),
// binds the namespace to it and measures client -> Service VIP -> ztunnel
// -> waypoint -> ztunnel -> nginx backend. Anything missing makes the row
// "not available" with the reason; it never invents figures.
func waypointRow(ctx context.Context, e *meshenv.Env, o Options, dir string, startNginx func(netns, name, conf string) (*meshenv.Proc, error)) *Row {
	r := &Row{Name: "meshlite waypoint (HBONE in and out)"}
	if _, err := os.Stat(filepath.Join(e.Repo, "bin", "waypoint")); err != nil {
		r.Err = fmt.Errorf("bin/waypoint is not built")
		return r
	}
	srv, err := e.Netns(ctx, meshenv.MeshNS, meshenv.Server)
	if err == nil {
		r.netns, err = e.Netns(ctx, meshenv.MeshNS, meshenv.Client)
	}
	if err != nil {
		r.Err = err
		return r
	}
	backend, err := startNginx(srv, "mesh-backend", peers.NginxBackendConfig(filepath.Join(dir, "mesh-backend"), fmt.Sprintf("0.0.0.0:%d", backendPort), workers))
	if err != nil {
		r.Err = err
		return r
	}
	defer backend.Stop()
	if err := e.WaitListening(ctx, srv, fmt.Sprintf("127.0.0.1:%d", backendPort), backend); err != nil {
		r.Err = err
		return r
	}
	objs := fmt.Sprintf(`
apiVersion: v1
kind: Service
metadata: {name: %[2]s, namespace: %[1]s}
spec:
  selector: {app: bench, role: server}
  ports: [{name: http, port: %[3]d, targetPort: %[3]d, protocol: TCP}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: %[4]s, namespace: %[1]s}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
`, meshenv.MeshNS, serviceName, backendPort, waypointName)
	defer func() {
		cctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		if err := e.Label(cctx, meshenv.MeshNS, "istio.io/use-waypoint", ""); err != nil {
			o.Log.Warn("unbind the waypoint", "err", err)
		}
		if err := e.SB.Delete(cctx, objs); err != nil {
			o.Log.Warn("delete the waypoint", "err", err)
		}
	}()
	applied, err := e.SB.Apply(ctx, objs)
	if err != nil {
		r.Err = fmt.Errorf("apply Service and Gateway: %w", err)
		return r
	}
	var vip string
	for _, u := range applied {
		if u.GetKind() == "Service" {
			vip, _, _ = unstructuredString(u.Object, "spec", "clusterIP")
		}
	}
	if vip == "" {
		r.Err = fmt.Errorf("service %s has no cluster IP", serviceName)
		return r
	}
	wait := o.WaypointWait
	if wait == 0 {
		wait = 90 * time.Second
	}
	pods, err := e.SB.WaitPodsRunning(ctx, meshenv.MeshNS, "gateway.networking.k8s.io/gateway-name="+waypointName, 1, wait)
	if err != nil {
		r.Err = fmt.Errorf("no Running waypoint pod for Gateway %s/%s: %w", meshenv.MeshNS, waypointName, err)
		return r
	}
	// One HTTPRoute with a retry and a rate limit configured but never
	// firing (the backend answers 200; the limit is far above the load),
	// so the row pays for having them.
	route := fmt.Sprintf(`
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: %[2]s, namespace: %[1]s}
spec:
  parentRefs: [{group: "", kind: Service, name: %[2]s, port: %[3]d}]
  rules:
  - backendRefs: [{name: %[2]s, port: %[3]d}]
    retry: {attempts: 2, codes: [503], backoff: 10ms}
---
apiVersion: policy.meshlite.io/v1alpha1
kind: TrafficPolicy
metadata: {name: %[2]s, namespace: %[1]s}
spec:
  targetRefs: [{group: gateway.networking.k8s.io, kind: HTTPRoute, name: %[2]s}]
  rateLimit: {requestsPerSecond: 1000000}
`, meshenv.MeshNS, serviceName, backendPort)
	if _, err := e.SB.Apply(ctx, route); err != nil {
		r.Config = "HTTPRoute with retry and TrafficPolicy rate limit NOT configured: " + oneLine(err.Error())
	} else {
		r.Config = "HTTPRoute " + serviceName + " (retry: 2 attempts on 503, 10ms backoff) with a TrafficPolicy rate limit of 1M req/s, neither firing"
		defer func() {
			cctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			if err := e.SB.Delete(cctx, route); err != nil {
				o.Log.Warn("delete the HTTPRoute", "err", err)
			}
		}()
	}
	if err := e.Label(ctx, meshenv.MeshNS, "istio.io/use-waypoint", waypointName); err != nil {
		r.Err = err
		return r
	}
	wpNetns, err := e.Netns(ctx, meshenv.MeshNS, pods[0].Name)
	if err != nil {
		r.Err = err
		return r
	}
	r.proxy = func() ([]int, error) { return meshenv.FindProcess("waypoint", wpNetns) }
	r.profile = append([]profile.Target{{Label: "waypoint", Netns: wpNetns, Admin: "127.0.0.1:15000", Bin: filepath.Join(e.Repo, "bin", "waypoint")}}, profile.Ztunnels(e)...)
	if r.profileDir = o.ProfileDir; r.profileDir == "" {
		if r.profileDir, err = e.TempDir("pprof"); err != nil {
			r.Err = err
			return r
		}
	}
	r.URL = "http://" + net.JoinHostPort(vip, fmt.Sprint(backendPort)) + "/"
	// The binding reaches the ztunnels through istiod-lite; wait until a
	// request goes through the waypoint (its CPU moves) or give up.
	pids, err := r.proxy()
	if err != nil {
		r.Err = err
		return r
	}
	var lastErr error
	err = e.SB.WaitFor(ctx, 30*time.Second, "traffic through the waypoint", func(ctx context.Context) (bool, error) {
		before, err := meshenv.ReadUsage(pids...)
		if err != nil {
			return false, err
		}
		_, lastErr = load.Fortio(ctx, e, r.netns, r.URL, load.Fixed{QPS: 200, Connections: 2, Duration: time.Second})
		after, err := meshenv.ReadUsage(pids...)
		if err != nil {
			return false, err
		}
		return lastErr == nil && after.CPUTicks > before.CPUTicks, nil
	})
	if err != nil {
		r.Err = fmt.Errorf("%w (last request: %v)", err, lastErr)
		return r
	}
	measureRow(ctx, e, o, r)
	return r
}

func unstructuredString(obj map[string]any, fields ...string) (string, bool, error) {
	var cur any = obj
	for _, f := range fields {
		m, ok := cur.(map[string]any)
		if !ok {
			return "", false, nil
		}
		cur = m[f]
	}
	s, ok := cur.(string)
	return s, ok, nil
}

func ver(bin, arg string) string { return peers.ToolVersion(bin, arg) }

func result(o Options, rows []*Row) report.Result {
	res := report.Result{
		Scenario: Name,
		Description: fmt.Sprintf("HTTP/1.1 GET / from a client pod on node 0 to an nginx backend (2 workers, answers 200 \"ok\") in a server pod on node 1. "+
			"Proxies run in the server pod in front of the backend (nginx: 2 workers, upstream keepalive; haproxy: 2 threads, http-reuse always). "+
			"Waypoint row: the enrolled namespace bound to a waypoint (Gateway of class istio-waypoint deployed by istiod-lite), client -> Service VIP -> ztunnel -> HBONE -> waypoint -> HBONE -> ztunnel -> backend; "+
			"configuration in the note below. wrk: 2 threads, %d connections, %s, max req/s. fortio %s: fixed %d qps on 4 connections for %s, p99. "+
			"Proxy CPU: vCPU of the proxy's processes during the wrk run; peak RSS: their VmHWM after both runs. "+
			"Commands: `wrk -t2 -c%d -d%ds http://<target>/`, `fortio load -qps %d -c 4 -t %s -p 50,90,99 -json - http://<target>/`.",
			wrkConns, o.WrkDuration, measure.FortioVersion, fixedQPS, o.LoadDuration, wrkConns, max(1, int(o.WrkDuration.Seconds())), fixedQPS, o.LoadDuration),
		Columns: []string{"path", "wrk req/s", "x no mesh", "x nginx", "p50 ms at 1000 qps", "p99 ms at 1000 qps", "proxy vCPU (wrk)", "proxy peak RSS MB"},
	}
	report.Describe(&res)
	base, ngx := rows[0], rows[1]
	var groups []string
	var rps, p99 []float64
	for _, r := range rows {
		groups = append(groups, shortName(r.Name))
		if r.Err != nil {
			res.Rows = append(res.Rows, []string{r.Name, "not available: " + oneLine(r.Err.Error()), "", "", "", "", "", ""})
			rps, p99 = append(rps, math.NaN()), append(p99, math.NaN())
			continue
		}
		cpu, rss := "", ""
		if r.proxy != nil {
			cpu, rss = fmt.Sprintf("%.2f", r.CPU), fmt.Sprintf("%.1f", float64(r.PeakRSS)/1e6)
			res.Set(r.Name, "proxy_vcpu", r.CPU)
			res.Set(r.Name, "proxy_peak_rss_mb", float64(r.PeakRSS)/1e6)
		}
		res.Rows = append(res.Rows, []string{r.Name, fmt.Sprintf("%.0f", r.Wrk.RequestsPerSec),
			report.Fmt(report.Ratio(r.Wrk.RequestsPerSec, base.Wrk.RequestsPerSec), 2), report.Fmt(report.Ratio(r.Wrk.RequestsPerSec, ngx.Wrk.RequestsPerSec), 2),
			fmt.Sprintf("%.3f", ms(r.Fixed.P50)), fmt.Sprintf("%.3f", ms(r.Fixed.P99)), cpu, rss})
		res.Set(r.Name, "wrk_rps", r.Wrk.RequestsPerSec)
		res.Set(r.Name, "p99_ms", ms(r.Fixed.P99))
		rps, p99 = append(rps, r.Wrk.RequestsPerSec/1000), append(p99, ms(r.Fixed.P99))
	}
	wp := rows[len(rows)-1]
	g := report.Goal{What: "waypoint / nginx max req/s", Value: report.Ratio(wp.Wrk.RequestsPerSec, ngx.Wrk.RequestsPerSec), Bound: 1.0, Unit: "x"}
	if wp.Err != nil {
		g.Missing = oneLine(wp.Err.Error())
	}
	res.Notes = append(res.Notes, "Goal (issue 9):\n\n- "+g.String())
	if g.Verdict() == "missed" && len(wp.Profiles) > 0 {
		res.Notes = append(res.Notes, profile.Markdown("Where the time goes on the waypoint path (CPU profiles from the admin ports, /debug/pprof/profile, during the waypoint's wrk run)", wp.Profiles))
	}
	if wp.Config != "" {
		res.Notes = append(res.Notes, "Waypoint route configuration: "+wp.Config+".")
	}
	res.Charts = []plot.Bars{{Title: "l7: HTTP/1.1 node 0 -> node 1", YLabel: "k req/s (wrk) / p99 ms (fortio, 1000 qps)", Groups: groups,
		Series: []plot.Series{{Name: "wrk k req/s", Values: rps}, {Name: "p99 ms at 1000 qps", Values: p99}}}}
	return res
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

func shortName(n string) string {
	f := strings.Fields(n)
	switch {
	case strings.HasPrefix(n, "no mesh"):
		return "no mesh"
	case strings.HasPrefix(n, "meshlite waypoint"):
		return "waypoint"
	case len(f) > 0:
		return f[0]
	}
	return n
}

func oneLine(s string) string {
	s = strings.Join(strings.Fields(s), " ")
	if len(s) > 300 {
		s = s[:300] + "..."
	}
	return strings.ReplaceAll(s, "|", "/")
}
