package controlplane

import (
	"context"
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	benchcp "github.com/meshlite/meshlite/bench/controlplane"
)

func envInt(name string, def int) int {
	if v, err := strconv.Atoi(os.Getenv(name)); err == nil && v > 0 {
		return v
	}
	return def
}

// BenchmarkScale measures istiod-lite, run as its own process, against a
// cluster of SCALE_PODS pods (default 10000) behind SCALE_SERVICES services
// (1000) with SCALE_CLIENTS Delta ADS clients (100): the time until every
// client holds the full initial push, its size, the latency of a pod change
// to all clients, and istiod-lite's peak RSS. The harness is
// bench/controlplane's, which `make bench SCENARIO=control-plane` runs on
// its own cluster; this one shares the package's. Run it with
//
//	go test -run XXX -bench Scale -benchtime 1x ./istiod-lite/controlplane/
func BenchmarkScale(b *testing.B) {
	scale := benchcp.Scale{
		Pods: envInt("SCALE_PODS", 10000), Services: envInt("SCALE_SERVICES", 1000),
		Clients: envInt("SCALE_CLIENTS", 100), Changes: envInt("SCALE_CHANGES", 50),
		Namespace: "scale", Nodes: []string{"node-a", "node-b"},
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Minute)
	defer cancel()

	bin := filepath.Join(b.TempDir(), "istiod-lite")
	if err := benchcp.BuildIstiod(ctx, filepath.Join("..", ".."), bin); err != nil {
		b.Fatal(err)
	}
	start := time.Now()
	if err := benchcp.Populate(ctx, env.rc, scale); err != nil {
		b.Fatal(err)
	}
	b.Logf("created %d services and %d pods in %s", scale.Services, scale.Pods, time.Since(start).Round(time.Millisecond))

	ist, err := benchcp.StartIstiod(ctx, bin, env.layout.AdminKubeconfig, "istio-system", os.Stderr)
	if err != nil {
		b.Fatal(err)
	}
	defer ist.Stop()
	tlsCfg, err := benchcp.ClientTLS(ctx, env.kc, "istio-system")
	if err != nil {
		b.Fatal(err)
	}
	tok, err := benchcp.ZtunnelToken(ctx, env.kc)
	if err != nil {
		b.Fatal(err)
	}
	m, err := benchcp.Measure(ctx, benchcp.MeasureConfig{Scale: scale, Istiod: ist, RESTConfig: env.rc, TLS: tlsCfg, Token: tok,
		ProfileDir: os.Getenv("SCALE_PROFILE_DIR")})
	if err != nil {
		b.Fatal(err)
	}
	p50, p99 := m.Percentile(50), m.Percentile(99)
	b.Logf("istiod-lite ready %s after start; %d clients hold %d addresses each %s after connecting; initial Address push %.1f MB",
		ist.Ready.Round(time.Millisecond), scale.Clients, m.Held, m.FullPush.Round(time.Millisecond), float64(m.PushBytes)/1e6)
	b.Logf("CPU during the full push: istiod-lite %s, clients %s", m.IstiodPushCPU.Round(time.Millisecond), m.ClientsPushCPU.Round(time.Millisecond))
	b.Logf("pod change to all %d clients: p50 %s p99 %s max %s; istiod-lite peak RSS %.0f MB", scale.Clients,
		p50.Round(time.Millisecond), p99.Round(time.Millisecond), m.Latencies[len(m.Latencies)-1].Round(time.Millisecond), float64(m.PeakRSS)/1e6)
	b.ReportMetric(m.FullPush.Seconds(), "full-push-s")
	b.ReportMetric(float64(m.PushBytes)/1e6, "push-MB")
	b.ReportMetric(float64(p99.Microseconds())/1000, "change-p99-ms")
	b.ReportMetric(float64(m.PeakRSS)/1e6, "peak-RSS-MB")
}
