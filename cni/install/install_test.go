package install

import (
	"context"
	"encoding/json"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/cni/libcni"
)

const sandboxList = `{
  "cniVersion": "1.0.0",
  "name": "sandbox",
  "plugins": [
    {"type": "bridge", "bridge": "cni0", "isGateway": true, "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.244.0.0/24"}]]}},
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
`

var entry = json.RawMessage(`{"type":"mesh-cni","agent_socket":"/run/a.sock","add_timeout":"30s"}`)

func types(t *testing.T, conflist []byte) []string {
	t.Helper()
	l, err := libcni.NetworkConfFromBytes(conflist)
	if err != nil {
		t.Fatalf("result is not a valid conflist: %v\n%s", err, conflist)
	}
	var out []string
	for _, p := range l.Plugins {
		out = append(out, p.Network.Type)
	}
	return out
}

func TestChainInto_EdgeCases(t *testing.T) {
	for _, tc := range []struct {
		name    string
		in      string
		list    bool
		want    string // plugin types, comma separated
		changed bool
		err     string
	}{
		{"appends", sandboxList, true, "bridge,portmap,mesh-cni", true, ""},
		{"already chained", strings.Replace(sandboxList, `{"type": "portmap", "capabilities": {"portMappings": true}}`,
			`{"type": "portmap", "capabilities": {"portMappings": true}}, {"add_timeout":"30s","type":"mesh-cni","agent_socket":"/run/a.sock"}`, 1),
			true, "bridge,portmap,mesh-cni", false, ""},
		{"stale entry replaced in place", strings.Replace(sandboxList, `{"type": "portmap", "capabilities": {"portMappings": true}}`,
			`{"type":"mesh-cni","agent_socket":"/old.sock"}, {"type": "portmap", "capabilities": {"portMappings": true}}`, 1),
			true, "bridge,mesh-cni,portmap", true, ""},
		{"duplicates dropped", strings.Replace(sandboxList, `{"type": "portmap", "capabilities": {"portMappings": true}}`,
			`{"type": "portmap", "capabilities": {"portMappings": true}}, {"type":"mesh-cni"}, {"type":"mesh-cni"}`, 1),
			true, "bridge,portmap,mesh-cni", true, ""},
		{"single .conf becomes a list", `{"cniVersion":"1.0.0","name":"net","type":"bridge","bridge":"cni0"}`, false, "bridge,mesh-cni", true, ""},
		{"no plugins", `{"cniVersion":"1.0.0","name":"x"}`, true, "", false, "no plugins"},
		{"not JSON", `{"cniVersion":`, true, "", false, "parse CNI config"},
		{"plugins not a list", `{"cniVersion":"1.0.0","name":"x","plugins":{}}`, true, "", false, "parse conflist plugins"},
		{"null", `null`, true, "", false, "not a JSON object"},
	} {
		out, changed, err := ChainInto([]byte(tc.in), tc.list, entry, "mesh-cni")
		if tc.err != "" {
			if err == nil || !strings.Contains(err.Error(), tc.err) {
				t.Errorf("%s: err = %v, want %q", tc.name, err, tc.err)
			}
			continue
		}
		if err != nil {
			t.Errorf("%s: %v", tc.name, err)
			continue
		}
		if changed != tc.changed {
			t.Errorf("%s: changed = %v", tc.name, changed)
		}
		if got := strings.Join(types(t, out), ","); got != tc.want {
			t.Errorf("%s: plugins %s, want %s", tc.name, got, tc.want)
		}
		// Other plugins keep every field.
		if tc.list && !strings.Contains(string(out), `"isGateway": true`) {
			t.Errorf("%s: bridge settings lost:\n%s", tc.name, out)
		}
		if !changed && string(out) != tc.in {
			t.Errorf("%s: unchanged input rewritten", tc.name)
		}
		// Chaining the result again is a no-op.
		again, changed2, err := ChainInto(out, true, entry, "mesh-cni")
		if err != nil || changed2 || string(again) != string(out) {
			t.Errorf("%s: second chain changed it (%v, %v)", tc.name, changed2, err)
		}
	}
}

func TestUnchain(t *testing.T) {
	chained, _, err := ChainInto([]byte(sandboxList), true, entry, "mesh-cni")
	if err != nil {
		t.Fatal(err)
	}
	out, changed, err := Unchain(chained, "mesh-cni")
	if err != nil || !changed {
		t.Fatalf("Unchain: %v %v", changed, err)
	}
	if got := strings.Join(types(t, out), ","); got != "bridge,portmap" {
		t.Errorf("plugins after Unchain: %s", got)
	}
	if _, changed, _ := Unchain([]byte(sandboxList), "mesh-cni"); changed {
		t.Error("Unchain changed a file without our entry")
	}
	if _, _, err := Unchain([]byte(`{"cniVersion":"1.0.0","name":"x","plugins":[{"type":"mesh-cni"}]}`), "mesh-cni"); err == nil {
		t.Error("Unchain left an empty chain")
	}
}

type fixture struct {
	conf, bin, plugin string
	inst              *Installer
}

func newFixture(t *testing.T) *fixture {
	t.Helper()
	d := t.TempDir()
	fx := &fixture{conf: filepath.Join(d, "net.d"), bin: filepath.Join(d, "bin"), plugin: filepath.Join(d, "mesh-cni-src")}
	os.MkdirAll(fx.conf, 0o755)
	if err := os.WriteFile(fx.plugin, []byte("#!/bin/sh\necho plugin v1\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	var e map[string]any
	json.Unmarshal(entry, &e)
	inst, err := New(Config{ConfDir: fx.conf, BinDir: fx.bin, PluginBinary: fx.plugin, PluginName: "mesh-cni", Entry: e, Resync: time.Hour},
		slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	fx.inst = inst
	return fx
}

func (fx *fixture) read(t *testing.T, name string) []byte {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(fx.conf, name))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestInstaller_InstallChainsPrimaryOnlyAndUninstallUndoes(t *testing.T) {
	fx := newFixture(t)
	// Without any config there is nothing to chain into: an error to retry.
	if err := fx.inst.Install(); err == nil {
		t.Fatal("Install succeeded with an empty net.d")
	}
	os.WriteFile(filepath.Join(fx.conf, "10-sandbox.conflist"), []byte(sandboxList), 0o644)
	os.WriteFile(filepath.Join(fx.conf, "20-other.conflist"), []byte(strings.Replace(sandboxList, `"sandbox"`, `"other"`, 1)), 0o644)
	os.WriteFile(filepath.Join(fx.conf, "05-broken.conflist"), []byte("{"), 0o644) // invalid: never primary
	if err := fx.inst.Install(); err != nil {
		t.Fatal(err)
	}
	if got := types(t, fx.read(t, "10-sandbox.conflist")); strings.Join(got, ",") != "bridge,portmap,mesh-cni" {
		t.Errorf("primary plugins: %v", got)
	}
	if got := types(t, fx.read(t, "20-other.conflist")); strings.Join(got, ",") != "bridge,portmap" {
		t.Errorf("a non-primary config was chained: %v", got)
	}
	if fx.inst.Chained() != filepath.Join(fx.conf, "10-sandbox.conflist") {
		t.Errorf("Chained() = %q", fx.inst.Chained())
	}
	st, err := os.Stat(filepath.Join(fx.bin, "mesh-cni"))
	if err != nil || st.Mode().Perm() != 0o755 {
		t.Fatalf("installed binary: %v %v", st, err)
	}
	// Leftover temp files would be read by nobody, but must not pile up.
	ents, _ := os.ReadDir(fx.conf)
	for _, e := range ents {
		if strings.HasPrefix(e.Name(), ".") {
			t.Errorf("temp file left: %s", e.Name())
		}
	}
	// A new binary replaces the old.
	os.WriteFile(fx.plugin, []byte("#!/bin/sh\necho plugin v2\n"), 0o755)
	if err := fx.inst.Install(); err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(filepath.Join(fx.bin, "mesh-cni")); !strings.Contains(string(b), "v2") {
		t.Error("binary not updated")
	}

	if err := fx.inst.Uninstall(); err != nil {
		t.Fatal(err)
	}
	if got := types(t, fx.read(t, "10-sandbox.conflist")); strings.Join(got, ",") != "bridge,portmap" {
		t.Errorf("after uninstall: %v", got)
	}
	// The binary stays for DELs of pods set up while chained.
	if _, err := os.Stat(filepath.Join(fx.bin, "mesh-cni")); err != nil {
		t.Errorf("binary removed: %v", err)
	}
	if err := fx.inst.Uninstall(); err != nil {
		t.Errorf("second uninstall: %v", err)
	}
}

func TestInstaller_ConvertsSingleConf(t *testing.T) {
	fx := newFixture(t)
	os.WriteFile(filepath.Join(fx.conf, "10-net.conf"), []byte(`{"cniVersion":"1.0.0","name":"net","type":"bridge","bridge":"cni0"}`), 0o644)
	if err := fx.inst.Install(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(fx.conf, "10-net.conf")); !os.IsNotExist(err) {
		t.Errorf(".conf kept: %v", err)
	}
	if got := types(t, fx.read(t, "10-net.conflist")); strings.Join(got, ",") != "bridge,mesh-cni" {
		t.Errorf("plugins %v", got)
	}
}

func TestInstaller_RunRechainsWhenPrimaryIsRewrittenOrReplaced(t *testing.T) {
	fx := newFixture(t)
	primary := filepath.Join(fx.conf, "10-sandbox.conflist")
	os.WriteFile(primary, []byte(sandboxList), 0o644)
	if err := fx.inst.Install(); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- fx.inst.Run(ctx) }()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Error(err)
		}
	}()
	time.Sleep(100 * time.Millisecond) // let the watch start
	waitTypes := func(name, want string) {
		t.Helper()
		deadline := time.Now().Add(5 * time.Second)
		for {
			b, err := os.ReadFile(filepath.Join(fx.conf, name))
			if err == nil {
				if l, err := libcni.NetworkConfFromBytes(b); err == nil {
					var got []string
					for _, p := range l.Plugins {
						got = append(got, p.Network.Type)
					}
					if strings.Join(got, ",") == want {
						return
					}
				}
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s never became %s; now %s", name, want, b)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	// The node's CNI rewrites its config without us (as on upgrade).
	if err := os.WriteFile(primary, []byte(sandboxList), 0o644); err != nil {
		t.Fatal(err)
	}
	waitTypes("10-sandbox.conflist", "bridge,portmap,mesh-cni")
	// A new, earlier config becomes primary: we move there.
	os.WriteFile(filepath.Join(fx.conf, "01-new.conflist"), []byte(strings.Replace(sandboxList, `"sandbox"`, `"new"`, 1)), 0o644)
	waitTypes("01-new.conflist", "bridge,portmap,mesh-cni")
	waitTypes("10-sandbox.conflist", "bridge,portmap")
}

func FuzzChainInto(f *testing.F) {
	f.Add([]byte(sandboxList), true)
	f.Add([]byte(`{"cniVersion":"1.0.0","name":"n","type":"bridge"}`), false)
	f.Add([]byte(`{"cniVersion":"1.0.0","name":"n","plugins":[{"type":"mesh-cni"},{"type":"mesh-cni","x":1}]}`), true)
	f.Fuzz(func(t *testing.T, in []byte, list bool) {
		out, changed, err := ChainInto(in, list, entry, "mesh-cni")
		if err != nil {
			return
		}
		if changed {
			// Whatever we write must be a valid conflist ending... with us in it.
			l, err := libcni.NetworkConfFromBytes(out)
			if err != nil {
				t.Fatalf("wrote an invalid conflist: %v", err)
			}
			n := 0
			for _, p := range l.Plugins {
				if p.Network.Type == "mesh-cni" {
					n++
				}
			}
			if n != 1 {
				t.Fatalf("%d mesh-cni entries", n)
			}
		}
		if _, changed2, err := ChainInto(out, true, entry, "mesh-cni"); err == nil && changed2 && changed {
			t.Fatal("chaining is not idempotent")
		}
		_, _, _ = Unchain(out, "mesh-cni")
	})
}
