package telemetry

import (
	"bytes"
	"context"
	"strings"
	"sync"
	"testing"
	"time"
)

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

func TestLogBuffer_FlushesOnTickFullChunkAndStop(t *testing.T) {
	out := &syncBuffer{}
	b := NewLogBuffer(out, 64, 0, time.Hour)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- b.Run(ctx) }()
	waitOut := func(what string, ok func(string) bool) {
		t.Helper()
		for deadline := time.Now().Add(5 * time.Second); !ok(out.String()); time.Sleep(5 * time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatalf("%s: output %q", what, out.String())
			}
		}
	}

	b.Write([]byte("one\n"))
	time.Sleep(20 * time.Millisecond)
	if out.String() != "" {
		t.Error("a short line was written before the interval")
	}
	long := strings.Repeat("x", 100) + "\n"
	b.Write([]byte(long)) // a chunk gathered: written soon
	waitOut("a full chunk waited for the interval", func(s string) bool { return s == "one\n"+long })
	b.Write([]byte("last\n"))
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if out.String() != "one\n"+long+"last\n" {
		t.Errorf("the last line was not written at stop: %q", out.String())
	}

	ticked := &syncBuffer{}
	b = NewLogBuffer(ticked, 0, 0, 20*time.Millisecond)
	ctx, cancel = context.WithCancel(context.Background())
	defer cancel()
	go b.Run(ctx)
	b.Write([]byte("tick\n"))
	out = ticked
	waitOut("not written after the interval", func(s string) bool { return s == "tick\n" })
}

// blockedWriter stands for a log pipe nobody reads.
type blockedWriter struct {
	release chan struct{}
	syncBuffer
}

func (w *blockedWriter) Write(p []byte) (int, error) {
	<-w.release
	return w.syncBuffer.Write(p)
}

func TestLogBuffer_SlowOutputDropsLinesInsteadOfBlocking(t *testing.T) {
	out := &blockedWriter{release: make(chan struct{})}
	b := NewLogBuffer(out, 10, 100, time.Hour)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- b.Run(ctx) }()
	line := []byte(strings.Repeat("y", 9) + "\n")
	wrote := make(chan struct{})
	go func() {
		for range 1000 { // far beyond the limit, with the output stuck
			b.Write(line)
		}
		close(wrote)
	}()
	select {
	case <-wrote:
	case <-time.After(5 * time.Second):
		t.Fatal("Write blocked on a stuck output")
	}
	if d := b.Dropped(); d < int64(1000-2*100/len(line)) {
		t.Errorf("dropped %d of 1000 lines with room for ~%d", d, 2*100/len(line))
	}
	close(out.release)
	cancel()
	<-done
	got := out.String()
	if !strings.Contains(got, `"msg":"access log lines dropped: the output is too slow","dropped":`) {
		t.Errorf("the drops were not reported: %q", got)
	}
	for _, l := range strings.Split(strings.TrimSpace(got), "\n") {
		if l != string(line[:len(line)-1]) && !strings.HasPrefix(l, "{") {
			t.Fatalf("a torn line: %q", l)
		}
	}
}
