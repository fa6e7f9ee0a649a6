package kubelet

import (
	"testing"
	"time"

	v1 "k8s.io/api/core/v1"
)

func TestParseStatStartTime(t *testing.T) {
	// The command name may hold spaces and parentheses.
	stat := "4242 (my (odd) cmd) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 10"
	got, err := parseStatStartTime([]byte(stat))
	if err != nil || got != 987654 {
		t.Fatalf("got %d, %v", got, err)
	}
	if _, err := parseStatStartTime([]byte("12 (x) S 1 2")); err == nil {
		t.Fatal("short stat accepted")
	}
	if _, err := parseStatStartTime([]byte("garbage")); err == nil {
		t.Fatal("garbage accepted")
	}
}

func TestShouldRestart(t *testing.T) {
	cases := []struct {
		policy        v1.RestartPolicy
		init, sidecar bool
		code          int32
		want          bool
	}{
		{v1.RestartPolicyAlways, false, false, 0, true},
		{v1.RestartPolicyAlways, false, false, 1, true},
		{v1.RestartPolicyOnFailure, false, false, 0, false},
		{v1.RestartPolicyOnFailure, false, false, 137, true},
		{v1.RestartPolicyNever, false, false, 1, false},
		{v1.RestartPolicyAlways, true, false, 0, false}, // init done
		{v1.RestartPolicyAlways, true, false, 1, true},
		{v1.RestartPolicyNever, true, false, 1, false},
		{v1.RestartPolicyNever, true, true, 0, true}, // sidecar always
	}
	for _, tc := range cases {
		if got := shouldRestart(tc.policy, tc.init, tc.sidecar, tc.code); got != tc.want {
			t.Errorf("shouldRestart(%s, init=%v, sidecar=%v, %d) = %v", tc.policy, tc.init, tc.sidecar, tc.code, got)
		}
	}
}

func TestRestartBackoff(t *testing.T) {
	base, max := time.Second, 30*time.Second
	want := []time.Duration{1, 2, 4, 8, 16, 30, 30}
	for i, w := range want {
		if got := restartBackoff(int32(i+1), base, max); got != w*time.Second {
			t.Errorf("restart %d: %s, want %s", i+1, got, w*time.Second)
		}
	}
}
