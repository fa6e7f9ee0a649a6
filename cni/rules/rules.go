package rules

import (
	"fmt"
	"net/netip"
	"sort"
	"strings"
)

// Marks, ports and names of Istio's in-pod redirection. ztunnel must use the
// same mark on its own sockets and listen on the same ports in the pod.
const (
	// ZtunnelMark is the SO_MARK ztunnel sets on every socket it opens in a
	// pod netns; such packets are never redirected.
	ZtunnelMark = 0x539
	// MarkMask is the part of the mark meshlite (and Istio) owns.
	MarkMask = 0xfff
	// ConnMark marks connections ztunnel took part in, so their replies
	// skip redirection and route locally (table 100).
	ConnMark = 0x111
	// RestoreMask restores the whole connmark into the packet mark.
	RestoreMask = 0xffffffff

	// RouteTable holds `local 0.0.0.0/0 dev lo`, looked up for ConnMark.
	RouteTable = 100
	// RulePriority is the priority of the fwmark rule (as Istio's).
	RulePriority = 32764

	PortOutbound         = 15001
	PortInboundPlaintext = 15006
	PortInboundHBONE     = 15008
	PortDNS              = 15053

	ChainPrerouting  = "ISTIO_PRERT"
	ChainOutput      = "ISTIO_OUTPUT"
	ChainPostrouting = "ISTIO_POSTRT"

	// ProbeIPSet holds the IPv4 addresses of enrolled pods on this node;
	// locally originated TCP to them (kubelet probes) is SNATed.
	ProbeIPSet = "istio-inpod-probes-v4"
)

// DefaultProbeSNAT is the source kubelet probes get on their way into an
// enrolled pod, so the pod lets them through uncaptured.
var DefaultProbeSNAT = netip.MustParseAddr("169.254.7.127")

// Config selects optional parts of the rule set.
type Config struct {
	// ProbeSNAT is the address probes are SNATed to (DefaultProbeSNAT when
	// zero). It must be IPv4.
	ProbeSNAT netip.Addr
	// NoDNS leaves DNS (UDP and TCP port 53) uncaptured; by default it goes
	// to ztunnel's DNS proxy on 15053.
	NoDNS bool
}

func (c Config) probeSNAT() netip.Addr {
	if c.ProbeSNAT.IsValid() {
		return c.ProbeSNAT
	}
	return DefaultProbeSNAT
}

func (c Config) validate() error {
	if a := c.probeSNAT(); !a.Is4() {
		return fmt.Errorf("probe SNAT address %s is not IPv4", a)
	}
	return nil
}

// Rule is one iptables rule: its table, chain and match/target arguments.
type Rule struct {
	Table string
	Chain string
	Args  []string
}

func (r Rule) String() string {
	return fmt.Sprintf("-t %s -A %s %s", r.Table, r.Chain, strings.Join(r.Args, " "))
}

// Ruleset is a rendered set of rules: the chains meshlite owns, the rules in
// them (in order) and the jumps from built-in chains into them.
type Ruleset struct {
	// Chains lists, per table, the chains this set owns.
	Chains map[string][]string
	// Rules are appended to owned chains, in this order.
	Rules []Rule
	// Jumps go into built-in chains; Insert puts them first instead of last.
	Jumps  []Rule
	Insert bool
}

// tables lists the tables of the set in a fixed order.
func (s *Ruleset) tables() []string {
	order := map[string]int{"raw": 0, "mangle": 1, "nat": 2, "filter": 3}
	var ts []string
	for t := range s.Chains {
		ts = append(ts, t)
	}
	for _, r := range s.Jumps {
		if _, ok := s.Chains[r.Table]; !ok {
			ts = append(ts, r.Table)
		}
	}
	sort.Slice(ts, func(i, j int) bool { return order[ts[i]] < order[ts[j]] })
	return dedupe(ts)
}

func dedupe(s []string) []string {
	var out []string
	for i, v := range s {
		if i == 0 || s[i-1] != v {
			out = append(out, v)
		}
	}
	return out
}

// Restore renders the set as iptables-restore --noflush input. Declaring an
// owned chain flushes it, so the owned chains end up holding exactly Rules;
// only the jumps for which missing returns true are added (all when missing
// is nil), which keeps a second apply from duplicating them.
func (s *Ruleset) Restore(missing func(Rule) bool) string {
	var b strings.Builder
	for _, t := range s.tables() {
		fmt.Fprintf(&b, "*%s\n", t)
		for _, c := range s.Chains[t] {
			fmt.Fprintf(&b, ":%s - [0:0]\n", c)
		}
		for _, r := range s.Rules {
			if r.Table == t {
				fmt.Fprintf(&b, "-A %s %s\n", r.Chain, strings.Join(r.Args, " "))
			}
		}
		for _, r := range s.Jumps {
			if r.Table != t || (missing != nil && !missing(r)) {
				continue
			}
			if s.Insert {
				fmt.Fprintf(&b, "-I %s 1 %s\n", r.Chain, strings.Join(r.Args, " "))
			} else {
				fmt.Fprintf(&b, "-A %s %s\n", r.Chain, strings.Join(r.Args, " "))
			}
		}
		b.WriteString("COMMIT\n")
	}
	return b.String()
}

func hex(v uint32) string { return fmt.Sprintf("0x%x", v) }

func markMask(mark, mask uint32) string { return hex(mark) + "/" + hex(mask) }

// PodRules renders Istio's in-pod rule set. In rule order:
//
//   - mangle ISTIO_PRERT: packets with ztunnel's mark set the connmark
//     (replies to ztunnel's connections are then recognised);
//   - nat ISTIO_PRERT: probes from the SNAT address are accepted; other
//     inbound TCP not to 15008, not to loopback and not from ztunnel is
//     redirected to 15006 (15008 is reached directly);
//   - mangle ISTIO_OUTPUT: the connmark is restored into the packet mark;
//   - nat ISTIO_OUTPUT: replies to probes are accepted; DNS (UDP and TCP 53)
//     goes to 15053; marked connections and traffic over lo to the pod's own
//     addresses pass; other outbound TCP not to loopback and not from
//     ztunnel is redirected to 15001;
//   - raw: ztunnel's upstream DNS traffic gets its own conntrack zone.
func PodRules(cfg Config) (*Ruleset, error) {
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	ztMark := markMask(ZtunnelMark, MarkMask)
	connMark := markMask(ConnMark, MarkMask)
	snat := cfg.probeSNAT().String()
	const lo4 = "127.0.0.1/32"

	s := &Ruleset{Chains: map[string][]string{
		"mangle": {ChainPrerouting, ChainOutput},
		"nat":    {ChainPrerouting, ChainOutput},
	}}
	s.Jumps = []Rule{
		{"mangle", "PREROUTING", []string{"-j", ChainPrerouting}},
		{"mangle", "OUTPUT", []string{"-j", ChainOutput}},
		{"nat", "OUTPUT", []string{"-j", ChainOutput}},
		{"nat", "PREROUTING", []string{"-j", ChainPrerouting}},
	}
	add := func(table, chain string, args ...string) {
		s.Rules = append(s.Rules, Rule{table, chain, args})
	}
	add("mangle", ChainPrerouting, "-m", "mark", "--mark", ztMark, "-j", "CONNMARK", "--set-xmark", connMark)
	add("nat", ChainPrerouting, "-s", snat+"/32", "-p", "tcp", "-m", "tcp", "-j", "ACCEPT")
	add("nat", ChainOutput, "-d", snat+"/32", "-p", "tcp", "-m", "tcp", "-j", "ACCEPT")
	add("nat", ChainPrerouting, "!", "-d", lo4, "-p", "tcp", "-m", "tcp", "!", "--dport", fmt.Sprint(PortInboundHBONE),
		"-m", "mark", "!", "--mark", ztMark, "-j", "REDIRECT", "--to-ports", fmt.Sprint(PortInboundPlaintext))
	add("mangle", ChainOutput, "-m", "connmark", "--mark", connMark, "-j", "CONNMARK", "--restore-mark",
		"--nfmask", hex(RestoreMask), "--ctmask", hex(RestoreMask))
	if !cfg.NoDNS {
		s.Chains["raw"] = []string{ChainPrerouting, ChainOutput}
		s.Jumps = append(s.Jumps,
			Rule{"raw", "PREROUTING", []string{"-j", ChainPrerouting}},
			Rule{"raw", "OUTPUT", []string{"-j", ChainOutput}})
		add("nat", ChainOutput, "!", "-o", "lo", "-p", "udp", "-m", "mark", "!", "--mark", ztMark,
			"-m", "udp", "--dport", "53", "-j", "REDIRECT", "--to-ports", fmt.Sprint(PortDNS))
		add("nat", ChainOutput, "!", "-d", lo4, "-p", "tcp", "-m", "tcp", "--dport", "53",
			"-m", "mark", "!", "--mark", ztMark, "-j", "REDIRECT", "--to-ports", fmt.Sprint(PortDNS))
		add("raw", ChainOutput, "-p", "udp", "-m", "mark", "--mark", ztMark, "-m", "udp", "--dport", "53", "-j", "CT", "--zone", "1")
		add("raw", ChainPrerouting, "-p", "udp", "-m", "mark", "!", "--mark", ztMark, "-m", "udp", "--sport", "53", "-j", "CT", "--zone", "1")
	}
	add("nat", ChainOutput, "-p", "tcp", "-m", "mark", "--mark", connMark, "-j", "ACCEPT")
	add("nat", ChainOutput, "!", "-d", lo4, "-o", "lo", "-j", "ACCEPT")
	add("nat", ChainOutput, "!", "-d", lo4, "-p", "tcp", "-m", "mark", "!", "--mark", ztMark,
		"-j", "REDIRECT", "--to-ports", fmt.Sprint(PortOutbound))
	return s, nil
}

// HostRules renders the node-side rule: TCP from a local socket (the
// kubelet's probes) to an enrolled pod's IP (ProbeIPSet) leaves with the
// probe SNAT address as source.
func HostRules(cfg Config) (*Ruleset, error) {
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	return &Ruleset{
		Chains: map[string][]string{"nat": {ChainPostrouting}},
		Rules: []Rule{{"nat", ChainPostrouting, []string{
			"-m", "owner", "--socket-exists", "-p", "tcp", "-m", "set", "--match-set", ProbeIPSet, "dst",
			"-j", "SNAT", "--to-source", cfg.probeSNAT().String(),
		}}},
		Jumps:  []Rule{{"nat", "POSTROUTING", []string{"-j", ChainPostrouting}}},
		Insert: true,
	}, nil
}
