// Command waypoint is meshlite's L7 proxy for the Services of a namespace
// that asks for one (a Gateway of class istio-waypoint): it terminates HBONE
// from ztunnels, applies HTTPRoute/GRPCRoute routing, resilience policy and
// L7 authorization, and forwards over HBONE with its own identity. See
// package app for its parts.
package main

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"runtime"
	"syscall"

	"github.com/meshlite/meshlite/internal/kube"
	"github.com/meshlite/meshlite/waypoint/app"
)

func main() {
	// Every setting has a flag and, for the pod istiod-lite renders, an
	// environment variable (see /work/notes/waypoint-deploy-contract.md).
	var cfg app.Config
	var logLevel string
	flag.StringVar(&cfg.XDSAddress, "xds-address", envOr("XDS_ADDRESS", "istiod.istio-system.svc:15012"), "istiod-lite xDS address, host:port (an IP works without DNS)")
	flag.StringVar(&cfg.XDSServerName, "xds-server-name", os.Getenv("XDS_SERVER_NAME"), "name istiod-lite's certificate must hold (default: the host of --xds-address)")
	flag.StringVar(&cfg.CAAddress, "ca-address", os.Getenv("CA_ADDR"), "istiod-lite CA address (default: --xds-address)")
	flag.StringVar(&cfg.CAServerName, "ca-server-name", "", "name the CA's certificate must hold (default: --xds-server-name when --ca-address is unset)")
	flag.StringVar(&cfg.RootCert, "root-cert", "/var/run/secrets/istio/root-cert.pem", "mesh root certificate (istio-ca-root-cert ConfigMap, key root-cert.pem)")
	flag.StringVar(&cfg.TokenPath, "token-path", "/var/run/secrets/tokens/istio-token", "projected service-account token with audience "+kube.TokenAudience)
	flag.StringVar(&cfg.ClusterID, "cluster-id", envOr("CLUSTER_ID", kube.DefaultClusterID), "cluster id")
	flag.StringVar(&cfg.TrustDomain, "trust-domain", envOr("TRUST_DOMAIN", kube.DefaultDomainSuffix), "SPIFFE trust domain")
	flag.StringVar(&cfg.DomainSuffix, "domain-suffix", envOr("DOMAIN_SUFFIX", kube.DefaultDomainSuffix), "cluster DNS domain")
	flag.StringVar(&cfg.PodName, "pod-name", os.Getenv("POD_NAME"), "the waypoint's pod name (xDS node)")
	flag.StringVar(&cfg.PodNamespace, "pod-namespace", os.Getenv("POD_NAMESPACE"), "the waypoint's namespace (xDS node, identity)")
	flag.StringVar(&cfg.PodIP, "pod-ip", envOr("INSTANCE_IP", os.Getenv("POD_IP")), "the waypoint's pod IP (xDS node)")
	flag.StringVar(&cfg.ServiceAccount, "service-account", os.Getenv("SERVICE_ACCOUNT"), "the waypoint's service account (identity)")
	flag.StringVar(&cfg.GatewayName, "gateway-name", envOr("GATEWAY_NAME", "waypoint"), "name of the Gateway this waypoint serves")
	flag.StringVar(&cfg.HBONEAddr, "hbone-addr", ":15008", "HBONE listener (TCP for HTTP/2, UDP for QUIC)")
	flag.StringVar(&cfg.MetricsAddr, "metrics-addr", ":15020", "Prometheus metrics endpoint (empty: off)")
	flag.StringVar(&cfg.ReadyAddr, "ready-addr", ":15021", "readiness endpoint /healthz/ready (empty: off)")
	flag.StringVar(&cfg.AdminAddr, "admin-addr", "127.0.0.1:15000", "admin endpoint /config_dump (keep it on localhost; empty: off)")
	flag.StringVar(&cfg.UpstreamTunnel, "tunnel", "h2", "HBONE transport to endpoints: h2 or quic")
	flag.StringVar(&cfg.OTLPEndpoint, "otlp-endpoint", os.Getenv("OTLP_ENDPOINT"), "OTLP/gRPC collector host:port for spans (empty: propagate traceparent only)")
	flag.DurationVar(&cfg.CertTTL, "cert-ttl", 0, "certificate lifetime to ask for (0: the CA's default)")
	flag.StringVar(&logLevel, "log-level", "info", "debug, info, warn or error")
	maxProcs := flag.Int("max-procs", 0, "OS threads running Go code at once (0: GOMAXPROCS or one per CPU)")
	flag.Parse()
	if *maxProcs > 0 && os.Getenv("GOMAXPROCS") == "" {
		runtime.GOMAXPROCS(*maxProcs)
	}

	cfg.LogLevel = new(slog.LevelVar)
	if err := cfg.LogLevel.UnmarshalText([]byte(logLevel)); err != nil {
		fail(fmt.Errorf("bad --log-level %q: %w", logLevel, err))
	}
	cfg.Log = slog.New(slog.NewJSONHandler(os.Stderr, &slog.HandlerOptions{Level: cfg.LogLevel})).With("component", "waypoint")
	cfg.AccessLogOut = os.Stderr
	a, err := app.New(cfg)
	if err != nil {
		fail(err)
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	if err := a.Run(ctx); err != nil {
		cfg.Log.Error("waypoint stopped on error", "error", err)
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
	fmt.Fprintln(os.Stderr, "waypoint:", err)
	os.Exit(2)
}
