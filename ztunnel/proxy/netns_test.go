package proxy

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/meshlite/meshlite/internal/identity"
	"github.com/meshlite/meshlite/ztunnel/podnet"
	"github.com/meshlite/meshlite/ztunnel/state"
)

func run(t *testing.T, args ...string) {
	t.Helper()
	out, err := exec.Command(args[0], args[1:]...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s: %v\n%s", strings.Join(args, " "), err, out)
	}
}

// pair creates two netns joined by a veth: client 10.251.0.1, server
// 10.251.0.2, with a minimal version of the in-pod rules: the client's
// outbound TCP is REDIRECTed to 15001 unless marked 0x539; in the server,
// replies to ztunnel's transparent sockets are routed back locally
// (connmark 0x111, fwmark rule to a local table).
func pair(t *testing.T) (cli, srv *podnet.NS) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Fatal("needs root (network namespaces, iptables): run the tests as root, as make test and CI do")
	}
	tag := fmt.Sprintf("%d", os.Getpid()%100000)
	cn, sn := "zt-test-"+tag+"-c", "zt-test-"+tag+"-s"
	run(t, "ip", "netns", "add", cn)
	t.Cleanup(func() { exec.Command("ip", "netns", "del", cn).Run() })
	run(t, "ip", "netns", "add", sn)
	t.Cleanup(func() { exec.Command("ip", "netns", "del", sn).Run() })
	vc, vs := "ztc"+tag, "zts"+tag
	run(t, "ip", "link", "add", vc, "netns", cn, "type", "veth", "peer", "name", vs, "netns", sn)
	for _, c := range [][]string{
		{cn, "ip", "addr", "add", "10.251.0.1/24", "dev", vc},
		{cn, "ip", "link", "set", vc, "up"},
		{cn, "ip", "link", "set", "lo", "up"},
		{sn, "ip", "addr", "add", "10.251.0.2/24", "dev", vs},
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
	var err error
	if cli, err = podnet.Open("/var/run/netns/" + cn); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cli.Close() })
	if srv, err = podnet.Open("/var/run/netns/" + sn); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Close() })
	return cli, srv
}

// TestNetns_OutboundRedirectHBONEInboundTransparent runs the whole path in
// real namespaces: the client app connects to the server's pod IP, the
// kernel redirects it to 15001, the proxy reads SO_ORIGINAL_DST, tunnels
// over HBONE to the server's 15008 from a marked socket, and connects to the
// app with IP_TRANSPARENT: the app sees the client's pod IP.
func TestNetns_OutboundRedirectHBONEInboundTransparent(t *testing.T) {
	cliNS, srvNS := pair(t)
	for _, tr := range []Tunnel{TunnelH2, TunnelQUIC} {
		t.Run(tr.String(), func(t *testing.T) { netnsRoundTrip(t, tr, cliNS, srvNS) })
	}
}

func netnsRoundTrip(t *testing.T, tr Tunnel, cliNS, srvNS *podnet.NS) {
	cliIP, srvIP := netip.MustParseAddr("10.251.0.1"), netip.MustParseAddr("10.251.0.2")
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	t.Cleanup(func() { cancel(); wg.Wait() })
	go1 := func(f func()) { wg.Add(1); go func() { defer wg.Done(); f() }() }

	ca, err := identity.NewAuthority(spiffeid.RequireTrustDomainFromString("cluster.local"), time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	store := state.New(nil)
	if err := store.ApplyAddresses([]state.NamedAddress{named(podWl("client", cliIP)), named(podWl("server", srvIP))}, nil); err != nil {
		t.Fatal(err)
	}
	logs := &logBuf{}
	px, err := New(Config{State: store, Bundle: ca.Bundle(), Tunnel: tr,
		Log: slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug}))})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { px.Close() })
	for name, ns := range map[string]*podnet.NS{"client": cliNS, "server": srvNS} {
		svid, err := ca.NewSVID(id(t, "default", name), time.Hour)
		if err != nil {
			t.Fatal(err)
		}
		px.AddPod(&Pod{UID: "Kubernetes//Pod/default/" + name, SVID: svid, Net: ns})
	}

	out, err := cliNS.Listen(ctx, netip.MustParseAddrPort("0.0.0.0:15001"))
	if err != nil {
		t.Fatal(err)
	}
	go1(func() { px.ServeOutbound(ctx, out, "Kubernetes//Pod/default/client") })
	hb, err := srvNS.Listen(ctx, netip.MustParseAddrPort("0.0.0.0:15008"))
	if err != nil {
		t.Fatal(err)
	}
	go1(func() { px.ServeHBONE(ctx, hb) })
	udp, err := srvNS.ListenUDP(ctx, netip.MustParseAddrPort("0.0.0.0:15008"))
	if err != nil {
		t.Fatal(err)
	}
	go1(func() { px.ServeHBONEQUIC(ctx, udp); udp.Close() })

	// The app in the server netns, unmarked.
	var app net.Listener
	if err := srvNS.Do(func() (err error) { app, err = net.Listen("tcp", "10.251.0.2:8080"); return }); err != nil {
		t.Fatal(err)
	}
	seen := make(chan netip.AddrPort, 1)
	go1(func() { serveEcho(ctx, app, seen) })

	// The client app in the client netns, unmarked: captured by REDIRECT.
	var c net.Conn
	if err := cliNS.Do(func() (err error) { c, err = net.DialTimeout("tcp", "10.251.0.2:8080", 5*time.Second); return }); err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	msg := []byte("through SO_ORIGINAL_DST and IP_TRANSPARENT\n")
	if _, err := c.Write(msg); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len(msg))
	if _, err := io.ReadFull(c, got); err != nil {
		t.Fatalf("read echo: %v\nproxy log:\n%s", err, logs)
	}
	if string(got) != string(msg) {
		t.Fatalf("echo %q", got)
	}
	select {
	case src := <-seen:
		if src.Addr() != cliIP {
			t.Fatalf("app saw source %s, want the client's %s", src.Addr(), cliIP)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("app saw no connection")
	}
	c.Close()
	waitLog(t, logs, "connection complete")
	l := logs.String()
	for _, want := range []string{"dst=10.251.0.2:8080", "route=direct", "transport=" + map[Tunnel]string{TunnelH2: "h2", TunnelQUIC: "h3"}[tr]} {
		if !strings.Contains(l, want) {
			t.Errorf("log lacks %q:\n%s", want, l)
		}
	}
}
