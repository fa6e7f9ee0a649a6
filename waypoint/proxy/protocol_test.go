package proxy

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/meshlite/meshlite/internal/hbone"
	"github.com/meshlite/meshlite/internal/identity"
	"github.com/meshlite/meshlite/proto/l7"
)

// grpcCall sends a unary gRPC-shaped request over h2c and returns the HTTP
// status, grpc-status (header or trailer) and body.
func grpcCall(t *testing.T, c *http.Client, method string) (int, string, string) {
	t.Helper()
	// One empty message: flag 0, length 0.
	req, _ := http.NewRequest("POST", "http://echo"+domain+method, bytes.NewReader([]byte{0, 0, 0, 0, 0}))
	req.Header.Set("Content-Type", "application/grpc")
	req.Header.Set("Te", "trailers")
	resp, err := c.Do(req)
	if err != nil {
		t.Fatalf("gRPC %s: %v", method, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	st := resp.Header.Get("Grpc-Status")
	if st == "" {
		st = resp.Trailer.Get("Grpc-Status")
	}
	return resp.StatusCode, st, string(b)
}

func grpcBackend(name string) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		if r.ProtoMajor != 2 || !strings.HasPrefix(r.Header.Get("Content-Type"), "application/grpc") {
			w.WriteHeader(http.StatusUnsupportedMediaType)
			return
		}
		io.Copy(io.Discard, r.Body)
		w.Header().Set("Content-Type", "application/grpc")
		w.Header().Set("Trailer", "Grpc-Status")
		w.WriteHeader(200)
		w.Write(append([]byte{0, 0, 0, 0, byte(len(name))}, name...))
		w.Header().Set("Grpc-Status", "0")
	}
}

func TestWaypoint_GRPCRouteByServiceAndMethod(t *testing.T) {
	m := newMesh(t)
	m.addService("echo", vip)
	m.addService("greeter-v2", "")
	m.addEndpoint("echo", true, grpcBackend("v1"))
	m.addEndpoint("greeter-v2", true, grpcBackend("v2"))
	m.bind("echo", &l7.ServiceConfig{GrpcRoutes: []*l7.GRPCRoute{{Namespace: "default", Name: "g", Rules: []*l7.GRPCRouteRule{
		{Matches: []*l7.GRPCRouteMatch{{Method: &l7.GRPCMethodMatch{Service: "helloworld.Greeter", Method: "SayHello"}}}, BackendRefs: []*l7.BackendRef{ref("greeter-v2", 1)}},
		{BackendRefs: []*l7.BackendRef{ref("echo", 1)}},
	}}}, AuthorizationPolicies: []*l7.AuthorizationPolicy{{Name: "no-admin", Namespace: "default", Action: l7.AuthorizationPolicy_DENY,
		Rules: []*l7.AuthorizationRule{{To: []*l7.Operation{{Paths: []string{"/admin.*"}}}}}}}})
	c := m.client(true)
	code, st, body := grpcCall(t, c, "/helloworld.Greeter/SayHello")
	if code != 200 || st != "0" || !strings.HasSuffix(body, "v2") {
		t.Errorf("SayHello: %d grpc-status=%q body %q, want v2", code, st, body)
	}
	code, st, body = grpcCall(t, c, "/helloworld.Greeter/SayBye")
	if code != 200 || st != "0" || !strings.HasSuffix(body, "v1") {
		t.Errorf("SayBye: %d grpc-status=%q body %q, want v1", code, st, body)
	}
	// A denial is a gRPC status, not an HTTP error.
	code, st, _ = grpcCall(t, c, "/admin.Ops/Drop")
	if code != 200 || st != "7" {
		t.Errorf("denied gRPC call: %d grpc-status=%q, want 200 with PERMISSION_DENIED (7)", code, st)
	}
}

func TestWaypoint_OpaqueTCPIsRelayedWithL4Policy(t *testing.T) {
	m := newMesh(t)
	m.addService("echo", vip)
	// A TCP echo app at the endpoint's 8080 instead of HTTP.
	ep := m.addEndpoint("echo", true, named("unused"))
	_ = ep
	m.bind("echo", nil)
	// Replace the app: the HTTP app answers non-HTTP with 400, which is
	// enough to show the bytes went through unparsed.
	c := m.rawTunnel()
	defer c.Close()
	c.SetDeadline(time.Now().Add(3 * time.Second))
	io.WriteString(c, "\x16\x03\x01 not http at all\r\n\r\n")
	b, _ := io.ReadAll(c)
	if !strings.HasPrefix(string(b), "HTTP/1.1 400") {
		t.Errorf("opaque bytes were not relayed to the app as they were: got %q", b)
	}
	// L4 DENY of the port: the tunnel is reset without reaching the app.
	m.bind("echo", &l7.ServiceConfig{AuthorizationPolicies: []*l7.AuthorizationPolicy{{Name: "deny-80", Namespace: "default",
		Action: l7.AuthorizationPolicy_DENY, Rules: []*l7.AuthorizationRule{{To: []*l7.Operation{{Ports: []uint32{80}}}}}}}})
	c2 := m.rawTunnel()
	defer c2.Close()
	c2.SetDeadline(time.Now().Add(3 * time.Second))
	io.WriteString(c2, "\x16\x03\x01 not http at all\r\n\r\n")
	b, err := io.ReadAll(c2)
	if len(b) != 0 || err == nil {
		t.Errorf("denied TCP got %q, %v; want a reset", b, err)
	}
	if !strings.Contains(m.logs.String(), `msg="connection denied" src.identity=cluster.local/ns/default/sa/client`) {
		t.Error("TCP denial not logged")
	}
}

func TestWaypoint_RefusesPeersOutsideTheMeshAndUnknownTargets(t *testing.T) {
	m := newMesh(t)
	m.addService("echo", vip)
	m.addEndpoint("echo", true, named("ok"))
	m.bind("echo", nil)
	// Another trust domain's CA and client.
	otherTD := spiffeid.RequireTrustDomainFromString("evil.example")
	other, err := identity.NewAuthority(otherTD, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	id, _ := spiffeid.FromSegments(otherTD, "ns", "default", "sa", "client")
	svid, _ := other.NewSVID(id, time.Hour)
	cl, err := hbone.NewClient(hbone.ClientConfig{Bundle: m.ca.Bundle()})
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	_, err = cl.Dial(ctx, hbone.DialRequest{Endpoint: netip.AddrPortFrom(netip.MustParseAddr(waypointIP), m.port),
		Target: netip.MustParseAddrPort(vip + ":80"), Source: staticSource{svid}, PeerIDs: []spiffeid.ID{m.wpID}})
	if err == nil {
		t.Fatal("a peer from another trust domain opened a tunnel")
	}
	// A mesh peer asking for a destination the waypoint does not serve.
	_, err = m.tunnels.Dial(ctx, hbone.DialRequest{Endpoint: netip.AddrPortFrom(netip.MustParseAddr(waypointIP), m.port),
		Target: netip.MustParseAddrPort("10.96.9.9:80"), Source: staticSource{m.clientSVID}, PeerIDs: []spiffeid.ID{m.wpID}})
	if !errors.Is(err, hbone.ErrBadRequest) {
		t.Errorf("unknown target: %v, want 400", err)
	}
	_ = tls.VersionTLS13
	_ = net.ErrClosed
}
