package retry

import (
	"testing"
	"time"

	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/meshlite/meshlite/proto/l7"
)

func TestPolicy(t *testing.T) {
	p := New(&l7.Retry{Attempts: 3, Codes: []uint32{500, 503}, Backoff: durationpb.New(10 * time.Millisecond), RetryOnConnectFailure: true})
	if !p.RetryStatus(0, 503) || !p.RetryStatus(2, 500) || p.RetryStatus(3, 503) || p.RetryStatus(0, 502) || p.RetryStatus(0, 200) {
		t.Error("status retry decisions wrong")
	}
	if !p.RetryConnect(2) || p.RetryConnect(3) {
		t.Error("connect retry decisions wrong")
	}
	for n, hi := range map[int]time.Duration{1: 10 * time.Millisecond, 2: 20 * time.Millisecond, 3: 40 * time.Millisecond, 9: 100 * time.Millisecond} {
		for i := 0; i < 50; i++ {
			if d := p.Backoff(n); d < hi/2 || d > hi {
				t.Fatalf("Backoff(%d) = %v, want in [%v, %v]", n, d, hi/2, hi)
			}
		}
	}
	none := New(nil)
	if none.RetryStatus(0, 503) || none.RetryConnect(0) {
		t.Error("no policy must not retry")
	}
	if New(&l7.Retry{Attempts: 1, Codes: []uint32{500}}).RetryConnect(0) {
		t.Error("connect failures retried only when asked or when 503 is retried")
	}
	if !New(&l7.Retry{Attempts: 1, Codes: []uint32{503}}).RetryConnect(0) {
		t.Error("retrying 503 must retry connect failures (answered 503)")
	}
}
