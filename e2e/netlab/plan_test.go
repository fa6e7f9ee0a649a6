package netlab

import (
	"encoding/json"
	"net/netip"
	"strings"
	"testing"
)

func TestDefaultPlan_AddressesAndNames(t *testing.T) {
	p := DefaultPlan(3)
	if err := p.Validate(); err != nil {
		t.Fatalf("default plan invalid: %v", err)
	}
	checks := []struct{ got, want string }{
		{p.HostIP().String(), "172.30.0.1"},
		{p.NodeIP(0).String(), "172.30.0.10"},
		{p.NodeIP(2).String(), "172.30.0.12"},
		{p.PodCIDR(0).String(), "10.244.0.0/24"},
		{p.PodCIDR(2).String(), "10.244.2.0/24"},
		{p.PodGateway(1).String(), "10.244.1.1"},
		{p.NodeNetns(1), "sbx-node-1"},
		{p.UnderlayNetns(), "sbx-underlay"},
		{p.HostLink(), "sbx-host"},
		{p.NodeName(1), "node-1"},
	}
	for _, c := range checks {
		if c.got != c.want {
			t.Errorf("got %s, want %s", c.got, c.want)
		}
	}
	if !p.Owns("sbx-pod-1234") || p.Owns("sbxpod") || p.Owns("other-node-0") {
		t.Error("Owns does not match exactly the <prefix>- names")
	}
}

func TestPlanValidate_RejectsUnbuildablePlans(t *testing.T) {
	bad := map[string]func(*Plan){
		"no nodes":          func(p *Plan) { p.Nodes = 0 },
		"too many nodes":    func(p *Plan) { p.Nodes = MaxNodes + 1 },
		"long prefix":       func(p *Plan) { p.Prefix = "waytoolong" },
		"slash in prefix":   func(p *Plan) { p.Prefix = "a/b" },
		"underlay not /24":  func(p *Plan) { p.Underlay = netip.MustParsePrefix("172.30.0.0/16") },
		"pods not /16":      func(p *Plan) { p.PodSupernet = netip.MustParsePrefix("10.244.0.0/24") },
		"overlapping pods":  func(p *Plan) { p.PodSupernet = netip.MustParsePrefix("10.96.0.0/16") },
		"ipv6 underlay":     func(p *Plan) { p.Underlay = netip.MustParsePrefix("fd00::/24") },
		"underlay in pods":  func(p *Plan) { p.Underlay = netip.MustParsePrefix("10.244.3.0/24") },
		"ipv6 service CIDR": func(p *Plan) { p.ServiceCIDR = netip.MustParsePrefix("fd00::/108") },
	}
	for name, mutate := range bad {
		p := DefaultPlan(2)
		mutate(&p)
		if err := p.Validate(); err == nil {
			t.Errorf("%s: Validate accepted %+v", name, p)
		}
	}
}

func TestConflist_BridgeWithNodeRangeThenPortmap(t *testing.T) {
	b, err := Conflist(netip.MustParsePrefix("10.244.1.0/24"), "/state/nodes/node-1/root/var/lib/cni/networks")
	if err != nil {
		t.Fatal(err)
	}
	var got struct {
		CNIVersion string `json:"cniVersion"`
		Plugins    []struct {
			Type        string `json:"type"`
			IsGateway   bool   `json:"isGateway"`
			IPMasq      bool   `json:"ipMasq"`
			HairpinMode bool   `json:"hairpinMode"`
			IPAM        struct {
				Type    string `json:"type"`
				DataDir string `json:"dataDir"`
				Ranges  [][]struct {
					Subnet  string `json:"subnet"`
					Gateway string `json:"gateway"`
				} `json:"ranges"`
			} `json:"ipam"`
			Capabilities map[string]bool `json:"capabilities"`
		} `json:"plugins"`
	}
	if err := json.Unmarshal(b, &got); err != nil {
		t.Fatalf("conflist is not JSON: %v\n%s", err, b)
	}
	if got.CNIVersion != "1.0.0" || len(got.Plugins) != 2 {
		t.Fatalf("want cniVersion 1.0.0 and 2 plugins, got %s", b)
	}
	br, pm := got.Plugins[0], got.Plugins[1]
	if br.Type != "bridge" || !br.IsGateway || br.IPMasq || !br.HairpinMode {
		t.Errorf("bridge plugin wrong: %+v", br)
	}
	if br.IPAM.Type != "host-local" || br.IPAM.DataDir != "/state/nodes/node-1/root/var/lib/cni/networks" ||
		len(br.IPAM.Ranges) != 1 || br.IPAM.Ranges[0][0].Subnet != "10.244.1.0/24" || br.IPAM.Ranges[0][0].Gateway != "10.244.1.1" {
		t.Errorf("ipam wrong: %+v", br.IPAM)
	}
	if pm.Type != "portmap" || !pm.Capabilities["portMappings"] {
		t.Errorf("portmap plugin wrong: %+v", pm)
	}
	if _, err := Conflist(netip.MustParsePrefix("fd00::/64"), "/x"); err == nil {
		t.Error("Conflist accepted an IPv6 pod CIDR")
	}
}

// Instances side by side share no name, address range or prefix.
func TestPlanFor_InstancesAreDisjoint(t *testing.T) {
	var plans []Plan
	for i := 0; i < MaxInstances; i++ {
		p := PlanFor(i, 3)
		if err := p.Validate(); err != nil {
			t.Fatalf("instance %d: %v", i, err)
		}
		for j, q := range plans {
			if p.Prefix == q.Prefix || strings.HasPrefix(p.Prefix, q.Prefix+"-") || p.Underlay.Overlaps(q.Underlay) ||
				p.PodSupernet.Overlaps(q.PodSupernet) || p.ServiceCIDR.Overlaps(q.ServiceCIDR) ||
				p.PodSupernet.Overlaps(q.ServiceCIDR) || p.ServiceCIDR.Overlaps(q.PodSupernet) {
				t.Errorf("instances %d and %d overlap: %+v %+v", j, i, q, p)
			}
		}
		plans = append(plans, p)
	}
	if PlanFor(0, 2) != DefaultPlan(2) {
		t.Error("instance 0 is not the default plan")
	}
}
