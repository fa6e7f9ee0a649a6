package loopback

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/meshlite/meshlite/internal/hbone"
	"github.com/meshlite/meshlite/internal/identity"
)

func hboneH2Row(e *env) (row, error)   { return hboneRow(e, hbone.H2, "HBONE over HTTP/2") }
func hboneQUICRow(e *env) (row, error) { return hboneRow(e, hbone.H3, "HBONE over QUIC (HTTP/3)") }

// hboneRow runs our HBONE server in front of the sink, as ztunnel inbound
// does, and dials through a pooled client, as ztunnel outbound does.
func hboneRow(e *env, t hbone.Transport, name string) (row, error) {
	srv, err := hbone.NewServer(hbone.ServerConfig{
		Certificates: identity.StaticCertificates(map[netip.Addr]*x509svid.SVID{e.serverIP: e.server}),
		Bundle:       e.ca.Bundle(),
		Authorize:    identity.AuthorizeMemberOf(e.ca.TrustDomain()),
		Logger:       e.log,
		Handler: func(ctx context.Context, r *hbone.Request) (net.Conn, error) {
			var d net.Dialer
			c, err := d.DialContext(ctx, "tcp", r.Target.String())
			if err != nil {
				return nil, errors.Join(hbone.ErrUpstream, err)
			}
			return c, nil
		},
	})
	if err != nil {
		return row{}, fmt.Errorf("%s server: %w", name, err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	var endpoint netip.AddrPort
	switch t {
	case hbone.H2:
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			cancel()
			return row{}, err
		}
		endpoint = netip.MustParseAddrPort(ln.Addr().String())
		go func() { done <- srv.ServeH2(ctx, ln) }()
	case hbone.H3:
		pc, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
		if err != nil {
			cancel()
			return row{}, err
		}
		endpoint = netip.MustParseAddrPort(pc.LocalAddr().String())
		go func() { done <- srv.ServeH3(ctx, pc); pc.Close() }()
	}
	cl, err := hbone.NewClient(hbone.ClientConfig{Bundle: e.ca.Bundle(), Logger: e.log})
	if err != nil {
		cancel()
		return row{}, err
	}
	e.closers = append(e.closers, func() {
		cl.Close()
		cancel()
		<-done
	})
	target := netip.MustParseAddrPort(e.sinkAddr)
	return row{name: name, dial: func(ctx context.Context) (net.Conn, error) {
		return cl.Dial(ctx, hbone.DialRequest{
			Transport: t, Endpoint: endpoint, Target: target,
			Source: e.client, PeerIDs: []spiffeid.ID{e.server.ID},
		})
	}}, nil
}
