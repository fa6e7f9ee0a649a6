package netlab

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/meshlite/meshlite/internal/nsenter"
)

// Names of links inside the namespaces this package makes.
const (
	underlayBridge = "br0"
	nodeLink       = "eth0"
)

// Network is a built sandbox network.
type Network struct {
	Plan Plan
	// MadeNetnsMount says whether Create bind-mounted NetnsDir (so Destroy
	// may undo it).
	MadeNetnsMount bool
}

// Create builds the network described by p. It fails if any of its
// namespaces or the host link already exist; on failure it removes what it
// made.
func Create(p Plan, log *slog.Logger) (_ *Network, err error) {
	if err := p.Validate(); err != nil {
		return nil, err
	}
	if left, err := Leftovers(p); err != nil {
		return nil, err
	} else if len(left) > 0 {
		return nil, fmt.Errorf("netlab: network %q already (partly) exists: %v", p.Prefix, left)
	}
	made, err := ensureNetnsDir()
	if err != nil {
		return nil, err
	}
	n := &Network{Plan: p, MadeNetnsMount: made}
	defer func() {
		if err != nil {
			if derr := Destroy(p, false); derr != nil {
				log.Warn("clean up after failed network create", "err", derr)
			}
		}
	}()

	under, err := createNamed(p.UnderlayNetns())
	if err != nil {
		return nil, err
	}
	defer under.Close()
	uh, err := netlink.NewHandleAt(under)
	if err != nil {
		return nil, fmt.Errorf("netlink handle in %s: %w", p.UnderlayNetns(), err)
	}
	defer uh.Close()
	if err := linkUp(uh, "lo"); err != nil {
		return nil, err
	}
	br := &netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: underlayBridge}}
	if err := uh.LinkAdd(br); err != nil {
		return nil, fmt.Errorf("add bridge in %s: %w", p.UnderlayNetns(), err)
	}
	if err := linkUp(uh, underlayBridge); err != nil {
		return nil, err
	}

	// Host <-> underlay.
	host := &netlink.Veth{
		LinkAttrs:     netlink.LinkAttrs{Name: p.HostLink()},
		PeerName:      "host",
		PeerNamespace: netlink.NsFd(int(under)),
	}
	if err := netlink.LinkAdd(host); err != nil {
		return nil, fmt.Errorf("add host veth %s: %w", p.HostLink(), err)
	}
	if err := attach(uh, "host", br); err != nil {
		return nil, err
	}
	if err := addAddrUp(hostHandle, p.HostLink(), netip.PrefixFrom(p.HostIP(), p.Underlay.Bits())); err != nil {
		return nil, err
	}

	for i := 0; i < p.Nodes; i++ {
		if err := createNode(p, i, under, uh, br); err != nil {
			return nil, err
		}
		// The host reaches pods on node i through node i.
		if err := addRoute(hostHandle, p.PodCIDR(i), p.NodeIP(i)); err != nil {
			return nil, fmt.Errorf("host route to node %d pods: %w", i, err)
		}
	}
	log.Info("network created", "prefix", p.Prefix, "nodes", p.Nodes, "host", p.HostIP())
	return n, nil
}

func createNode(p Plan, i int, under netns.NsHandle, uh *netlink.Handle, br netlink.Link) error {
	name := p.NodeNetns(i)
	ns, err := createNamed(name)
	if err != nil {
		return err
	}
	defer ns.Close()
	nh, err := netlink.NewHandleAt(ns)
	if err != nil {
		return fmt.Errorf("netlink handle in %s: %w", name, err)
	}
	defer nh.Close()
	if err := linkUp(nh, "lo"); err != nil {
		return err
	}
	peer := fmt.Sprintf("node-%d", i)
	v := &netlink.Veth{
		LinkAttrs:     netlink.LinkAttrs{Name: peer},
		PeerName:      nodeLink,
		PeerNamespace: netlink.NsFd(int(ns)),
	}
	if err := uh.LinkAdd(v); err != nil {
		return fmt.Errorf("add veth for %s: %w", name, err)
	}
	if err := attach(uh, peer, br); err != nil {
		return err
	}
	if err := addAddrUp(nh, nodeLink, netip.PrefixFrom(p.NodeIP(i), p.Underlay.Bits())); err != nil {
		return fmt.Errorf("%s: %w", name, err)
	}
	for j := 0; j < p.Nodes; j++ {
		if j == i {
			continue
		}
		if err := addRoute(nh, p.PodCIDR(j), p.NodeIP(j)); err != nil {
			return fmt.Errorf("%s: route to node %d pods: %w", name, j, err)
		}
	}
	if err := addRoute(nh, p.ServiceCIDR, p.HostIP()); err != nil {
		return fmt.Errorf("%s: route to services: %w", name, err)
	}
	// Nodes route between the underlay and their pod bridge; forwarding
	// is a per-namespace setting and off in a new one.
	if err := nsenter.DoPath(NetnsPath(name), func() error {
		return os.WriteFile("/proc/sys/net/ipv4/ip_forward", []byte("1"), 0o644)
	}); err != nil {
		return fmt.Errorf("%s: enable ip_forward: %w", name, err)
	}
	return nil
}

// ForwardVIP makes TCP connections to vip, from pods of the node whose
// namespace is nsName and from the node itself, go to target instead (the
// part of kube-proxy the sandbox needs for the kubernetes Service). The rules
// live in the node namespace and go with it.
func ForwardVIP(nsName string, vip, target netip.AddrPort) error {
	for _, chain := range []string{"PREROUTING", "OUTPUT"} {
		if err := Run(NetnsPath(nsName), "iptables", "-w", "-t", "nat", "-A", chain,
			"-d", vip.Addr().String()+"/32", "-p", "tcp", "--dport", fmt.Sprint(vip.Port()),
			"-m", "comment", "--comment", "sandbox: kubernetes service",
			"-j", "DNAT", "--to-destination", target.String()); err != nil {
			return err
		}
	}
	return nil
}

// Destroy removes every namespace whose name starts with the plan's prefix
// (underlay, nodes and pods), the host link and with it the host routes.
// Processes inside those namespaces must be stopped first, or the
// namespaces outlive their names. When unmountNetnsDir is set and
// NetnsDir holds nothing else, its bind mount is removed too. Destroy is
// idempotent.
func Destroy(p Plan, unmountNetnsDir bool) error {
	var errs []error
	if l, err := netlink.LinkByName(p.HostLink()); err == nil {
		if err := netlink.LinkDel(l); err != nil {
			errs = append(errs, fmt.Errorf("delete host link %s: %w", p.HostLink(), err))
		}
	} else if !isNotFound(err) {
		errs = append(errs, fmt.Errorf("find host link %s: %w", p.HostLink(), err))
	}
	names, err := ListNetns(p.Prefix)
	if err != nil {
		errs = append(errs, err)
	}
	for _, n := range names {
		if err := deleteNamed(n); err != nil {
			errs = append(errs, err)
		}
	}
	if unmountNetnsDir {
		if ents, err := os.ReadDir(NetnsDir); err == nil && len(ents) == 0 {
			if err := unix.Unmount(NetnsDir, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) {
				errs = append(errs, fmt.Errorf("unmount %s: %w", NetnsDir, err))
			}
		}
	}
	return errors.Join(errs...)
}

// Leftovers lists what of the plan's network exists on the host:
// namespaces with its prefix, the host link, and host routes into its pod
// supernet or underlay.
func Leftovers(p Plan) ([]string, error) {
	var out []string
	names, err := ListNetns(p.Prefix)
	if err != nil {
		return nil, err
	}
	for _, n := range names {
		out = append(out, "netns "+n)
	}
	links, err := netlink.LinkList()
	if err != nil {
		return nil, fmt.Errorf("list host links: %w", err)
	}
	for _, l := range links {
		if name := l.Attrs().Name; len(name) > len(p.Prefix) && name[:len(p.Prefix)+1] == p.Prefix+"-" {
			out = append(out, "link "+name)
		}
	}
	routes, err := netlink.RouteList(nil, unix.AF_INET)
	if err != nil {
		return nil, fmt.Errorf("list host routes: %w", err)
	}
	for _, r := range routes {
		if r.Dst == nil {
			continue
		}
		d, ok := netip.AddrFromSlice(r.Dst.IP)
		if !ok {
			continue
		}
		if p.PodSupernet.Contains(d.Unmap()) || p.Underlay.Contains(d.Unmap()) {
			out = append(out, "route "+r.Dst.String())
		}
	}
	return out, nil
}

func linkUp(h *netlink.Handle, name string) error {
	l, err := h.LinkByName(name)
	if err != nil {
		return fmt.Errorf("find link %s: %w", name, err)
	}
	if err := h.LinkSetUp(l); err != nil {
		return fmt.Errorf("set %s up: %w", name, err)
	}
	return nil
}

func attach(h *netlink.Handle, name string, br netlink.Link) error {
	l, err := h.LinkByName(name)
	if err != nil {
		return fmt.Errorf("find link %s: %w", name, err)
	}
	if err := h.LinkSetMaster(l, br); err != nil {
		return fmt.Errorf("attach %s to bridge: %w", name, err)
	}
	if err := h.LinkSetUp(l); err != nil {
		return fmt.Errorf("set %s up: %w", name, err)
	}
	return nil
}

func addAddrUp(h *netlink.Handle, name string, addr netip.Prefix) error {
	l, err := h.LinkByName(name)
	if err != nil {
		return fmt.Errorf("find link %s: %w", name, err)
	}
	if err := h.AddrAdd(l, &netlink.Addr{IPNet: ipNet(addr)}); err != nil {
		return fmt.Errorf("add %s to %s: %w", addr, name, err)
	}
	if err := h.LinkSetUp(l); err != nil {
		return fmt.Errorf("set %s up: %w", name, err)
	}
	return nil
}

func addRoute(h *netlink.Handle, dst netip.Prefix, via netip.Addr) error {
	r := &netlink.Route{Dst: ipNet(dst.Masked()), Gw: net.IP(via.AsSlice())}
	if err := h.RouteAdd(r); err != nil {
		return fmt.Errorf("add route %s via %s: %w", dst, via, err)
	}
	return nil
}

func ipNet(p netip.Prefix) *net.IPNet {
	return &net.IPNet{IP: net.IP(p.Addr().AsSlice()), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}

func isNotFound(err error) bool {
	var nf netlink.LinkNotFoundError
	return errors.As(err, &nf)
}

// hostHandle talks netlink in the namespace of the calling thread; every
// thread that entered another namespace is retired (see Do), so that is the
// host's.
var hostHandle = &netlink.Handle{}
