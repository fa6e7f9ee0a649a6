package app

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"io"
	"math/big"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/meshlite/meshlite/internal/hbone"
	"github.com/meshlite/meshlite/internal/identity"
	"github.com/meshlite/meshlite/internal/xds"
	pb "github.com/meshlite/meshlite/proto/ca"
	"github.com/meshlite/meshlite/proto/l7"
	"github.com/meshlite/meshlite/proto/workload"
)

// controlPlane is a real gRPC server over TLS (certificate for
// "istiod.test" from the test mesh root) serving the CA and a Delta ADS
// that answers each subscription with the resources it is given, once
// release is closed.
type controlPlane struct {
	pb.UnimplementedIstioCertificateServiceServer
	discovery.UnimplementedAggregatedDiscoveryServiceServer
	auth      *identity.Authority
	resources map[string][]*discovery.Resource
	release   chan struct{}
	mu        sync.Mutex
	node      *discovery.DeltaDiscoveryRequest
}

func (c *controlPlane) CreateCertificate(ctx context.Context, req *pb.IstioCertificateRequest) (*pb.IstioCertificateResponse, error) {
	csr, id, err := identity.ParseCSR([]byte(req.GetCsr()))
	if err != nil {
		return nil, err
	}
	chain, err := c.auth.Sign(csr, id, time.Hour)
	if err != nil {
		return nil, err
	}
	return &pb.IstioCertificateResponse{CertChain: []string{string(identity.EncodeCertsPEM(chain))}}, nil
}

func (c *controlPlane) DeltaAggregatedResources(st discovery.AggregatedDiscoveryService_DeltaAggregatedResourcesServer) error {
	for {
		req, err := st.Recv()
		if err != nil {
			return nil
		}
		if req.GetNode() != nil {
			c.mu.Lock()
			c.node = req
			c.mu.Unlock()
		}
		if req.GetResponseNonce() != "" {
			continue // an ACK
		}
		select {
		case <-c.release:
		case <-st.Context().Done():
			return nil
		}
		if err := st.Send(&discovery.DeltaDiscoveryResponse{TypeUrl: req.GetTypeUrl(), Nonce: "n-" + req.GetTypeUrl(),
			Resources: c.resources[req.GetTypeUrl()]}); err != nil {
			return err
		}
	}
}

func mustAny(t *testing.T, name string, a *anypb.Any, err error) *discovery.Resource {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
	return &discovery.Resource{Name: name, Version: "1", Resource: a}
}

func TestApp_ServesWithConfigAndCertificateFromTheControlPlane(t *testing.T) {
	td := spiffeid.RequireTrustDomainFromString("cluster.local")
	auth, err := identity.NewAuthority(td, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	_, keyPEM, _ := auth.MarshalPEM()
	rootKey, _ := identity.ParseKeyPEM(keyPEM)
	srvKey, _ := identity.GenerateKey()
	der, err := x509.CreateCertificate(nil, &x509.Certificate{SerialNumber: big.NewInt(9), Subject: pkix.Name{CommonName: "istiod"},
		DNSNames: []string{"istiod.test"}, NotBefore: time.Now().Add(-time.Minute), NotAfter: time.Now().Add(time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}, auth.Root(), srvKey.Public(), rootKey)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, "root-cert.pem"), identity.EncodeCertsPEM([]*x509.Certificate{auth.Root()}), 0o600)
	os.WriteFile(filepath.Join(dir, "token"), []byte("tok"), 0o600)

	// The backend: a plain (non-HBONE) pod app on 127.78.0.5:8080.
	app := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "hello from "+r.Host) })}
	appLn, err := net.Listen("tcp", "127.78.0.5:8080")
	if err != nil {
		t.Fatal(err)
	}
	go app.Serve(appLn)
	defer app.Close()

	const host = "echo.default.svc.cluster.local"
	cp := &controlPlane{auth: auth, release: make(chan struct{}), resources: map[string][]*discovery.Resource{}}
	sc, err := anypb.New(&l7.ServiceConfig{Namespace: "default", Name: "echo", Hostname: host, Addresses: []string{"10.96.0.10"},
		Ports: []*l7.ServicePort{{Port: 80, TargetPort: 8080}}})
	cp.resources[l7.TypeURL] = []*discovery.Resource{mustAny(t, "default/"+host, sc, err)}
	wl, err := anypb.New(&workload.Address{Type: &workload.Address_Workload{Workload: &workload.Workload{Uid: "Kubernetes//Pod/default/echo",
		Name: "echo", Namespace: "default", Addresses: [][]byte{netip.MustParseAddr("127.78.0.5").AsSlice()},
		Services: map[string]*workload.PortList{"default/" + host: {Ports: []*workload.Port{{ServicePort: 80, TargetPort: 8080}}}}}}})
	cp.resources[xds.TypeAddress] = []*discovery.Resource{mustAny(t, "Kubernetes//Pod/default/echo", wl, err)}
	gs := grpc.NewServer(grpc.Creds(credentials.NewTLS(&tls.Config{MinVersion: tls.VersionTLS13,
		Certificates: []tls.Certificate{{Certificate: [][]byte{der}, PrivateKey: srvKey}}})))
	pb.RegisterIstioCertificateServiceServer(gs, cp)
	discovery.RegisterAggregatedDiscoveryServiceServer(gs, cp)
	cpLn, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go gs.Serve(cpLn)
	defer gs.Stop()

	accessLog := &lockedBuffer{}
	a, err := New(Config{XDSAddress: cpLn.Addr().String(), XDSServerName: "istiod.test", RootCert: filepath.Join(dir, "root-cert.pem"),
		TokenPath: filepath.Join(dir, "token"), ClusterID: "Kubernetes", TrustDomain: "cluster.local", DomainSuffix: "cluster.local",
		PodName: "waypoint-abc", PodNamespace: "default", PodIP: "127.78.0.1", ServiceAccount: "waypoint", GatewayName: "waypoint",
		HBONEAddr: "127.78.0.1:0", MetricsAddr: "127.0.0.1:0", ReadyAddr: "127.0.0.1:0", AdminAddr: "127.0.0.1:0",
		AccessLogOut: accessLog})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- a.Run(ctx) }()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
	}()
	get := func(name, path string) (int, string) {
		resp, err := http.Get("http://" + a.Addr(name).String() + path)
		if err != nil {
			return 0, err.Error()
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	waitFor := func(what string, cond func() bool) {
		t.Helper()
		deadline := time.Now().Add(10 * time.Second)
		for !cond() {
			if time.Now().After(deadline) {
				t.Fatalf("timed out waiting for %s", what)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	// Certificate but no configuration yet: not ready.
	waitFor("the certificate", func() bool { return a.certs.Ready() == nil })
	if code, body := get("ready", "/healthz/ready"); code != 503 || !strings.Contains(body, "configuration") {
		t.Errorf("ready without configuration: %d %q", code, body)
	}
	close(cp.release)
	waitFor("readiness", func() bool { code, _ := get("ready", "/healthz/ready"); return code == 200 })

	cp.mu.Lock()
	node := cp.node.GetNode()
	cp.mu.Unlock()
	if node.GetId() != "waypoint~127.78.0.1~waypoint-abc.default~default.svc.cluster.local" ||
		node.GetMetadata().GetFields()["GATEWAY_NAME"].GetStringValue() != "waypoint" ||
		node.GetMetadata().GetFields()["SERVICE_ACCOUNT"].GetStringValue() != "waypoint" {
		t.Errorf("xDS node %v", node)
	}

	// A client pod's tunnel through the waypoint to the Service.
	clientID, _ := identity.NewID("cluster.local", "default", "client")
	clientSVID, _ := auth.NewSVID(clientID, time.Hour)
	wpID, _ := identity.NewID("cluster.local", "default", "waypoint")
	cl, err := hbone.NewClient(hbone.ClientConfig{Bundle: auth.Bundle()})
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	hc := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DisableKeepAlives: true,
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return cl.Dial(ctx, hbone.DialRequest{Endpoint: a.Addr("hbone").(*net.TCPAddr).AddrPort(), Target: netip.MustParseAddrPort("10.96.0.10:80"),
				Source: staticSource{clientSVID}, PeerIDs: []spiffeid.ID{wpID}})
		}}}
	resp, err := hc.Get("http://" + host + "/")
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || string(b) != "hello from "+host {
		t.Errorf("through the waypoint: %d %q", resp.StatusCode, b)
	}
	// The access log is buffered and flushed within a second or so.
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		line := accessLog.String()
		if strings.Contains(line, `"msg":"access"`) && strings.Contains(line, `"authority":"`+host+`"`) &&
			strings.Contains(line, `"status":200`) && strings.Contains(line, `"part":"access"`) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no access log line: %q", line)
		}
	}

	if code, body := get("metrics", "/metrics"); code != 200 || !strings.Contains(body, `istio_requests_total{`) ||
		!strings.Contains(body, `reporter="waypoint"`) || !strings.Contains(body, `source_principal="spiffe://cluster.local/ns/default/sa/client"`) {
		t.Errorf("metrics: %d\n%s", code, body)
	}
	code, body := get("admin", "/config_dump")
	var dump struct {
		Node        string            `json:"node"`
		Services    []json.RawMessage `json:"services"`
		Certificate map[string]any    `json:"certificate"`
		Endpoints   map[string][]any  `json:"endpoints"`
	}
	if err := json.Unmarshal([]byte(body), &dump); err != nil || code != 200 {
		t.Fatalf("config_dump: %d %v\n%s", code, err, body)
	}
	if len(dump.Services) != 1 || dump.Certificate["identity"] != wpID.String() || len(dump.Endpoints["default/"+host+":80"]) != 1 {
		t.Errorf("config_dump: %s", body)
	}
	// The bench and operators profile the waypoint through admin.
	if code, body := get("admin", "/debug/pprof/"); code != 200 || !strings.Contains(body, "goroutine") {
		t.Errorf("pprof index: %d\n%.300s", code, body)
	}
}

type lockedBuffer struct {
	mu sync.Mutex
	b  strings.Builder
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

type staticSource struct{ s *x509svid.SVID }

func (s staticSource) GetX509SVID() (*x509svid.SVID, error) { return s.s, nil }

func TestConfig_CAInheritsTheXDSServerName(t *testing.T) {
	base := Config{XDSAddress: "10.244.0.4:15012", XDSServerName: "istiod.istio-system.svc", RootCert: "r", TokenPath: "t",
		ClusterID: "K", TrustDomain: "cluster.local", DomainSuffix: "cluster.local", PodName: "p", PodNamespace: "n",
		PodIP: "10.0.0.1", ServiceAccount: "waypoint", GatewayName: "waypoint", HBONEAddr: ":15008"}
	for _, c := range []struct {
		ca, caName, want string
	}{
		{"", "", "istiod.istio-system.svc"},
		{"10.244.0.4:15012", "", "istiod.istio-system.svc"}, // CA_ADDR = XDS_ADDRESS, as istiod-lite renders it
		{"ca.example:15012", "", "ca.example"},
		{"10.244.0.4:15012", "ca.test", "ca.test"},
	} {
		cfg := base
		cfg.CAAddress, cfg.CAServerName = c.ca, c.caName
		if err := cfg.check(); err != nil {
			t.Fatal(err)
		}
		if cfg.CAServerName != c.want {
			t.Errorf("CA %q name %q: server name %q, want %q", c.ca, c.caName, cfg.CAServerName, c.want)
		}
	}
}
