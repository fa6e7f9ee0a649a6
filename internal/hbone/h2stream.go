package hbone

import (
	"errors"
	"io"
	"net"
	"os"
	"sync"
	"time"

	"golang.org/x/net/http2"
)

// recvChunk is the size of the pooled chunks a stream buffers received data in.
const recvChunk = 64 << 10

var recvChunks = sync.Pool{New: func() any { b := make([]byte, 0, recvChunk); return &b }}

// recvBuf is a FIFO of pooled chunks, guarded by the connection's mu. The
// read loop reads DATA payloads straight into the free tail of the last
// chunk without holding mu (filling is then set, and nobody else may touch
// that chunk's free space or recycle it); the reader copies out from the
// head, or takes whole chunks (WriteTo).
type recvBuf struct {
	chunks  []*[]byte // len(*chunk) is its fill level
	head    int       // read offset into chunks[0]
	n       int       // buffered bytes
	filling bool
}

func (b *recvBuf) len() int { return b.n }

// tailSpace returns free space at the tail for the read loop and marks the
// buffer as filling until commit.
func (b *recvBuf) tailSpace() []byte {
	if k := len(b.chunks); k > 0 {
		t := b.chunks[k-1]
		if k == 1 && b.head == len(*t) { // drained: start over
			*t = (*t)[:0]
			b.head = 0
		}
		if len(*t) < recvChunk {
			b.filling = true
			return (*t)[len(*t):recvChunk]
		}
	}
	c := recvChunks.Get().(*[]byte)
	b.chunks = append(b.chunks, c)
	b.filling = true
	return (*c)[:recvChunk]
}

// commit records k bytes written into the space tailSpace returned.
func (b *recvBuf) commit(k int) {
	t := b.chunks[len(b.chunks)-1]
	*t = (*t)[:len(*t)+k]
	b.n += k
	b.filling = false
}

// read copies buffered bytes into p.
func (b *recvBuf) read(p []byte) int {
	n := 0
	for n < len(p) && b.n > 0 {
		c := b.chunks[0]
		k := copy(p[n:], (*c)[b.head:])
		n += k
		b.head += k
		b.n -= k
		if b.head == len(*c) && len(b.chunks) > 1 {
			b.popHead()
		}
	}
	return n
}

func (b *recvBuf) popHead() {
	c := b.chunks[0]
	*c = (*c)[:0]
	recvChunks.Put(c)
	b.chunks[0] = nil
	b.chunks = b.chunks[1:]
	b.head = 0
}

// take detaches the head chunk for zero-copy use and returns it with the
// offset of its unread data. It returns nil if the head chunk is the tail
// the read loop is filling right now.
func (b *recvBuf) take() (*[]byte, int) {
	if b.n == 0 || len(b.chunks) == 1 && b.filling {
		return nil, 0
	}
	c, off := b.chunks[0], b.head
	b.n -= len(*c) - off
	b.chunks[0] = nil
	b.chunks = b.chunks[1:]
	b.head = 0
	return c, off
}

// discard drops everything buffered and returns how much that was. A tail
// chunk being filled stays (emptied) until the read loop commits.
func (b *recvBuf) discard() int {
	n := b.n
	var keep *[]byte
	for i, c := range b.chunks {
		if i == len(b.chunks)-1 && b.filling {
			keep = c
			break
		}
		*c = (*c)[:0]
		recvChunks.Put(c)
	}
	b.chunks, b.head, b.n = nil, 0, 0
	if keep != nil {
		b.chunks = append(b.chunks, keep)
		b.head = len(*keep)
	}
	return n
}

// h2Stream is one HBONE tunnel on an HTTP/2 connection. It implements Conn.
type h2Stream struct {
	c  *h2Conn
	id uint32

	// guarded by c.mu
	sendWin, recvWin int64
	unacked          int64
	rbuf             recvBuf
	remoteEnded      bool  // END_STREAM received
	localEnded       bool  // END_STREAM sent
	rstSent          bool  // RST_STREAM sent or received: no more frames on this stream
	resetErr         error // why the stream failed, if it did
	keepBuffered     bool  // reset with NO_ERROR after END_STREAM: buffered data still readable
	readClosed       bool  // Close called
	done             bool  // left the connection's stream map
	rcond, wcond     sync.Cond
	rdeadline        time.Time
	wdeadline        time.Time
	rtimer, wtimer   *time.Timer

	// client: response head
	respCh      chan struct{}
	gotResponse bool
	status      int

	wlock     sync.Mutex // serializes Write and CloseWrite
	onFinish  func()     // called once with c.mu held when the stream finishes
	closeOnce sync.Once
}

var _ Conn = (*h2Stream)(nil)

func (st *h2Stream) wakeLocked() {
	st.rcond.Broadcast()
	st.wcond.Broadcast()
}

// finishLocked removes a stream from the connection once it is over: both
// sides ended or reset. Reads may still drain the buffer afterwards.
func (st *h2Stream) finishLocked() {
	if st.done {
		return
	}
	if st.resetErr == nil && !(st.localEnded && st.remoteEnded) {
		return
	}
	st.done = true
	c := st.c
	if c.streams[st.id] == st {
		delete(c.streams, st.id)
		c.streamFinishedLocked()
	}
	if st.onFinish != nil {
		st.onFinish()
	}
}

// resetLocked resets the stream from our side with code.
func (st *h2Stream) resetLocked(code http2.ErrCode, err error) {
	if st.rstSent {
		return
	}
	if st.resetErr == nil {
		st.resetErr = err
	}
	if !st.done { // a finished stream is closed on the wire already
		st.rstSent = true
		st.c.queueLocked(ctrlFrame{kind: ctrlRST, streamID: st.id, val: uint32(code)})
	}
	st.c.creditLocked(nil, int64(st.rbuf.discard()))
	st.wakeLocked()
	st.finishLocked()
}

func (st *h2Stream) Read(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	c := st.c
	c.mu.Lock()
	defer c.mu.Unlock()
	for {
		if st.rbuf.len() > 0 && (st.resetErr == nil || st.keepBuffered) {
			n := st.rbuf.read(p)
			c.creditLocked(st, int64(n))
			return n, nil
		}
		switch {
		case st.readClosed:
			return 0, net.ErrClosed
		case st.remoteEnded && (st.resetErr == nil || st.keepBuffered):
			return 0, io.EOF
		case st.resetErr != nil:
			return 0, st.resetErr
		case !st.rdeadline.IsZero() && !time.Now().Before(st.rdeadline):
			return 0, os.ErrDeadlineExceeded
		}
		st.rcond.Wait()
	}
}

// WriteTo writes received data to w until the peer's END_STREAM, handing
// over whole buffered chunks instead of copying them (the relay uses it).
func (st *h2Stream) WriteTo(w io.Writer) (int64, error) {
	c := st.c
	var total int64
	var scratch *[]byte
	defer func() {
		if scratch != nil {
			putBuf(scratch)
		}
	}()
	c.mu.Lock()
	for {
		if st.rbuf.len() > 0 && (st.resetErr == nil || st.keepBuffered) && !st.readClosed {
			chunk, off := st.rbuf.take()
			var data []byte
			if chunk != nil {
				data = (*chunk)[off:]
			} else { // the tail is being filled: copy what is there
				if scratch == nil {
					scratch = getBuf()
				}
				data = (*scratch)[:st.rbuf.read(*scratch)]
			}
			c.creditLocked(st, int64(len(data)))
			c.mu.Unlock()
			n, err := w.Write(data)
			total += int64(n)
			if chunk != nil {
				*chunk = (*chunk)[:0]
				recvChunks.Put(chunk)
			}
			if err != nil {
				return total, err
			}
			c.mu.Lock()
			continue
		}
		var err error
		switch {
		case st.readClosed:
			err = net.ErrClosed
		case st.remoteEnded && (st.resetErr == nil || st.keepBuffered):
			c.mu.Unlock()
			return total, nil
		case st.resetErr != nil:
			err = st.resetErr
		case !st.rdeadline.IsZero() && !time.Now().Before(st.rdeadline):
			err = os.ErrDeadlineExceeded
		}
		if err != nil {
			c.mu.Unlock()
			return total, err
		}
		st.rcond.Wait()
	}
}

func (st *h2Stream) Write(p []byte) (int, error) {
	st.wlock.Lock()
	defer st.wlock.Unlock()
	c := st.c
	written := 0
	for len(p) > 0 {
		c.mu.Lock()
		for {
			if err := st.writeErrLocked(); err != nil {
				c.mu.Unlock()
				return written, err
			}
			if st.sendWin > 0 && c.sendWin > 0 {
				break
			}
			st.wcond.Wait()
		}
		n := int64(len(p))
		n = min(n, st.sendWin, c.sendWin, h2WriteChunk)
		st.sendWin -= n
		c.sendWin -= n
		c.mu.Unlock()
		if err := c.writeData(st, p[:n], false); err != nil {
			return written, err
		}
		written += int(n)
		p = p[n:]
	}
	return written, nil
}

// ReadFrom copies src to the stream until src's EOF (without sending
// END_STREAM). When the peer takes DATA frames as large as our relay
// buffers, it reads src behind room for the frame header and hands the
// frame to TLS as it is, with no copy into the write buffer (the relay
// uses it).
func (st *h2Stream) ReadFrom(src io.Reader) (int64, error) {
	c := st.c
	c.mu.Lock()
	direct := c.sock != nil && int(c.peerMaxFrame) >= copyBufSize-9
	c.mu.Unlock()
	bp := getBuf()
	defer putBuf(bp)
	buf := *bp
	if !direct {
		return copyBuffer(st, src, buf)
	}
	var total int64
	for {
		nr, rerr := src.Read(buf[9:])
		if nr > 0 {
			nw, err := st.writeFramed(buf[:9+nr])
			total += int64(nw)
			if err != nil {
				return total, err
			}
		}
		if rerr != nil {
			if errors.Is(rerr, io.EOF) {
				return total, nil
			}
			return total, rerr
		}
	}
}

// writeFramed writes the payload frame[9:] as one DATA frame when the send
// windows allow it all, else as Write does.
func (st *h2Stream) writeFramed(frame []byte) (int, error) {
	st.wlock.Lock()
	c := st.c
	n := int64(len(frame) - 9)
	c.mu.Lock()
	for {
		if err := st.writeErrLocked(); err != nil {
			c.mu.Unlock()
			st.wlock.Unlock()
			return 0, err
		}
		if st.sendWin > 0 && c.sendWin > 0 {
			break
		}
		st.wcond.Wait()
	}
	if st.sendWin < n || c.sendWin < n || int64(c.peerMaxFrame) < n {
		// Flow control or new peer SETTINGS split it: the buffered path.
		c.mu.Unlock()
		st.wlock.Unlock()
		return st.Write(frame[9:])
	}
	st.sendWin -= n
	c.sendWin -= n
	c.mu.Unlock()
	err := c.writeFrameDirect(st, frame)
	st.wlock.Unlock()
	if err != nil {
		return 0, err
	}
	return int(n), nil
}

// copyBuffer copies src to dst until src's EOF, like io.CopyBuffer
// without its ReaderFrom/WriterTo detours.
func copyBuffer(dst io.Writer, src io.Reader, buf []byte) (int64, error) {
	var n int64
	for {
		nr, rerr := src.Read(buf)
		if nr > 0 {
			nw, werr := dst.Write(buf[:nr])
			n += int64(nw)
			if werr != nil {
				return n, werr
			}
		}
		if rerr != nil {
			if errors.Is(rerr, io.EOF) {
				return n, nil
			}
			return n, rerr
		}
	}
}

func (st *h2Stream) writeErrLocked() error {
	switch {
	case st.readClosed:
		return net.ErrClosed
	case st.localEnded:
		return errWriteAfterHalf
	case st.resetErr != nil:
		return st.resetErr
	case st.c.closed:
		return st.c.err
	case !st.wdeadline.IsZero() && !time.Now().Before(st.wdeadline):
		return os.ErrDeadlineExceeded
	}
	return nil
}

// CloseWrite sends END_STREAM.
func (st *h2Stream) CloseWrite() error {
	st.wlock.Lock()
	defer st.wlock.Unlock()
	return st.closeWriteLocked()
}

func (st *h2Stream) closeWriteLocked() error {
	c := st.c
	c.mu.Lock()
	if st.localEnded {
		c.mu.Unlock()
		return nil
	}
	if st.resetErr != nil {
		err := st.resetErr
		c.mu.Unlock()
		return err
	}
	c.mu.Unlock()
	return c.writeData(st, nil, true)
}

// Reset aborts the stream with CONNECT_ERROR, as RFC 9113 §8.5 asks for a
// TCP connection that failed or was reset.
func (st *h2Stream) Reset() error {
	c := st.c
	c.mu.Lock()
	st.resetLocked(http2.ErrCodeConnect, &streamError{code: http2.ErrCodeConnect})
	c.mu.Unlock()
	return nil
}

// Close ends the stream like close(2) on a TCP socket: if we already read
// the peer's END_STREAM it finishes cleanly (END_STREAM from us too);
// otherwise it also tells the peer to stop sending, with NO_ERROR when no
// received data was thrown away and CANCEL when some was.
func (st *h2Stream) Close() error {
	st.closeOnce.Do(st.close)
	return nil
}

func (st *h2Stream) close() {
	c := st.c
	c.mu.Lock()
	st.readClosed = true
	discarded := st.rbuf.discard()
	c.creditLocked(nil, int64(discarded))
	st.wakeLocked()
	if st.done || st.rstSent {
		c.mu.Unlock()
		return
	}
	if discarded > 0 {
		st.resetLocked(http2.ErrCodeCancel, &streamError{code: http2.ErrCodeCancel})
		c.mu.Unlock()
		return
	}
	remoteEnded := st.remoteEnded
	c.mu.Unlock()

	// A blocked Write has been woken with net.ErrClosed; take the write lock
	// so that END_STREAM follows the last DATA.
	st.wlock.Lock()
	c.mu.Lock()
	needEnd := !st.localEnded && st.resetErr == nil
	c.mu.Unlock()
	if needEnd {
		_ = c.writeData(st, nil, true)
	}
	st.wlock.Unlock()
	if !remoteEnded {
		c.mu.Lock()
		if !st.remoteEnded {
			st.resetLocked(http2.ErrCodeNo, &streamError{code: http2.ErrCodeNo, cause: net.ErrClosed})
		}
		c.mu.Unlock()
	}
}

func (st *h2Stream) LocalAddr() net.Addr  { return st.c.nc.LocalAddr() }
func (st *h2Stream) RemoteAddr() net.Addr { return st.c.nc.RemoteAddr() }

func (st *h2Stream) SetDeadline(t time.Time) error {
	st.SetReadDeadline(t)
	return st.SetWriteDeadline(t)
}

func (st *h2Stream) SetReadDeadline(t time.Time) error {
	return st.setDeadline(&st.rdeadline, &st.rtimer, &st.rcond, t)
}

func (st *h2Stream) SetWriteDeadline(t time.Time) error {
	return st.setDeadline(&st.wdeadline, &st.wtimer, &st.wcond, t)
}

func (st *h2Stream) setDeadline(d *time.Time, timer **time.Timer, cond *sync.Cond, t time.Time) error {
	c := st.c
	c.mu.Lock()
	defer c.mu.Unlock()
	*d = t
	if *timer != nil {
		(*timer).Stop()
		*timer = nil
	}
	if t.IsZero() {
		return nil
	}
	if dur := time.Until(t); dur > 0 {
		*timer = time.AfterFunc(dur, func() {
			c.mu.Lock()
			cond.Broadcast()
			c.mu.Unlock()
		})
	} else {
		cond.Broadcast()
	}
	return nil
}
