package profile

import (
	"errors"
	"strings"
	"testing"
)

const pprofTop = `File: ztunnel
Type: cpu
Time: 2026-11-22 03:00:00 UTC
Duration: 4s, Total samples = 3.10s (77.50%)
Showing nodes accounting for 2.5s, 80.65% of 3.10s total
Dropped 120 nodes (cum <= 0.02s)
      flat  flat%   sum%        cum   cum%
     0.90s 29.03% 29.03%      0.90s 29.03%  internal/runtime/syscall.Syscall6
     0.40s 12.90% 41.94%      0.40s 12.90%  crypto/internal/fips140/aes/gcm.gcmAesEnc

     0.20s  6.45% 48.39%      1.20s 38.71%  golang.org/x/net/http2.(*Framer).WriteData
`

func TestTopLines_TableRowsOnly(t *testing.T) {
	got := TopLines(pprofTop)
	if len(got) != 3 {
		t.Fatalf("got %d lines: %q", len(got), got)
	}
	if got[0] != "0.90s 29.03% 29.03% 0.90s 29.03% internal/runtime/syscall.Syscall6" {
		t.Errorf("first line %q", got[0])
	}
	if TopLines("go tool pprof: no such file\n") != nil {
		t.Error("lines from an error message")
	}
}

func TestMarkdown_SaysWhyAProfileIsMissing(t *testing.T) {
	md := Markdown("Where the time goes", []Summary{
		{Label: "node-0 ztunnel", File: "/tmp/a.pprof", Top: TopLines(pprofTop)},
		{Label: "node-1 ztunnel", Err: errors.New("admin port refused")},
	})
	for _, want := range []string{"gcmAesEnc", "node-1 ztunnel: no profile (admin port refused)", "```"} {
		if !strings.Contains(md, want) {
			t.Errorf("markdown lacks %q:\n%s", want, md)
		}
	}
}

func TestCategorise_SumsFlatShareByKindOfWork(t *testing.T) {
	got := Categorise(TopLines(pprofTop))
	want := []Share{{"syscalls (socket reads and writes)", 29.03}, {"TLS/QUIC crypto (AES-GCM, ChaCha)", 12.90}, {"HTTP/2 and QUIC framing", 6.45}}
	if len(got) != len(want) {
		t.Fatalf("got %v", got)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Errorf("share %d = %v, want %v", i, got[i], want[i])
		}
	}
	if s := SharesText(got); !strings.HasPrefix(s, "syscalls (socket reads and writes) 29%, TLS/QUIC crypto") {
		t.Errorf("text %q", s)
	}
}
