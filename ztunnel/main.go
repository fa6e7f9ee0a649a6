// Command ztunnel is meshlite's per-node zero-trust tunnel: it takes over
// the traffic of the node's ambient pods from the CNI agent and carries it
// over HBONE with mutual TLS, under L4 policy. See package app for its parts.
package main

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/meshlite/meshlite/internal/caclient"
	"github.com/meshlite/meshlite/internal/kube"
	"github.com/meshlite/meshlite/ztunnel/admin"
	"github.com/meshlite/meshlite/ztunnel/app"
	"github.com/meshlite/meshlite/ztunnel/dns"
	"github.com/meshlite/meshlite/ztunnel/inpod"
	"github.com/meshlite/meshlite/ztunnel/proxy"
)

func main() {
	var cfg app.Config
	var tunnel, logLevel string
	flag.StringVar(&cfg.XDSAddress, "xds-address", "istiod.istio-system.svc:15012", "istiod-lite xDS address, host:port (an IP works without DNS)")
	flag.StringVar(&cfg.XDSServerName, "xds-server-name", "", "name istiod-lite's certificate must hold (default: the host of --xds-address)")
	flag.StringVar(&cfg.CAAddress, "ca-address", "", "istiod-lite CA address (default: --xds-address)")
	flag.StringVar(&cfg.CAServerName, "ca-server-name", "", "name the CA's certificate must hold (default: --xds-server-name when --ca-address is unset, else the host of --ca-address)")
	flag.StringVar(&cfg.RootCert, "root-cert", caclient.DefaultRootCertPath, "mesh root certificate (istio-ca-root-cert ConfigMap, key root-cert.pem)")
	flag.StringVar(&cfg.TokenPath, "token-path", caclient.DefaultTokenPath, "projected service-account token with audience "+kube.TokenAudience)
	flag.StringVar(&cfg.ZDSSocket, "zds-socket", inpod.DefaultSocket, "the CNI agent's ZDS socket")
	flag.StringVar(&tunnel, "tunnel", "h2", "HBONE transport for outbound tunnels: h2, quic or auto")
	flag.StringVar(&cfg.NodeName, "node-name", os.Getenv("NODE_NAME"), "node this ztunnel serves")
	flag.StringVar(&cfg.ClusterID, "cluster-id", kube.DefaultClusterID, "cluster id")
	flag.StringVar(&cfg.TrustDomain, "trust-domain", kube.DefaultDomainSuffix, "SPIFFE trust domain")
	flag.StringVar(&cfg.DomainSuffix, "domain-suffix", kube.DefaultDomainSuffix, "cluster DNS domain")
	flag.StringVar(&cfg.Network, "network", os.Getenv("NETWORK"), "network of this node's addresses")
	flag.StringVar(&cfg.PodName, "pod-name", os.Getenv("POD_NAME"), "ztunnel's pod name (xDS node)")
	flag.StringVar(&cfg.PodNamespace, "pod-namespace", envOr("POD_NAMESPACE", kube.DefaultRootNamespace), "ztunnel's namespace (xDS node)")
	flag.StringVar(&cfg.PodIP, "pod-ip", envOr("INSTANCE_IP", os.Getenv("POD_IP")), "ztunnel's pod IP (xDS node)")
	flag.StringVar(&cfg.ServiceAccount, "service-account", envOr("SERVICE_ACCOUNT", "ztunnel"), "ztunnel's service account (xDS node)")
	flag.StringVar(&cfg.AdminAddr, "admin-addr", admin.DefaultAdminAddr, "admin endpoint (keep it on localhost; empty: off)")
	flag.StringVar(&cfg.MetricsAddr, "metrics-addr", admin.DefaultMetricsAddr, "Prometheus metrics endpoint (empty: off)")
	flag.StringVar(&cfg.ReadyAddr, "ready-addr", admin.DefaultReadyAddr, "readiness endpoint /healthz/ready (empty: off)")
	flag.DurationVar(&cfg.CertTTL, "cert-ttl", 0, "workload certificate lifetime to ask for (0: the CA's default)")
	flag.StringVar(&cfg.ResolvConf, "dns-resolv-conf", dns.DefaultResolvConf, "resolv.conf naming the DNS proxy's upstream resolvers")
	flag.DurationVar(&cfg.DNSTimeout, "dns-forward-timeout", 2*time.Second, "how long a forwarded DNS query may take before the pod gets SERVFAIL")
	flag.DurationVar(&cfg.HandoverTimeout, "handover-timeout", 10*time.Second, "on SIGTERM, how long to keep accepting while waiting for a new ztunnel to listen in every pod (0: stop at once)")
	flag.DurationVar(&cfg.DrainTimeout, "drain-timeout", 15*time.Second, "on SIGTERM, how long established connections may run on after accepting stops")
	flag.StringVar(&logLevel, "log-level", "info", "debug, info, warn or error")
	flag.Parse()

	cfg.LogLevel = new(slog.LevelVar)
	if err := cfg.LogLevel.UnmarshalText([]byte(logLevel)); err != nil {
		fail(fmt.Errorf("bad --log-level %q: %w", logLevel, err))
	}
	var err error
	if cfg.Tunnel, err = proxy.ParseTunnel(tunnel); err != nil {
		fail(err)
	}
	cfg.Log = slog.New(slog.NewJSONHandler(os.Stderr, &slog.HandlerOptions{Level: cfg.LogLevel})).With("component", "ztunnel")

	a, err := app.New(cfg)
	if err != nil {
		fail(err)
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	if err := a.Run(ctx); err != nil {
		cfg.Log.Error("ztunnel stopped on error", "error", err)
		os.Exit(1)
	}
}

func envOr(k, def string) string {
	if v := os.Getenv(k); v != "" {
		return v
	}
	return def
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, "ztunnel:", err)
	os.Exit(2)
}
