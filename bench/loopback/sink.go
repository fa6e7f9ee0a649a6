package loopback

import (
	"encoding/binary"
	"errors"
	"io"
	"log/slog"
	"net"
	"sync"
)

// sink accepts connections, discards what it reads and, at EOF, answers with
// the byte count (8 bytes, big endian) and closes. The count travelling back
// through the path under test proves half-close crossed it and gives the
// figure at the receiving end, not at the sender's buffers.
type sink struct {
	ln  net.Listener
	log *slog.Logger
	wg  sync.WaitGroup
}

func newSink(ln net.Listener, log *slog.Logger) *sink {
	s := &sink{ln: ln, log: log}
	s.wg.Add(1)
	go s.serve()
	return s
}

func (s *sink) serve() {
	defer s.wg.Done()
	for {
		c, err := s.ln.Accept()
		if err != nil {
			if !errors.Is(err, net.ErrClosed) {
				s.log.Warn("sink accept", "err", err)
			}
			return
		}
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			defer c.Close()
			n, err := discard(c)
			if err != nil {
				s.log.Warn("sink read", "err", err)
				return
			}
			var b [8]byte
			binary.BigEndian.PutUint64(b[:], uint64(n))
			if _, err := c.Write(b[:]); err != nil {
				s.log.Warn("sink answer", "err", err)
			}
		}()
	}
}

func (s *sink) Close() {
	s.ln.Close()
	s.wg.Wait()
}

var bufPool = sync.Pool{New: func() any { b := make([]byte, 64<<10); return &b }}

func discard(r io.Reader) (int64, error) {
	bp := bufPool.Get().(*[]byte)
	defer bufPool.Put(bp)
	var n int64
	for {
		m, err := r.Read(*bp)
		n += int64(m)
		if errors.Is(err, io.EOF) {
			return n, nil
		}
		if err != nil {
			return n, err
		}
	}
}
