// Package l4cost is the l4-cost scenario: what each node's ztunnel costs
// in CPU and memory while it carries 1000 qps of 1 KB TCP echo between a
// client pod on node 0 and a server pod on node 1, normalised per 1000 qps.
package l4cost

import (
	"context"
	"fmt"
	"log/slog"
	"math"
	"net"
	"strings"
	"sync"
	"time"

	"github.com/meshlite/meshlite/bench/load"
	"github.com/meshlite/meshlite/bench/measure"
	"github.com/meshlite/meshlite/bench/meshenv"
	"github.com/meshlite/meshlite/bench/plot"
	"github.com/meshlite/meshlite/bench/profile"
	"github.com/meshlite/meshlite/bench/report"
)

// Name is the scenario's name for `make bench SCENARIO=...`.
const Name = "l4-cost"

// Options set the run's length.
type Options struct {
	Duration   time.Duration
	Log        *slog.Logger
	Env        *meshenv.Shared
	ProfileDir string
}

// Scenario returns the scenario for the bench runner.
func Scenario(o Options) report.Scenario {
	return report.Scenario{Name: Name, Run: func(ctx context.Context) (report.Result, error) { return run(ctx, o) }}
}

const (
	echoPort = 8078
	qps      = 1000
	// Goals per 1000 qps per ztunnel (issue 9).
	goalVCPU = 0.06
	goalMB   = 20
)

// Cost is one ztunnel's figures over the run.
type Cost struct {
	Node        string
	IdleVCPU    float64 // before the load, same length
	VCPU        float64 // during the load
	PeakRSS     uint64  // VmHWM at the end (since the fresh start)
	MaxRSS      uint64  // highest VmRSS sampled during the load
	ActualQPS   float64
	VCPUPer1k   float64
	PeakMBPer1k float64
}

// Normalise fills the per-1000-qps figures (NaN without load, so no goal
// is met by a run that carried nothing).
func (c *Cost) Normalise() {
	k := c.ActualQPS / 1000
	if !(k > 0) {
		c.VCPUPer1k, c.PeakMBPer1k = math.NaN(), math.NaN()
		return
	}
	c.VCPUPer1k = c.VCPU / k
	c.PeakMBPer1k = float64(c.PeakRSS) / 1e6 / k
}

func run(ctx context.Context, o Options) (report.Result, error) {
	e, err := o.Env.Get(ctx)
	if err != nil {
		return report.Result{}, err
	}
	// Fresh ztunnels: their peak RSS then covers start-up and this load,
	// not an earlier scenario's throughput runs.
	if err := e.SetTunnel(ctx, meshenv.TunnelH2, true); err != nil {
		return report.Result{}, err
	}
	srv, err := e.Netns(ctx, meshenv.MeshNS, meshenv.Server)
	if err != nil {
		return report.Result{}, err
	}
	client, err := e.Netns(ctx, meshenv.MeshNS, meshenv.Client)
	if err != nil {
		return report.Result{}, err
	}
	p, err := load.StartEcho(ctx, e, srv, echoPort)
	if err != nil {
		return report.Result{}, err
	}
	defer p.Stop()
	addr := net.JoinHostPort(e.PodIP(meshenv.MeshNS, meshenv.Server), fmt.Sprint(echoPort))
	// One short call first, so the HBONE connection and certificates exist
	// before the idle figure and the load.
	if _, err := load.Fortio(ctx, e, client, "tcp://"+addr, load.Fixed{QPS: 10, Connections: 1, Duration: time.Second, PayloadBytes: 1024}); err != nil {
		return report.Result{}, fmt.Errorf("warm-up call through the mesh: %w", err)
	}
	nodes := e.SB.Plan.Nodes
	pids := make([][]int, nodes)
	for i := range nodes {
		if pids[i], err = e.ZtunnelPids(i); err != nil {
			return report.Result{}, err
		}
	}
	costs := make([]Cost, nodes)
	idle := min(o.Duration, 10*time.Second)
	idleCPU, _, err := sample(ctx, pids, idle)
	if err != nil {
		return report.Result{}, err
	}
	profDir := o.ProfileDir
	if profDir == "" {
		if profDir, err = e.TempDir("pprof"); err != nil {
			return report.Result{}, err
		}
	}
	var f measure.Fortio
	var ferr error
	var wg sync.WaitGroup
	wg.Add(1)
	loadCtx, cancel := context.WithCancel(ctx)
	go func() {
		defer wg.Done()
		defer cancel()
		f, ferr = load.Fortio(ctx, e, client, "tcp://"+addr, load.Fixed{QPS: qps, Connections: 4, Duration: o.Duration, PayloadBytes: 1024})
	}()
	// Sample while fortio runs (it starts within milliseconds).
	cpu, maxRSS, serr := sample(loadCtx, pids, o.Duration)
	wg.Wait()
	if ferr != nil {
		return report.Result{}, ferr
	}
	if serr != nil {
		return report.Result{}, serr
	}
	var profiles []profile.Summary
	for i := range nodes {
		u, err := meshenv.ReadUsage(pids[i]...)
		if err != nil {
			return report.Result{}, err
		}
		costs[i] = Cost{Node: e.SB.NodeName(i), IdleVCPU: idleCPU[i], VCPU: cpu[i], PeakRSS: u.PeakRSS, MaxRSS: maxRSS[i], ActualQPS: f.ActualQPS}
		costs[i].Normalise()
		o.Log.Info("measured", "scenario", Name, "node", costs[i].Node, "vcpu", fmt.Sprintf("%.3f", costs[i].VCPU), "peak_rss_mb", costs[i].PeakRSS>>20)
	}
	res := result(o, costs, f)
	if !allMet(costs) {
		// Profile a second, shorter load to say where the CPU goes.
		prof := profile.Start(ctx, e, profDir, Name, min(o.Duration, 10*time.Second))
		load.Fortio(ctx, e, client, "tcp://"+addr, load.Fixed{QPS: qps, Connections: 4, Duration: min(o.Duration, 10*time.Second), PayloadBytes: 1024})
		profiles = prof.Wait()
		res.Notes = append(res.Notes, profile.Markdown("Where ztunnel's CPU goes at 1000 qps (CPU profile from its admin port)", profiles))
	}
	return res, nil
}

// sample measures each ztunnel's vCPU over d (or until ctx ends) and its
// highest VmRSS, reading /proc every 200 ms.
func sample(ctx context.Context, pids [][]int, d time.Duration) ([]float64, []uint64, error) {
	n := len(pids)
	before := make([]meshenv.Usage, n)
	maxRSS := make([]uint64, n)
	for i := range n {
		u, err := meshenv.ReadUsage(pids[i]...)
		if err != nil {
			return nil, nil, err
		}
		before[i], maxRSS[i] = u, u.RSS
	}
	start := time.Now()
	t := time.NewTicker(200 * time.Millisecond)
	defer t.Stop()
	end := time.After(d)
loop:
	for {
		select {
		case <-ctx.Done():
			break loop
		case <-end:
			break loop
		case <-t.C:
			for i := range n {
				if u, err := meshenv.ReadUsage(pids[i]...); err == nil && u.RSS > maxRSS[i] {
					maxRSS[i] = u.RSS
				}
			}
		}
	}
	el := time.Since(start).Seconds()
	cpu := make([]float64, n)
	for i := range n {
		u, err := meshenv.ReadUsage(pids[i]...)
		if err != nil {
			return nil, nil, err
		}
		cpu[i] = float64(u.CPUTicks-before[i].CPUTicks) / meshenv.ClockTicks / el
		if u.RSS > maxRSS[i] {
			maxRSS[i] = u.RSS
		}
	}
	return cpu, maxRSS, nil
}

// Goals are the bars for one ztunnel.
func (c Cost) Goals() []report.Goal {
	return []report.Goal{
		{What: c.Node + " ztunnel vCPU per 1000 qps", Value: c.VCPUPer1k, Bound: goalVCPU, AtMost: true},
		{What: c.Node + " ztunnel peak RSS per 1000 qps", Value: c.PeakMBPer1k, Bound: goalMB, AtMost: true, Unit: " MB"},
	}
}

func allMet(cs []Cost) bool {
	for _, c := range cs {
		for _, g := range c.Goals() {
			if !g.Met() {
				return false
			}
		}
	}
	return true
}

func mb(b uint64) float64 { return float64(b) / 1e6 }

func result(o Options, costs []Cost, f measure.Fortio) report.Result {
	res := report.Result{
		Scenario: Name,
		Description: fmt.Sprintf("The ztunnel of each node (freshly restarted for this scenario, --tunnel=h2) while fortio %s sends a fixed %d qps of 1 KB TCP echo on 4 connections for %s "+
			"from a client pod on node 0 to a server pod on node 1 (node 0's ztunnel runs the outbound side, node 1's the inbound side). "+
			"CPU: utime+stime of the ztunnel process from /proc/<pid>/stat over the run, in vCPU (1.0 = one core busy). Memory: VmHWM (peak RSS since the fresh start) at the end, "+
			"and the highest VmRSS sampled every 200 ms during the load. Idle: the same ztunnel over %s with no load, just before.",
			measure.FortioVersion, qps, o.Duration, min(o.Duration, 10*time.Second)),
		Columns: []string{"ztunnel", "idle vCPU", "vCPU at load", "vCPU per 1000 qps", "peak RSS MB (VmHWM)", "max VmRSS MB at load", "peak RSS MB per 1000 qps", "achieved qps"},
	}
	report.Describe(&res)
	var lines []string
	groups := []string{}
	var cpuVals, memVals []float64
	for _, c := range costs {
		res.Rows = append(res.Rows, []string{c.Node, fmt.Sprintf("%.3f", c.IdleVCPU), fmt.Sprintf("%.3f", c.VCPU), fmt.Sprintf("%.3f", c.VCPUPer1k),
			fmt.Sprintf("%.1f", mb(c.PeakRSS)), fmt.Sprintf("%.1f", mb(c.MaxRSS)), fmt.Sprintf("%.1f", c.PeakMBPer1k), fmt.Sprintf("%.0f", c.ActualQPS)})
		res.Set(c.Node, "idle_vcpu", c.IdleVCPU)
		res.Set(c.Node, "vcpu", c.VCPU)
		res.Set(c.Node, "vcpu_per_1k_qps", c.VCPUPer1k)
		res.Set(c.Node, "peak_rss_mb", mb(c.PeakRSS))
		res.Set(c.Node, "max_rss_mb", mb(c.MaxRSS))
		res.Set(c.Node, "peak_rss_mb_per_1k_qps", c.PeakMBPer1k)
		for _, g := range c.Goals() {
			lines = append(lines, "- "+g.String())
		}
		groups = append(groups, c.Node+" ztunnel")
		cpuVals = append(cpuVals, c.VCPUPer1k*1000) // millicores
		memVals = append(memVals, c.PeakMBPer1k)
	}
	res.Notes = append(res.Notes, "Goals (issue 9: under 0.06 vCPU and 20 MB RSS per 1000 qps per ztunnel):\n\n"+strings.Join(lines, "\n"))
	res.Charts = []plot.Bars{{Title: "l4-cost: ztunnel per 1000 qps", YLabel: "millicores / MB", Groups: groups,
		Series: []plot.Series{{Name: "CPU (millicores)", Values: cpuVals}, {Name: "peak RSS (MB)", Values: memVals}, {Name: "goal: 60 mc", Values: fill(len(groups), goalVCPU*1000)}, {Name: "goal: 20 MB", Values: fill(len(groups), goalMB)}}}}
	return res
}

func fill(n int, v float64) []float64 {
	out := make([]float64, n)
	for i := range out {
		out[i] = v
	}
	return out
}
