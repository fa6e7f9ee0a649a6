// Command istiod-lite is meshlite's control plane: it watches Kubernetes,
// serves the ambient Workload API over Delta ADS and is the mesh's SPIFFE
// certificate authority, both on port 15012 (gRPC over TLS).
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

	"github.com/meshlite/meshlite/internal/kube"
	"github.com/meshlite/meshlite/istiod-lite/controlplane"
)

func main() {
	var (
		cfg        controlplane.Config
		kubeconfig string
		hosts      string
		trusted    string
		logLevel   string
		qps        float64
		burst      int
	)
	flag.StringVar(&kubeconfig, "kubeconfig", os.Getenv("KUBECONFIG"), "kubeconfig file (empty: in-cluster service account)")
	flag.Float64Var(&qps, "kube-qps", 50, "apiserver requests per second")
	flag.IntVar(&burst, "kube-burst", 100, "apiserver request burst")
	flag.StringVar(&cfg.Namespace, "namespace", envOr("POD_NAMESPACE", kube.DefaultRootNamespace), "namespace istiod-lite runs in (holds the CA secret)")
	flag.StringVar(&cfg.ServiceAccount, "service-account", envOr("SERVICE_ACCOUNT", "istiod"), "service account istiod-lite runs as (its serving identity)")
	flag.StringVar(&cfg.Mesh.ClusterID, "cluster-id", kube.DefaultClusterID, "cluster id, part of workload uids")
	flag.StringVar(&cfg.Mesh.TrustDomain, "trust-domain", kube.DefaultDomainSuffix, "SPIFFE trust domain")
	flag.StringVar(&cfg.Mesh.DomainSuffix, "domain-suffix", kube.DefaultDomainSuffix, "cluster DNS domain of service hostnames")
	flag.StringVar(&cfg.Mesh.RootNamespace, "root-namespace", kube.DefaultRootNamespace, "namespace of mesh-wide policies")
	flag.StringVar(&cfg.Mesh.Network, "network", "", "network of this cluster's addresses")
	flag.StringVar(&cfg.GRPCAddr, "grpc-addr", ":15012", "xDS and CA listen address (TLS)")
	flag.StringVar(&cfg.DebugAddr, "debug-addr", "127.0.0.1:15014", "debug and metrics listen address (empty: off)")
	flag.StringVar(&cfg.ReadyAddr, "ready-addr", ":8080", "readiness (/ready) listen address (empty: off)")
	flag.StringVar(&hosts, "serving-hosts", "", "comma-separated DNS names and IPs of the serving certificate (default: istiod.<ns>.svc and friends)")
	flag.StringVar(&trusted, "trusted-node-accounts", "istio-system/ztunnel", "comma-separated namespace/serviceaccount of node proxies allowed to request pod identities on their node")
	flag.DurationVar(&cfg.RootTTL, "root-ttl", 10*365*24*time.Hour, "lifetime of a newly generated root CA")
	flag.DurationVar(&cfg.ServingTTL, "serving-cert-ttl", 24*time.Hour, "lifetime of istiod-lite's own certificate")
	flag.DurationVar(&cfg.WorkloadTTL, "workload-cert-ttl", 24*time.Hour, "default workload certificate lifetime")
	flag.DurationVar(&cfg.MaxWorkloadTTL, "max-workload-cert-ttl", 90*24*time.Hour, "longest workload certificate lifetime a client may ask for")
	flag.DurationVar(&cfg.Debounce, "push-debounce", 10*time.Millisecond, "quiet period before pushing changes")
	flag.DurationVar(&cfg.MaxPushDelay, "push-max-delay", 100*time.Millisecond, "longest a change waits for quiet")
	flag.StringVar(&cfg.Waypoints.Image, "waypoint-image", "meshlite/waypoint:dev", "image of the waypoint proxies deployed for istio-waypoint Gateways")
	flag.StringVar(&cfg.Waypoints.XDSAddress, "proxy-xds-address", "", "address waypoints reach xDS and the CA at (default istiod.<namespace>.svc:15012)")
	flag.StringVar(&cfg.Waypoints.XDSServerName, "proxy-xds-server-name", "", "DNS name waypoints verify istiod-lite's certificate for (default istiod.<namespace>.svc)")
	flag.BoolVar(&cfg.LeaderElection, "leader-elect", false, "run the waypoint controller and the route status writer only on the replica holding the Lease (for more than one replica)")
	flag.StringVar(&cfg.LeaseName, "leader-elect-lease", "istiod-lite-leader", "name of the leader-election Lease in -namespace")
	flag.StringVar(&cfg.Identity, "leader-elect-identity", envOr("POD_NAME", hostname()), "this replica's name in the Lease")
	flag.StringVar(&logLevel, "log-level", "info", "debug, info, warn or error")
	flag.Parse()

	var lvl slog.Level
	if err := lvl.UnmarshalText([]byte(logLevel)); err != nil {
		fmt.Fprintf(os.Stderr, "istiod-lite: bad -log-level %q: %v\n", logLevel, err)
		os.Exit(2)
	}
	log := slog.New(slog.NewJSONHandler(os.Stderr, &slog.HandlerOptions{Level: lvl})).With("component", "istiod-lite")
	cfg.Log = log
	cfg.ServingHosts = splitList(hosts)
	cfg.TrustedNodeAccounts = splitList(trusted)

	rc, err := kube.RESTConfig(kubeconfig, float32(qps), burst)
	if err != nil {
		log.Error("cannot reach Kubernetes", "err", err)
		os.Exit(1)
	}
	cfg.RESTConfig = rc

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	cp, err := controlplane.New(ctx, cfg)
	if err != nil {
		log.Error("cannot start", "err", err)
		os.Exit(1)
	}
	if err := cp.Run(ctx); err != nil {
		log.Error("stopped on error", "err", err)
		os.Exit(1)
	}
}

func envOr(k, def string) string {
	if v := os.Getenv(k); v != "" {
		return v
	}
	return def
}

func hostname() string {
	h, _ := os.Hostname()
	return h
}

func splitList(s string) []string {
	var out []string
	for _, p := range strings.Split(s, ",") {
		if p = strings.TrimSpace(p); p != "" {
			out = append(out, p)
		}
	}
	return out
}
