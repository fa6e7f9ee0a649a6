package interop

import (
	"crypto/tls"
	"log"
	"net/http"
	"net/netip"
	"slices"
	"testing"

	istiohbone "istio.io/istio/pkg/hbone"
)

// istioServer runs Istio's HBONE server (istio.io/istio/pkg/hbone.NewServer)
// behind our server TLS config, the way Istio's echo test server runs it: a
// TLS listener offering h2, then http.Server.Serve. Istio's handler dials the
// CONNECT authority itself; it cannot be replaced.
type istioServer struct {
	addr string
	l    *countingListener
}

func startIstioServer(t *testing.T, cfg *tls.Config) *istioServer {
	t.Helper()
	cfg = cfg.Clone()
	if !slices.Contains(cfg.NextProtos, "h2") {
		cfg.NextProtos = append(cfg.NextProtos, "h2")
	}
	l := listenLoopback(t)
	srv := istiohbone.NewServer()
	srv.ErrorLog = log.New(newTestWriter(t), "istio http.Server: ", 0)
	go func() { _ = srv.Serve(tls.NewListener(l, cfg)) }()
	t.Cleanup(func() { _ = srv.Close() })
	return &istioServer{addr: l.Addr().String(), l: l}
}

// istioDialer is Istio's HBONE client (hbone.NewDialer) with our client TLS
// config; it runs HTTP/2 CONNECT over x/net/http2's Transport.
func istioDialer(proxyAddr string, cfg *tls.Config, headers http.Header) istiohbone.Dialer {
	return istiohbone.NewDialer(istiohbone.Config{
		ProxyAddress: proxyAddr,
		Headers:      headers,
		TLS:          cfg,
	})
}

func (s *istioServer) addrPort() netip.AddrPort { return netip.MustParseAddrPort(s.addr) }
