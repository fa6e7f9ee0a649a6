package redirection

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"strings"
	"testing"

	"github.com/meshlite/meshlite/internal/nsenter"
)

func TestCheck_InARealNetns(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Fatal("needs root (network namespaces, iptables): run the tests as root, as make test and CI do")
	}
	name := fmt.Sprintf("zt-redir-%d", os.Getpid()%100000)
	if out, err := exec.Command("ip", "netns", "add", name).CombinedOutput(); err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	t.Cleanup(func() { exec.Command("ip", "netns", "del", name).Run() })
	ns, err := os.Open("/var/run/netns/" + name)
	if err != nil {
		t.Fatal(err)
	}
	defer ns.Close()
	ipt := func(args ...string) {
		t.Helper()
		if out, err := exec.Command("ip", append([]string{"netns", "exec", name, "iptables", "-w"}, args...)...).CombinedOutput(); err != nil {
			t.Fatalf("iptables %v: %v: %s", args, err, out)
		}
	}

	// Nothing installed: every hook and listener is named as missing.
	err = Check(context.Background(), ns)
	if err == nil {
		t.Fatal("an empty netns passed the check")
	}
	for _, want := range []string{"nat: -A OUTPUT -j ISTIO_OUTPUT", "mangle: -A PREROUTING -j ISTIO_PRERT", "no ztunnel listener on tcp 15001"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("check error %q lacks %q", err, want)
		}
	}

	// The CNI's chains, hooked, and ztunnel's listeners open.
	for _, table := range []string{"nat", "mangle"} {
		ipt("-t", table, "-N", "ISTIO_PRERT")
		ipt("-t", table, "-N", "ISTIO_OUTPUT")
		ipt("-t", table, "-A", "PREROUTING", "-j", "ISTIO_PRERT")
		ipt("-t", table, "-A", "OUTPUT", "-j", "ISTIO_OUTPUT")
	}
	ipt("-t", "nat", "-A", "ISTIO_PRERT", "-p", "tcp", "-j", "REDIRECT", "--to-ports", "15006")
	ipt("-t", "nat", "-A", "ISTIO_OUTPUT", "-p", "tcp", "-j", "REDIRECT", "--to-ports", "15001")
	var closers []interface{ Close() error }
	defer func() {
		for _, c := range closers {
			c.Close()
		}
	}()
	err = nsenter.Do(ns, func() error {
		for _, p := range []int{PortOutbound, PortPlaintext, PortHBONE} {
			ln, err := net.Listen("tcp", fmt.Sprintf("0.0.0.0:%d", p))
			if err != nil {
				return err
			}
			closers = append(closers, ln)
		}
		pc, err := net.ListenPacket("udp", fmt.Sprintf("0.0.0.0:%d", PortHBONE))
		if err != nil {
			return err
		}
		closers = append(closers, pc)
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := Check(context.Background(), ns); err != nil {
		t.Fatalf("complete redirection (DNS not captured): %v", err)
	}
	if n, err := Listeners(ns, PortOutbound); err != nil || n != 1 {
		t.Errorf("listeners on 15001: %d %v", n, err)
	}
	// DNS captured but no DNS listener: missing.
	ipt("-t", "nat", "-I", "ISTIO_OUTPUT", "-p", "udp", "--dport", "53", "-j", "REDIRECT", "--to-ports", "15053")
	if err := Check(context.Background(), ns); err == nil || !strings.Contains(err.Error(), "udp 15053") {
		t.Errorf("DNS captured without a listener: %v", err)
	}
	ipt("-t", "nat", "-D", "ISTIO_OUTPUT", "-p", "udp", "--dport", "53", "-j", "REDIRECT", "--to-ports", "15053")
	// The Checker caches for its TTL: a hook removed shows on the next check.
	c := Checker{TTL: 1}
	if st, why := c.Status(context.Background(), "pod", ns); st != Verified {
		t.Fatalf("status %s (%s)", st, why)
	}
	ipt("-t", "nat", "-D", "OUTPUT", "-j", "ISTIO_OUTPUT")
	if st, why := c.Status(context.Background(), "pod", ns); st != Missing || !strings.Contains(why, "-A OUTPUT -j ISTIO_OUTPUT") {
		t.Errorf("after unhooking: %s (%s)", st, why)
	}
}

func TestParseSave(t *testing.T) {
	tb := parseSave([]byte("*nat\n:ISTIO_OUTPUT - [0:0]\n-A OUTPUT -j ISTIO_OUTPUT\nCOMMIT\n*mangle\n-A OUTPUT -j ISTIO_OUTPUT\nCOMMIT\n"))
	if !tb.has("nat", "-A OUTPUT -j ISTIO_OUTPUT") || !tb.has("mangle", "-A OUTPUT -j ISTIO_OUTPUT") || tb.has("nat", "PREROUTING") {
		t.Errorf("tables %v", tb)
	}
}
