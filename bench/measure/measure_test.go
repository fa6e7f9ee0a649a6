package measure

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func read(t *testing.T, name string) []byte {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("testdata", name))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// The testdata files are real output of iperf 3.12, fortio v1.68.2 and wrk
// 4.1 (Debian 12) run on loopback.
func TestParseIperf3_ReadsReceiverThroughputOfAllStreams(t *testing.T) {
	r, err := ParseIperf3(read(t, "iperf3-p2.json"))
	if err != nil {
		t.Fatal(err)
	}
	if r.Streams != 2 {
		t.Errorf("streams = %d, want 2", r.Streams)
	}
	// bits_per_second of end.sum_received in the file.
	if r.ReceivedGbps < 1 || r.ReceivedGbps > 200 {
		t.Errorf("received %.3f Gbit/s: not the loopback figure in the file", r.ReceivedGbps)
	}
	if r.SentGbps < r.ReceivedGbps*0.9 {
		t.Errorf("sent %.3f < received %.3f Gbit/s", r.SentGbps, r.ReceivedGbps)
	}
}

func TestParseIperf3_ReportsIperfsOwnError(t *testing.T) {
	_, err := ParseIperf3(read(t, "iperf3-refused.json"))
	if err == nil || !strings.Contains(err.Error(), "Connection refused") {
		t.Fatalf("err = %v, want iperf3's connection refused", err)
	}
}

func TestParseIperf3_RejectsBadInput(t *testing.T) {
	for name, in := range map[string]string{
		"not json":     "iperf3: error - unable to connect",
		"no end":       `{"start":{}}`,
		"zero rate":    `{"end":{"sum_sent":{"bits_per_second":0},"sum_received":{"bits_per_second":0}}}`,
		"empty object": `{}`,
	} {
		if _, err := ParseIperf3([]byte(in)); err == nil {
			t.Errorf("%s: no error", name)
		}
	}
}

func TestParseFortio_TCPEchoPercentilesAndCounts(t *testing.T) {
	r, err := ParseFortio(read(t, "fortio-tcp.json"))
	if err != nil {
		t.Fatal(err)
	}
	if r.Count != 200 || r.OK != 200 || r.Errors != 0 {
		t.Errorf("count %d ok %d errors %d, want 200 200 0", r.Count, r.OK, r.Errors)
	}
	if !(r.P50 > 0 && r.P50 <= r.P90 && r.P90 <= r.P99 && r.P99 <= r.Max+time.Microsecond) {
		t.Errorf("percentiles out of order: p50 %v p90 %v p99 %v max %v", r.P50, r.P90, r.P99, r.Max)
	}
	if r.P99 > time.Second {
		t.Errorf("p99 %v: seconds were not converted", r.P99)
	}
}

func TestParseFortio_HTTPCountsStatus200AsOK(t *testing.T) {
	r, err := ParseFortio(read(t, "fortio-http.json"))
	if err != nil {
		t.Fatal(err)
	}
	if r.OK != r.Count || r.Count == 0 {
		t.Errorf("ok %d of %d", r.OK, r.Count)
	}
}

func TestParseFortio_RejectsMissingPercentilesAndEmptyRuns(t *testing.T) {
	for name, in := range map[string]string{
		"no percentiles": `{"DurationHistogram":{"Count":3,"Percentiles":[{"Percentile":50,"Value":0.001}]}}`,
		"no calls":       `{"DurationHistogram":{"Count":0}}`,
		"fortio error":   `{"Error":"bad url","Message":"x"}`,
		"not json":       `Aborting because of lookup foo: no such host`,
	} {
		if _, err := ParseFortio([]byte(in)); err == nil {
			t.Errorf("%s: no error", name)
		}
	}
}

func TestParseWrk_RequestsPerSecondAndErrors(t *testing.T) {
	r, err := ParseWrk(read(t, "wrk.txt"))
	if err != nil {
		t.Fatal(err)
	}
	if r.RequestsPerSec != 67721.16 || r.Requests != 74493 {
		t.Errorf("got %+v, want 67721.16 req/s of 74493", r)
	}
	r, err = ParseWrk([]byte("  10 requests in 1.00s, 1KB read\n  Socket errors: connect 1, read 2, write 0, timeout 3\n  Non-2xx or 3xx responses: 4\nRequests/sec:     10.00\n"))
	if err != nil {
		t.Fatal(err)
	}
	if r.SocketErrors != 6 || r.Non2xx != 4 {
		t.Errorf("got %+v, want 6 socket errors and 4 non-2xx", r)
	}
	if _, err := ParseWrk([]byte("unable to connect to 10.0.0.1:80 Connection refused\n")); err == nil {
		t.Error("no error for wrk output without a rate")
	}
}

func TestProcCPUTicks_CountsFieldsAfterTheCommandName(t *testing.T) {
	// A command name with spaces and a ')' must not shift the fields.
	stat := "4242 (a b) c) S 1 4242 4242 0 -1 4194560 100 0 0 0 123 45 0 0 20 0 8 0 100 1000 200\n"
	n, err := ProcCPUTicks([]byte(stat))
	if err != nil || n != 168 {
		t.Fatalf("got %d, %v; want 123+45", n, err)
	}
	for _, bad := range []string{"", "1 (x) S 1 2", "1 (x) S 1 2 3 4 5 6 7 8 9 10 eleven 12"} {
		if _, err := ProcCPUTicks([]byte(bad)); err == nil {
			t.Errorf("%q: no error", bad)
		}
	}
}

func TestParseProcStatus_ReadsRSSAndPeak(t *testing.T) {
	m, err := ParseProcStatus([]byte("Name:\tztunnel\nVmHWM:\t   20480 kB\nVmRSS:\t   10240 kB\nThreads:\t9\n"))
	if err != nil || m.PeakRSSBytes != 20<<20 || m.RSSBytes != 10<<20 {
		t.Fatalf("got %+v, %v", m, err)
	}
	if _, err := ParseProcStatus([]byte("Name:\tkthreadd\nState:\tS\n")); err == nil {
		t.Error("no error for a status without memory lines")
	}
	if _, err := ParseProcStatus([]byte("VmHWM:\t1 MB\nVmRSS:\t1 kB\n")); err == nil {
		t.Error("no error for a size not in kB")
	}
}
