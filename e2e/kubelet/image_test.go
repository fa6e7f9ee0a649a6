package kubelet

import (
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"testing"
)

func TestImageBinaryName(t *testing.T) {
	cases := map[string]string{
		"echo":                                 "echo",
		"meshlite/echo:dev":                    "echo",
		"docker.io/istio/ztunnel:1.24.0":       "ztunnel",
		"localhost:5000/mesh/istiod-lite":      "istiod-lite",
		"localhost:5000/mesh/cni@sha256:abcd":  "cni",
		"registry:5000/a/b/pilot:v1@sha256:00": "pilot",
	}
	for image, want := range cases {
		if got := imageBinaryName(image); got != want {
			t.Errorf("imageBinaryName(%q) = %q, want %q", image, got, want)
		}
	}
}

func writeExe(t *testing.T, dir, name string) string {
	t.Helper()
	p := filepath.Join(dir, name)
	if err := os.WriteFile(p, []byte("#!/bin/sh\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestResolveArgv_KubernetesCommandAndArgsRules(t *testing.T) {
	d1, d2 := t.TempDir(), t.TempDir()
	echo := writeExe(t, d1, "echo")
	helper := writeExe(t, d2, "helper")
	if err := os.WriteFile(filepath.Join(d1, "notexec"), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	l := lookups{imageDirs: []string{d1, d2}, hostPath: func(s string) (string, error) {
		if s == "sh" || s == "/bin/sleep" {
			if s == "sh" {
				return "/bin/sh", nil
			}
			return s, nil
		}
		return "", errors.New("not found")
	}}
	cases := []struct {
		name          string
		image         string
		command, args []string
		want          []string
		wantErr       bool
	}{
		{name: "neither: image entrypoint", image: "meshlite/echo:dev", want: []string{echo}},
		{name: "args only: entrypoint plus args", image: "meshlite/echo", args: []string{"server", "--port=80"}, want: []string{echo, "server", "--port=80"}},
		{name: "command naming the image binary by path", image: "meshlite/echo", command: []string{"/usr/local/bin/echo", "server"}, args: []string{"-v"}, want: []string{echo, "server", "-v"}},
		{name: "command naming another image-dir binary", image: "meshlite/echo", command: []string{"helper"}, want: []string{helper}},
		{name: "command from the host", image: "busybox", command: []string{"sh", "-c", "sleep 1"}, want: []string{"/bin/sh", "-c", "sleep 1"}},
		{name: "absolute host command", image: "busybox", command: []string{"/bin/sleep", "5"}, want: []string{"/bin/sleep", "5"}},
		{name: "no binary and no command", image: "nginx:latest", wantErr: true},
		{name: "args only without binary", image: "nginx", args: []string{"x"}, wantErr: true},
		{name: "unknown command", image: "meshlite/echo", command: []string{"nope"}, wantErr: true},
		{name: "non-executable file is no binary", image: "notexec", wantErr: true},
		{name: "empty command", image: "meshlite/echo", command: []string{""}, wantErr: true},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			got, err := resolveArgv(tc.image, tc.command, tc.args, l)
			if tc.wantErr {
				if err == nil {
					t.Fatalf("want error, got %v", got)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(got, tc.want) {
				t.Fatalf("got %q, want %q", got, tc.want)
			}
		})
	}
}
