package sandbox

import (
	"os"
	"path/filepath"
	"testing"
)

func TestUnder_MatchesDirAndDescendantsOnly(t *testing.T) {
	dir := "/var/lib/meshlite-sandbox"
	cases := map[string]bool{
		"/var/lib/meshlite-sandbox":                  true,
		"/var/lib/meshlite-sandbox/":                 true,
		"/var/lib/meshlite-sandbox/nodes/node-0/x":   true,
		"/var/lib/meshlite-sandbox/../other":         false,
		"/var/lib/meshlite-sandbox-other/logs":       false,
		"/var/lib/meshlite-sandbox.lock":             false,
		"var/lib/meshlite-sandbox/relative":          false,
		"":                                           false,
		"/var/lib/meshlite-sandbox/logs/etcd.log.gz": true,
	}
	for path, want := range cases {
		if got := under(path, dir); got != want {
			t.Errorf("under(%q) = %v, want %v", path, got, want)
		}
	}
}

func TestUnescapeMount_DecodesOctalEscapes(t *testing.T) {
	cases := map[string]string{
		`/plain/path`:            "/plain/path",
		`/with\040space`:         "/with space",
		`/tab\011and\134slash`:   "/tab\tand\\slash",
		`/trailing\04`:           `/trailing\04`,
		`/not\9990octal`:         `/not\9990octal`,
		`/run/netns/sbx-node-0`:  "/run/netns/sbx-node-0",
		`/a\040b\040c\040d\040e`: "/a b c d e",
	}
	for in, want := range cases {
		if got := unescapeMount(in); got != want {
			t.Errorf("unescapeMount(%q) = %q, want %q", in, got, want)
		}
	}
}

func TestFindRepoRoot_NeedsTheMeshliteModule(t *testing.T) {
	top := t.TempDir()
	deep := filepath.Join(top, "a", "b")
	if err := os.MkdirAll(deep, 0o755); err != nil {
		t.Fatal(err)
	}
	if _, err := FindRepoRoot(deep); err == nil {
		t.Fatal("found a repo root without any go.mod")
	}
	// A go.mod of another module is not the checkout.
	if err := os.WriteFile(filepath.Join(top, "a", "go.mod"), []byte("module example.com/other\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(top, "go.mod"), []byte("// c\nmodule "+ModulePath+"\n\ngo 1.26\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	got, err := FindRepoRoot(deep)
	if err != nil || got != top {
		t.Fatalf("FindRepoRoot = %q, %v; want %q", got, err, top)
	}
}

func TestState_RoundTripsThroughItsFile(t *testing.T) {
	dir := t.TempDir()
	in := &State{Nodes: 3, Prefix: "sbx", Ready: true, Persistent: true, KubeletBin: "/x/bin/sandbox"}
	if err := saveState(dir, in); err != nil {
		t.Fatal(err)
	}
	out, err := loadState(dir)
	if err != nil {
		t.Fatal(err)
	}
	if out.Nodes != 3 || out.Prefix != "sbx" || !out.Ready || !out.Persistent || out.KubeletBin != in.KubeletBin {
		t.Errorf("loaded %+v, saved %+v", out, in)
	}
	if err := os.WriteFile(statePath(dir), []byte("{not json"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := loadState(dir); err == nil {
		t.Error("loadState accepted a corrupt file")
	}
}
