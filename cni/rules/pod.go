package rules

import (
	"errors"
	"fmt"
	"net"
	"os"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/meshlite/meshlite/internal/nsenter"
)

// Pod installs, checks and removes the in-pod rule set.
type Pod struct {
	tables *Tables
	set    *Ruleset
}

// NewPod renders the in-pod rule set for cfg, to be run with tables.
func NewPod(tables *Tables, cfg Config) (*Pod, error) {
	set, err := PodRules(cfg)
	if err != nil {
		return nil, err
	}
	return &Pod{tables: tables, set: set}, nil
}

// Ruleset is the rendered in-pod rule set.
func (p *Pod) Ruleset() *Ruleset { return p.set }

// Apply installs the rule set in the pod network namespace ns: the route and
// the fwmark rule first, then every chain in one iptables-restore. Applying
// again changes nothing.
func (p *Pod) Apply(ns *os.File) error {
	if err := withHandle(ns, addRouting); err != nil {
		return err
	}
	return nsenter.Do(ns, func() error {
		if err := p.tables.Apply(p.set); err != nil {
			return fmt.Errorf("apply in-pod iptables rules: %w", err)
		}
		return nil
	})
}

// Check verifies that the whole rule set is in place in ns.
func (p *Pod) Check(ns *os.File) error {
	var errs []error
	if err := withHandle(ns, checkRouting); err != nil {
		errs = append(errs, err)
	}
	if err := nsenter.Do(ns, func() error { return p.tables.Check(p.set) }); err != nil {
		errs = append(errs, err)
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("in-pod redirection incomplete: %w", err)
	}
	return nil
}

// Remove deletes every chain, jump, rule and route of the set from ns;
// absent parts are fine.
func (p *Pod) Remove(ns *os.File) error {
	err := nsenter.Do(ns, func() error { return p.tables.Remove(p.set) })
	if rerr := withHandle(ns, delRouting); rerr != nil {
		err = errors.Join(err, rerr)
	}
	if err != nil {
		return fmt.Errorf("remove in-pod redirection: %w", err)
	}
	return nil
}

// Present reports whether any part of the iptables rule set is in ns.
func (p *Pod) Present(ns *os.File) (bool, error) {
	var ok bool
	err := nsenter.Do(ns, func() error {
		var err error
		ok, err = p.tables.Present(p.set)
		return err
	})
	return ok, err
}

// withHandle runs fn with a netlink handle whose sockets live in ns.
func withHandle(ns *os.File, fn func(*netlink.Handle) error) error {
	h, err := netlink.NewHandleAt(netns.NsHandle(int(ns.Fd())))
	if err != nil {
		return fmt.Errorf("netlink handle in netns %s: %w", ns.Name(), err)
	}
	defer h.Close()
	return fn(h)
}

func markRule() *netlink.Rule {
	r := netlink.NewRule()
	r.Family = unix.AF_INET
	r.Table = RouteTable
	r.Mark = ConnMark
	mask := uint32(MarkMask)
	r.Mask = &mask
	r.Priority = RulePriority
	return r
}

func localRoute(h *netlink.Handle) (*netlink.Route, error) {
	lo, err := h.LinkByName("lo")
	if err != nil {
		return nil, fmt.Errorf("find lo: %w", err)
	}
	return &netlink.Route{
		Dst:       &net.IPNet{IP: net.IPv4zero.To4(), Mask: net.CIDRMask(0, 32)},
		Scope:     netlink.SCOPE_HOST,
		Type:      unix.RTN_LOCAL,
		Table:     RouteTable,
		LinkIndex: lo.Attrs().Index,
	}, nil
}

// addRouting adds `ip route add local 0.0.0.0/0 dev lo table 100` and
// `ip rule add fwmark 0x111/0xfff pref 32764 lookup 100`.
func addRouting(h *netlink.Handle) error {
	rt, err := localRoute(h)
	if err != nil {
		return err
	}
	if err := h.RouteReplace(rt); err != nil {
		return fmt.Errorf("add local route in table %d: %w", RouteTable, err)
	}
	ok, err := hasMarkRule(h)
	if err != nil {
		return err
	}
	if !ok {
		if err := h.RuleAdd(markRule()); err != nil && !errors.Is(err, unix.EEXIST) {
			return fmt.Errorf("add fwmark rule: %w", err)
		}
	}
	return nil
}

func delRouting(h *netlink.Handle) error {
	var errs []error
	for {
		ok, err := hasMarkRule(h)
		if err != nil {
			errs = append(errs, err)
			break
		}
		if !ok {
			break
		}
		if err := h.RuleDel(markRule()); err != nil {
			errs = append(errs, fmt.Errorf("delete fwmark rule: %w", err))
			break
		}
	}
	rt, err := localRoute(h)
	if err != nil {
		return errors.Join(append(errs, err)...)
	}
	if err := h.RouteDel(rt); err != nil && !errors.Is(err, unix.ESRCH) && !errors.Is(err, unix.ENOENT) {
		errs = append(errs, fmt.Errorf("delete local route in table %d: %w", RouteTable, err))
	}
	return errors.Join(errs...)
}

func checkRouting(h *netlink.Handle) error {
	var errs []error
	ok, err := hasMarkRule(h)
	if err != nil {
		errs = append(errs, err)
	} else if !ok {
		errs = append(errs, fmt.Errorf("missing ip rule fwmark %#x/%#x lookup %d", ConnMark, MarkMask, RouteTable))
	}
	ok, err = hasLocalRoute(h)
	if err != nil {
		errs = append(errs, err)
	} else if !ok {
		errs = append(errs, fmt.Errorf("missing route local 0.0.0.0/0 dev lo table %d", RouteTable))
	}
	return errors.Join(errs...)
}

func hasMarkRule(h *netlink.Handle) (bool, error) {
	rules, err := h.RuleList(unix.AF_INET)
	if err != nil {
		return false, fmt.Errorf("list ip rules: %w", err)
	}
	for _, r := range rules {
		if r.Table == RouteTable && r.Mark == ConnMark && r.Mask != nil && *r.Mask == MarkMask {
			return true, nil
		}
	}
	return false, nil
}

func hasLocalRoute(h *netlink.Handle) (bool, error) {
	routes, err := h.RouteListFiltered(unix.AF_INET, &netlink.Route{Table: RouteTable}, netlink.RT_FILTER_TABLE)
	if err != nil {
		return false, fmt.Errorf("list routes of table %d: %w", RouteTable, err)
	}
	for _, r := range routes {
		ones := 0 // a nil Dst is the default route
		if r.Dst != nil {
			ones, _ = r.Dst.Mask.Size()
		}
		if r.Type == unix.RTN_LOCAL && ones == 0 {
			return true, nil
		}
	}
	return false, nil
}
