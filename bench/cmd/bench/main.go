// Command bench runs meshlite's benchmark scenarios and writes bench/RESULTS.md
// and bench/results.json. main only wires: scenarios live in their packages.
package main

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/meshlite/meshlite/bench/controlplane"
	"github.com/meshlite/meshlite/bench/l4cost"
	"github.com/meshlite/meshlite/bench/l4latency"
	"github.com/meshlite/meshlite/bench/l4throughput"
	"github.com/meshlite/meshlite/bench/l7"
	"github.com/meshlite/meshlite/bench/loopback"
	"github.com/meshlite/meshlite/bench/meshenv"
	"github.com/meshlite/meshlite/bench/report"
)

func main() { os.Exit(run()) }

// run returns the exit code, so the deferred clean-ups run first.
func run() int {
	scenario := flag.String("scenario", "", "run only this scenario, or these (comma-separated) (default: all)")
	out := flag.String("out", "bench", "directory for RESULTS.md and results.json")
	duration := flag.Duration("duration", 5*time.Second, "length of one measurement")
	rounds := flag.Int("rounds", 3, "measurements per row (interleaved); the median is reported")
	profileDir := flag.String("profile-dir", "", "write a CPU profile of each row's last round here")
	cp := controlplane.DefaultOptions()
	flag.IntVar(&cp.Pods, "cp-pods", cp.Pods, "control-plane: pods in the cluster")
	flag.IntVar(&cp.Services, "cp-services", cp.Services, "control-plane: services in the cluster")
	flag.IntVar(&cp.Clients, "cp-clients", cp.Clients, "control-plane: simulated ztunnels")
	flag.IntVar(&cp.Changes, "cp-changes", cp.Changes, "control-plane: timed pod changes")
	l4Duration := flag.Duration("l4-duration", 10*time.Second, "data-plane scenarios: length of one iperf3 run")
	loadDuration := flag.Duration("load-duration", 30*time.Second, "data-plane scenarios: length of one fixed-rate (1000 qps) fortio run and of a wrk run")
	short := flag.Bool("short", false, "smoke run: data-plane runs of 2-3 s and one round (figures are rough)")
	flag.Parse()
	waypointWait := 90 * time.Second
	if *short {
		*l4Duration, *loadDuration = 2*time.Second, 3*time.Second
		*rounds = 1
		waypointWait = 30 * time.Second
	}

	log := slog.New(slog.NewTextHandler(os.Stderr, nil))
	cp.Log, cp.ProfileDir = log, *profileDir
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	// ztunnel CPU profiles of the data-plane scenarios are kept where
	// RESULTS.md can name them (bench/out is not committed).
	dpProfiles := *profileDir
	if dpProfiles == "" {
		dpProfiles = filepath.Join(*out, "out", "profiles")
	}
	// The data-plane scenarios share one sandbox with the mesh installed,
	// brought up on first use and removed when the run ends.
	env := &meshenv.Shared{Log: log}
	defer func() {
		if err := env.Close(); err != nil {
			log.Error("clean up the sandbox", "err", err)
		}
	}()
	scenarios := []report.Scenario{
		loopback.Scenario(loopback.Options{Duration: *duration, Rounds: *rounds, Log: log, ProfileDir: *profileDir}),
		controlplane.Scenario(cp),
		l4throughput.Scenario(l4throughput.Options{Duration: *l4Duration, Rounds: *rounds, Log: log, Env: env, ProfileDir: dpProfiles}),
		l4latency.Scenario(l4latency.Options{Duration: *loadDuration, ConnDuration: min(*loadDuration, 5*time.Second), Log: log, Env: env, ProfileDir: dpProfiles}),
		l4cost.Scenario(l4cost.Options{Duration: *loadDuration, Log: log, Env: env, ProfileDir: dpProfiles}),
		l7.Scenario(l7.Options{WrkDuration: min(*loadDuration, 15*time.Second), LoadDuration: *loadDuration, Log: log, Env: env, WaypointWait: waypointWait, ProfileDir: dpProfiles}),
	}
	cmd := "make bench"
	if *scenario != "" {
		cmd += " SCENARIO=" + *scenario
	}
	argv := strings.Join(append([]string{"go run ./bench/cmd/bench"}, os.Args[1:]...), " ")
	want := map[string]bool{}
	for _, n := range strings.Split(*scenario, ",") {
		if n = strings.TrimSpace(n); n != "" {
			want[n] = true
		}
	}
	for _, s := range scenarios {
		delete(want, s.Name)
	}
	if len(want) > 0 {
		fmt.Fprintf(os.Stderr, "bench: no scenario named %q\n", *scenario)
		return 2
	}
	var results []report.Result
	failed := false
	for _, s := range scenarios {
		if *scenario != "" && !slices.Contains(strings.Split(*scenario, ","), s.Name) {
			continue
		}
		start := time.Now()
		log.Info("scenario", "name", s.Name)
		r, err := s.Run(ctx)
		if err != nil {
			// The other scenarios still run and are written.
			fmt.Fprintf(os.Stderr, "bench: scenario %s: %v\n", s.Name, err)
			failed = true
			continue
		}
		log.Info("scenario done", "name", s.Name, "took", time.Since(start).Round(time.Second))
		if *short {
			r.Notes = append([]string{"**Smoke run (-short)**: runs cut to a few seconds and one round; the figures are rough, not the benchmark."}, r.Notes...)
		}
		r.Command, r.Argv = cmd, argv
		fmt.Println(r.Markdown())
		results = append(results, r)
	}
	if len(results) > 0 {
		if err := report.Write(*out, cmd, argv, results); err != nil {
			fmt.Fprintf(os.Stderr, "bench: %v\n", err)
			return 1
		}
	}
	if failed {
		return 1
	}
	return 0
}
