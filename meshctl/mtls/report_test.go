package mtls

import (
	"bytes"
	"encoding/json"
	"flag"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/meshlite/meshlite/meshctl/output"
	"github.com/meshlite/meshlite/meshctl/ztunnel"
)

var update = flag.Bool("update", false, "rewrite the golden files under testdata/")

var now = time.Date(2026, 11, 22, 3, 0, 0, 0, time.UTC)

func strp(s string) *string { return &s }

const (
	ambient = "istio.io/dataplane-mode"
	redir   = "ambient.istio.io/redirection"
)

// fixture is a 2-node cluster: namespace demo (enrolled) with a client on
// node-0 and echo servers on both nodes, namespace legacy (not enrolled)
// with a client and a server, a healthy ztunnel on each node reporting
// redirection, and the client's mTLS connection to echo-1 seen at both
// ends.
type fixture struct {
	in   Input
	dump map[string]*ztunnel.ConfigDump
}

func uid(ns, name string) string { return "Kubernetes//Pod/" + ns + "/" + name }

func newFixture() *fixture {
	f := &fixture{dump: map[string]*ztunnel.ConfigDump{}}
	f.in = Input{Now: now, RootNamespace: "istio-system", Namespaces: []Namespace{
		{Name: "demo", Labels: map[string]string{ambient: "ambient"}},
		{Name: "legacy"},
		{Name: "istio-system"},
	}}
	pod := func(ns, name, ip, node, sa string, enrolled bool) Pod {
		p := Pod{Namespace: ns, Name: name, IP: ip, Node: node, ServiceAccount: sa, Labels: map[string]string{"app": strings.SplitN(name, "-", 2)[0]}}
		if enrolled {
			p.Annotations = map[string]string{redir: "enabled"}
		}
		return p
	}
	f.in.Pods = []Pod{
		pod("demo", "client-7d9f", "10.244.0.5", "node-0", "client", true),
		pod("demo", "echo-0", "10.244.0.6", "node-0", "echo", true),
		pod("demo", "echo-1", "10.244.1.5", "node-1", "echo", true),
		pod("legacy", "client-5c6b", "10.244.0.7", "node-0", "default", false),
		pod("legacy", "echo-4f2a", "10.244.1.6", "node-1", "default", false),
		{Namespace: "istio-system", Name: "ztunnel-abcde", IP: "172.30.0.10", Node: "node-0", HostNetwork: true},
	}
	for i, node := range []string{"node-0", "node-1"} {
		d := &ztunnel.ConfigDump{Ztunnel: &ztunnel.Info{Node: node, Version: "dev", Tunnel: "h2"}}
		for _, p := range f.in.Pods {
			if p.HostNetwork {
				continue
			}
			w := ztunnel.Workload{UID: uid(p.Namespace, p.Name), Name: p.Name, Namespace: p.Namespace, Addresses: []string{p.IP},
				Node: p.Node, Protocol: "TCP", ServiceAccount: p.ServiceAccount, TrustDomain: "cluster.local", Status: "HEALTHY",
				Redirection: strp("")}
			if p.Namespace == "demo" {
				w.Protocol = "HBONE"
				if p.Node == node {
					w.Local = true
					w.Redirection = strp("verified")
				}
			}
			d.Workloads = append(d.Workloads, w)
		}
		for _, sa := range []string{"client", "echo"} {
			var pods []string
			for _, p := range f.in.Pods {
				if p.Namespace == "demo" && p.Node == node && p.ServiceAccount == sa {
					pods = append(pods, uid(p.Namespace, p.Name))
				}
			}
			if len(pods) == 0 {
				continue
			}
			d.Certificates = append(d.Certificates, ztunnel.Certificate{Identity: "spiffe://cluster.local/ns/demo/sa/" + sa, Pods: pods, State: "valid",
				NotBefore: now.Add(-time.Hour), NotAfter: now.Add(23 * time.Hour), Serial: "0" + string(rune('a'+i))})
		}
		f.dump[node] = d
		f.in.Ztunnels = append(f.in.Ztunnels, Ztunnel{Node: node, Pod: "istio-system/ztunnel-" + node, Dump: d})
	}
	f.dump["node-0"].Connections = append(f.dump["node-0"].Connections, ztunnel.Connection{Direction: "outbound", Pod: uid("demo", "client-7d9f"),
		Src: "10.244.0.5:40000", Dst: "10.244.1.5:8080", Security: "mtls", Transport: "h2"})
	f.dump["node-1"].Connections = append(f.dump["node-1"].Connections, ztunnel.Connection{Direction: "inbound", Pod: uid("demo", "echo-1"),
		Src: "10.244.0.5:40000", Dst: "10.244.1.5:8080", Security: "mtls", Transport: "h2"})
	return f
}

func (f *fixture) row(t *testing.T, rep Report, ns, name string) Row {
	t.Helper()
	for _, r := range rep.Workloads {
		if r.Namespace == ns && r.Pod == name {
			return r
		}
	}
	t.Fatalf("no row for %s/%s", ns, name)
	return Row{}
}

func (f *fixture) workload(node, ns, name string) *ztunnel.Workload {
	d := f.dump[node]
	for i := range d.Workloads {
		if d.Workloads[i].Namespace == ns && d.Workloads[i].Name == name {
			return &d.Workloads[i]
		}
	}
	panic("no workload " + ns + "/" + name)
}

func TestCompute_AllMTLSPasses(t *testing.T) {
	f := newFixture()
	rep := Compute(f.in)
	if !rep.Summary.OK {
		t.Fatalf("verdict failed: %v", rep.Summary.Problems)
	}
	if rep.Summary.EnrolledPods != 3 || strings.Join(rep.Summary.EnrolledNamespaces, ",") != "demo" {
		t.Errorf("enrolled: %d pods in %v", rep.Summary.EnrolledPods, rep.Summary.EnrolledNamespaces)
	}
	c := f.row(t, rep, "demo", "client-7d9f")
	if c.Protocol != "HBONE" || c.Mode != ModePermissive || c.Redirection != RedirVerified || c.Cert.State != CertValid || c.Live.MTLS != 1 {
		t.Errorf("client row: %+v", c)
	}
	if e := f.row(t, rep, "demo", "echo-1"); e.Live.MTLS != 1 || e.Live.Plaintext != 0 {
		t.Errorf("echo-1 live: %+v", e.Live)
	}
	l := f.row(t, rep, "legacy", "echo-4f2a")
	if l.Enrolled || l.Protocol != "TCP" || l.Mode != "" || l.Redirection != RedirNone || l.Cert.State != CertNone {
		t.Errorf("legacy row: %+v", l)
	}
	if h := f.row(t, rep, "istio-system", "ztunnel-abcde"); h.Enrollment != HostNetwork || h.Enrolled {
		t.Errorf("host-network row: %+v", h)
	}
	golden(t, "status_ok", rep)
}

func TestCompute_PlaintextToEnrolledPodFails(t *testing.T) {
	f := newFixture()
	// legacy/client holds a plaintext connection to demo/echo-1 (accepted
	// under PERMISSIVE on 15006).
	f.dump["node-1"].Connections = append(f.dump["node-1"].Connections, ztunnel.Connection{Direction: "inbound-plaintext",
		Pod: uid("demo", "echo-1"), Src: "10.244.0.7:51000", Dst: "10.244.1.5:9090", Security: "plaintext", Transport: "tcp"})
	rep := Compute(f.in)
	if rep.Summary.OK {
		t.Fatal("verdict passed with a plaintext connection to an enrolled pod")
	}
	e := f.row(t, rep, "demo", "echo-1")
	if e.Live.Plaintext != 1 || e.Live.MTLS != 1 {
		t.Errorf("echo-1 live: %+v", e.Live)
	}
	if !strings.Contains(rep.Summary.Line, "demo/echo-1") || !strings.Contains(rep.Summary.Line, "plaintext") ||
		!strings.Contains(rep.Summary.Line, "legacy/client-5c6b") {
		t.Errorf("summary does not say who talks plaintext to whom: %q", rep.Summary.Line)
	}
	// The legacy client, outside the mesh, sees its side counted too, but
	// fails nothing.
	if l := f.row(t, rep, "legacy", "client-5c6b"); l.Live.Plaintext != 1 || len(l.Problems) != 0 {
		t.Errorf("legacy client row: %+v", l)
	}
	golden(t, "status_plaintext", rep)
}

func TestCompute_PlaintextFromEnrolledPodFails(t *testing.T) {
	f := newFixture()
	f.dump["node-0"].Connections = append(f.dump["node-0"].Connections, ztunnel.Connection{Direction: "outbound",
		Pod: uid("demo", "client-7d9f"), Src: "10.244.0.5:41000", Dst: "10.244.1.6:8080", Security: "plaintext", Transport: "tcp", Route: "passthrough"})
	rep := Compute(f.in)
	if rep.Summary.OK || !strings.Contains(rep.Summary.Line, "demo/client-7d9f") {
		t.Fatalf("verdict %v %q", rep.Summary.OK, rep.Summary.Line)
	}
	if l := f.row(t, rep, "legacy", "echo-4f2a"); l.Live.Plaintext != 1 {
		t.Errorf("legacy server's row does not count the plaintext connection to it: %+v", l.Live)
	}
}

func TestCompute_SilentZtunnelFailsAndNamesNode(t *testing.T) {
	f := newFixture()
	f.in.Ztunnels[1].Dump = nil
	f.in.Ztunnels[1].Err = "port-forward: connection refused"
	rep := Compute(f.in)
	if rep.Summary.OK {
		t.Fatal("verdict passed though node-1's ztunnel did not answer")
	}
	e := f.row(t, rep, "demo", "echo-1")
	if e.Redirection != RedirUnknown || e.Cert.State != CertUnknown {
		t.Errorf("echo-1: %+v", e)
	}
	if !strings.Contains(rep.Summary.Line, "node-1") {
		t.Errorf("summary does not name the node: %q", rep.Summary.Line)
	}
	// Pods on node-0 are still checked.
	if c := f.row(t, rep, "demo", "client-7d9f"); c.Redirection != RedirVerified || len(c.Problems) != 0 {
		t.Errorf("client on the healthy node: %+v", c)
	}
}

func TestCompute_Redirection(t *testing.T) {
	for _, tc := range []struct {
		name       string
		edit       func(w *ztunnel.Workload, p *Pod)
		want       string
		ok         bool
		noteSubstr string
	}{
		{"verified", func(*ztunnel.Workload, *Pod) {}, RedirVerified, true, ""},
		{"missing", func(w *ztunnel.Workload, _ *Pod) {
			w.Redirection, w.RedirectionError = strp("missing"), "no ISTIO_PRERT chain in the pod netns"
		}, RedirMissing, false, ""},
		{"not local to its node's ztunnel", func(w *ztunnel.Workload, _ *Pod) { w.Redirection, w.Local = strp(""), false }, RedirPending, false, ""},
		// An older ztunnel without the field: the CNI's annotation, never "verified".
		{"older ztunnel, annotated and held", func(w *ztunnel.Workload, _ *Pod) { w.Redirection = nil }, RedirAnnotated, true, "annotated"},
		{"older ztunnel, annotated, not held", func(w *ztunnel.Workload, _ *Pod) { w.Redirection, w.Local = nil, false }, RedirPending, false, ""},
		{"older ztunnel, no annotation", func(w *ztunnel.Workload, p *Pod) { w.Redirection, p.Annotations = nil, nil }, RedirPending, false, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := newFixture()
			tc.edit(f.workload("node-1", "demo", "echo-1"), &f.in.Pods[2])
			rep := Compute(f.in)
			if r := f.row(t, rep, "demo", "echo-1"); r.Redirection != tc.want {
				t.Errorf("redirection %q, want %q (%+v)", r.Redirection, tc.want, r)
			}
			if rep.Summary.OK != tc.ok {
				t.Errorf("verdict ok=%v, want %v: %q", rep.Summary.OK, tc.ok, rep.Summary.Line)
			}
			if tc.noteSubstr != "" && !strings.Contains(strings.Join(rep.Summary.Notes, "\n"), tc.noteSubstr) {
				t.Errorf("no note about %q: %v", tc.noteSubstr, rep.Summary.Notes)
			}
		})
	}
}

func TestCompute_Certificates(t *testing.T) {
	for _, tc := range []struct {
		name string
		edit func(c *ztunnel.Certificate, d *ztunnel.ConfigDump)
		want string
		ok   bool
	}{
		{"valid", func(*ztunnel.Certificate, *ztunnel.ConfigDump) {}, CertValid, true},
		{"expiring: under a quarter of its life left", func(c *ztunnel.Certificate, _ *ztunnel.ConfigDump) {
			c.NotBefore, c.NotAfter = now.Add(-20*time.Hour), now.Add(4*time.Hour)
		}, CertExpiring, true},
		{"expiring: under an hour left", func(c *ztunnel.Certificate, _ *ztunnel.ConfigDump) {
			c.NotBefore, c.NotAfter = now.Add(-time.Minute), now.Add(50*time.Minute)
		}, CertExpiring, true},
		{"expired", func(c *ztunnel.Certificate, _ *ztunnel.ConfigDump) { c.NotAfter = now.Add(-time.Second) }, CertExpired, false},
		{"pending", func(c *ztunnel.Certificate, _ *ztunnel.ConfigDump) {
			c.State, c.NotBefore, c.NotAfter = "pending", time.Time{}, time.Time{}
		}, CertPending, false},
		{"missing", func(_ *ztunnel.Certificate, d *ztunnel.ConfigDump) { d.Certificates = nil }, CertMissing, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := newFixture()
			d := f.dump["node-1"]
			tc.edit(&d.Certificates[0], d)
			rep := Compute(f.in)
			r := f.row(t, rep, "demo", "echo-1")
			if r.Cert.State != tc.want {
				t.Errorf("cert %q, want %q", r.Cert.State, tc.want)
			}
			if rep.Summary.OK != tc.ok {
				t.Errorf("verdict ok=%v, want %v: %q", rep.Summary.OK, tc.ok, rep.Summary.Line)
			}
		})
	}
}

func TestCompute_OptedOutAndPodEnrolled(t *testing.T) {
	f := newFixture()
	f.in.Pods[1].Labels[ambient] = "none"    // demo/echo-0 opts out
	f.in.Pods[4].Labels[ambient] = "ambient" // legacy/echo-4f2a opts in
	f.in.Pods[4].Annotations = map[string]string{redir: "enabled"}
	w := f.workload("node-1", "legacy", "echo-4f2a")
	w.Protocol, w.Local, w.Redirection = "HBONE", true, strp("verified")
	f.dump["node-1"].Certificates = append(f.dump["node-1"].Certificates, ztunnel.Certificate{Identity: "spiffe://cluster.local/ns/legacy/sa/default",
		Pods: []string{w.UID}, State: "valid", NotBefore: now.Add(-time.Hour), NotAfter: now.Add(23 * time.Hour)})
	rep := Compute(f.in)
	if r := f.row(t, rep, "demo", "echo-0"); r.Enrolled || r.Enrollment != OptedOut || r.Redirection != RedirNone {
		t.Errorf("opted-out pod: %+v", r)
	}
	if r := f.row(t, rep, "legacy", "echo-4f2a"); !r.Enrolled || r.Enrollment != EnrolledByPod || r.Redirection != RedirVerified {
		t.Errorf("pod-enrolled pod: %+v", r)
	}
	if !rep.Summary.OK {
		t.Errorf("verdict: %v", rep.Summary.Problems)
	}
}

func TestCompute_StrictModeFromZtunnelPolicies(t *testing.T) {
	f := newFixture()
	f.in.PeerAuthentications = []PeerAuthentication{{Namespace: "demo", Name: "default", Created: now, Mode: "STRICT"}}
	for _, node := range []string{"node-0", "node-1"} {
		for _, name := range []string{"client-7d9f", "echo-0", "echo-1"} {
			w := f.workload(node, "demo", name)
			w.Policies = []string{"istio-system/istio_converted_static_strict"}
		}
	}
	// node-1's ztunnel has not received it for echo-1 yet.
	f.workload("node-1", "demo", "echo-1").Policies = nil
	rep := Compute(f.in)
	if r := f.row(t, rep, "demo", "echo-0"); r.Mode != ModeStrict || r.ModeSource != "ztunnel" {
		t.Errorf("echo-0: mode %q from %q", r.Mode, r.ModeSource)
	}
	r := f.row(t, rep, "demo", "echo-1")
	if r.Mode != ModePermissive || r.ModeConfigured != ModeStrict {
		t.Errorf("echo-1: mode %q configured %q; want what ztunnel enforces (PERMISSIVE) beside STRICT", r.Mode, r.ModeConfigured)
	}
	if !strings.Contains(strings.Join(rep.Summary.Notes, "\n"), "demo/echo-1") {
		t.Errorf("no note about the mode not enforced yet: %v", rep.Summary.Notes)
	}
	if l := f.row(t, rep, "legacy", "echo-4f2a"); l.Mode != "" {
		t.Errorf("a pod outside the mesh has mode %q; nothing enforces one", l.Mode)
	}
}

func TestConfiguredMode(t *testing.T) {
	t0 := now
	pod := Pod{Namespace: "demo", Name: "echo-0", Labels: map[string]string{"app": "echo"}}
	for _, tc := range []struct {
		name  string
		pas   []PeerAuthentication
		want  string
		ports map[uint32]string
	}{
		{"none: PERMISSIVE", nil, ModePermissive, nil},
		{"mesh STRICT", []PeerAuthentication{{Namespace: "istio-system", Name: "default", Mode: "STRICT"}}, ModeStrict, nil},
		{"namespace PERMISSIVE overrides mesh STRICT", []PeerAuthentication{
			{Namespace: "istio-system", Name: "default", Mode: "STRICT"},
			{Namespace: "demo", Name: "ns", Mode: "PERMISSIVE"}}, ModePermissive, nil},
		{"namespace UNSET inherits mesh STRICT", []PeerAuthentication{
			{Namespace: "istio-system", Name: "default", Mode: "STRICT"},
			{Namespace: "demo", Name: "ns"}}, ModeStrict, nil},
		{"workload STRICT overrides namespace PERMISSIVE", []PeerAuthentication{
			{Namespace: "demo", Name: "ns", Mode: "PERMISSIVE"},
			{Namespace: "demo", Name: "wl", Selector: map[string]string{"app": "echo"}, Mode: "STRICT"}}, ModeStrict, nil},
		{"a workload policy for other pods does not apply", []PeerAuthentication{
			{Namespace: "demo", Name: "wl", Selector: map[string]string{"app": "other"}, Mode: "STRICT"}}, ModePermissive, nil},
		{"another namespace's policy does not apply", []PeerAuthentication{{Namespace: "legacy", Name: "default", Mode: "STRICT"}}, ModePermissive, nil},
		{"DISABLE is PERMISSIVE for ambient", []PeerAuthentication{{Namespace: "demo", Name: "ns", Mode: "DISABLE"}}, ModePermissive, nil},
		{"the oldest namespace policy wins", []PeerAuthentication{
			{Namespace: "demo", Name: "b-new", Created: t0.Add(time.Minute), Mode: "PERMISSIVE"},
			{Namespace: "demo", Name: "a-old", Created: t0, Mode: "STRICT"}}, ModeStrict, nil},
		{"port-level exception", []PeerAuthentication{
			{Namespace: "demo", Name: "wl", Selector: map[string]string{"app": "echo"}, Mode: "STRICT",
				PortModes: map[uint32]string{8080: "PERMISSIVE", 9090: "STRICT"}}}, ModeStrict, map[uint32]string{8080: ModePermissive}},
		{"a selector in the root namespace is not mesh-wide", []PeerAuthentication{
			{Namespace: "istio-system", Name: "wl", Selector: map[string]string{"app": "echo"}, Mode: "STRICT"}}, ModePermissive, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, ports := configuredMode(tc.pas, "istio-system", pod)
			if got != tc.want || len(ports) != len(tc.ports) {
				t.Fatalf("mode %q ports %v, want %q %v", got, ports, tc.want, tc.ports)
			}
			for p, m := range tc.ports {
				if ports[p] != m {
					t.Errorf("port %d: %q, want %q", p, ports[p], m)
				}
			}
		})
	}
}

// golden compares the table and the JSON of rep with testdata/<name>.*.
func golden(t *testing.T, name string, rep Report) {
	t.Helper()
	var table bytes.Buffer
	if err := output.WriteTable(&table, Headers, TableRows(rep)); err != nil {
		t.Fatal(err)
	}
	table.WriteString("\n" + SummaryText(rep.Summary))
	js, err := json.MarshalIndent(rep, "", "  ")
	if err != nil {
		t.Fatal(err)
	}
	for ext, got := range map[string][]byte{".table": table.Bytes(), ".json": append(js, '\n')} {
		path := filepath.Join("testdata", name+ext)
		if *update {
			if err := os.MkdirAll("testdata", 0o755); err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(path, got, 0o644); err != nil {
				t.Fatal(err)
			}
			continue
		}
		want, err := os.ReadFile(path)
		if err != nil {
			t.Fatalf("%v (run go test -update to create it)", err)
		}
		if !bytes.Equal(got, want) {
			t.Errorf("%s differs (go test -update rewrites it):\n--- got\n%s\n--- want\n%s", path, got, want)
		}
	}
}
