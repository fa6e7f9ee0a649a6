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
	"strings"
	"syscall"
	"time"

	"github.com/meshlite/meshlite/bench/controlplane"
	"github.com/meshlite/meshlite/bench/loopback"
	"github.com/meshlite/meshlite/bench/report"
)

func main() {
	scenario := flag.String("scenario", "", "run only this scenario (default: all)")
	out := flag.String("out", "bench", "directory for RESULTS.md and results.json")
	duration := flag.Duration("duration", 5*time.Second, "length of one measurement")
	rounds := flag.Int("rounds", 3, "measurements per row (interleaved); the median is reported")
	profileDir := flag.String("profile-dir", "", "write a CPU profile of each row's last round here")
	cp := controlplane.DefaultOptions()
	flag.IntVar(&cp.Pods, "cp-pods", cp.Pods, "control-plane: pods in the cluster")
	flag.IntVar(&cp.Services, "cp-services", cp.Services, "control-plane: services in the cluster")
	flag.IntVar(&cp.Clients, "cp-clients", cp.Clients, "control-plane: simulated ztunnels")
	flag.IntVar(&cp.Changes, "cp-changes", cp.Changes, "control-plane: timed pod changes")
	flag.Parse()

	log := slog.New(slog.NewTextHandler(os.Stderr, nil))
	cp.Log, cp.ProfileDir = log, *profileDir
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	scenarios := []report.Scenario{
		loopback.Scenario(loopback.Options{Duration: *duration, Rounds: *rounds, Log: log, ProfileDir: *profileDir}),
		controlplane.Scenario(cp),
	}
	var results []report.Result
	for _, s := range scenarios {
		if *scenario != "" && s.Name != *scenario {
			continue
		}
		log.Info("scenario", "name", s.Name)
		r, err := s.Run(ctx)
		if err != nil {
			fmt.Fprintf(os.Stderr, "bench: scenario %s: %v\n", s.Name, err)
			os.Exit(1)
		}
		fmt.Println(r.Markdown())
		results = append(results, r)
	}
	if len(results) == 0 {
		fmt.Fprintf(os.Stderr, "bench: no scenario named %q\n", *scenario)
		os.Exit(2)
	}
	cmd := "make bench"
	if *scenario != "" {
		cmd += " SCENARIO=" + *scenario
	}
	if err := report.Write(*out, cmd, strings.Join(os.Args, " "), results); err != nil {
		fmt.Fprintf(os.Stderr, "bench: %v\n", err)
		os.Exit(1)
	}
}
