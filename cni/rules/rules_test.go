package rules

import (
	"flag"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

var update = flag.Bool("update", false, "rewrite golden files")

func golden(t *testing.T, name, got string) {
	t.Helper()
	path := filepath.Join("testdata", name)
	if *update {
		if err := os.WriteFile(path, []byte(got), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("read golden (run with -update to create): %v", err)
	}
	if got != string(want) {
		t.Errorf("%s differs from the rendered rules:\n--- got\n%s--- want\n%s", path, got, want)
	}
}

func TestPodRules_RenderGolden(t *testing.T) {
	for _, tc := range []struct {
		file string
		cfg  Config
	}{
		{"pod.golden", Config{}},
		{"pod_nodns.golden", Config{NoDNS: true}},
	} {
		s, err := PodRules(tc.cfg)
		if err != nil {
			t.Fatal(err)
		}
		golden(t, tc.file, s.Restore(nil))
	}
}

func TestHostRules_RenderGolden(t *testing.T) {
	s, err := HostRules(Config{})
	if err != nil {
		t.Fatal(err)
	}
	golden(t, "host.golden", s.Restore(nil))
}

// The facts Istio's ztunnel relies on, independent of the golden file's
// formatting.
func TestPodRules_MatchIstioFacts(t *testing.T) {
	s, err := PodRules(Config{})
	if err != nil {
		t.Fatal(err)
	}
	out := s.Restore(nil)
	for _, want := range []string{
		"-A ISTIO_PRERT -m mark --mark 0x539/0xfff -j CONNMARK --set-xmark 0x111/0xfff",
		"-A ISTIO_PRERT -s 169.254.7.127/32 -p tcp -m tcp -j ACCEPT",
		"! --dport 15008 -m mark ! --mark 0x539/0xfff -j REDIRECT --to-ports 15006",
		"-A ISTIO_OUTPUT -m connmark --mark 0x111/0xfff -j CONNMARK --restore-mark --nfmask 0xffffffff --ctmask 0xffffffff",
		"--dport 53 -j REDIRECT --to-ports 15053",
		"-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -p tcp -m mark ! --mark 0x539/0xfff -j REDIRECT --to-ports 15001",
		"-A PREROUTING -j ISTIO_PRERT",
		"-A OUTPUT -j ISTIO_OUTPUT",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("rendered rules lack %q", want)
		}
	}
	// The outbound redirect must come after the rules that let ztunnel's
	// replies and probe replies through, or they would loop into 15001.
	iAccept := strings.Index(out, "-A ISTIO_OUTPUT -p tcp -m mark --mark 0x111/0xfff -j ACCEPT")
	iRedirect := strings.Index(out, "--to-ports 15001")
	if iAccept < 0 || iRedirect < iAccept {
		t.Errorf("connmark ACCEPT (%d) must precede the 15001 redirect (%d)", iAccept, iRedirect)
	}
}

func TestRestore_OnlyMissingJumps(t *testing.T) {
	s, err := PodRules(Config{NoDNS: true})
	if err != nil {
		t.Fatal(err)
	}
	out := s.Restore(func(r Rule) bool { return r.Chain == "OUTPUT" && r.Table == "nat" })
	if strings.Count(out, "-A PREROUTING") != 0 || strings.Count(out, "-A OUTPUT -j ISTIO_OUTPUT") != 1 {
		t.Errorf("want only the nat OUTPUT jump, got:\n%s", out)
	}
	// Owned chains are always declared, so re-applying flushes them first.
	if strings.Count(out, ":ISTIO_PRERT - [0:0]") != 2 {
		t.Errorf("owned chains not declared in both tables:\n%s", out)
	}
}

func TestConfig_RejectsIPv6SNAT(t *testing.T) {
	if _, err := PodRules(Config{ProbeSNAT: netip.MustParseAddr("fd16::1")}); err == nil {
		t.Fatal("IPv6 probe SNAT address accepted")
	}
	if _, err := HostRules(Config{ProbeSNAT: netip.MustParseAddr("fd16::1")}); err == nil {
		t.Fatal("IPv6 probe SNAT address accepted")
	}
}
