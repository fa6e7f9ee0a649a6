package meshharness

import (
	"fmt"
	"os/exec"
	"regexp"
	"strconv"
	"strings"
	"testing"

	"github.com/meshlite/meshlite/e2e/netlab"
	"github.com/meshlite/meshlite/internal/nsenter"
)

// WireProbe counts, on every node's forwarding path (the traffic between a
// node's pods and the underlay), the packets that carry a marker in clear
// and the packets to a destination's ports: proof of what crossed between
// nodes and whether it was readable. Packet counters of iptables rules in
// a chain of the mangle table: no capture needed.
type WireProbe struct {
	e     *Env
	chain string
	rules []string // one per counter, in chain order
	names []string
}

var counterLine = regexp.MustCompile(`^\s*(\d+)\s+\d+\s`)

// NewWireProbe installs on every node a counter "marker" for packets
// carrying marker and one counter per entry of ports for TCP packets to
// dstIP at that port; they go when the test ends.
func (e *Env) NewWireProbe(t testing.TB, marker, dstIP string, ports map[string]int) *WireProbe {
	t.Helper()
	p := &WireProbe{e: e, chain: "MESHTEST-WIRE"}
	p.names = append(p.names, "marker")
	p.rules = append(p.rules, "-m string --string "+marker+" --algo bm")
	for name, port := range ports {
		p.names = append(p.names, name)
		p.rules = append(p.rules, fmt.Sprintf("-d %s/32 -p tcp --dport %d", dstIP, port))
	}
	for i := 0; i < e.Sandbox.Plan.Nodes; i++ {
		ns := netlab.NetnsPath(e.Sandbox.Plan.NodeNetns(i))
		p.cleanup(i) // a previous run's, if any
		cmds := [][]string{{"-N", p.chain}}
		for _, r := range p.rules {
			cmds = append(cmds, append([]string{"-A", p.chain}, strings.Fields(r)...))
		}
		cmds = append(cmds, []string{"-I", "FORWARD", "-j", p.chain})
		for _, c := range cmds {
			if err := netlab.Run(ns, "iptables", append([]string{"-w", "-t", "mangle"}, c...)...); err != nil {
				t.Fatalf("wire probe on node %d: %v", i, err)
			}
		}
		t.Cleanup(func() { p.cleanup(i) })
	}
	return p
}

// cleanup removes node i's chain; what is not there is no error.
func (p *WireProbe) cleanup(i int) {
	ns := netlab.NetnsPath(p.e.Sandbox.Plan.NodeNetns(i))
	netlab.Run(ns, "iptables", "-w", "-t", "mangle", "-D", "FORWARD", "-j", p.chain)
	netlab.Run(ns, "iptables", "-w", "-t", "mangle", "-F", p.chain)
	netlab.Run(ns, "iptables", "-w", "-t", "mangle", "-X", p.chain)
}

// Counts sums each counter over the nodes, by name ("marker" and the
// names of NewWireProbe's ports).
func (p *WireProbe) Counts(t testing.TB) map[string]int {
	t.Helper()
	out := map[string]int{}
	for i := 0; i < p.e.Sandbox.Plan.Nodes; i++ {
		var b []byte
		err := nsenter.DoPath(netlab.NetnsPath(p.e.Sandbox.Plan.NodeNetns(i)), func() error {
			var err error
			b, err = exec.Command("iptables", "-w", "-t", "mangle", "-L", p.chain, "-v", "-n", "-x").CombinedOutput()
			return err
		})
		if err != nil {
			t.Fatalf("read wire probe on node %d: %v: %s", i, err, b)
		}
		var n int
		for _, l := range strings.Split(string(b), "\n") {
			m := counterLine.FindStringSubmatch(l)
			if m == nil {
				continue
			}
			if n < len(p.names) {
				v, _ := strconv.Atoi(m[1])
				out[p.names[n]] += v
			}
			n++
		}
		if n != len(p.names) {
			t.Fatalf("wire probe on node %d: %d counters, want %d:\n%s", i, n, len(p.names), b)
		}
	}
	return out
}
