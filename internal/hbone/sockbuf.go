package hbone

import (
	"net"
	"sync"
)

// Write gathering under crypto/tls. tls.Conn writes every record (at most
// 16 KiB of payload) with its own write(2); on the HBONE data path the
// socket writes were most of ztunnel's CPU. sockConn sits between tls.Conn
// and the TCP socket: while the HTTP/2 writer flushes, the records are
// gathered and leave with one write(2). Measured on the sandbox (iperf3
// through two ztunnels), that cut the sender's write syscall time per byte
// by about a third, for one extra copy of the ciphertext. Reads are not
// buffered: a read buffer under TLS saved no syscall time per byte and cost
// a copy.
const sockWriteMax = 256 << 10 // gathered records are written out at this size at the latest

var sockWriteBufs = sync.Pool{New: func() any { b := make([]byte, 0, sockWriteMax); return &b }}

type sockConn struct {
	net.Conn

	wmu      sync.Mutex
	batching bool
	wbuf     *[]byte // gathered records, only while batching
}

// plainSock turns the buffering off (a benchmark compares both); set only
// while no connection is being made.
var plainSock = false

// newSockConn wraps nc, or returns nil when buffering is off.
func newSockConn(nc net.Conn) *sockConn {
	if plainSock {
		return nil
	}
	return &sockConn{Conn: nc}
}

// underTLS is what to hand to tls.Client or tls.Server: s, or nc without it.
func (s *sockConn) underTLS(nc net.Conn) net.Conn {
	if s == nil {
		return nc
	}
	return s
}

// Write writes p, or gathers it while a batch is open.
func (s *sockConn) Write(p []byte) (int, error) {
	s.wmu.Lock()
	defer s.wmu.Unlock()
	if !s.batching {
		return s.Conn.Write(p)
	}
	if s.wbuf == nil {
		s.wbuf = sockWriteBufs.Get().(*[]byte)
	}
	if len(*s.wbuf)+len(p) > sockWriteMax {
		if err := s.flushLocked(); err != nil {
			return 0, err
		}
		if len(p) > sockWriteMax {
			return s.Conn.Write(p)
		}
	}
	*s.wbuf = append(*s.wbuf, p...)
	return len(p), nil
}

// beginBatch gathers writes until endBatch.
func (s *sockConn) beginBatch() {
	s.wmu.Lock()
	s.batching = true
	s.wmu.Unlock()
}

// endBatch writes what was gathered, with one syscall.
func (s *sockConn) endBatch() error {
	s.wmu.Lock()
	defer s.wmu.Unlock()
	s.batching = false
	err := s.flushLocked()
	if s.wbuf != nil {
		sockWriteBufs.Put(s.wbuf)
		s.wbuf = nil
	}
	return err
}

func (s *sockConn) flushLocked() error {
	if s.wbuf == nil || len(*s.wbuf) == 0 {
		return nil
	}
	_, err := s.Conn.Write(*s.wbuf)
	*s.wbuf = (*s.wbuf)[:0]
	return err
}
