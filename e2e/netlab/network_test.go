package netlab

import (
	"bufio"
	"context"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/cni/libcni"
	types100 "github.com/containernetworking/cni/pkg/types/100"

	"github.com/meshlite/meshlite/internal/nsenter"
)

// testPlan is disjoint from DefaultPlan, so this test runs beside a live
// sandbox.
func testPlan() Plan {
	return Plan{
		Prefix:      "sbt",
		Nodes:       2,
		Underlay:    netip.MustParsePrefix("172.31.254.0/24"),
		PodSupernet: netip.MustParsePrefix("10.245.0.0/16"),
		ServiceCIDR: netip.MustParsePrefix("10.97.0.0/16"),
	}
}

const cniVersion = "v1.6.2" // keep in step with hack/cni-plugins.sh

func needRootAndPlugins(t *testing.T) string {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Fatal("this test builds network namespaces and needs root")
	}
	dir, err := filepath.Abs(filepath.Join("..", "..", ".cache", "cni", cniVersion))
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range ReferencePlugins {
		if _, err := os.Stat(filepath.Join(dir, p)); err != nil {
			t.Fatalf("CNI plugin %s missing in %s: run hack/cni-plugins.sh", p, dir)
		}
	}
	return dir
}

// TestNetwork_HostNodesAndPodsReachEachOther builds a two-node network,
// wires a pod on node 1 with the real reference CNI plugins and checks every
// path the sandbox relies on: host -> node, node -> node, host -> pod,
// node 0 -> pod on node 1, pod -> host, and the Service VIP DNAT.
func TestNetwork_HostNodesAndPodsReachEachOther(t *testing.T) {
	plugins := needRootAndPlugins(t)
	p := testPlan()
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	_ = Destroy(p, false) // a previous run killed mid-test
	if _, err := Create(p, log); err != nil {
		t.Fatalf("create network: %v", err)
	}
	t.Cleanup(func() {
		if err := Destroy(p, false); err != nil {
			t.Errorf("destroy: %v", err)
		}
		left, err := Leftovers(p)
		if err != nil || len(left) > 0 {
			t.Errorf("after Destroy: leftovers %v (err %v)", left, err)
		}
	})

	if _, err := Create(p, log); err == nil {
		t.Error("a second Create of the same plan succeeded")
	}

	node0, node1 := NetnsPath(p.NodeNetns(0)), NetnsPath(p.NodeNetns(1))
	hostLn := listen(t, "", netip.AddrPortFrom(p.HostIP(), 0))
	node1Ln := listen(t, node1, netip.AddrPortFrom(p.NodeIP(1), 0))

	roundTrip(t, "host -> node 1", "", node1Ln)
	roundTrip(t, "node 0 -> node 1", node0, node1Ln)
	roundTrip(t, "node 1 -> host", node1, hostLn)

	// A pod on node 1, wired as kubelet-lite wires one.
	root := NodeRootAt(t.TempDir())
	if err := root.Prepare(plugins, p.PodCIDR(1)); err != nil {
		t.Fatalf("prepare node root: %v", err)
	}
	podNs := p.Prefix + "-pod-test"
	if _, err := createNamed(podNs); err != nil {
		t.Fatal(err)
	}
	list, err := libcni.NetworkConfFromFile(filepath.Join(root.CNIConfDir, ConflistName))
	if err != nil {
		t.Fatalf("libcni rejects the conflist: %v", err)
	}
	cni := libcni.NewCNIConfigWithCacheDir([]string{root.CNIBinDir}, root.CNICache, nil)
	rt := &libcni.RuntimeConf{ContainerID: "test", NetNS: NetnsPath(podNs), IfName: "eth0"}
	var podIP netip.Addr
	err = nsenter.DoPath(node1, func() error {
		res, err := cni.AddNetworkList(context.Background(), list, rt)
		if err != nil {
			return err
		}
		r, err := types100.NewResultFromResult(res)
		if err != nil {
			return err
		}
		podIP, _ = netip.AddrFromSlice(r.IPs[0].Address.IP.To4())
		return nil
	})
	if err != nil {
		t.Fatalf("CNI ADD on node 1: %v", err)
	}
	if !p.PodCIDR(1).Contains(podIP) {
		t.Fatalf("pod IP %s not in node 1's range %s", podIP, p.PodCIDR(1))
	}
	if err := Run(NetnsPath(podNs), "ip", "link", "set", "lo", "up"); err != nil {
		t.Fatal(err)
	}
	podLn := listen(t, NetnsPath(podNs), netip.AddrPortFrom(podIP, 0))
	roundTrip(t, "host -> pod on node 1", "", podLn)
	roundTrip(t, "node 0 -> pod on node 1", node0, podLn)
	roundTrip(t, "pod -> host", NetnsPath(podNs), hostLn)

	// The kubernetes Service VIP, DNATed on node 1 to the host listener.
	vip := netip.AddrPortFrom(netip.MustParseAddr("10.97.0.1"), 443)
	if err := ForwardVIP(p.NodeNetns(1), vip, hostLn.Addr().(*net.TCPAddr).AddrPort()); err != nil {
		t.Fatalf("forward VIP: %v", err)
	}
	roundTripTo(t, "pod -> service VIP", NetnsPath(podNs), hostLn, vip.String())
	roundTripTo(t, "node 1 -> service VIP", node1, hostLn, vip.String())

	err = nsenter.DoPath(node1, func() error { return cni.DelNetworkList(context.Background(), list, rt) })
	if err != nil {
		t.Errorf("CNI DEL: %v", err)
	}
}

// listen opens a line-echo listener inside the namespace nsPath ("" =
// host) and serves it until the test ends.
func listen(t *testing.T, nsPath string, addr netip.AddrPort) net.Listener {
	t.Helper()
	var ln net.Listener
	open := func() error {
		var err error
		ln, err = net.Listen("tcp", addr.String())
		return err
	}
	var err error
	if nsPath == "" {
		err = open()
	} else {
		err = nsenter.DoPath(nsPath, open)
	}
	if err != nil {
		t.Fatalf("listen on %s in %q: %v", addr, nsPath, err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				line, _ := bufio.NewReader(c).ReadString('\n')
				_, _ = io.WriteString(c, "echo "+line)
			}()
		}
	}()
	return ln
}

func roundTrip(t *testing.T, what, fromNs string, ln net.Listener) {
	t.Helper()
	roundTripTo(t, what, fromNs, ln, ln.Addr().String())
}

func roundTripTo(t *testing.T, what, fromNs string, ln net.Listener, addr string) {
	t.Helper()
	var c net.Conn
	dial := func() error {
		var err error
		c, err = net.DialTimeout("tcp", addr, 3*time.Second)
		return err
	}
	var err error
	if fromNs == "" {
		err = dial()
	} else {
		err = nsenter.DoPath(fromNs, dial)
	}
	if err != nil {
		t.Errorf("%s: dial %s: %v", what, addr, err)
		return
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(3 * time.Second))
	if _, err := io.WriteString(c, "hi\n"); err != nil {
		t.Errorf("%s: write: %v", what, err)
		return
	}
	got, err := bufio.NewReader(c).ReadString('\n')
	if err != nil || strings.TrimSpace(got) != "echo hi" {
		t.Errorf("%s: got %q, %v", what, got, err)
	}
}
