package rules

import (
	"io"
	"net"
	"net/netip"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/meshlite/meshlite/cni/netnstest"
)

// topo is a node netns joined to two pod netns: pod (10.99.0.2, gets the
// rules) and peer (10.99.1.2, an ordinary pod elsewhere). The node forwards
// between them, as a CNI bridge would.
type topo struct {
	node, pod, peer *os.File
	tables          *Tables
}

func newTopo(t *testing.T) *topo {
	t.Helper()
	netnstest.RequireRoot(t)
	tables, err := NewTables()
	if err != nil {
		t.Fatal(err)
	}
	if tables.Flavour != "nf_tables" {
		t.Fatalf("iptables flavour %q; this machine's is nf_tables", tables.Flavour)
	}
	tp := &topo{node: netnstest.New(t), pod: netnstest.New(t), peer: netnstest.New(t), tables: tables}
	netnstest.Link(t, tp.node, "to-pod", "10.99.0.1/24", tp.pod, "eth0", "10.99.0.2/24")
	netnstest.Link(t, tp.node, "to-peer", "10.99.1.1/24", tp.peer, "eth0", "10.99.1.2/24")
	netnstest.DefaultRoute(t, tp.pod, "10.99.0.1")
	netnstest.DefaultRoute(t, tp.peer, "10.99.1.1")
	netnstest.Forwarding(t, tp.node)
	return tp
}

func (tp *topo) podRules(t *testing.T) *Pod {
	t.Helper()
	p, err := NewPod(tp.tables, Config{})
	if err != nil {
		t.Fatal(err)
	}
	return p
}

func istioLines(save string) []string {
	var out []string
	for _, l := range strings.Split(save, "\n") {
		if strings.Contains(l, "ISTIO") {
			out = append(out, l)
		}
	}
	return out
}

func TestPod_ApplyIsIdempotentCheckableAndRemovable(t *testing.T) {
	tp := newTopo(t)
	p := tp.podRules(t)

	if err := p.Check(tp.pod); err == nil {
		t.Fatal("Check passed on a pod without rules")
	}
	if err := p.Apply(tp.pod); err != nil {
		t.Fatal(err)
	}
	if err := p.Check(tp.pod); err != nil {
		t.Fatalf("Check after Apply: %v", err)
	}
	save1 := netnstest.Run(t, tp.pod, "iptables-save")
	lines := istioLines(save1)
	// 6 chain declarations, 6 jumps, 12 rules.
	if len(lines) != 24 {
		t.Errorf("iptables-save shows %d ISTIO lines, want 24:\n%s", len(lines), save1)
	}
	for _, want := range []string{
		"-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -p tcp -m mark ! --mark 0x539/0xfff -j REDIRECT --to-ports 15001",
		"-A ISTIO_PRERT ! -d 127.0.0.1/32 -p tcp -m tcp ! --dport 15008 -m mark ! --mark 0x539/0xfff -j REDIRECT --to-ports 15006",
		"-A ISTIO_PRERT -s 169.254.7.127/32 -p tcp -m tcp -j ACCEPT",
	} {
		if !strings.Contains(save1, want) {
			t.Errorf("iptables-save lacks %q", want)
		}
	}
	rulesOut := netnstest.Run(t, tp.pod, "ip", "rule")
	if !strings.Contains(rulesOut, "32764:") || !strings.Contains(rulesOut, "fwmark 0x111/0xfff lookup 100") {
		t.Errorf("ip rule lacks the fwmark rule:\n%s", rulesOut)
	}
	if rt := netnstest.Run(t, tp.pod, "ip", "route", "show", "table", "100"); !strings.Contains(rt, "local default dev lo") {
		t.Errorf("table 100 lacks the local route: %q", rt)
	}

	// Again: nothing changes.
	if err := p.Apply(tp.pod); err != nil {
		t.Fatal(err)
	}
	if got := istioLines(netnstest.Run(t, tp.pod, "iptables-save")); strings.Join(got, "\n") != strings.Join(lines, "\n") {
		t.Errorf("second Apply changed the rules:\n%s\nwant\n%s", strings.Join(got, "\n"), strings.Join(lines, "\n"))
	}
	if n := strings.Count(netnstest.Run(t, tp.pod, "ip", "rule"), "lookup 100"); n != 1 {
		t.Errorf("%d fwmark rules after the second Apply, want 1", n)
	}

	// Someone deletes a rule: Check names it, Apply restores it.
	netnstest.Run(t, tp.pod, "iptables", "-t", "nat", "-D", ChainOutput, "!", "-d", "127.0.0.1/32", "-p", "tcp",
		"-m", "mark", "!", "--mark", "0x539/0xfff", "-j", "REDIRECT", "--to-ports", "15001")
	err := p.Check(tp.pod)
	if err == nil || !strings.Contains(err.Error(), "15001") {
		t.Errorf("Check after deleting the outbound redirect: %v", err)
	}
	if err := p.Apply(tp.pod); err != nil {
		t.Fatal(err)
	}
	if err := p.Check(tp.pod); err != nil {
		t.Errorf("Check after repair: %v", err)
	}
	// An extra rule in an owned chain is also drift.
	netnstest.Run(t, tp.pod, "iptables", "-t", "nat", "-A", ChainOutput, "-p", "tcp", "--dport", "9", "-j", "ACCEPT")
	if err := p.Check(tp.pod); err == nil || !strings.Contains(err.Error(), "has 7 rules, want 6") {
		t.Errorf("Check with an extra rule: %v", err)
	}

	if err := p.Remove(tp.pod); err != nil {
		t.Fatal(err)
	}
	if got := istioLines(netnstest.Run(t, tp.pod, "iptables-save")); len(got) != 0 {
		t.Errorf("rules left after Remove: %v", got)
	}
	if out := netnstest.Run(t, tp.pod, "ip", "rule"); strings.Contains(out, "lookup 100") {
		t.Errorf("fwmark rule left after Remove:\n%s", out)
	}
	if out := netnstest.Run(t, tp.pod, "ip", "route", "show", "table", "100"); strings.TrimSpace(out) != "" {
		t.Errorf("table 100 not empty after Remove: %q", out)
	}
	if ok, err := p.Present(tp.pod); err != nil || ok {
		t.Errorf("Present after Remove = %v, %v", ok, err)
	}
	if err := p.Remove(tp.pod); err != nil {
		t.Errorf("second Remove: %v", err)
	}
}

func accept(t *testing.T, l net.Listener, what string) net.Conn {
	t.Helper()
	c, err := netnstest.AcceptWithin(l, 3*time.Second)
	if err != nil {
		t.Fatalf("%s: nothing arrived: %v", what, err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func noAccept(t *testing.T, l net.Listener, what string) {
	t.Helper()
	if c, err := netnstest.AcceptWithin(l, 300*time.Millisecond); err == nil {
		c.Close()
		t.Errorf("%s: a connection arrived from %s", what, c.RemoteAddr())
	}
}

func TestPod_RedirectsOutboundInboundAndDNS(t *testing.T) {
	tp := newTopo(t)
	p := tp.podRules(t)
	if err := p.Apply(tp.pod); err != nil {
		t.Fatal(err)
	}
	// ztunnel's listeners inside the pod, and an app on the peer.
	outL := netnstest.Listen(t, tp.pod, "0.0.0.0:15001")
	inL := netnstest.Listen(t, tp.pod, "0.0.0.0:15006")
	hboneL := netnstest.Listen(t, tp.pod, "0.0.0.0:15008")
	dnsL := netnstest.ListenUDP(t, tp.pod, "0.0.0.0:15053")
	peerL := netnstest.Listen(t, tp.peer, "10.99.1.2:8080")

	// The app's outbound TCP ends at 15001 with its original destination.
	c, err := netnstest.Dial(tp.pod, "10.99.1.2:8080", 0)
	if err != nil {
		t.Fatalf("outbound dial: %v", err)
	}
	defer c.Close()
	got := accept(t, outL, "outbound capture")
	if od, err := netnstest.OriginalDst(got); err != nil || od != "10.99.1.2:8080" {
		t.Errorf("SO_ORIGINAL_DST = %q, %v; want 10.99.1.2:8080", od, err)
	}
	noAccept(t, peerL, "captured outbound leaked to the peer")

	// ztunnel's own (marked) socket goes straight out.
	zc, err := netnstest.Dial(tp.pod, "10.99.1.2:8080", ZtunnelMark)
	if err != nil {
		t.Fatalf("marked dial: %v", err)
	}
	defer zc.Close()
	accept(t, peerL, "ztunnel's marked connection")

	// Inbound plaintext to any port but 15008 ends at 15006.
	ic, err := netnstest.Dial(tp.peer, "10.99.0.2:9090", 0)
	if err != nil {
		t.Fatalf("inbound dial: %v", err)
	}
	defer ic.Close()
	got = accept(t, inL, "inbound capture")
	if od, err := netnstest.OriginalDst(got); err != nil || od != "10.99.0.2:9090" {
		t.Errorf("inbound SO_ORIGINAL_DST = %q, %v", od, err)
	}
	if ra := got.RemoteAddr().String(); !strings.HasPrefix(ra, "10.99.1.2:") {
		t.Errorf("inbound source %s, want the peer's address preserved", ra)
	}
	// HBONE on 15008 is not redirected.
	hc, err := netnstest.Dial(tp.peer, "10.99.0.2:15008", 0)
	if err != nil {
		t.Fatalf("HBONE dial: %v", err)
	}
	defer hc.Close()
	accept(t, hboneL, "inbound HBONE")
	noAccept(t, inL, "15008 was redirected to 15006")

	// DNS over UDP to any resolver ends at 15053.
	netnstest.Do(t, tp.pod, func() error {
		u, err := net.Dial("udp4", "10.99.1.2:53")
		if err != nil {
			return err
		}
		defer u.Close()
		_, err = u.Write([]byte("query"))
		return err
	})
	if err := dnsL.SetReadDeadline(time.Now().Add(3 * time.Second)); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 64)
	n, _, err := dnsL.ReadFrom(buf)
	if err != nil || string(buf[:n]) != "query" {
		t.Errorf("DNS capture: read %q, %v", buf[:n], err)
	}
}

func TestPod_WithoutZtunnelOutboundIsBlockedNotLeaked(t *testing.T) {
	tp := newTopo(t)
	p := tp.podRules(t)
	if err := p.Apply(tp.pod); err != nil {
		t.Fatal(err)
	}
	peerL := netnstest.Listen(t, tp.peer, "10.99.1.2:8080")
	c, err := netnstest.Dial(tp.pod, "10.99.1.2:8080", 0)
	if err == nil {
		c.Close()
		t.Fatal("outbound connection succeeded with nothing on 15001")
	}
	noAccept(t, peerL, "plaintext leaked around the missing ztunnel")

	// Control: without the rules the same dial reaches the peer.
	if err := p.Remove(tp.pod); err != nil {
		t.Fatal(err)
	}
	c, err = netnstest.Dial(tp.pod, "10.99.1.2:8080", 0)
	if err != nil {
		t.Fatalf("dial without rules: %v", err)
	}
	c.Close()
	accept(t, peerL, "uncaptured dial")
}

func TestHost_ProbesAreSNATedAndPassUncaptured(t *testing.T) {
	tp := newTopo(t)
	p := tp.podRules(t)
	if err := p.Apply(tp.pod); err != nil {
		t.Fatal(err)
	}
	h, err := NewHost(tp.tables, Config{})
	if err != nil {
		t.Fatal(err)
	}
	podIP := netip.MustParseAddr("10.99.0.2")
	netnstest.Do(t, tp.node, func() error {
		if err := h.Ensure(); err != nil {
			return err
		}
		if err := h.Ensure(); err != nil { // idempotent
			return err
		}
		if err := h.Check(); err != nil {
			return err
		}
		return h.AddPod(podIP, "pod-uid-1")
	})
	appL := netnstest.Listen(t, tp.pod, "0.0.0.0:8081")
	inL := netnstest.Listen(t, tp.pod, "0.0.0.0:15006")

	// A probe: a local socket on the node to the enrolled pod's IP.
	c, err := netnstest.Dial(tp.node, "10.99.0.2:8081", 0)
	if err != nil {
		t.Fatalf("probe dial: %v", err)
	}
	defer c.Close()
	got := accept(t, appL, "probe")
	if ra := got.RemoteAddr().String(); !strings.HasPrefix(ra, "169.254.7.127:") {
		t.Errorf("probe arrived from %s, want 169.254.7.127", ra)
	}
	if _, err := got.Write([]byte("ok")); err != nil {
		t.Fatal(err)
	}
	b := make([]byte, 2)
	c.SetReadDeadline(time.Now().Add(3 * time.Second))
	if _, err := io.ReadFull(c, b); err != nil {
		t.Errorf("probe reply did not come back: %v", err)
	}
	noAccept(t, inL, "probe redirected to 15006")

	// Forwarded traffic (no local socket on the node) is not SNATed: it is
	// captured like any other inbound.
	fc, err := netnstest.Dial(tp.peer, "10.99.0.2:8081", 0)
	if err != nil {
		t.Fatalf("forwarded dial: %v", err)
	}
	defer fc.Close()
	got = accept(t, inL, "forwarded inbound")
	if ra := got.RemoteAddr().String(); !strings.HasPrefix(ra, "10.99.1.2:") {
		t.Errorf("forwarded inbound from %s, want the peer", ra)
	}

	// A pod no longer in the set gets no SNAT: the node's dial is captured.
	netnstest.Do(t, tp.node, func() error { return h.DelPod(podIP) })
	netnstest.Do(t, tp.node, func() error { return h.DelPod(podIP) }) // absent is fine
	nc, err := netnstest.Dial(tp.node, "10.99.0.2:8081", 0)
	if err != nil {
		t.Fatalf("dial after DelPod: %v", err)
	}
	defer nc.Close()
	accept(t, inL, "node dial without SNAT")

	netnstest.Do(t, tp.node, func() error {
		if err := h.Remove(); err != nil {
			return err
		}
		return h.Remove()
	})
	if got := istioLines(netnstest.Run(t, tp.node, "iptables-save")); len(got) != 0 {
		t.Errorf("node rules left after Remove: %v", got)
	}
	if out := netnstest.Run(t, tp.node, "nft", "list", "sets"); strings.Contains(out, ProbeIPSet) {
		t.Errorf("ipset left after Remove: %s", out)
	}
}
