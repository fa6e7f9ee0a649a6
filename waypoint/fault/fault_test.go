package fault

import (
	"math/rand/v2"
	"testing"
	"time"

	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/meshlite/meshlite/proto/l7"
)

func TestDecide_HitsConfiguredShare(t *testing.T) {
	f := &l7.FaultInjection{
		Delay: &l7.FaultDelay{FixedDelay: durationpb.New(50 * time.Millisecond), Percentage: 30},
		Abort: &l7.FaultAbort{HttpStatus: 503, Percentage: 20},
	}
	r := rand.New(rand.NewPCG(1, 2))
	delays, aborts := 0, 0
	const n = 10000
	for i := 0; i < n; i++ {
		a := Decide(f, r.Float64)
		if a.Delay == 50*time.Millisecond {
			delays++
		}
		if a.AbortStatus == 503 {
			aborts++
			if a.GRPCStatus != 14 {
				t.Fatalf("grpc status %d for 503, want 14", a.GRPCStatus)
			}
		}
	}
	if delays < 2800 || delays > 3200 || aborts < 1800 || aborts > 2200 {
		t.Errorf("delays %d aborts %d of %d, want ~3000 and ~2000", delays, aborts, n)
	}
}

func TestDecide_EdgeValues(t *testing.T) {
	one := func() float64 { return 0.999999 }
	if a := Decide(&l7.FaultInjection{Abort: &l7.FaultAbort{HttpStatus: 42, Percentage: 100}}, one); a.AbortStatus != 503 {
		t.Errorf("invalid status must become 503, got %d", a.AbortStatus)
	}
	if a := Decide(&l7.FaultInjection{Abort: &l7.FaultAbort{HttpStatus: 500, Percentage: 0}}, func() float64 { return 0 }); a.AbortStatus != 0 {
		t.Error("0% must never abort")
	}
	if a := Decide(nil, one); a != (Action{}) {
		t.Error("nil policy must do nothing")
	}
}
