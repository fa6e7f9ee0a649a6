package main

import "testing"

func TestSplitPod(t *testing.T) {
	ok := map[string][2]string{
		"default/web-1": {"default", "web-1"},
		"web-1":         {"default", "web-1"},
		"kube-system/x": {"kube-system", "x"},
	}
	for in, want := range ok {
		ns, name, err := splitPod(in)
		if err != nil || ns != want[0] || name != want[1] {
			t.Errorf("splitPod(%q) = %q, %q, %v; want %v", in, ns, name, err, want)
		}
	}
	for _, bad := range []string{"", "/", "ns/", "/pod", "a/b/c"} {
		if _, _, err := splitPod(bad); err == nil {
			t.Errorf("splitPod(%q) accepted", bad)
		}
	}
}
