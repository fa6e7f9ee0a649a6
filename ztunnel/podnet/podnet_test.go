package podnet

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

func sh(t *testing.T, ns string, args ...string) {
	t.Helper()
	full := append([]string{"netns", "exec", ns}, args...)
	if out, err := exec.Command("ip", full...).CombinedOutput(); err != nil {
		t.Fatalf("ip %v: %v\n%s", full, err, out)
	}
}

// TestOriginalDst_IPv4AndIPv6 redirects connections to two addresses (one
// per family) to a marked listener inside a test netns and checks that
// OriginalDst recovers the address the client dialled, and that the
// listener and a dialled socket carry the mark.
func TestOriginalDst_IPv4AndIPv6(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Fatal("needs root (network namespaces, iptables): run the tests as root, as make test and CI do")
	}
	name := fmt.Sprintf("zt-test-%d-od", os.Getpid()%100000)
	if out, err := exec.Command("ip", "netns", "add", name).CombinedOutput(); err != nil {
		t.Fatalf("%v %s", err, out)
	}
	t.Cleanup(func() { exec.Command("ip", "netns", "del", name).Run() })
	sh(t, name, "ip", "link", "set", "lo", "up")
	sh(t, name, "ip", "addr", "add", "10.252.0.2/32", "dev", "lo")
	sh(t, name, "ip", "addr", "add", "fd00:252::2/128", "dev", "lo", "nodad")
	sh(t, name, "iptables", "-t", "nat", "-A", "OUTPUT", "-m", "mark", "--mark", "0x539/0xfff", "-j", "RETURN")
	sh(t, name, "ip6tables", "-t", "nat", "-A", "OUTPUT", "-m", "mark", "--mark", "0x539/0xfff", "-j", "RETURN")
	sh(t, name, "iptables", "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-d", "10.252.0.2", "--dport", "80", "-j", "REDIRECT", "--to-ports", "15001")
	sh(t, name, "ip6tables", "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-d", "fd00:252::2", "--dport", "80", "-j", "REDIRECT", "--to-ports", "15001")
	ns, err := Open("/var/run/netns/" + name)
	if err != nil {
		t.Fatal(err)
	}
	defer ns.Close()
	ctx := context.Background()
	for _, tc := range []struct{ listen, dst string }{
		{"0.0.0.0:15001", "10.252.0.2:80"},
		{"[::]:15001", "[fd00:252::2]:80"},
	} {
		t.Run(tc.dst, func(t *testing.T) {
			ln, err := ns.Listen(ctx, netip.MustParseAddrPort(tc.listen))
			if err != nil {
				t.Fatal(err)
			}
			defer ln.Close()
			accepted := make(chan net.Conn, 1)
			go func() {
				c, err := ln.Accept()
				if err == nil {
					accepted <- c
				}
			}()
			// An unmarked client in the netns: its connection is redirected.
			var c net.Conn
			if err := ns.Do(func() (err error) { c, err = net.DialTimeout("tcp", tc.dst, 2*time.Second); return }); err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			var sc net.Conn
			select {
			case sc = <-accepted:
			case <-time.After(5 * time.Second):
				t.Fatal("listener accepted nothing")
			}
			defer sc.Close()
			got, err := OriginalDst(sc)
			if err != nil {
				t.Fatal(err)
			}
			if got != netip.MustParseAddrPort(tc.dst) {
				t.Fatalf("original dst %s, want %s", got, tc.dst)
			}
			// A marked dial is not redirected: nothing listens on port 80.
			dctx, cancel := context.WithTimeout(ctx, 2*time.Second)
			defer cancel()
			if mc, err := ns.DialTCP(dctx, netip.Addr{}, netip.MustParseAddrPort(tc.dst), false); err == nil {
				mc.Close()
				t.Fatal("marked socket was redirected")
			}
			rc, _ := ln.SyscallConn()
			var mark int
			rc.Control(func(fd uintptr) { mark, _ = unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_MARK) })
			if mark != Mark {
				t.Fatalf("listener mark %#x", mark)
			}
		})
	}
}

func TestFromFile_RefusesNonNamespace(t *testing.T) {
	f, err := os.Open("/proc/self/status")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := FromFile(f); err == nil {
		t.Fatal("a regular file was accepted as a netns")
	}
}
