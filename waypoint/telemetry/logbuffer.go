package telemetry

import (
	"context"
	"io"
	"strconv"
	"sync"
	"time"
)

// LogBuffer takes access log lines off the request path: Write only
// appends to memory, and Run writes the lines out from its own goroutine
// every interval, or sooner once a chunk has gathered. A slow reader of the
// output (a container log pipe on a busy node) must never stall requests,
// so when more than the pending limit waits, new lines are dropped and
// counted, and the count is written out as a line of its own. At most one
// interval of lines is late (and lost on a crash).
type LogBuffer struct {
	out   io.Writer
	every time.Duration
	chunk int // pending bytes that wake the writer early
	limit int // pending bytes beyond which lines are dropped

	mu      sync.Mutex
	pending []byte
	spare   []byte
	dropped int64 // since the last flush
	total   int64

	outMu sync.Mutex // one writer to out at a time
	kick  chan struct{}
}

// NewLogBuffer buffers for out, writing every interval or when chunk
// bytes are pending, and drops lines beyond limit pending bytes
// (defaults: 1 s, 64 KiB, 4 MiB).
func NewLogBuffer(out io.Writer, chunk, limit int, every time.Duration) *LogBuffer {
	if chunk <= 0 {
		chunk = 64 << 10
	}
	if limit < chunk {
		limit = max(4<<20, chunk)
	}
	if every <= 0 {
		every = time.Second
	}
	return &LogBuffer{out: out, every: every, chunk: chunk, limit: limit, kick: make(chan struct{}, 1)}
}

// Write adds one line (slog handlers and JSONAccess write one per call).
// It never blocks on the output.
func (b *LogBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	if len(b.pending)+len(p) > b.limit {
		b.dropped++
		b.total++
		b.mu.Unlock()
		return len(p), nil
	}
	b.pending = append(b.pending, p...)
	full := len(b.pending) >= b.chunk
	b.mu.Unlock()
	if full {
		select {
		case b.kick <- struct{}{}:
		default:
		}
	}
	return len(p), nil
}

// Dropped is how many lines were dropped so far.
func (b *LogBuffer) Dropped() int64 {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.total
}

// Flush writes out what is pending (and a line with the number of lines
// dropped since the last flush, if any).
func (b *LogBuffer) Flush() error {
	b.outMu.Lock()
	defer b.outMu.Unlock()
	b.mu.Lock()
	p := b.pending
	b.pending = b.spare[:0]
	dropped := b.dropped
	b.dropped = 0
	b.mu.Unlock()
	if dropped > 0 {
		p = append(p, `{"time":"`...)
		p = time.Now().AppendFormat(p, "2006-01-02T15:04:05.000Z07:00")
		p = append(p, `","level":"WARN","msg":"access log lines dropped: the output is too slow","dropped":`...)
		p = strconv.AppendInt(p, dropped, 10)
		p = append(p, "}\n"...)
	}
	var err error
	if len(p) > 0 {
		_, err = b.out.Write(p)
	}
	b.mu.Lock()
	if cap(p) <= 2*b.limit {
		b.spare = p[:0]
	}
	b.mu.Unlock()
	return err
}

// Run writes pending lines every interval and when a chunk has gathered,
// until ctx ends, then once more.
func (b *LogBuffer) Run(ctx context.Context) error {
	t := time.NewTicker(b.every)
	defer t.Stop()
	for {
		select {
		case <-t.C:
		case <-b.kick:
		case <-ctx.Done():
			_ = b.Flush()
			return nil
		}
		_ = b.Flush()
	}
}
