// Package netlab builds and removes the sandbox's networks: an underlay
// bridge in its own network namespace, one namespace per node joined to it
// by a veth, a host-side veth so the host reaches node and pod addresses,
// routes between the nodes' pod CIDRs, and each node's root directory with
// its CNI configuration. It knows nothing about Kubernetes processes; every
// name and address it uses comes from a Plan, so tests can build a second,
// disjoint network beside a running sandbox.
package netlab

import (
	"fmt"
	"net/netip"
	"path/filepath"
	"strings"
)

// Plan is the address and name layout of one sandbox network.
type Plan struct {
	// Prefix starts every namespace and host link name (at most 8 bytes,
	// so link names fit IFNAMSIZ).
	Prefix string
	// Nodes is the number of node namespaces.
	Nodes int
	// Underlay is the node network: the host takes .1, node i takes .10+i.
	Underlay netip.Prefix
	// PodSupernet is cut into one /24 per node: node i gets the i-th /24.
	PodSupernet netip.Prefix
	// ServiceCIDR is routed from each node to the host, so traffic to a
	// Service VIP has a route before a DNAT rule rewrites it.
	ServiceCIDR netip.Prefix
}

// DefaultPlan is the sandbox's layout for n nodes.
func DefaultPlan(n int) Plan {
	return Plan{
		Prefix:      "sbx",
		Nodes:       n,
		Underlay:    netip.MustParsePrefix("172.30.0.0/24"),
		PodSupernet: netip.MustParsePrefix("10.244.0.0/16"),
		ServiceCIDR: netip.MustParsePrefix("10.96.0.0/16"),
	}
}

// MaxInstances bounds the sandbox instances one machine can run side by
// side (PlanFor).
const MaxInstances = 8

// PlanFor is the layout of sandbox instance i (0 is DefaultPlan): its own
// name prefix, underlay, pod and service ranges, so instances never share a
// name or an address.
func PlanFor(instance, n int) Plan {
	p := DefaultPlan(n)
	if instance <= 0 {
		return p
	}
	p.Prefix = fmt.Sprintf("sb%d", instance)
	p.Underlay = netip.PrefixFrom(netip.AddrFrom4([4]byte{172, byte(30 + instance), 0, 0}), 24)
	p.PodSupernet = netip.PrefixFrom(netip.AddrFrom4([4]byte{10, byte(244 + instance), 0, 0}), 16)
	p.ServiceCIDR = netip.PrefixFrom(netip.AddrFrom4([4]byte{10, byte(96 + instance), 0, 0}), 16)
	return p
}

// MaxNodes bounds Nodes: node addresses are .10+i in a /24 and pod CIDRs
// are /24s of a /16.
const MaxNodes = 200

// Validate reports a plan that cannot be built.
func (p Plan) Validate() error {
	switch {
	case p.Prefix == "" || len(p.Prefix) > 8 || strings.ContainsAny(p.Prefix, "/ \t\n"):
		return fmt.Errorf("netlab plan: prefix %q must be 1-8 characters without '/' or spaces", p.Prefix)
	case p.Nodes < 1 || p.Nodes > MaxNodes:
		return fmt.Errorf("netlab plan: %d nodes, want 1..%d", p.Nodes, MaxNodes)
	case !p.Underlay.Addr().Is4() || p.Underlay.Bits() != 24:
		return fmt.Errorf("netlab plan: underlay %s must be an IPv4 /24", p.Underlay)
	case !p.PodSupernet.Addr().Is4() || p.PodSupernet.Bits() != 16:
		return fmt.Errorf("netlab plan: pod supernet %s must be an IPv4 /16", p.PodSupernet)
	case !p.ServiceCIDR.Addr().Is4():
		return fmt.Errorf("netlab plan: service CIDR %s must be IPv4", p.ServiceCIDR)
	case p.Underlay.Overlaps(p.PodSupernet) || p.Underlay.Overlaps(p.ServiceCIDR) || p.PodSupernet.Overlaps(p.ServiceCIDR):
		return fmt.Errorf("netlab plan: underlay %s, pods %s and services %s must not overlap", p.Underlay, p.PodSupernet, p.ServiceCIDR)
	}
	return nil
}

// ClusterDNS is the address pods get as their nameserver (.10 of the
// service range, as kubeadm clusters have it).
func (p Plan) ClusterDNS() netip.Addr { return nth(p.ServiceCIDR.Masked(), 10) }

// HostIP is the host's address on the underlay.
func (p Plan) HostIP() netip.Addr { return nth(p.Underlay, 1) }

// NodeIP is node i's underlay address.
func (p Plan) NodeIP(i int) netip.Addr { return nth(p.Underlay, 10+i) }

// NodeName is node i's Kubernetes name.
func (p Plan) NodeName(i int) string { return fmt.Sprintf("node-%d", i) }

// PodCIDR is node i's pod range.
func (p Plan) PodCIDR(i int) netip.Prefix {
	a := p.PodSupernet.Addr().As4()
	a[2] = byte(i)
	return netip.PrefixFrom(netip.AddrFrom4(a), 24)
}

// PodGateway is the bridge address on node i (the pods' default gateway).
func (p Plan) PodGateway(i int) netip.Addr { return nth(p.PodCIDR(i), 1) }

// UnderlayNetns names the namespace holding the underlay bridge.
func (p Plan) UnderlayNetns() string { return p.Prefix + "-underlay" }

// NodeNetns names node i's namespace.
func (p Plan) NodeNetns(i int) string { return fmt.Sprintf("%s-node-%d", p.Prefix, i) }

// HostLink names the host end of the veth to the underlay.
func (p Plan) HostLink() string { return p.Prefix + "-host" }

// NetnsDir is where named network namespaces are bind-mounted (as
// iproute2 does).
const NetnsDir = "/run/netns"

// NetnsPath is the bind-mount path of a named namespace.
func NetnsPath(name string) string { return filepath.Join(NetnsDir, name) }

// Owns reports whether a namespace name belongs to this plan's prefix
// (underlay, nodes, and the pods kubelets create as <prefix>-pod-<uid>).
func (p Plan) Owns(netnsName string) bool { return strings.HasPrefix(netnsName, p.Prefix+"-") }

func nth(pfx netip.Prefix, n int) netip.Addr {
	a := pfx.Masked().Addr().As4()
	v := uint32(a[0])<<24 | uint32(a[1])<<16 | uint32(a[2])<<8 | uint32(a[3])
	v += uint32(n)
	return netip.AddrFrom4([4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)})
}
