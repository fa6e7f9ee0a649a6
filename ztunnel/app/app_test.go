package app

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"io"
	"log/slog"
	"math/big"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/meshlite/meshlite/internal/identity"
	"github.com/meshlite/meshlite/internal/xds"
	pb "github.com/meshlite/meshlite/proto/ca"
	"github.com/meshlite/meshlite/proto/workload"
	"github.com/meshlite/meshlite/proto/zds"
	"github.com/meshlite/meshlite/ztunnel/admin"
	"github.com/meshlite/meshlite/ztunnel/podnet"
	"github.com/meshlite/meshlite/ztunnel/proxy"
)

const token = "ztunnel-sa-token"

// istiod is a real gRPC server over TLS speaking the two protocols ztunnel
// uses, as istiod-lite does on 15012: Delta ADS (serving a fixed Workload
// API state, then taking ACKs) and IstioCertificateService (impersonation
// allowed for the identities it lists). Both check the Bearer token.
type istiod struct {
	discovery.UnimplementedAggregatedDiscoveryServiceServer
	pb.UnimplementedIstioCertificateServiceServer
	ca      *identity.Authority
	addr    string
	srv     *grpc.Server
	allowed map[string]bool
	addrs   []*discovery.Resource

	mu      sync.Mutex
	nodes   []*corev3.Node
	acks    map[string]int
	nacks   []string
	csrs    []string // impersonated identities
	cluster []string
}

func bearer(ctx context.Context) error {
	md, _ := metadata.FromIncomingContext(ctx)
	if v := md.Get("authorization"); len(v) != 1 || v[0] != "Bearer "+token {
		return status.Error(codes.Unauthenticated, "bad token")
	}
	return nil
}

func (s *istiod) DeltaAggregatedResources(st discovery.AggregatedDiscoveryService_DeltaAggregatedResourcesServer) error {
	if err := bearer(st.Context()); err != nil {
		return err
	}
	for {
		req, err := st.Recv()
		if err != nil {
			return nil
		}
		s.mu.Lock()
		if req.GetNode() != nil {
			s.nodes = append(s.nodes, req.GetNode())
		}
		if req.GetResponseNonce() != "" {
			if req.GetErrorDetail() != nil {
				s.nacks = append(s.nacks, req.GetErrorDetail().GetMessage())
			} else {
				s.acks[req.GetTypeUrl()]++
			}
			s.mu.Unlock()
			continue
		}
		s.mu.Unlock()
		resp := &discovery.DeltaDiscoveryResponse{TypeUrl: req.GetTypeUrl(), Nonce: "n-" + req.GetTypeUrl()}
		if req.GetTypeUrl() == xds.TypeAddress {
			resp.Resources = s.addrs
		}
		if err := st.Send(resp); err != nil {
			return err
		}
	}
}

func (s *istiod) CreateCertificate(ctx context.Context, req *pb.IstioCertificateRequest) (*pb.IstioCertificateResponse, error) {
	if err := bearer(ctx); err != nil {
		return nil, err
	}
	md, _ := metadata.FromIncomingContext(ctx)
	imp := req.GetMetadata().GetFields()["ImpersonatedIdentity"].GetStringValue()
	s.mu.Lock()
	s.csrs = append(s.csrs, imp)
	s.cluster = append(s.cluster, md.Get("clusterid")...)
	allowed := s.allowed[imp]
	s.mu.Unlock()
	if !allowed {
		return nil, status.Errorf(codes.PermissionDenied, "no pod with identity %s on the node", imp)
	}
	block, _ := pem.Decode([]byte(req.GetCsr()))
	if block == nil {
		return nil, status.Error(codes.InvalidArgument, "no CSR")
	}
	csr, err := x509.ParseCertificateRequest(block.Bytes)
	if err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	certs, err := s.ca.Sign(csr, spiffeid.RequireFromString(imp), time.Hour)
	if err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	resp := &pb.IstioCertificateResponse{}
	for _, c := range append(certs, s.ca.Root()) {
		resp.CertChain = append(resp.CertChain, string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})))
	}
	return resp, nil
}

func startIstiod(t *testing.T, wls []*workload.Workload, allowed ...string) *istiod {
	t.Helper()
	ca, err := identity.NewAuthority(spiffeid.RequireTrustDomainFromString("cluster.local"), time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	s := &istiod{ca: ca, allowed: map[string]bool{}, acks: map[string]int{}}
	for _, a := range allowed {
		s.allowed[a] = true
	}
	for _, w := range wls {
		body, err := anypb.New(&workload.Address{Type: &workload.Address_Workload{Workload: w}})
		if err != nil {
			t.Fatal(err)
		}
		body.TypeUrl = xds.TypeAddress
		s.addrs = append(s.addrs, &discovery.Resource{Name: w.GetUid(), Version: "1", Resource: body})
	}
	// Serving certificate for 127.0.0.1 and istiod's name, under the mesh root.
	chainPEM, keyPEM, _ := ca.MarshalPEM()
	chain, _ := identity.ParseCertsPEM(chainPEM)
	caKey, _ := identity.ParseKeyPEM(keyPEM)
	key, _ := identity.GenerateKey()
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(7), NotBefore: time.Now().Add(-time.Minute), NotAfter: time.Now().Add(time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1)}, DNSNames: []string{"istiod.istio-system.svc"}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, chain[0], key.Public(), caKey)
	if err != nil {
		t.Fatal(err)
	}
	s.srv = grpc.NewServer(grpc.Creds(credentials.NewTLS(&tls.Config{MinVersion: tls.VersionTLS13,
		Certificates: []tls.Certificate{{Certificate: [][]byte{der}, PrivateKey: key}}})))
	discovery.RegisterAggregatedDiscoveryServiceServer(s.srv, s)
	pb.RegisterIstioCertificateServiceServer(s.srv, s)
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s.addr = lis.Addr().String()
	go s.srv.Serve(lis)
	t.Cleanup(s.srv.Stop)
	return s
}

func run(t *testing.T, args ...string) {
	t.Helper()
	if out, err := exec.Command(args[0], args[1:]...).CombinedOutput(); err != nil {
		t.Fatalf("%s: %v\n%s", strings.Join(args, " "), err, out)
	}
}

// pods creates two pod network namespaces joined by a veth, client
// 10.252.0.1 and server 10.252.0.2, with the in-pod rules that matter
// here: the client's outbound TCP is redirected to 15001 unless it carries
// ztunnel's mark; in the server, replies to ztunnel's transparent sockets
// are routed back to them.
func pods(t *testing.T) (cli, srv *os.File) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Fatal("needs root (network namespaces, iptables): run the tests as root, as make test and CI do")
	}
	tag := fmt.Sprintf("%d", os.Getpid()%100000)
	cn, sn := "zt-app-"+tag+"-c", "zt-app-"+tag+"-s"
	for _, n := range []string{cn, sn} {
		run(t, "ip", "netns", "add", n)
		t.Cleanup(func() { exec.Command("ip", "netns", "del", n).Run() })
	}
	vc, vs := "zac"+tag, "zas"+tag
	run(t, "ip", "link", "add", vc, "netns", cn, "type", "veth", "peer", "name", vs, "netns", sn)
	for _, c := range [][]string{
		{cn, "ip", "addr", "add", "10.252.0.1/24", "dev", vc},
		{cn, "ip", "link", "set", vc, "up"},
		{cn, "ip", "link", "set", "lo", "up"},
		{sn, "ip", "addr", "add", "10.252.0.2/24", "dev", vs},
		{sn, "ip", "link", "set", vs, "up"},
		{sn, "ip", "link", "set", "lo", "up"},
		{cn, "iptables", "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-m", "mark", "--mark", "0x539/0xfff", "-j", "RETURN"},
		{cn, "iptables", "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "!", "-d", "127.0.0.0/8", "-j", "REDIRECT", "--to-ports", "15001"},
		{sn, "iptables", "-t", "mangle", "-A", "PREROUTING", "-m", "mark", "--mark", "0x539/0xfff", "-j", "CONNMARK", "--set-xmark", "0x111/0xfff"},
		{sn, "iptables", "-t", "mangle", "-A", "OUTPUT", "-m", "connmark", "--mark", "0x111/0xfff", "-j", "CONNMARK", "--restore-mark", "--nfmask", "0xffffffff", "--ctmask", "0xffffffff"},
		{sn, "ip", "rule", "add", "fwmark", "0x111/0xfff", "pref", "32764", "lookup", "100"},
		{sn, "ip", "route", "add", "local", "0.0.0.0/0", "dev", "lo", "table", "100"},
	} {
		run(t, append([]string{"ip", "netns", "exec"}, c...)...)
	}
	open := func(n string) *os.File {
		f, err := os.Open("/var/run/netns/" + n)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { f.Close() })
		return f
	}
	return open(cn), open(sn)
}

// emptyNetns is a new network namespace with only loopback up.
func emptyNetns(t *testing.T) *os.File {
	t.Helper()
	n := fmt.Sprintf("zt-app-%d-e", os.Getpid()%100000)
	run(t, "ip", "netns", "add", n)
	t.Cleanup(func() { exec.Command("ip", "netns", "del", n).Run() })
	run(t, "ip", "netns", "exec", n, "ip", "link", "set", "lo", "up")
	f, err := os.Open("/var/run/netns/" + n)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return f
}

// inNS runs fn on a thread in the netns f.
func inNS(t *testing.T, f *os.File, fn func() error) {
	t.Helper()
	dup, err := os.Open(fmt.Sprintf("/proc/self/fd/%d", f.Fd()))
	if err != nil {
		t.Fatal(err)
	}
	ns, err := podnet.FromFile(dup)
	if err != nil {
		t.Fatal(err)
	}
	defer ns.Close()
	if err := ns.Do(fn); err != nil {
		t.Fatal(err)
	}
}

// agent is the CNI agent's end of ZDS: it hands pods over and reads Acks.
type agent struct {
	t    *testing.T
	path string
	ln   *net.UnixListener
	c    *net.UnixConn
}

func newAgent(t *testing.T) *agent {
	t.Helper()
	path := filepath.Join(t.TempDir(), "ztunnel.sock")
	ln, err := net.ListenUnix("unixpacket", &net.UnixAddr{Name: path, Net: "unixpacket"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	return &agent{t: t, path: path, ln: ln}
}

func (a *agent) accept() {
	a.t.Helper()
	a.ln.SetDeadline(time.Now().Add(10 * time.Second))
	c, err := a.ln.AcceptUnix()
	if err != nil {
		a.t.Fatal(err)
	}
	a.t.Cleanup(func() { c.Close() })
	buf := make([]byte, 1024)
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	n, _, _, _, err := c.ReadMsgUnix(buf, nil)
	if err != nil {
		a.t.Fatal(err)
	}
	var h zds.ZdsHello
	if err := proto.Unmarshal(buf[:n], &h); err != nil || h.GetVersion() != zds.Version_V1 {
		a.t.Fatalf("hello %v %v", &h, err)
	}
	a.c = c
}

// send sends req (with the netns fd, if any) and returns the Ack's error.
func (a *agent) send(req *zds.WorkloadRequest, netns *os.File) string {
	a.t.Helper()
	b, _ := proto.Marshal(req)
	var oob []byte
	if netns != nil {
		oob = unix.UnixRights(int(netns.Fd()))
	}
	if _, _, err := a.c.WriteMsgUnix(b, oob, nil); err != nil {
		a.t.Fatal(err)
	}
	buf := make([]byte, 4096)
	a.c.SetReadDeadline(time.Now().Add(10 * time.Second))
	n, _, _, _, err := a.c.ReadMsgUnix(buf, nil)
	if err != nil {
		a.t.Fatalf("read Ack: %v", err)
	}
	var r zds.WorkloadResponse
	if err := proto.Unmarshal(buf[:n], &r); err != nil || r.GetAck() == nil {
		a.t.Fatalf("response %v %v", &r, err)
	}
	return r.GetAck().GetError()
}

func add(uid, ns, name, sa string) *zds.WorkloadRequest {
	return &zds.WorkloadRequest{Payload: &zds.WorkloadRequest_Add{Add: &zds.AddWorkload{Uid: uid,
		WorkloadInfo: &zds.WorkloadInfo{Name: name, Namespace: ns, ServiceAccount: sa}}}}
}

func httpGet(t *testing.T, url string) (int, string) {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

func eventually(t *testing.T, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

type logBuf struct {
	mu sync.Mutex
	b  strings.Builder
}

func (l *logBuf) Write(p []byte) (int, error) { l.mu.Lock(); defer l.mu.Unlock(); return l.b.Write(p) }
func (l *logBuf) String() string              { l.mu.Lock(); defer l.mu.Unlock(); return l.b.String() }

// TestApp_PodToPodThroughTheWholeZtunnel runs ztunnel as main does, against
// a gRPC istiod over TLS and a ZDS agent on a unix socket, with two real
// pod network namespaces: the pods are handed over, their certificates
// obtained by impersonation, ztunnel turns ready, and a connection from one
// pod to the other is captured, tunnelled over HBONE with mTLS and shows up
// in the connection table and the Istio metrics.
func TestApp_PodToPodThroughTheWholeZtunnel(t *testing.T) {
	cliNS, srvNS := pods(t)
	const (
		// Workload API uids (istiod's keys); ZDS names the same pods by
		// their Kubernetes uids, as the CNI agent does.
		cliUID    = "Kubernetes//Pod/default/sleep-1"
		srvUID    = "Kubernetes//Pod/default/httpbin-1"
		cliPodUID = "4f0c2d7e-1b6a-4c1e-9d3e-0a1b2c3d4e01"
		srvPodUID = "4f0c2d7e-1b6a-4c1e-9d3e-0a1b2c3d4e02"
		cliID     = "spiffe://cluster.local/ns/default/sa/sleep"
		srvID     = "spiffe://cluster.local/ns/default/sa/httpbin"
	)
	wl := func(uid, name, sa, ip string) *workload.Workload {
		return &workload.Workload{Uid: uid, Name: name, Namespace: "default", ServiceAccount: sa, Node: "node-1",
			Addresses: [][]byte{netip.MustParseAddr(ip).AsSlice()}, TunnelProtocol: workload.TunnelProtocol_HBONE}
	}
	ist := startIstiod(t, []*workload.Workload{wl(cliUID, "sleep-1", "sleep", "10.252.0.1"), wl(srvUID, "httpbin-1", "httpbin", "10.252.0.2")}, cliID, srvID)
	dir := t.TempDir()
	rootPath, tokenPath := filepath.Join(dir, "root-cert.pem"), filepath.Join(dir, "istio-token")
	if err := os.WriteFile(rootPath, identity.EncodeCertsPEM([]*x509.Certificate{ist.ca.Root()}), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(tokenPath, []byte(token), 0o600); err != nil {
		t.Fatal(err)
	}
	ag := newAgent(t)

	// The server app, listening in its pod.
	var app net.Listener
	inNS(t, srvNS, func() (err error) { app, err = net.Listen("tcp", "10.252.0.2:8080"); return })
	defer app.Close()
	seen := make(chan string, 4)
	go func() {
		for {
			c, err := app.Accept()
			if err != nil {
				return
			}
			seen <- c.RemoteAddr().String()
			go func() { defer c.Close(); io.Copy(c, c) }()
		}
	}()

	logs := &logBuf{}
	a, err := New(Config{
		XDSAddress: ist.addr, RootCert: rootPath, TokenPath: tokenPath, ZDSSocket: ag.path, Tunnel: proxy.TunnelH2,
		NodeName: "node-1", ClusterID: "Kubernetes", TrustDomain: "cluster.local", DomainSuffix: "cluster.local",
		PodName: "ztunnel-x1", PodNamespace: "istio-system", PodIP: "10.0.0.9", ServiceAccount: "ztunnel",
		AdminAddr: "127.0.0.1:0", MetricsAddr: "127.0.0.1:0", ReadyAddr: "127.0.0.1:0",
		Log: slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug})),
	})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- a.Run(ctx) }()
	stopped := false
	defer func() {
		if !stopped {
			cancel()
			<-done
		}
	}()
	url := func(name, path string) string { return "http://" + a.Addr(name).String() + path }

	// The agent hands both pods over, then says the snapshot is complete.
	ag.accept()
	if e := ag.send(add(cliPodUID, "default", "sleep-1", "sleep"), cliNS); e != "" {
		t.Fatalf("add client: %s\n%s", e, logs)
	}
	if e := ag.send(add(srvPodUID, "default", "httpbin-1", "httpbin"), srvNS); e != "" {
		t.Fatalf("add server: %s", e)
	}
	if e := ag.send(&zds.WorkloadRequest{Payload: &zds.WorkloadRequest_SnapshotSent{SnapshotSent: &zds.SnapshotSent{}}}, nil); e != "" {
		t.Fatalf("snapshot: %s", e)
	}
	eventually(t, 10*time.Second, "readiness", func() bool {
		code, _ := httpGet(t, url("ready", "/healthz/ready"))
		return code == 200
	})

	// What istiod saw: the node, the token, the impersonated identities.
	ist.mu.Lock()
	if len(ist.nodes) == 0 {
		t.Error("no xDS node")
	} else {
		n := ist.nodes[0]
		if n.GetId() != "ztunnel~10.0.0.9~ztunnel-x1.istio-system~istio-system.svc.cluster.local" {
			t.Errorf("node id %q", n.GetId())
		}
		f := n.GetMetadata().GetFields()
		for k, want := range map[string]string{"NAMESPACE": "istio-system", "SERVICE_ACCOUNT": "ztunnel", "NAME": "ztunnel-x1", "CLUSTER_ID": "Kubernetes"} {
			if got := f[k].GetStringValue(); got != want {
				t.Errorf("node metadata %s = %q, want %q", k, got, want)
			}
		}
	}
	if ist.acks[xds.TypeAddress] == 0 || ist.acks[xds.TypeAuthorization] == 0 || len(ist.nacks) > 0 {
		t.Errorf("acks %v nacks %v", ist.acks, ist.nacks)
	}
	if strings.Join(ist.csrs, " ") != cliID+" "+srvID || strings.Join(ist.cluster, " ") != "Kubernetes Kubernetes" {
		t.Errorf("CSRs for %v with clusterid %v", ist.csrs, ist.cluster)
	}
	ist.mu.Unlock()

	// Pod to pod: captured, tunnelled, source IP kept.
	var c net.Conn
	inNS(t, cliNS, func() (err error) { c, err = net.DialTimeout("tcp", "10.252.0.2:8080", 5*time.Second); return })
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	msg := []byte("through the whole ztunnel\n")
	if _, err := c.Write(msg); err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(c, make([]byte, len(msg))); err != nil {
		t.Fatalf("echo: %v\n%s", err, logs)
	}
	if src := <-seen; !strings.HasPrefix(src, "10.252.0.1:") {
		t.Errorf("app saw %s, want the client pod's IP", src)
	}
	var conns []proxy.ConnInfo
	eventually(t, 5*time.Second, "both ends in /debug/connections", func() bool {
		_, body := httpGet(t, url("admin", "/debug/connections"))
		conns = nil
		if err := json.Unmarshal([]byte(body), &conns); err != nil {
			t.Fatalf("/debug/connections: %v: %s", err, body)
		}
		return len(conns) == 2
	})
	// Both ends name the app's own source address (the inbound side from
	// the tunnel's Forwarded header, not the pooled connection's port).
	if len(conns) == 2 && conns[0].Src != conns[1].Src {
		t.Errorf("outbound and inbound entries disagree on the client: %s vs %s", conns[0].Src, conns[1].Src)
	}
	for _, ci := range conns {
		if ci.Security != "mtls" || ci.Transport != "h2" {
			t.Errorf("connection %+v", ci)
		}
		if ci.Direction == "outbound" && (ci.SrcIdentity != cliID || ci.DstIdentity != srvID || ci.Pod != cliUID) {
			t.Errorf("outbound %+v", ci)
		}
		if ci.Direction == "inbound" && (ci.SrcIdentity != cliID || ci.Pod != srvUID) {
			t.Errorf("inbound %+v", ci)
		}
	}
	_, metrics := httpGet(t, url("metrics", "/metrics"))
	for _, want := range []string{"istio_tcp_connections_opened_total{", `reporter="source"`, `reporter="destination"`,
		`source_principal="` + cliID + `"`, `connection_security_policy="mutual_tls"`, "meshlite_ztunnel_pods 2",
		"meshlite_ztunnel_xds_synced 1", "meshlite_ztunnel_certificates_held 2"} {
		if !strings.Contains(metrics, want) {
			t.Errorf("metrics lack %s", want)
		}
	}
	c.Close()

	var dump admin.ConfigDump
	_, body := httpGet(t, url("admin", "/config_dump"))
	if err := json.Unmarshal([]byte(body), &dump); err != nil {
		t.Fatal(err)
	}
	if len(dump.Workloads) != 2 || !dump.Workloads[0].Local || !dump.Workloads[1].Local {
		t.Errorf("workloads %+v", dump.Workloads)
	}
	if z := dump.Ztunnel; z == nil || z.Node != "node-1" || z.Tunnel != "h2" || z.Version == "" {
		t.Errorf("ztunnel object %+v", z)
	}
	// These test pods have a bare redirect, not the CNI's chains: ztunnel
	// says what is missing rather than claiming the pod is captured.
	for _, w := range dump.Workloads {
		if w.Redirection != "missing" || !strings.Contains(w.RedirectionError, "ISTIO_OUTPUT") {
			t.Errorf("workload %s: redirection %q (%s)", w.Name, w.Redirection, w.RedirectionError)
		}
	}
	if len(dump.Certificates) != 2 || dump.Certificates[0].State != "valid" || dump.Certificates[1].State != "valid" {
		t.Errorf("certificates %+v", dump.Certificates)
	}

	// The server pod is recreated under its name (a StatefulSet pod): the
	// new instance, with its own Kubernetes uid and netns, is handed over
	// before the old one is deleted. The old one's sockets close; the
	// workload stays served, by the new instance.
	const srvPodUID2 = "4f0c2d7e-1b6a-4c1e-9d3e-0a1b2c3d4e03"
	if e := ag.send(add(srvPodUID2, "default", "httpbin-1", "httpbin"), emptyNetns(t)); e != "" {
		t.Fatalf("add the recreated server: %s", e)
	}
	if e := ag.send(&zds.WorkloadRequest{Payload: &zds.WorkloadRequest_Del{Del: &zds.DelWorkload{Uid: srvPodUID}}}, nil); e != "" {
		t.Fatalf("del: %s", e)
	}
	inNS(t, srvNS, func() error {
		if c, err := net.DialTimeout("tcp", "10.252.0.2:15008", time.Second); err == nil {
			c.Close()
			t.Error("the deleted pod's HBONE port still accepts")
		}
		return nil
	})
	local := func() bool {
		_, body := httpGet(t, url("admin", "/config_dump"))
		var dump admin.ConfigDump
		json.Unmarshal([]byte(body), &dump)
		for _, w := range dump.Workloads {
			if w.UID == srvUID {
				return w.Local
			}
		}
		return false
	}
	if !local() {
		t.Error("deleting the old instance of a recreated pod stopped serving the new one")
	}
	// The new instance is deleted too: the workload is no longer local.
	if e := ag.send(&zds.WorkloadRequest{Payload: &zds.WorkloadRequest_Del{Del: &zds.DelWorkload{Uid: srvPodUID2}}}, nil); e != "" {
		t.Fatalf("del: %s", e)
	}
	if local() {
		t.Error("deleted pod still local")
	}

	// Shutdown: Run returns, the endpoints close.
	readyAddr := a.Addr("ready").String()
	cancel()
	stopped = true
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("Run: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Run did not return after cancel")
	}
	if c, err := net.DialTimeout("tcp", readyAddr, time.Second); err == nil {
		c.Close()
		t.Error("readiness endpoint still open after shutdown")
	}
}

func TestApp_NotReadyUntilCertificatesHeld(t *testing.T) {
	cliNS, srvNS := pods(t)
	const uid = "Kubernetes//Pod/default/sleep-1"
	ist := startIstiod(t, []*workload.Workload{{Uid: uid, Name: "sleep-1", Namespace: "default", ServiceAccount: "sleep",
		Addresses: [][]byte{netip.MustParseAddr("10.252.0.1").AsSlice()}, TunnelProtocol: workload.TunnelProtocol_HBONE}}) // allows nothing
	dir := t.TempDir()
	rootPath, tokenPath := filepath.Join(dir, "root-cert.pem"), filepath.Join(dir, "istio-token")
	os.WriteFile(rootPath, identity.EncodeCertsPEM([]*x509.Certificate{ist.ca.Root()}), 0o600)
	os.WriteFile(tokenPath, []byte(token), 0o600)
	ag := newAgent(t)
	a, err := New(Config{
		XDSAddress: ist.addr, RootCert: rootPath, TokenPath: tokenPath, ZDSSocket: ag.path,
		NodeName: "node-1", ClusterID: "Kubernetes", TrustDomain: "cluster.local", DomainSuffix: "cluster.local",
		PodName: "ztunnel-x1", PodNamespace: "istio-system", PodIP: "10.0.0.9", ServiceAccount: "ztunnel",
		ReadyAddr: "127.0.0.1:0", CertWait: 500 * time.Millisecond,
	})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- a.Run(ctx) }()
	defer func() { cancel(); <-done }()
	ag.accept()
	// The pod is taken although the CA refuses its identity...
	if e := ag.send(add("4f0c2d7e-1b6a-4c1e-9d3e-0a1b2c3d4e01", "default", "sleep-1", "sleep"), cliNS); e != "" {
		t.Fatalf("add: %s", e)
	}
	eventually(t, 5*time.Second, "xDS sync", func() bool { return a.xdsSynced() })
	// ...but ztunnel is not ready, and says why.
	code, body := httpGet(t, "http://"+a.Addr("ready").String()+"/healthz/ready")
	if code != http.StatusServiceUnavailable || !strings.Contains(body, "spiffe://cluster.local/ns/default/sa/sleep") || !strings.Contains(body, "PermissionDenied") {
		t.Errorf("readiness %d %q", code, body)
	}
	ist.mu.Lock()
	ist.allowed["spiffe://cluster.local/ns/default/sa/sleep"] = true
	ist.mu.Unlock()
	eventually(t, 5*time.Second, "readiness once the CA allows the identity", func() bool { return a.Ready() == nil })

	// Once ready, a new pod whose certificate the CA refuses does not
	// unready the node's ztunnel (a rollout would delete it first).
	if e := ag.send(add("4f0c2d7e-1b6a-4c1e-9d3e-0a1b2c3d4e02", "default", "refused-1", "refused"), srvNS); e != "" {
		t.Fatalf("add refused pod: %s", e)
	}
	ist.mu.Lock()
	asked := slices.Contains(ist.csrs, "spiffe://cluster.local/ns/default/sa/refused")
	ist.mu.Unlock()
	if !asked {
		t.Fatal("no certificate request for the refused pod's identity: the check below proves nothing")
	}
	if code, body := httpGet(t, "http://"+a.Addr("ready").String()+"/healthz/ready"); code != http.StatusOK {
		t.Errorf("readiness after a later pod's certificate was refused: %d %q, want 200", code, body)
	}
}

func TestNew_RefusesIncompleteConfig(t *testing.T) {
	if _, err := New(Config{XDSAddress: "127.0.0.1:15012"}); err == nil || !strings.Contains(err.Error(), "missing") {
		t.Errorf("incomplete config: %v", err)
	}
}

func TestConfigDefaults_CAInheritsTheXDSServerName(t *testing.T) {
	for _, tc := range []struct {
		name                string
		in                  Config
		caAddr, caName, xds string
	}{
		{"istiod by IP, named by flag", Config{XDSAddress: "10.244.1.2:15012", XDSServerName: "istiod.istio-system.svc"},
			"10.244.1.2:15012", "istiod.istio-system.svc", "istiod.istio-system.svc"},
		{"istiod by name", Config{XDSAddress: "istiod.istio-system.svc:15012"},
			"istiod.istio-system.svc:15012", "istiod.istio-system.svc", "istiod.istio-system.svc"},
		{"separate CA keeps its own name", Config{XDSAddress: "10.0.0.1:15012", XDSServerName: "istiod.istio-system.svc", CAAddress: "ca.example:443"},
			"ca.example:443", "ca.example", "istiod.istio-system.svc"},
		{"separate CA named by flag", Config{XDSAddress: "10.0.0.1:15012", CAAddress: "10.0.0.2:15012", CAServerName: "ca.svc"},
			"10.0.0.2:15012", "ca.svc", "10.0.0.1"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := tc.in
			c.defaults()
			if c.CAAddress != tc.caAddr || c.CAServerName != tc.caName || c.XDSServerName != tc.xds {
				t.Errorf("CA %s named %q, xDS named %q; want CA %s named %q, xDS named %q",
					c.CAAddress, c.CAServerName, c.XDSServerName, tc.caAddr, tc.caName, tc.xds)
			}
		})
	}
}
