package mtls

import (
	"os"
	"testing"

	"github.com/meshlite/meshlite/meshctl/ztunnel"
)

// FuzzCompute: whatever a ztunnel answers (it is untrusted input), the
// verdict and its table are computed without a panic, and a dump that
// decodes never makes an enrolled pod's problems vanish from the summary.
func FuzzCompute(f *testing.F) {
	if b, err := os.ReadFile("../ztunnel/testdata/config_dump.json"); err == nil {
		f.Add(b)
	}
	f.Add([]byte(`{"workloads":[{"uid":"Kubernetes//Pod/demo/echo-1","name":"echo-1","namespace":"demo","redirection":"missing"}],
		"connections":[{"direction":"inbound","pod":"Kubernetes//Pod/demo/echo-1","src":"::1","dst":"[::1]:80","security":"plaintext"}]}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		d, err := ztunnel.Decode(b)
		if err != nil {
			return
		}
		fx := newFixture()
		fx.in.Ztunnels[1].Dump = d
		rep := Compute(fx.in)
		_ = TableRows(rep)
		_ = SummaryText(rep.Summary)
		n := 0
		for _, r := range rep.Workloads {
			if r.Enrolled {
				n += len(r.Problems)
			}
		}
		if len(rep.Summary.Problems) != n || rep.Summary.OK != (n == 0) {
			t.Fatalf("summary has %d problems (ok=%v), rows %d", len(rep.Summary.Problems), rep.Summary.OK, n)
		}
	})
}
