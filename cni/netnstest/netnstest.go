// Package netnstest builds small network topologies out of network
// namespaces for cni's integration tests: namespaces that live as long as
// the test, veth pairs between them, addresses and routes, and helpers to
// listen and dial from inside one. It needs root; tests that use it fail,
// not skip, without it.
package netnstest

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"runtime"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// RequireRoot fails the test when it does not run as root.
func RequireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Fatalf("this test needs root (network namespaces, iptables); run it as root")
	}
}

// New makes an anonymous network namespace, kept alive by the returned file
// until the test ends. Its loopback is up.
func New(t testing.TB) *os.File {
	t.Helper()
	RequireRoot(t)
	type res struct {
		f   *os.File
		err error
	}
	done := make(chan res, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			runtime.UnlockOSThread()
			done <- res{nil, err}
			return
		}
		defer orig.Close()
		if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
			runtime.UnlockOSThread()
			done <- res{nil, fmt.Errorf("unshare: %w", err)}
			return
		}
		f, err := os.Open(fmt.Sprintf("/proc/self/task/%d/ns/net", unix.Gettid()))
		if err == nil {
			if lo, lerr := netlink.LinkByName("lo"); lerr == nil {
				err = netlink.LinkSetUp(lo)
			} else {
				err = lerr
			}
		}
		if serr := netns.Set(orig); serr == nil {
			runtime.UnlockOSThread()
		}
		done <- res{f, err}
	}()
	r := <-done
	if r.err != nil {
		if r.f != nil {
			r.f.Close()
		}
		t.Fatalf("create netns: %v", r.err)
	}
	t.Cleanup(func() { r.f.Close() })
	return r.f
}

// Handle returns a netlink handle working inside ns.
func Handle(t testing.TB, ns *os.File) *netlink.Handle {
	t.Helper()
	h, err := netlink.NewHandleAt(netns.NsHandle(int(ns.Fd())))
	if err != nil {
		t.Fatalf("netlink handle: %v", err)
	}
	t.Cleanup(h.Close)
	return h
}

// Link joins a and b with a veth pair: aName/aAddr in a, bName/bAddr in b
// (CIDR notation), both up.
func Link(t testing.TB, a *os.File, aName, aAddr string, b *os.File, bName, bAddr string) {
	t.Helper()
	ha := Handle(t, a)
	veth := &netlink.Veth{
		LinkAttrs:     netlink.LinkAttrs{Name: aName},
		PeerName:      bName,
		PeerNamespace: netlink.NsFd(int(b.Fd())),
	}
	if err := ha.LinkAdd(veth); err != nil {
		t.Fatalf("add veth %s/%s: %v", aName, bName, err)
	}
	addr(t, ha, aName, aAddr)
	addr(t, Handle(t, b), bName, bAddr)
}

func addr(t testing.TB, h *netlink.Handle, name, cidr string) {
	t.Helper()
	l, err := h.LinkByName(name)
	if err != nil {
		t.Fatalf("find %s: %v", name, err)
	}
	a, err := netlink.ParseAddr(cidr)
	if err != nil {
		t.Fatalf("parse %s: %v", cidr, err)
	}
	if err := h.AddrAdd(l, a); err != nil {
		t.Fatalf("add %s to %s: %v", cidr, name, err)
	}
	if err := h.LinkSetUp(l); err != nil {
		t.Fatalf("set %s up: %v", name, err)
	}
}

// DefaultRoute routes everything in ns via gw.
func DefaultRoute(t testing.TB, ns *os.File, gw string) {
	t.Helper()
	h := Handle(t, ns)
	if err := h.RouteAdd(&netlink.Route{Gw: net.ParseIP(gw)}); err != nil {
		t.Fatalf("default route via %s: %v", gw, err)
	}
}

// Forwarding turns on IPv4 forwarding in ns.
func Forwarding(t testing.TB, ns *os.File) {
	t.Helper()
	Do(t, ns, func() error {
		return os.WriteFile("/proc/sys/net/ipv4/ip_forward", []byte("1"), 0o644)
	})
}

// Do runs fn on a thread inside ns and fails the test on error.
func Do(t testing.TB, ns *os.File, fn func() error) {
	t.Helper()
	if err := In(ns, fn); err != nil {
		t.Fatal(err)
	}
}

// In runs fn on a thread inside ns. /proc/sys opened there is ns's.
func In(ns *os.File, fn func() error) error {
	done := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			runtime.UnlockOSThread()
			done <- err
			return
		}
		defer orig.Close()
		if err := netns.Set(netns.NsHandle(int(ns.Fd()))); err != nil {
			runtime.UnlockOSThread()
			done <- err
			return
		}
		ferr := fn()
		if netns.Set(orig) == nil {
			runtime.UnlockOSThread()
		}
		done <- ferr
	}()
	return <-done
}

// Run runs a command inside ns and returns its combined output.
func Run(t testing.TB, ns *os.File, argv ...string) string {
	t.Helper()
	var out []byte
	err := In(ns, func() error {
		var err error
		out, err = exec.Command(argv[0], argv[1:]...).CombinedOutput()
		return err
	})
	if err != nil {
		t.Fatalf("%v in netns: %v: %s", argv, err, out)
	}
	return string(out)
}

// Listen opens a TCP listener inside ns.
func Listen(t testing.TB, ns *os.File, addr string) net.Listener {
	t.Helper()
	var l net.Listener
	Do(t, ns, func() error {
		var err error
		l, err = net.Listen("tcp4", addr)
		return err
	})
	t.Cleanup(func() { l.Close() })
	return l
}

// ListenUDP opens a UDP socket inside ns.
func ListenUDP(t testing.TB, ns *os.File, addr string) *net.UDPConn {
	t.Helper()
	var c *net.UDPConn
	Do(t, ns, func() error {
		a, err := net.ResolveUDPAddr("udp4", addr)
		if err != nil {
			return err
		}
		c, err = net.ListenUDP("udp4", a)
		return err
	})
	t.Cleanup(func() { c.Close() })
	return c
}

// Dial connects to addr from inside ns; mark, when non-zero, is set as
// SO_MARK on the socket before it connects (as ztunnel marks its own).
func Dial(ns *os.File, addr string, mark int) (net.Conn, error) {
	var c net.Conn
	err := In(ns, func() error {
		d := net.Dialer{Timeout: 3 * time.Second}
		if mark != 0 {
			d.Control = func(_, _ string, rc syscall.RawConn) error {
				var serr error
				if err := rc.Control(func(fd uintptr) {
					serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_MARK, mark)
				}); err != nil {
					return err
				}
				return serr
			}
		}
		var err error
		c, err = d.DialContext(context.Background(), "tcp4", addr)
		return err
	})
	return c, err
}

// AcceptWithin accepts one connection or fails after d.
func AcceptWithin(l net.Listener, d time.Duration) (net.Conn, error) {
	if tl, ok := l.(*net.TCPListener); ok {
		if err := tl.SetDeadline(time.Now().Add(d)); err != nil {
			return nil, err
		}
		defer tl.SetDeadline(time.Time{})
	}
	return l.Accept()
}

// OriginalDst reads SO_ORIGINAL_DST of a redirected TCP connection.
func OriginalDst(c net.Conn) (string, error) {
	tc, ok := c.(*net.TCPConn)
	if !ok {
		return "", fmt.Errorf("not a TCP connection")
	}
	rc, err := tc.SyscallConn()
	if err != nil {
		return "", err
	}
	var out string
	var gerr error
	err = rc.Control(func(fd uintptr) {
		// SO_ORIGINAL_DST answers a sockaddr_in; the ipv6 mreq getter is
		// the usual way to fetch 16 raw bytes.
		m, err := unix.GetsockoptIPv6Mreq(int(fd), unix.SOL_IP, 80 /* SO_ORIGINAL_DST */)
		if err != nil {
			gerr = err
			return
		}
		b := m.Multiaddr
		port := int(b[2])<<8 | int(b[3])
		out = fmt.Sprintf("%d.%d.%d.%d:%d", b[4], b[5], b[6], b[7], port)
	})
	if err != nil {
		return "", err
	}
	return out, gerr
}
