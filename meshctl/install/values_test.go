package install

import (
	"context"
	"os"
	"path/filepath"
	"reflect"
	"testing"
)

func TestValuesFromFiles_LaterFilesWinKeyByKey(t *testing.T) {
	dir := t.TempDir()
	a := filepath.Join(dir, "a.yaml")
	b := filepath.Join(dir, "b.yaml")
	os.WriteFile(a, []byte("trustDomain: a.org\nztunnel:\n  tunnel: quic\n  drainTimeout: 5s\n"), 0o644)
	os.WriteFile(b, []byte("ztunnel:\n  tunnel: auto\nlogLevel: debug\n"), 0o644)
	got, err := ValuesFromFiles(a, b)
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]any{
		"trustDomain": "a.org", "logLevel": "debug",
		"ztunnel": map[string]any{"tunnel": "auto", "drainTimeout": "5s"},
	}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("got %v, want %v", got, want)
	}
	r, err := RenderChart(context.Background(), Options{Values: got})
	if err != nil {
		t.Fatal(err)
	}
	wantArgs(t, find(t, r.Objects, "DaemonSet", "ztunnel"), "--tunnel=auto", "--drain-timeout=5s", "--trust-domain=a.org", "--log-level=debug")

	os.WriteFile(b, []byte("ztunnel: [\n"), 0o644)
	if _, err := ValuesFromFiles(a, b); err == nil {
		t.Fatal("broken YAML accepted")
	}
	if _, err := ValuesFromFiles(filepath.Join(dir, "missing.yaml")); err == nil {
		t.Fatal("missing file accepted")
	}
}
