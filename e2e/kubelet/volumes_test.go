package kubelet

import (
	"os"
	"path/filepath"
	"testing"
	"time"

	v1 "k8s.io/api/core/v1"
)

func TestResolveHostPath(t *testing.T) {
	cases := []struct{ path, want string }{
		{"/var/run/ztunnel", "/node/root/var/run/ztunnel"},
		{"/etc/cni/net.d", "/node/root/etc/cni/net.d"},
		{"/../../etc/shadow", "/node/root/etc/shadow"},
		{"/var/run/ztunnel/../../../../x", "/node/root/x"},
		{"/proc", "/proc"},
		{"/var/run/netns", "/var/run/netns"},
		{"/sys/fs/cgroup", "/sys/fs/cgroup"},
		{"/procfoo", "/node/root/procfoo"},
	}
	for _, tc := range cases {
		got, err := resolveHostPath("/node/root", tc.path)
		if err != nil || got != tc.want {
			t.Errorf("resolveHostPath(%q) = %q, %v; want %q", tc.path, got, err, tc.want)
		}
	}
	if _, err := resolveHostPath("/node/root", "relative/x"); err == nil {
		t.Error("relative hostPath accepted")
	}
}

func TestPrepareHostPath(t *testing.T) {
	dir := t.TempDir()
	typ := func(t v1.HostPathType) *v1.HostPathType { return &t }
	if err := prepareHostPath(filepath.Join(dir, "a/b"), typ(v1.HostPathDirectoryOrCreate)); err != nil {
		t.Fatal(err)
	}
	if st, err := os.Stat(filepath.Join(dir, "a/b")); err != nil || !st.IsDir() {
		t.Fatal("DirectoryOrCreate did not create a dir")
	}
	if err := prepareHostPath(filepath.Join(dir, "f/x.lock"), typ(v1.HostPathFileOrCreate)); err != nil {
		t.Fatal(err)
	}
	if err := prepareHostPath(filepath.Join(dir, "f/x.lock"), typ(v1.HostPathFile)); err != nil {
		t.Fatal("File check on an existing file:", err)
	}
	if err := prepareHostPath(filepath.Join(dir, "missing"), typ(v1.HostPathDirectory)); err == nil {
		t.Fatal("Directory that does not exist accepted")
	}
	if err := prepareHostPath(filepath.Join(dir, "a/b"), typ(v1.HostPathFile)); err == nil {
		t.Fatal("a dir accepted as File")
	}
	if err := prepareHostPath(filepath.Join(dir, "a/b"), typ(v1.HostPathSocket)); err == nil {
		t.Fatal("a dir accepted as Socket")
	}
}

func TestWriteVolumeFiles_ReplacesAndPrunes(t *testing.T) {
	dir := t.TempDir()
	files := map[string]volFile{
		"token":        {data: []byte("t1"), mode: 0o600},
		"ca.crt":       {data: []byte("ca"), mode: 0o644},
		"nested/a.txt": {data: []byte("a"), mode: 0o644},
	}
	if err := writeVolumeFiles(dir, files, nil); err != nil {
		t.Fatal(err)
	}
	st, _ := os.Stat(filepath.Join(dir, "token"))
	if st.Mode().Perm() != 0o600 {
		t.Fatalf("token mode %v", st.Mode().Perm())
	}
	delete(files, "nested/a.txt")
	files["token"] = volFile{data: []byte("t2"), mode: 0o600}
	if err := writeVolumeFiles(dir, files, nil); err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(filepath.Join(dir, "token")); string(b) != "t2" {
		t.Fatalf("token = %q", b)
	}
	if _, err := os.Stat(filepath.Join(dir, "nested/a.txt")); !os.IsNotExist(err) {
		t.Fatal("stale file kept")
	}
	for _, bad := range []string{"../escape", "/abs", "a/../../b", ""} {
		if err := writeVolumeFiles(dir, map[string]volFile{bad: {data: nil, mode: 0o644}}, nil); err == nil {
			t.Errorf("path %q accepted", bad)
		}
	}
	if _, err := os.Stat(filepath.Join(filepath.Dir(dir), "escape")); !os.IsNotExist(err) {
		t.Fatal("a file escaped the volume dir")
	}
}

func TestTokenEntry_NeedsRefresh(t *testing.T) {
	issued := time.Date(2025, 1, 1, 0, 0, 0, 0, time.UTC)
	tok := tokenEntry{token: "x", issued: issued, expires: issued.Add(time.Hour)}
	if tok.needsRefresh(issued.Add(47 * time.Minute)) {
		t.Error("refreshed before 80% of its life")
	}
	if !tok.needsRefresh(issued.Add(49 * time.Minute)) {
		t.Error("not refreshed after 80% of its life")
	}
	long := tokenEntry{token: "x", issued: issued, expires: issued.Add(365 * 24 * time.Hour)}
	if !long.needsRefresh(issued.Add(25 * time.Hour)) {
		t.Error("a year-long token must still be renewed daily")
	}
	if !(tokenEntry{}).needsRefresh(issued) {
		t.Error("no token must be fetched")
	}
}
