package loopback

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"time"
)

// dialFunc opens one connection whose far end is a sink.
type dialFunc func(ctx context.Context) (net.Conn, error)

type closeWriter interface{ CloseWrite() error }

// measure sends for d on one connection, half-closes and waits for the sink's
// count. It returns the throughput in Gbit/s as the sink saw it.
func measure(ctx context.Context, dial dialFunc, d time.Duration) (float64, error) {
	c, err := dial(ctx)
	if err != nil {
		return 0, fmt.Errorf("dial: %w", err)
	}
	defer c.Close()
	cw, ok := c.(closeWriter)
	if !ok {
		return 0, fmt.Errorf("%T cannot half-close", c)
	}
	if dl, ok := ctx.Deadline(); ok {
		c.SetDeadline(dl)
	}
	buf := make([]byte, 64<<10)
	rand.Read(buf)
	var sent int64
	start := time.Now()
	for end := start.Add(d); time.Now().Before(end); {
		n, err := c.Write(buf)
		sent += int64(n)
		if err != nil {
			return 0, fmt.Errorf("write after %d bytes: %w", sent, err)
		}
	}
	if err := cw.CloseWrite(); err != nil {
		return 0, fmt.Errorf("half-close: %w", err)
	}
	var b [8]byte
	if _, err := io.ReadFull(c, b[:]); err != nil {
		return 0, fmt.Errorf("read count: %w", err)
	}
	elapsed := time.Since(start)
	got := int64(binary.BigEndian.Uint64(b[:]))
	if got != sent {
		return 0, fmt.Errorf("sink counted %d bytes, sent %d", got, sent)
	}
	return float64(got) * 8 / elapsed.Seconds() / 1e9, nil
}
