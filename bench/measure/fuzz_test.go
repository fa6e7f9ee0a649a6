package measure

import (
	"os"
	"path/filepath"
	"testing"
)

func seedFiles(f *testing.F, names ...string) {
	for _, n := range names {
		if b, err := os.ReadFile(filepath.Join("testdata", n)); err == nil {
			f.Add(b)
		}
	}
}

// The parsers read output of processes that may be cut short or garbled;
// none may panic, and a success must carry sane figures.
func FuzzParseIperf3(f *testing.F) {
	seedFiles(f, "iperf3-p2.json", "iperf3-refused.json")
	f.Fuzz(func(t *testing.T, b []byte) {
		if r, err := ParseIperf3(b); err == nil && !(r.ReceivedGbps > 0) {
			t.Fatalf("accepted a report with %v Gbit/s", r.ReceivedGbps)
		}
	})
}

func FuzzParseFortio(f *testing.F) {
	seedFiles(f, "fortio-tcp.json", "fortio-http.json")
	f.Fuzz(func(t *testing.T, b []byte) {
		if r, err := ParseFortio(b); err == nil && r.Count <= 0 {
			t.Fatalf("accepted a result with %d calls", r.Count)
		}
	})
}

func FuzzParseWrk(f *testing.F) {
	seedFiles(f, "wrk.txt")
	f.Fuzz(func(t *testing.T, b []byte) { ParseWrk(b) })
}

func FuzzProc(f *testing.F) {
	f.Add([]byte("1 (init) S 0 1 1 0 -1 4194560 100 0 0 0 5 6 0 0 20 0"), []byte("VmHWM:\t1 kB\nVmRSS:\t1 kB\n"))
	f.Fuzz(func(t *testing.T, stat, status []byte) {
		ProcCPUTicks(stat)
		if m, err := ParseProcStatus(status); err == nil && (m.RSSBytes > 1<<50 || m.PeakRSSBytes > 1<<50) {
			t.Fatalf("accepted %+v", m)
		}
	})
}
