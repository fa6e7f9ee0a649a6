// Command cni-agent is meshlite's CNI node agent (one per node, a
// hostNetwork DaemonSet pod): it installs and chains mesh-cni, redirects
// enrolled pods' traffic and hands them to ztunnel over ZDS (package agent).
//
//	cni-agent [flags]            run the agent
//	cni-agent uninstall [flags]  unchain the plugin and remove node rules
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"k8s.io/client-go/kubernetes"

	"github.com/meshlite/meshlite/cni/agent"
	"github.com/meshlite/meshlite/cni/plugin"
	"github.com/meshlite/meshlite/cni/zds"
	"github.com/meshlite/meshlite/internal/kube"
)

func main() {
	args := os.Args[1:]
	uninstall := len(args) > 0 && args[0] == "uninstall"
	if uninstall {
		args = args[1:]
	}
	fs := flag.NewFlagSet("cni-agent", flag.ExitOnError)
	var (
		cfg        agent.Config
		kubeconfig = fs.String("kubeconfig", "", "kubeconfig (empty: the pod's service account)")
		exclude    = fs.String("exclude-namespaces", "", "comma-separated namespaces never captured")
		capture    = fs.String("capture-namespaces", "", "comma-separated namespaces the mesh is limited to (empty: all)")
		probeSNAT  = fs.String("probe-snat", "169.254.7.127", "source address kubelet probes get into enrolled pods")
		noDNS      = fs.Bool("no-dns-capture", false, "leave DNS (port 53) uncaptured")
		logLevel   = fs.String("log-level", "info", "debug, info, warn or error")
	)
	fs.StringVar(&cfg.NodeName, "node-name", os.Getenv("NODE_NAME"), "this node (default $NODE_NAME)")
	fs.StringVar(&cfg.PodNamespace, "pod-namespace", os.Getenv("POD_NAMESPACE"), "the agent's namespace (default $POD_NAMESPACE)")
	fs.StringVar(&cfg.PodName, "pod-name", os.Getenv("POD_NAME"), "the agent's pod (default $POD_NAME)")
	fs.StringVar(&cfg.CNIConfDir, "cni-conf-dir", "/etc/cni/net.d", "the node's CNI config dir")
	fs.StringVar(&cfg.CNIBinDir, "cni-bin-dir", "/opt/cni/bin", "the node's CNI bin dir")
	fs.StringVar(&cfg.PluginBinary, "plugin-binary", "", "the mesh-cni binary to install (default: beside this binary)")
	fs.StringVar(&cfg.HostRoot, "host-root", "", "the node's root as the runtime sees it, prefixing the socket path written into the conflist (empty on a real node)")
	fs.StringVar(&cfg.SocketPath, "plugin-socket", plugin.DefaultAgentSocket, "unix socket the plugin asks")
	fs.StringVar(&cfg.ZDSSocket, "zds-socket", zds.DefaultSocket, "unix socket ztunnel connects to")
	fs.DurationVar(&cfg.AddTimeout, "cni-add-timeout", plugin.DefaultAddTimeout, "how long a pod's CNI ADD waits for ztunnel before failing (the runtime retries)")
	fs.DurationVar(&cfg.VerifyInterval, "rules-verify-interval", time.Minute, "how often enrolled pods' rules are checked and repaired")
	fs.StringVar(&cfg.ReadyAddr, "ready-addr", ":8000", "address of /readyz (empty: off)")
	fs.StringVar(&cfg.MetricsAddr, "metrics-addr", ":15014", "address of /metrics (empty: off)")
	fs.Parse(args)

	var lvl slog.Level
	if err := lvl.UnmarshalText([]byte(*logLevel)); err != nil {
		fmt.Fprintln(os.Stderr, "cni-agent: --log-level:", err)
		os.Exit(2)
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: lvl})).With("component", "cni-agent")

	cfg.ExcludeNamespaces = splitList(*exclude)
	cfg.CaptureNamespaces = splitList(*capture)
	snat, err := netip.ParseAddr(*probeSNAT)
	if err != nil {
		fail(log, "parse --probe-snat", err)
	}
	cfg.Rules.ProbeSNAT = snat
	cfg.Rules.NoDNS = *noDNS
	if cfg.PluginBinary == "" {
		exe, err := os.Executable()
		if err != nil {
			fail(log, "find own executable", err)
		}
		cfg.PluginBinary = filepath.Join(filepath.Dir(exe), plugin.Type)
	}

	if uninstall {
		if err := agent.UninstallNode(cfg, log); err != nil {
			fail(log, "uninstall", err)
		}
		log.Info("uninstalled from this node")
		return
	}

	rc, err := kube.RESTConfig(*kubeconfig, 20, 40)
	if err != nil {
		fail(log, "kube client", err)
	}
	cs, err := kubernetes.NewForConfig(rc)
	if err != nil {
		fail(log, "kube client", err)
	}
	a, err := agent.New(cfg, cs, log)
	if err != nil {
		fail(log, "set up", err)
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	start := time.Now()
	if err := a.Run(ctx); err != nil && !errors.Is(err, context.Canceled) {
		fail(log, "run", err)
	}
	log.Info("stopped", "uptime", time.Since(start).Round(time.Second))
}

func fail(log *slog.Logger, what string, err error) {
	log.Error(what, "err", err)
	os.Exit(1)
}

func splitList(s string) []string {
	var out []string
	for _, v := range strings.Split(s, ",") {
		if v = strings.TrimSpace(v); v != "" {
			out = append(out, v)
		}
	}
	return out
}
