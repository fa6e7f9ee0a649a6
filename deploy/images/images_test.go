package images

import (
	"archive/tar"
	"bytes"
	"debug/elf"
	"errors"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

// staticBins builds testdata/hello as a static binary under each name.
func staticBins(t *testing.T, names ...string) string {
	t.Helper()
	dir := t.TempDir()
	first := filepath.Join(dir, names[0])
	cmd := exec.Command("go", "build", "-trimpath", "-o", first, "./testdata/hello")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("build test binary: %v\n%s", err, out)
	}
	b, err := os.ReadFile(first)
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range names[1:] {
		if err := os.WriteFile(filepath.Join(dir, n), b, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

func TestLayoutTar_HoldsExecutableBinariesEntrypointAndUser(t *testing.T) {
	bins := staticBins(t, "cni-agent", "mesh-cni")
	spec := Spec{Name: "cni-agent", Binaries: []string{"cni-agent", "mesh-cni"}, User: UserRoot, Description: "test"}
	img, err := Build(spec, Options{BinDir: bins, Version: "v1"})
	if err != nil {
		t.Fatal(err)
	}
	out := t.TempDir()
	dst := filepath.Join(out, "cni-agent.oci.tar")
	ref := RefName("registry.local/mesh/", "cni-agent", "v1")
	if ref != "registry.local/mesh/cni-agent:v1" {
		t.Fatalf("ref %q", ref)
	}
	if err := WriteLayoutTar(dst, ref, img); err != nil {
		t.Fatal(err)
	}
	if left, _ := filepath.Glob(filepath.Join(out, ".layout-*")); len(left) > 0 || fileExists(dst+".part") {
		t.Errorf("temporary files left behind: %v", left)
	}

	got, err := ReadLayoutTar(dst, t.TempDir(), ref)
	if err != nil {
		t.Fatal(err)
	}
	if mt, _ := got.MediaType(); mt != types.OCIManifestSchema1 {
		t.Errorf("manifest media type %s", mt)
	}
	wantDigest, _ := img.Digest()
	if d, _ := got.Digest(); d != wantDigest {
		t.Errorf("digest read back %s, wrote %s", d, wantDigest)
	}
	cf, err := got.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	if ep := cf.Config.Entrypoint; len(ep) != 1 || ep[0] != "/usr/local/bin/cni-agent" {
		t.Errorf("entrypoint %v", ep)
	}
	if cf.Config.User != "0:0" || cf.OS != "linux" || cf.Architecture == "" {
		t.Errorf("user %q os %q arch %q", cf.Config.User, cf.OS, cf.Architecture)
	}
	if cf.Config.Labels["org.opencontainers.image.version"] != "v1" {
		t.Errorf("labels %v", cf.Config.Labels)
	}

	// The files, as a runtime unpacks them: both binaries, executable, and
	// runnable.
	rc := mutate.Extract(got)
	defer rc.Close()
	tr := tar.NewReader(rc)
	root := t.TempDir()
	found := map[string]bool{}
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		if h.Typeflag != tar.TypeReg {
			continue
		}
		if h.Mode&0o111 != 0o111 || h.Uid != 0 || h.Gid != 0 {
			t.Errorf("%s: mode %o uid %d gid %d, want executable by all, owned by root", h.Name, h.Mode, h.Uid, h.Gid)
		}
		found[h.Name] = true
		p := filepath.Join(root, filepath.Base(h.Name))
		b, _ := io.ReadAll(tr)
		if err := os.WriteFile(p, b, os.FileMode(h.Mode)); err != nil {
			t.Fatal(err)
		}
	}
	for _, want := range []string{"usr/local/bin/cni-agent", "usr/local/bin/mesh-cni"} {
		if !found[want] {
			t.Errorf("image lacks %s (has %v)", want, found)
		}
	}
	out2, err := exec.Command(filepath.Join(root, "mesh-cni")).Output()
	if err != nil || !strings.HasPrefix(string(out2), "hello from") {
		t.Errorf("binary from the image: %q, %v", out2, err)
	}
}

func TestBuild_SameBinariesSameDigest(t *testing.T) {
	bins := staticBins(t, "ztunnel")
	spec := Spec{Name: "ztunnel", Binaries: []string{"ztunnel"}, User: UserRoot}
	a, err := Build(spec, Options{BinDir: bins})
	if err != nil {
		t.Fatal(err)
	}
	b, err := Build(spec, Options{BinDir: bins})
	if err != nil {
		t.Fatal(err)
	}
	da, _ := a.Digest()
	db, _ := b.Digest()
	if da != db {
		t.Errorf("two builds of the same binaries: %s and %s", da, db)
	}
	c, err := Build(spec, Options{BinDir: bins, Created: time.Unix(1700000000, 0)})
	if err != nil {
		t.Fatal(err)
	}
	if dc, _ := c.Digest(); dc == da {
		t.Error("the creation time does not reach the image")
	}
}

func TestBuild_RefusesWhatCannotRunInAnEmptyImage(t *testing.T) {
	dyn := "/bin/true"
	f, err := elf.Open(dyn)
	if err != nil {
		t.Fatal(err)
	}
	isDynamic := false
	for _, p := range f.Progs {
		isDynamic = isDynamic || p.Type == elf.PT_INTERP
	}
	f.Close()
	if !isDynamic {
		t.Fatalf("%s is static on this machine; the test needs a dynamically linked binary", dyn)
	}
	dir := t.TempDir()
	b, _ := os.ReadFile(dyn)
	os.WriteFile(filepath.Join(dir, "dynamic"), b, 0o755)
	os.WriteFile(filepath.Join(dir, "script"), []byte("#!/bin/sh\necho hi\n"), 0o755)

	tests := []struct {
		name    string
		spec    Spec
		opts    Options
		wantErr string
	}{
		{"dynamic binary", Spec{Name: "x", Binaries: []string{"dynamic"}}, Options{BinDir: dir}, "dynamically linked"},
		{"script", Spec{Name: "x", Binaries: []string{"script"}}, Options{BinDir: dir}, "not an ELF"},
		{"missing binary", Spec{Name: "x", Binaries: []string{"nope"}}, Options{BinDir: dir}, "read binary"},
		{"no binaries", Spec{Name: "x"}, Options{BinDir: dir}, "no binaries"},
		{"path in name", Spec{Name: "x", Binaries: []string{"../dynamic"}}, Options{BinDir: dir}, "bad binary name"},
		{"wrong arch", Spec{Name: "x", Binaries: []string{"dynamic"}}, Options{BinDir: dir, Arch: otherArch()}, "built for"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Build(tc.spec, tc.opts)
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Fatalf("err %v, want %q", err, tc.wantErr)
			}
		})
	}
}

func otherArch() string {
	if elfMachine["amd64"] == hostMachine() {
		return "arm64"
	}
	return "amd64"
}

func hostMachine() elf.Machine {
	f, err := elf.Open("/proc/self/exe")
	if err != nil {
		return 0
	}
	defer f.Close()
	return f.Machine
}

func TestReadLayoutTar_RejectsEntriesOutsideTheLayout(t *testing.T) {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: "../evil", Mode: 0o644, Size: 1})
	tw.Write([]byte("x"))
	tw.Close()
	p := filepath.Join(t.TempDir(), "evil.tar")
	os.WriteFile(p, buf.Bytes(), 0o644)
	dir := t.TempDir()
	if _, err := ReadLayoutTar(p, dir, "x:y"); err == nil || !strings.Contains(err.Error(), "escapes") {
		t.Fatalf("err %v", err)
	}
	if fileExists(filepath.Join(filepath.Dir(dir), "evil")) {
		t.Fatal("wrote outside the directory")
	}
}

func TestComponents_NonRootExceptTheNodeParts(t *testing.T) {
	root := map[string]bool{"ztunnel": true, "cni-agent": true}
	seen := map[string]bool{}
	for _, s := range Components {
		seen[s.Name] = true
		if isRoot := strings.HasPrefix(s.User, "0:"); isRoot != root[s.Name] {
			t.Errorf("%s runs as %q", s.Name, s.User)
		}
	}
	for _, n := range []string{"istiod-lite", "ztunnel", "waypoint", "cni-agent", "meshctl"} {
		if !seen[n] {
			t.Errorf("no image for %s", n)
		}
	}
}

func fileExists(p string) bool { _, err := os.Stat(p); return err == nil }
