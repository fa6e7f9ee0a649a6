// Package controlplane is the `control-plane` bench scenario: istiod-lite,
// run as its own process, against a real Kubernetes control plane holding a
// large cluster, pushing to many simulated ztunnels. It also holds the
// harness for that (populating the cluster through the API, running
// istiod-lite, the simulated clients and the timing), which
// istiod-lite/controlplane's BenchmarkScale shares. It measures; it does
// not judge beyond reporting the goals as met or missed.
package controlplane

import (
	"bufio"
	"context"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/meshlite/meshlite/bench/report"
	"github.com/meshlite/meshlite/e2e/cluster"
)

// Name is the scenario's name for `make bench SCENARIO=...`.
const Name = "control-plane"

// Goals of issue 4.
const (
	GoalFullPush  = 2 * time.Second
	GoalChangeP99 = 100 * time.Millisecond
	GoalPeakRSS   = 300_000_000 // bytes (300 MB)
)

// Options size the run.
type Options struct {
	Pods, Services, Clients, Changes int
	Log                              *slog.Logger
	// ProfileDir, when set, gets istiod-lite's CPU profile of the full push
	// and its heap after it.
	ProfileDir string
}

// DefaultOptions are the figures.
func DefaultOptions() Options {
	return Options{Pods: 10000, Services: 1000, Clients: 100, Changes: 100}
}

// Scenario returns the scenario for the bench runner.
func Scenario(o Options) report.Scenario {
	return report.Scenario{Name: Name, Run: func(ctx context.Context) (report.Result, error) { return run(ctx, o) }}
}

func run(ctx context.Context, o Options) (report.Result, error) {
	if o.Log == nil {
		o.Log = slog.New(slog.DiscardHandler)
	}
	if o.Pods <= 0 || o.Services <= 0 || o.Clients <= 0 || o.Changes <= 0 {
		return report.Result{}, fmt.Errorf("pods, services, clients and changes must be positive: %+v", o)
	}
	load := loadAverage()
	repo, err := repoRoot()
	if err != nil {
		return report.Result{}, err
	}
	bins := filepath.Join(repo, ".cache", "kube", cluster.KubeVersion)
	if missing := cluster.MissingBinaries(bins); len(missing) > 0 {
		return report.Result{}, fmt.Errorf("kubernetes binaries %v missing in %s: run make deps", missing, bins)
	}
	dir, err := os.MkdirTemp("", "bench-control-plane-")
	if err != nil {
		return report.Result{}, err
	}
	defer os.RemoveAll(dir)

	istiodBin := filepath.Join(dir, "istiod-lite")
	if err := BuildIstiod(ctx, repo, istiodBin); err != nil {
		return report.Result{}, err
	}
	ports := make([]int, 3)
	for i := range ports {
		if ports[i], err = freePort(); err != nil {
			return report.Result{}, err
		}
	}
	l, err := cluster.Start(ctx, cluster.Config{
		Dir: filepath.Join(dir, "cluster"), BinDir: bins, HostIP: netip.MustParseAddr("127.0.0.1"),
		ServiceCIDR: netip.MustParsePrefix("10.96.0.0/16"), ClusterCIDR: netip.MustParsePrefix("10.244.0.0/16"),
		APIServerPort: ports[0], EtcdClientPort: ports[1], EtcdPeerPort: ports[2],
	})
	defer cluster.Stop(l)
	if err != nil {
		return report.Result{}, fmt.Errorf("start the Kubernetes control plane: %w", err)
	}
	rc, err := cluster.RESTConfig(l.AdminKubeconfig)
	if err != nil {
		return report.Result{}, err
	}
	kc, err := kubernetes.NewForConfig(rc)
	if err != nil {
		return report.Result{}, err
	}
	scale := Scale{Pods: o.Pods, Services: o.Services, Clients: o.Clients, Changes: o.Changes,
		Namespace: "scale", Nodes: []string{"node-a", "node-b"}}
	if _, err := kc.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "istio-system"}}, metav1.CreateOptions{}); err != nil {
		return report.Result{}, err
	}
	for _, n := range scale.Nodes {
		if _, err := kc.CoreV1().Nodes().Create(ctx, &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: n}}, metav1.CreateOptions{}); err != nil {
			return report.Result{}, err
		}
	}

	o.Log.Info("creating the cluster's objects", "pods", o.Pods, "services", o.Services)
	start := time.Now()
	if err := Populate(ctx, rc, scale); err != nil {
		return report.Result{}, err
	}
	created := time.Since(start)
	o.Log.Info("created", "in", created.Round(time.Millisecond))

	logPath := filepath.Join(dir, "istiod-lite.log")
	logf, err := os.Create(logPath)
	if err != nil {
		return report.Result{}, err
	}
	defer logf.Close()
	ist, err := StartIstiod(ctx, istiodBin, l.AdminKubeconfig, "istio-system", logf)
	if err != nil {
		return report.Result{}, fmt.Errorf("%w\n%s", err, cluster.Tail(logPath, 30))
	}
	defer ist.Stop()
	o.Log.Info("istiod-lite ready", "in", ist.Ready.Round(time.Millisecond))
	tlsCfg, err := ClientTLS(ctx, kc, "istio-system")
	if err != nil {
		return report.Result{}, err
	}
	tok, err := ZtunnelToken(ctx, kc)
	if err != nil {
		return report.Result{}, err
	}
	m, err := Measure(ctx, MeasureConfig{Scale: scale, Istiod: ist, RESTConfig: rc, TLS: tlsCfg, Token: tok, ProfileDir: o.ProfileDir})
	if err != nil {
		return report.Result{}, fmt.Errorf("%w\nistiod-lite log:\n%s", err, cluster.Tail(logPath, 30))
	}
	o.Log.Info("measured", "full_push", m.FullPush.Round(time.Millisecond), "push_mb", float64(m.PushBytes)/1e6,
		"p50", m.Percentile(50).Round(time.Millisecond), "p99", m.Percentile(99).Round(time.Millisecond),
		"peak_rss_mb", float64(m.PeakRSS)/1e6, "istiod_push_cpu", m.IstiodPushCPU, "clients_push_cpu", m.ClientsPushCPU)
	return result(o, created, ist.Ready, m, load), nil
}

// loadAverage is the machine's 1-minute load average ("" if unknown): the
// full push is CPU-bound, so other work on the machine shows in it.
func loadAverage() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return ""
	}
	f := strings.Fields(string(b))
	if len(f) == 0 {
		return ""
	}
	return f[0]
}

func result(o Options, created, ready time.Duration, m Measurement, load string) report.Result {
	res := report.Result{
		Scenario: Name,
		Description: fmt.Sprintf("istiod-lite (built from this tree, run as its own process) against a real etcd, kube-apiserver, "+
			"kube-controller-manager and kube-scheduler on this machine (e2e/cluster, no kubelets): %d pods behind %d services on 2 nodes, "+
			"created through the API with each pod's status patched Running and Ready with an IP as a kubelet would, before istiod-lite starts. "+
			"Then %d simulated ztunnels (Delta ADS over TLS with a service-account token, wildcard Address and Authorization, one process) "+
			"connect at once; after the full push, %d pod label changes are made one at a time and each is timed from the API call until every "+
			"client holds the new version. Clients, apiserver and istiod-lite share the machine's cores.",
			o.Pods, o.Services, o.Clients, o.Changes),
		Columns: []string{"figure", "value", "goal"},
		Values:  map[string]map[string]float64{},
	}
	report.Describe(&res)
	verdict := func(ok bool) string {
		if ok {
			return "met"
		}
		return "missed"
	}
	p50, p99 := m.Percentile(50), m.Percentile(99)
	rssMB := float64(m.PeakRSS) / 1e6
	add := func(name, value, goal string, v float64) {
		res.Rows = append(res.Rows, []string{name, value, goal})
		res.Values[name] = map[string]float64{"value": v}
	}
	add("objects created through the API", fmt.Sprintf("%.1f s", created.Seconds()), "", created.Seconds())
	add("istiod-lite start until ready", fmt.Sprintf("%.2f s", ready.Seconds()), "", ready.Seconds())
	add(fmt.Sprintf("first full push to %d clients", o.Clients), fmt.Sprintf("%.2f s", m.FullPush.Seconds()),
		fmt.Sprintf("< 2 s: %s", verdict(m.FullPush < GoalFullPush)), m.FullPush.Seconds())
	cpu := "CPU during the full push: istiod-lite / clients"
	add(cpu, fmt.Sprintf("%.2f s / %.2f s", m.IstiodPushCPU.Seconds(), m.ClientsPushCPU.Seconds()), "", m.IstiodPushCPU.Seconds())
	res.Values[cpu]["clients"] = m.ClientsPushCPU.Seconds()
	add("addresses each client holds", fmt.Sprintf("%d", m.Held), "", float64(m.Held))
	add("first Address response (per client)", fmt.Sprintf("%.2f MB", float64(m.PushBytes)/1e6), "", float64(m.PushBytes)/1e6)
	add(fmt.Sprintf("pod change to all %d clients, p50", o.Clients), ms(p50), "", float64(p50.Microseconds())/1000)
	add(fmt.Sprintf("pod change to all %d clients, p99", o.Clients), ms(p99),
		fmt.Sprintf("< 100 ms: %s", verdict(p99 < GoalChangeP99)), float64(p99.Microseconds())/1000)
	add(fmt.Sprintf("pod change to all %d clients, max", o.Clients), ms(m.Latencies[len(m.Latencies)-1]), "",
		float64(m.Latencies[len(m.Latencies)-1].Microseconds())/1000)
	add("istiod-lite peak RSS", fmt.Sprintf("%.0f MB", rssMB), fmt.Sprintf("< 300 MB: %s", verdict(m.PeakRSS < GoalPeakRSS)), rssMB)
	res.Notes = append(res.Notes, fmt.Sprintf(
		"Goals (issue 4): full push to %d clients under 2 s: %s; a change reaches every client under 100 ms at p99: %s; under 300 MB RSS: %s.",
		o.Clients, verdict(m.FullPush < GoalFullPush), verdict(p99 < GoalChangeP99), verdict(m.PeakRSS < GoalPeakRSS)))
	res.Notes = append(res.Notes, fmt.Sprintf(
		"The full push is CPU-bound and the simulated clients decode every response on the same cores as istiod-lite "+
			"(the CPU row splits the time); the machine's 1-minute load average was %s when the run started, other work included.", load))
	return res
}

func ms(d time.Duration) string { return fmt.Sprintf("%.1f ms", float64(d.Microseconds())/1000) }

// repoRoot walks up from the working directory to the module's root.
func repoRoot() (string, error) {
	wd, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for d := wd; ; d = filepath.Dir(d) {
		if f, err := os.Open(filepath.Join(d, "go.mod")); err == nil {
			s := bufio.NewScanner(f)
			found := s.Scan() && strings.TrimSpace(s.Text()) == "module github.com/meshlite/meshlite"
			f.Close()
			if found {
				return d, nil
			}
		}
		if d == filepath.Dir(d) {
			return "", fmt.Errorf("no github.com/meshlite/meshlite checkout above %s", wd)
		}
	}
}
