// Package l4throughput is the l4-throughput scenario: iperf3 between a
// client pod on node 0 and a server pod on node 1 with no mesh, through
// ztunnel (HBONE over HTTP/2 and over QUIC), and through the mTLS tunnel
// pairs users would pick instead (ghostunnel, stunnel4, haproxy), one
// stream and 8 streams, rows interleaved per round in one run.
package l4throughput

import (
	"context"
	"fmt"
	"log/slog"
	"math"
	"net"
	"sort"
	"strings"
	"time"

	"github.com/meshlite/meshlite/bench/measure"
	"github.com/meshlite/meshlite/bench/meshenv"
	"github.com/meshlite/meshlite/bench/peers"
	"github.com/meshlite/meshlite/bench/plot"
	"github.com/meshlite/meshlite/bench/profile"
	"github.com/meshlite/meshlite/bench/report"
)

// Name is the scenario's name for `make bench SCENARIO=...`.
const Name = "l4-throughput"

// Options set the length and count of the measurements.
type Options struct {
	Duration time.Duration // one iperf3 run
	Rounds   int
	Log      *slog.Logger
	Env      *meshenv.Shared
	// ProfileDir keeps the ztunnel CPU profiles (a temp dir otherwise).
	ProfileDir string
}

// Scenario returns the scenario for the bench runner.
func Scenario(o Options) report.Scenario {
	return report.Scenario{Name: Name, Run: func(ctx context.Context) (report.Result, error) { return run(ctx, o) }}
}

const iperfPort = 5201

// Streams are the two settings every row is measured with.
var Streams = []int{1, 8}

type row struct {
	name   string
	netns  string // where iperf3 -c runs
	target string // host:port it connects to
	tunnel meshenv.Tunnel
	mesh   bool
	// samples[i] are the Gbit/s of Streams[i], one per round.
	samples [2][]float64
	// ztunnelCPU is the ztunnels' vCPU (both nodes) in the last round.
	ztunnelCPU [2]float64
	err        error
}

func run(ctx context.Context, o Options) (report.Result, error) {
	e, err := o.Env.Get(ctx)
	if err != nil {
		return report.Result{}, err
	}
	if err := e.SetTunnel(ctx, meshenv.TunnelH2, false); err != nil {
		return report.Result{}, err
	}
	ns := func(n, pod string) string {
		if err != nil {
			return ""
		}
		var p string
		p, err = e.Netns(ctx, n, pod)
		return p
	}
	plainClient, plainServer := ns(meshenv.PlainNS, meshenv.Client), ns(meshenv.PlainNS, meshenv.Server)
	meshClient, meshServer := ns(meshenv.MeshNS, meshenv.Client), ns(meshenv.MeshNS, meshenv.Server)
	if err != nil {
		return report.Result{}, err
	}
	for _, srv := range []string{plainServer, meshServer} {
		p, err := e.Start(srv, "iperf3-server", "iperf3", "-s", "-p", fmt.Sprint(iperfPort))
		if err != nil {
			return report.Result{}, err
		}
		defer p.Stop()
		if err := e.WaitListening(ctx, srv, fmt.Sprintf("127.0.0.1:%d", iperfPort), p); err != nil {
			return report.Result{}, err
		}
	}
	dir, err := e.TempDir("tls")
	if err != nil {
		return report.Result{}, err
	}
	certs, err := peers.NewCerts(dir, net.ParseIP(e.PodIP(meshenv.PlainNS, meshenv.Server)))
	if err != nil {
		return report.Result{}, err
	}
	rows := []*row{
		{name: "no mesh (pod to pod)", netns: plainClient, target: net.JoinHostPort(e.PodIP(meshenv.PlainNS, meshenv.Server), fmt.Sprint(iperfPort))},
		{name: "ztunnel HBONE/h2", netns: meshClient, target: net.JoinHostPort(e.PodIP(meshenv.MeshNS, meshenv.Server), fmt.Sprint(iperfPort)), tunnel: meshenv.TunnelH2, mesh: true},
	}
	for i, kind := range []string{"ghostunnel", "stunnel4", "haproxy"} {
		p, err := peers.StartPair(ctx, e, meshenv.PlainNS, certs, peers.PairSpec{Kind: kind, ClientPort: 15201 + i, ServerPort: 8443 + i,
			AppAddr: fmt.Sprintf("127.0.0.1:%d", iperfPort)})
		if err != nil {
			return report.Result{}, err
		}
		for _, pr := range p.Procs {
			defer pr.Stop()
		}
		rows = append(rows, &row{name: p.Name, netns: plainClient, target: p.ClientAddr})
	}
	quic := &row{name: "ztunnel HBONE/QUIC", netns: meshClient, target: rows[1].target, tunnel: meshenv.TunnelQUIC, mesh: true}
	rows = append(rows, quic)

	profDir := o.ProfileDir
	if profDir == "" {
		if profDir, err = e.TempDir("pprof"); err != nil {
			return report.Result{}, err
		}
	}
	var profiles []profile.Summary
	// measureRows runs every round of rows with ztunnel in one tunnel mode.
	measureRows := func(rows []*row) error {
		for round := 0; round < o.Rounds; round++ {
			last := round == o.Rounds-1
			for _, r := range rows {
				for si, streams := range Streams {
					var prof *profile.Capture
					if last && r.mesh && streams == Streams[len(Streams)-1] {
						prof = profile.Start(ctx, e, profDir, Name+"-"+string(r.tunnel), o.Duration)
					}
					g, cpu, err := measureOnce(ctx, e, r, streams, o.Duration)
					if prof != nil {
						profiles = append(profiles, prof.Wait()...)
					}
					if err != nil {
						return fmt.Errorf("%s, %d stream(s): %w", r.name, streams, err)
					}
					o.Log.Info("measured", "scenario", Name, "row", r.name, "streams", streams, "round", round+1, "gbps", fmt.Sprintf("%.2f", g))
					r.samples[si] = append(r.samples[si], g)
					if last {
						r.ztunnelCPU[si] = cpu
					}
				}
			}
		}
		return nil
	}
	if err := measureRows(rows[:len(rows)-1]); err != nil {
		return report.Result{}, err
	}
	if err := e.SetTunnel(ctx, meshenv.TunnelQUIC, false); err != nil {
		quic.err = err
	} else if err := measureRows([]*row{quic}); err != nil {
		quic.err = err
	}
	if quic.err != nil {
		o.Log.Warn("QUIC row failed", "err", quic.err)
	}
	if err := e.SetTunnel(ctx, meshenv.TunnelH2, false); err != nil {
		return report.Result{}, err
	}
	return result(o, rows, profiles), nil
}

// measureOnce runs one iperf3 test and returns the receiver's Gbit/s and,
// for mesh rows, the vCPU both ztunnels used meanwhile.
func measureOnce(ctx context.Context, e *meshenv.Env, r *row, streams int, d time.Duration) (float64, float64, error) {
	host, port, _ := net.SplitHostPort(r.target)
	secs := max(1, int(math.Round(d.Seconds())))
	var before [2]meshenv.Usage
	var pids [2][]int
	if r.mesh {
		for i := range 2 {
			var err error
			if pids[i], err = e.ZtunnelPids(i); err != nil {
				return 0, 0, err
			}
			if before[i], err = meshenv.ReadUsage(pids[i]...); err != nil {
				return 0, 0, err
			}
		}
	}
	start := time.Now()
	rctx, cancel := context.WithTimeout(ctx, d+60*time.Second)
	defer cancel()
	out, err := e.Run(rctx, r.netns, "iperf3", "-c", host, "-p", port, "-t", fmt.Sprint(secs), "-P", fmt.Sprint(streams), "-J")
	elapsed := time.Since(start)
	res, perr := measure.ParseIperf3(out)
	if perr != nil {
		if err != nil {
			return 0, 0, fmt.Errorf("%w (%v)", perr, err)
		}
		return 0, 0, perr
	}
	var cpu float64
	if r.mesh {
		for i := range 2 {
			after, err := meshenv.ReadUsage(pids[i]...)
			if err != nil {
				return 0, 0, err
			}
			cpu += float64(after.CPUTicks-before[i].CPUTicks) / meshenv.ClockTicks / elapsed.Seconds()
		}
		// A mesh row whose bytes did not pass through ztunnel would
		// measure the wrong thing: a busy tunnel burns CPU.
		if cpu < 0.05 {
			return 0, 0, fmt.Errorf("the ztunnels used %.3f vCPU while %.2f Gbit/s went through: the traffic bypassed them", cpu, res.ReceivedGbps)
		}
	}
	return res.ReceivedGbps, cpu, nil
}

func median(v []float64) float64 {
	if len(v) == 0 {
		return math.NaN()
	}
	s := append([]float64(nil), v...)
	sort.Float64s(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

func result(o Options, rows []*row, profiles []profile.Summary) report.Result {
	res := report.Result{
		Scenario: Name,
		Description: fmt.Sprintf("iperf3 %s from a client pod on node 0 to a server pod on node 1 of the sandbox, %s per run, %d round(s) interleaving the rows, median reported. "+
			"No mesh: pod IP to pod IP, namespace not enrolled. ztunnel rows: the real mesh from the Helm chart (istiod-lite, CNI agent, ztunnel DaemonSet) with ztunnel.tunnel=h2, then upgraded to ztunnel.tunnel=quic; "+
			"iperf3 dials the server pod's IP and the in-pod redirect takes it through ztunnel on both nodes (HBONE, mTLS with SPIFFE identities). "+
			"Peer pairs: the client side runs in the client pod on 127.0.0.1, carries the stream over TLS 1.3 with client and server certificates from a test CA to the server side in the server pod, which forwards to iperf3 -s on 127.0.0.1. "+
			"Every process (iperf3, proxies, ztunnels, the sandbox's control plane) shares the machine's cores. Command: `iperf3 -c <server pod IP, or 127.0.0.1:<client proxy port>> -t %d -P {1,8} -J` against `iperf3 -s -p 5201`.",
			"1 stream and 8 streams (-P 8)", o.Duration, o.Rounds, max(1, int(math.Round(o.Duration.Seconds())))),
		Columns: []string{"path", "1 stream Gbit/s", "x no mesh", "8 streams Gbit/s", "x no mesh", "ztunnel vCPU (1 / 8 streams)", "all rounds (1 | 8)"},
	}
	report.Describe(&res)
	med := func(r *row, si int) float64 { return median(r.samples[si]) }
	base := rows[0]
	for _, r := range rows {
		cells := []string{r.name}
		for si := range Streams {
			g := med(r, si)
			cells = append(cells, report.Fmt(g, 2), report.Fmt(report.Ratio(g, med(base, si)), 2))
			res.Set(r.name, fmt.Sprintf("gbps_%d", Streams[si]), g)
			res.Set(r.name, fmt.Sprintf("ratio_no_mesh_%d", Streams[si]), report.Ratio(g, med(base, si)))
		}
		cpu := ""
		if r.mesh && r.err == nil {
			cpu = fmt.Sprintf("%.2f / %.2f", r.ztunnelCPU[0], r.ztunnelCPU[1])
		}
		all := joinf(r.samples[0]) + " | " + joinf(r.samples[1])
		if r.err != nil {
			all = "not available: " + oneLine(r.err.Error())
		}
		res.Rows = append(res.Rows, append(cells, cpu, all))
	}
	h2 := rows[1]
	quic := rows[len(rows)-1]
	var goals []report.Goal
	for si, streams := range Streams {
		best, bestName := math.NaN(), ""
		for _, r := range rows[2 : len(rows)-1] {
			if g := med(r, si); !(g <= best) {
				best, bestName = g, r.name
			}
		}
		label := fmt.Sprintf("(%d stream%s)", streams, map[bool]string{true: "s", false: ""}[streams > 1])
		res.Set("ztunnel HBONE/h2", fmt.Sprintf("ratio_best_peer_%d", streams), report.Ratio(med(h2, si), best))
		goals = append(goals,
			report.Goal{What: "ztunnel h2 / best peer (" + bestName + ") " + label, Value: report.Ratio(med(h2, si), best), Bound: 1.25, Unit: "x"},
			report.Goal{What: "ztunnel h2 / no mesh " + label, Value: report.Ratio(med(h2, si), med(base, si)), Bound: 0.35, Unit: "x"},
			quicGoal(quic, h2, si, label))
	}
	missed := false
	var lines []string
	for _, g := range goals {
		lines = append(lines, "- "+g.String())
		missed = missed || !g.Met()
	}
	res.Notes = append(res.Notes, "Goals (issue 9):\n\n"+strings.Join(lines, "\n"))
	if missed && len(profiles) > 0 {
		res.Notes = append(res.Notes, profile.Markdown("Where ztunnel's time goes (CPU profile from its admin port, /debug/pprof/profile, during the 8-stream run of the last round)", profiles))
	}
	groups := make([]string, len(rows))
	s1, s8 := make([]float64, len(rows)), make([]float64, len(rows))
	for i, r := range rows {
		groups[i], s1[i], s8[i] = shortName(r.name), med(r, 0), med(r, 1)
	}
	res.Charts = []plot.Bars{{Title: "l4-throughput: iperf3 node 0 -> node 1", YLabel: "Gbit/s", Groups: groups,
		Series: []plot.Series{{Name: "1 stream", Values: s1}, {Name: "8 streams", Values: s8}}}}
	return res
}

func quicGoal(quic, h2 *row, si int, label string) report.Goal {
	g := report.Goal{What: "ztunnel QUIC / h2 " + label, Value: report.Ratio(median(quic.samples[si]), median(h2.samples[si])), Bound: 0.5, Unit: "x"}
	if quic.err != nil {
		g.Missing = oneLine(quic.err.Error())
	}
	return g
}

func shortName(n string) string {
	n = strings.TrimSuffix(n, " pair")
	n = strings.TrimSuffix(n, " (pod to pod)")
	n = strings.TrimSuffix(n, " TCP+mTLS")
	return strings.Replace(n, "ztunnel HBONE/", "ztunnel ", 1)
}

func joinf(v []float64) string {
	var parts []string
	for _, x := range v {
		parts = append(parts, fmt.Sprintf("%.2f", x))
	}
	return strings.Join(parts, ", ")
}

func oneLine(s string) string {
	s = strings.Join(strings.Fields(s), " ")
	if len(s) > 300 {
		s = s[:300] + "..."
	}
	return strings.ReplaceAll(s, "|", "/")
}
