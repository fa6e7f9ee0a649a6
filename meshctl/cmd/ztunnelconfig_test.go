package cmd

import (
	"bytes"
	"flag"
	"os"
	"path/filepath"
	"testing"

	"github.com/meshlite/meshlite/meshctl/output"
	"github.com/meshlite/meshlite/meshctl/ztunnel"
)

var update = flag.Bool("update", false, "rewrite the golden files under testdata/")

func readDump(t *testing.T) *ztunnel.ConfigDump {
	t.Helper()
	b, err := os.ReadFile("../ztunnel/testdata/config_dump.json")
	if err != nil {
		t.Fatal(err)
	}
	d, err := ztunnel.Decode(b)
	if err != nil {
		t.Fatal(err)
	}
	return d
}

// The tables of `ztunnel-config`, from two ztunnels that hold the same
// mesh-wide view (printed once) and their own certificates and
// connections (printed per node), plus one that did not answer.
func TestZtunnelTable_Golden(t *testing.T) {
	d0, d1 := readDump(t), readDump(t)
	results := []ztunnel.Result{
		{Pod: ztunnel.Pod{Namespace: "istio-system", Name: "ztunnel-a", Node: "node-0"}, Dump: d0},
		{Pod: ztunnel.Pod{Namespace: "istio-system", Name: "ztunnel-b", Node: "node-1"}, Dump: d1},
		{Pod: ztunnel.Pod{Namespace: "istio-system", Name: "ztunnel-c", Node: "node-2"}, Err: os.ErrDeadlineExceeded},
	}
	for _, kind := range []string{"workloads", "services", "policies", "certificates", "connections"} {
		for _, ns := range []string{"", "legacy"} {
			name := kind
			if ns != "" {
				name += "-" + ns
			}
			t.Run(name, func(t *testing.T) {
				headers, rows := ztunnelTable(results, kind, ns)
				var b bytes.Buffer
				if err := output.WriteTable(&b, headers, rows); err != nil {
					t.Fatal(err)
				}
				golden(t, filepath.Join("testdata", "ztunnel-config-"+name+".txt"), b.Bytes())
			})
		}
	}
}

func TestWaypointShort(t *testing.T) {
	for in, want := range map[string]string{
		"": "",
		"demo/waypoint.demo.svc.cluster.local:15008": "waypoint",
		"10.244.0.9:15008":                           "10.244.0.9",
		"/10.244.0.9:15008":                          "10.244.0.9",
	} {
		if got := waypointShort(in); got != want {
			t.Errorf("%q: %q, want %q", in, got, want)
		}
	}
}

func TestWaypointGateway_IsIstioWaypoint(t *testing.T) {
	g := WaypointGateway("demo", "waypoint", "service")
	if g.Spec.GatewayClassName != "istio-waypoint" || len(g.Spec.Listeners) != 1 {
		t.Fatalf("%+v", g.Spec)
	}
	l := g.Spec.Listeners[0]
	if l.Name != "mesh" || l.Port != 15008 || l.Protocol != "HBONE" || g.Labels["istio.io/waypoint-for"] != "service" {
		t.Errorf("listener %+v labels %v", l, g.Labels)
	}
}

func TestExitCode(t *testing.T) {
	if ExitCode(&ExitError{Code: 1}) != 1 || ExitCode(os.ErrNotExist) != 1 || ExitCode(&ExitError{Code: 3}) != 3 {
		t.Error("exit codes")
	}
}

func golden(t *testing.T, path string, got []byte) {
	t.Helper()
	if *update {
		if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(path, got, 0o644); err != nil {
			t.Fatal(err)
		}
		return
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("%v (go test -update creates it)", err)
	}
	if !bytes.Equal(got, want) {
		t.Errorf("%s differs (go test -update rewrites it):\n--- got\n%s--- want\n%s", path, got, want)
	}
}

func TestMergeValues_LaterFilesWinDeeply(t *testing.T) {
	a := map[string]any{"ztunnel": map[string]any{"tunnel": "h2", "logLevel": "info"}, "x": 1}
	b := map[string]any{"ztunnel": map[string]any{"tunnel": "quic"}, "y": 2}
	m := mergeValues(a, b)
	z := m["ztunnel"].(map[string]any)
	if z["tunnel"] != "quic" || z["logLevel"] != "info" || m["x"] != 1 || m["y"] != 2 {
		t.Errorf("%v", m)
	}
	if a["ztunnel"].(map[string]any)["tunnel"] != "h2" {
		t.Error("merge wrote into its input")
	}
}
