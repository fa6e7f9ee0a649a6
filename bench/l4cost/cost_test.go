package l4cost

import "testing"

func TestCost_NormalisesPer1000QPSAndJudgesGoals(t *testing.T) {
	c := Cost{Node: "node-0", VCPU: 0.1, PeakRSS: 30e6, ActualQPS: 2000}
	c.Normalise()
	if c.VCPUPer1k != 0.05 || c.PeakMBPer1k != 15 {
		t.Fatalf("per 1000 qps: %.3f vCPU, %.1f MB; want 0.05 and 15", c.VCPUPer1k, c.PeakMBPer1k)
	}
	if !allMet([]Cost{c}) {
		t.Errorf("0.05 vCPU and 15 MB per 1000 qps should meet 0.06 and 20: %v", c.Goals())
	}
	c.ActualQPS = 1000
	c.Normalise()
	g := c.Goals()
	if g[0].Verdict() != "missed" || g[1].Verdict() != "missed" {
		t.Errorf("0.1 vCPU and 30 MB per 1000 qps: %v", g)
	}
	// No load measured: no per-1000 figure, and no goal met by accident.
	z := Cost{Node: "node-1", VCPU: 0.01}
	z.Normalise()
	if allMet([]Cost{z}) {
		t.Error("a run without load met the goals")
	}
}
