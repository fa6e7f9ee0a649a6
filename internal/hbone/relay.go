package hbone

import (
	"errors"
	"net"
	"sync"
)

// copyBufSize is the size of the pooled buffers used to move tunnel bytes.
const copyBufSize = 64 << 10

var copyBufs = sync.Pool{New: func() any { b := make([]byte, copyBufSize); return &b }}

func getBuf() *[]byte  { return copyBufs.Get().(*[]byte) }
func putBuf(b *[]byte) { copyBufs.Put(b) }

type closeWriter interface{ CloseWrite() error }
type resetter interface{ Reset() error }

// closeWrite half-closes c if it can, or closes it.
func closeWrite(c net.Conn) error {
	if cw, ok := c.(closeWriter); ok {
		return cw.CloseWrite()
	}
	return c.Close()
}

// abort tears c down so that its peer sees a reset: RST_STREAM / QUIC reset
// for tunnels, RST for TCP (SO_LINGER 0).
func abort(c net.Conn) {
	switch c := c.(type) {
	case resetter:
		_ = c.Reset()
	case *net.TCPConn:
		_ = c.SetLinger(0)
		_ = c.Close()
	default:
		_ = c.Close()
	}
}

// Relay copies bytes between a and b in both directions until both are done,
// then closes both. EOF on one side becomes a half-close (CloseWrite) on the
// other; any other error (a reset, a broken connection) aborts both sides, so
// a reset on one side becomes a reset on the other. It returns the bytes
// copied a->b and b->a and the first error that aborted the relay.
func Relay(a, b net.Conn) (aToB, bToA int64, err error) {
	var wg sync.WaitGroup
	var once sync.Once
	var firstErr error
	fail := func(e error) {
		once.Do(func() {
			firstErr = e
			abort(a)
			abort(b)
		})
	}
	wg.Add(1)
	go func() {
		defer wg.Done()
		var e error
		bToA, e = copyHalf(a, b)
		if e != nil {
			fail(e)
		}
	}()
	var e error
	aToB, e = copyHalf(b, a)
	if e != nil {
		fail(e)
	}
	wg.Wait()
	if firstErr == nil {
		_ = a.Close()
		_ = b.Close()
	}
	return aToB, bToA, firstErr
}

// copyHalf copies src to dst; on EOF it half-closes dst.
func copyHalf(dst, src net.Conn) (int64, error) {
	if st, ok := src.(*h2Stream); ok { // hands over buffered chunks, no copy
		n, err := st.WriteTo(dst)
		if err != nil {
			return n, err
		}
		if err := closeWrite(dst); err != nil && !errors.Is(err, net.ErrClosed) {
			return n, err
		}
		return n, nil
	}
	if st, ok := dst.(*h2Stream); ok { // reads behind room for the frame header, no copy
		n, err := st.ReadFrom(src)
		if err != nil {
			return n, err
		}
		if err := closeWrite(dst); err != nil && !errors.Is(err, net.ErrClosed) {
			return n, err
		}
		return n, nil
	}
	bp := getBuf()
	defer putBuf(bp)
	n, err := copyBuffer(dst, src, *bp)
	if err != nil {
		return n, err
	}
	if err := closeWrite(dst); err != nil && !errors.Is(err, net.ErrClosed) {
		return n, err
	}
	return n, nil
}
