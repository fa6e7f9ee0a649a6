// Package podnet opens ztunnel's sockets inside a pod's network namespace:
// listeners and dialers created on an OS thread that entered the netns,
// marked with ztunnel's mark (0x539) so the pod's redirect rules let them
// through, optionally transparent (bound to a non-local source IP); and it
// reads a redirected connection's original destination (SO_ORIGINAL_DST).
//
// It owns nothing but file descriptors: no iptables, no policy.
package podnet

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"os"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/meshlite/meshlite/internal/nsenter"
)

// Mark is the socket mark of every ztunnel socket in a pod; the in-pod rules
// exempt it from redirection (mask 0xfff).
const Mark = 0x539

// NS is an open network namespace. Each socket made in it keeps the netns
// alive until that socket closes.
type NS struct {
	f *os.File
}

// Open opens the netns at path (e.g. /var/run/netns/<name>).
func Open(path string) (*NS, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("open netns %s: %w", path, err)
	}
	return FromFile(f)
}

// FromFile takes ownership of f, which must be a netns descriptor.
func FromFile(f *os.File) (*NS, error) {
	var st unix.Statfs_t
	if err := unix.Fstatfs(int(f.Fd()), &st); err != nil {
		f.Close()
		return nil, fmt.Errorf("stat netns fd: %w", err)
	}
	if st.Type != unix.NSFS_MAGIC {
		f.Close()
		return nil, fmt.Errorf("fd %d is not a namespace (fs type %#x)", f.Fd(), st.Type)
	}
	return &NS{f: f}, nil
}

// Close releases the descriptor (sockets made in the netns stay valid).
func (n *NS) Close() error { return n.f.Close() }

// File returns the netns file (valid until Close), for nsenter.
func (n *NS) File() *os.File { return n.f }

// Fd returns the netns descriptor (valid until Close).
func (n *NS) Fd() uintptr { return n.f.Fd() }

// Do runs fn on an OS thread that is in the netns. Only socket creation
// needs it; a socket stays in the netns it was created in.
func (n *NS) Do(fn func() error) error { return nsenter.Do(n.f, fn) }

// control marks a socket and, when transparent, lets it bind a non-local
// address; reusePort lets a restarted ztunnel bind its listeners beside the
// old one's (SO_REUSEPORT), so the pod is never without a listener.
func control(transparent, reusePort bool) func(network, address string, c syscall.RawConn) error {
	return func(network, address string, c syscall.RawConn) error {
		var serr error
		err := c.Control(func(fd uintptr) {
			if serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_MARK, Mark); serr != nil {
				serr = fmt.Errorf("set SO_MARK: %w", serr)
				return
			}
			if reusePort {
				if serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_REUSEPORT, 1); serr != nil {
					serr = fmt.Errorf("set SO_REUSEPORT: %w", serr)
					return
				}
			}
			if !transparent {
				return
			}
			if network == "tcp6" || network == "udp6" {
				serr = unix.SetsockoptInt(int(fd), unix.SOL_IPV6, unix.IPV6_TRANSPARENT, 1)
			} else {
				serr = unix.SetsockoptInt(int(fd), unix.SOL_IP, unix.IP_TRANSPARENT, 1)
			}
			if serr != nil {
				serr = fmt.Errorf("set IP_TRANSPARENT: %w", serr)
			}
		})
		if err != nil {
			return err
		}
		return serr
	}
}

// Listen opens a marked TCP listener on addr in the netns (SO_REUSEPORT:
// a successor ztunnel may listen beside it).
func (n *NS) Listen(ctx context.Context, addr netip.AddrPort) (*net.TCPListener, error) {
	var ln net.Listener
	err := n.Do(func() error {
		var err error
		lc := net.ListenConfig{Control: control(false, true)}
		ln, err = lc.Listen(ctx, "tcp", addr.String())
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("listen tcp %s in pod netns: %w", addr, err)
	}
	return ln.(*net.TCPListener), nil
}

// ListenUDP opens a marked UDP socket on addr in the netns (SO_REUSEPORT:
// for stateless protocols, where any of the sockets may answer a datagram).
func (n *NS) ListenUDP(ctx context.Context, addr netip.AddrPort) (*net.UDPConn, error) {
	return n.listenUDP(ctx, addr, true)
}

// ListenUDPExclusive opens a marked UDP socket on addr in the netns without
// SO_REUSEPORT: while another socket holds addr it fails with EADDRINUSE.
// Connection-oriented UDP (QUIC) needs it: in a SO_REUSEPORT group the
// kernel spreads a flow's datagrams by a hash over the group's members, so
// a socket joining or leaving moves established connections to a process
// that does not know them.
func (n *NS) ListenUDPExclusive(ctx context.Context, addr netip.AddrPort) (*net.UDPConn, error) {
	return n.listenUDP(ctx, addr, false)
}

func (n *NS) listenUDP(ctx context.Context, addr netip.AddrPort, reusePort bool) (*net.UDPConn, error) {
	var pc net.PacketConn
	err := n.Do(func() error {
		var err error
		lc := net.ListenConfig{Control: control(false, reusePort)}
		pc, err = lc.ListenPacket(ctx, "udp", addr.String())
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("listen udp %s in pod netns: %w", addr, err)
	}
	return pc.(*net.UDPConn), nil
}

// DialTCP connects to dst from inside the netns with a marked socket. A
// valid src binds it; transparent allows src to be a non-local address (the
// original client's, for inbound source preservation).
//
// The dialing goroutine keeps its thread in the netns until the connect
// completes, so a slow connect occupies one OS thread.
func (n *NS) DialTCP(ctx context.Context, src netip.Addr, dst netip.AddrPort, transparent bool) (*net.TCPConn, error) {
	d := net.Dialer{Control: control(transparent, false)}
	if src.IsValid() {
		d.LocalAddr = &net.TCPAddr{IP: src.AsSlice()}
	}
	var c net.Conn
	err := n.Do(func() error {
		var err error
		c, err = d.DialContext(ctx, "tcp", dst.String())
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("dial %s from pod netns: %w", dst, err)
	}
	return c.(*net.TCPConn), nil
}

// DialUDP opens a marked UDP socket in the netns connected to dst (the DNS
// proxy's upstream queries: marked, so the pod's rules do not send them
// back to ztunnel).
func (n *NS) DialUDP(ctx context.Context, dst netip.AddrPort) (*net.UDPConn, error) {
	d := net.Dialer{Control: control(false, false)}
	var c net.Conn
	err := n.Do(func() error {
		var err error
		c, err = d.DialContext(ctx, "udp", dst.String())
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("dial udp %s from pod netns: %w", dst, err)
	}
	return c.(*net.UDPConn), nil
}

// OriginalDst returns the destination a REDIRECTed connection was sent to
// before NAT (SO_ORIGINAL_DST, IPv4 or IPv6 by the connection's family).
func OriginalDst(c net.Conn) (netip.AddrPort, error) {
	sc, ok := c.(syscall.Conn)
	if !ok {
		return netip.AddrPort{}, fmt.Errorf("original destination: %T has no raw connection", c)
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("original destination: %w", err)
	}
	local, _ := c.LocalAddr().(*net.TCPAddr)
	v6 := local != nil && local.IP.To4() == nil
	var out netip.AddrPort
	var serr error
	err = rc.Control(func(fd uintptr) {
		if v6 {
			// IP6T_SO_ORIGINAL_DST (80) fills a sockaddr_in6; IPv6MTUInfo
			// starts with one and is large enough.
			var info *unix.IPv6MTUInfo
			info, serr = unix.GetsockoptIPv6MTUInfo(int(fd), unix.SOL_IPV6, unix.SO_ORIGINAL_DST)
			if serr == nil {
				sa := &info.Addr
				port := (*[2]byte)(unsafe.Pointer(&sa.Port))
				out = netip.AddrPortFrom(netip.AddrFrom16(sa.Addr), uint16(port[0])<<8|uint16(port[1]))
			}
			return
		}
		// SO_ORIGINAL_DST fills a sockaddr_in; IPv6Mreq is 20 bytes and
		// holds it (family 2, port 2, address 4).
		var mreq *unix.IPv6Mreq
		mreq, serr = unix.GetsockoptIPv6Mreq(int(fd), unix.SOL_IP, unix.SO_ORIGINAL_DST)
		if serr == nil {
			b := mreq.Multiaddr
			out = netip.AddrPortFrom(netip.AddrFrom4([4]byte{b[4], b[5], b[6], b[7]}), uint16(b[2])<<8|uint16(b[3]))
		}
	})
	if err == nil {
		err = serr
	}
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("getsockopt SO_ORIGINAL_DST: %w", err)
	}
	return netip.AddrPortFrom(out.Addr().Unmap(), out.Port()), nil
}
