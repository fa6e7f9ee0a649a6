package rules

import (
	"errors"
	"fmt"
	"net/netip"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netlink/nl"
	"golang.org/x/sys/unix"
)

// Host keeps the node-side probe SNAT: chain ISTIO_POSTRT and the ipset of
// enrolled pod IPs. Its methods act on the network namespace of the calling
// thread (the agent runs with hostNetwork, so that is the node's).
type Host struct {
	tables *Tables
	set    *Ruleset
}

// NewHost renders the node-side rules for cfg.
func NewHost(tables *Tables, cfg Config) (*Host, error) {
	set, err := HostRules(cfg)
	if err != nil {
		return nil, err
	}
	return &Host{tables: tables, set: set}, nil
}

// Ruleset is the rendered node-side rule set.
func (h *Host) Ruleset() *Ruleset { return h.set }

// Ensure creates the ipset (keeping its members) and applies the chain.
func (h *Host) Ensure() error {
	err := netlink.IpsetCreate(ProbeIPSet, "hash:ip", netlink.IpsetCreateOptions{
		Family: unix.AF_INET, Comments: true,
	})
	if err != nil && !errors.Is(err, unix.EEXIST) {
		return fmt.Errorf("create ipset %s: %w", ProbeIPSet, err)
	}
	if err := h.tables.Apply(h.set); err != nil {
		return fmt.Errorf("apply node probe SNAT rules: %w", err)
	}
	return nil
}

// Check verifies the chain, the jump and the ipset.
func (h *Host) Check() error {
	var errs []error
	if _, err := netlink.IpsetList(ProbeIPSet); err != nil {
		errs = append(errs, fmt.Errorf("ipset %s: %w", ProbeIPSet, err))
	}
	if err := h.tables.Check(h.set); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// Remove deletes the chain, the jump and the ipset; absent parts are fine.
func (h *Host) Remove() error {
	err := h.tables.Remove(h.set)
	// The set can go only once no rule refers to it.
	if derr := netlink.IpsetDestroy(ProbeIPSet); derr != nil && !errors.Is(derr, unix.ENOENT) {
		err = errors.Join(err, fmt.Errorf("destroy ipset %s: %w", ProbeIPSet, derr))
	}
	return err
}

// AddPod puts a pod IP into the probe set; comment names the pod (its uid).
func (h *Host) AddPod(ip netip.Addr, comment string) error {
	if !ip.Is4() {
		return nil // IPv6 probes are not captured in-pod yet, so need no SNAT
	}
	err := netlink.IpsetAdd(ProbeIPSet, &netlink.IPSetEntry{IP: ip.AsSlice(), Comment: comment, Replace: true})
	if err != nil {
		return fmt.Errorf("add %s to ipset %s: %w", ip, ProbeIPSet, err)
	}
	return nil
}

// DelPod removes a pod IP from the probe set; an absent one is fine.
func (h *Host) DelPod(ip netip.Addr) error {
	if !ip.Is4() {
		return nil
	}
	err := netlink.IpsetDel(ProbeIPSet, &netlink.IPSetEntry{IP: ip.AsSlice()})
	if err != nil && !errors.Is(err, unix.ENOENT) && !isIpsetNotMember(err) {
		return fmt.Errorf("remove %s from ipset %s: %w", ip, ProbeIPSet, err)
	}
	return nil
}

// Members lists the IPs in the probe set.
func (h *Host) Members() ([]netip.Addr, error) {
	res, err := netlink.IpsetList(ProbeIPSet)
	if err != nil {
		return nil, fmt.Errorf("list ipset %s: %w", ProbeIPSet, err)
	}
	var out []netip.Addr
	for _, e := range res.Entries {
		if a, ok := netip.AddrFromSlice(e.IP); ok {
			out = append(out, a.Unmap())
		}
	}
	return out, nil
}

// isIpsetNotMember matches the kernel's IPSET_ERR_EXIST answer to deleting
// an absent member.
func isIpsetNotMember(err error) bool {
	var e nl.IPSetError
	return errors.As(err, &e) && e == nl.IPSetError(nl.IPSET_ERR_EXIST)
}
