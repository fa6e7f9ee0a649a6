// Command meshinstall installs meshlite into the running sandbox from the
// Helm chart, as the e2e tests do (e2e/meshinstall), for `make demo`:
//
//	meshinstall up [-capture ns,ns] [-set key=value]...   install and wait until ready
//	meshinstall down                                       uninstall (CRDs and namespace stay)
//
// The sandbox is the one in $MESHLITE_SANDBOX_DIR (default
// /var/lib/meshlite-sandbox). `up` leaves a mesh that is already there
// alone and says so.
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

	"github.com/meshlite/meshlite/e2e/meshinstall"
	"github.com/meshlite/meshlite/e2e/sandbox"
)

type setFlags []string

func (s *setFlags) String() string     { return strings.Join(*s, ",") }
func (s *setFlags) Set(v string) error { *s = append(*s, v); return nil }

func main() {
	if len(os.Args) < 2 || (os.Args[1] != "up" && os.Args[1] != "down") {
		fmt.Fprintln(os.Stderr, "usage: meshinstall up [-capture ns,ns] [-set key=value]... | meshinstall down")
		os.Exit(2)
	}
	cmd := os.Args[1]
	fs := flag.NewFlagSet("meshinstall "+cmd, flag.ExitOnError)
	capture := fs.String("capture", "", "comma-separated namespaces the CNI agent captures (default: every enrolled one)")
	timeout := fs.Duration("timeout", 3*time.Minute, "how long to wait")
	var set setFlags
	fs.Var(&set, "set", "chart value override key=value (repeatable)")
	fs.Parse(os.Args[2:])

	log := slog.New(slog.NewTextHandler(os.Stderr, nil))
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	ctx, cancel := context.WithTimeout(ctx, *timeout)
	defer cancel()

	sb, err := sandbox.Open(sandbox.StateDirFromEnv(), log)
	if err != nil {
		log.Error("open the sandbox (is it up? bin/sandbox up)", "err", err)
		os.Exit(1)
	}
	opts := meshinstall.Options{Set: set, Timeout: *timeout, Log: log}
	if *capture != "" {
		opts.CaptureNamespaces = strings.Split(*capture, ",")
	}
	switch cmd {
	case "up":
		have, err := meshinstall.Installed(ctx, sb)
		if err != nil {
			log.Error("look for an installed mesh", "err", err)
			os.Exit(1)
		}
		if have {
			fmt.Println("meshlite is installed already; leaving it as it is (meshinstall down removes it)")
			return
		}
		m, err := meshinstall.Install(ctx, sb, opts)
		if err != nil {
			log.Error("install the chart", "err", err)
			os.Exit(1)
		}
		fmt.Printf("meshlite installed from the chart: %d objects, istiod-lite at %s:15012\n", len(m.Objects()), m.IstiodIP)
	case "down":
		if err := meshinstall.Remove(ctx, sb, opts); err != nil {
			log.Error("uninstall", "err", err)
			os.Exit(1)
		}
		fmt.Println("meshlite uninstalled; every node unchained")
	}
}
