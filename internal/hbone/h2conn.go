package hbone

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// This file is a minimal HTTP/2 endpoint for CONNECT tunnels, built on the
// frame codec of golang.org/x/net/http2 (Framer, hpack). x/net's Server cannot
// half-close a response while still reading the request (it answers
// RST_STREAM(NO_ERROR) when the handler returns), and HBONE needs FIN and
// RST to map one to one onto END_STREAM and RST_STREAM, so the stream state
// machine and flow control live here.

// HTTP/2 parameters. The windows are what ztunnel uses: 4 MiB per stream, 16
// MiB per connection, in both directions.
const (
	h2StreamWindow     = 4 << 20
	h2ConnWindow       = 16 << 20
	h2MaxReadFrameSize = 64 << 10 // SETTINGS_MAX_FRAME_SIZE we announce
	h2MaxHeaderList    = 64 << 10 // SETTINGS_MAX_HEADER_LIST_SIZE we announce and enforce
	h2DefaultWindow    = 65535
	h2DefaultFrameSize = 16384
	h2WriteTimeout     = 30 * time.Second
	h2MaxWindow        = 1<<31 - 1
	h2WriteChunk       = 256 << 10 // bytes reserved from the send windows at a time
	h2MaxQueuedCtrl    = 10000     // control frames queued for a peer that does not read: ENHANCE_YOUR_CALM
)

var h2Preface = []byte(http2.ClientPreface)

// streamError is how a stream ends abnormally.
type streamError struct {
	code   http2.ErrCode
	remote bool
	cause  error
}

func (e *streamError) Error() string {
	who := "local"
	if e.remote {
		who = "remote"
	}
	if e.cause != nil {
		return fmt.Sprintf("hbone h2 stream reset (%s, %v): %v", who, e.code, e.cause)
	}
	return fmt.Sprintf("hbone h2 stream reset (%s, %v)", who, e.code)
}

var (
	errConnClosed     = errors.New("hbone: connection closed")
	errGoAway         = errors.New("hbone h2: connection going away")
	errRefusedStream  = errors.New("hbone h2: stream refused by peer")
	errWriteAfterHalf = errors.New("hbone: write after CloseWrite")
)

// ctrlFrame is a frame queued for the writer by a goroutine that must not block on I/O.
type ctrlFrame struct {
	kind     uint8
	streamID uint32
	val      uint32 // window increment, error code or header table size
	ping     [8]byte
}

const (
	ctrlSettingsAck = iota + 1
	ctrlHeaderTable // apply the peer's SETTINGS_HEADER_TABLE_SIZE to our encoder
	ctrlPingAck
	ctrlWindowUpdate
	ctrlRST
	ctrlGoAway
)

type h2Conn struct {
	nc     net.Conn
	client bool
	log    *slog.Logger

	// read side, owned by the read loop. There is no bufio.Reader: tls.Conn
	// buffers a record already, and DATA payloads are read straight into
	// the streams' buffers.
	fr *http2.Framer

	// write side, under wmu
	wmu     sync.Mutex
	writers atomic.Int32 // data/control writers waiting for wmu: the last one flushes
	sock    *sockConn    // under the TLS conn; nil in tests on plain pipes
	wdl     time.Time    // write deadline last set on nc
	bw      *bufio.Writer
	fw      *http2.Framer
	henc    *hpack.Encoder
	hbuf    bytes.Buffer

	mu             sync.Mutex
	streams        map[uint32]*h2Stream
	nextID         uint32 // client: next stream ID to open
	lastPeerID     uint32 // server: highest stream ID the peer opened
	sendWin        int64  // connection-level send window
	recvWin        int64  // connection-level window the peer may still use
	recvUnacked    int64  // consumed bytes not yet returned with WINDOW_UPDATE
	peerInitWin    int64
	peerMaxFrame   uint32
	ctrl, ctrlDone []ctrlFrame
	goingAway      bool // GOAWAY sent or received: no new streams
	closed         bool
	err            error
	active         int  // streams not yet finished
	maxStreams     int  // server: concurrent streams we allow
	gotSettings    bool // peer's first SETTINGS seen
	ctrlOverflow   bool // too many control frames queued

	usable         atomic.Bool   // not closed, not going away: may take new streams
	peerMaxStreams atomic.Uint32 // peer's SETTINGS_MAX_CONCURRENT_STREAMS
	settingsCh     chan struct{} // closed on the peer's first SETTINGS
	ctrlKick       chan struct{}
	done           chan struct{}

	// hooks, called with mu held; they must not call back into the conn
	onStreamDone func()
	onClose      func(error)
	onGoAway     func()
	// server only: a new request stream; runs in its own goroutine, after
	// onNewStream ran in the read loop
	newStream   func(st *h2Stream, fields []hpack.HeaderField)
	onNewStream func()
	handlers    atomic.Int32  // server: request handlers still running
	readDone    chan struct{} // closed when the read loop has exited, if set
	info        *connInfo     // server only: the peer
}

// newH2Conn makes an HTTP/2 endpoint on nc; sock, if not nil, is the socket
// under nc's TLS, whose writes are gathered while the frame buffer is flushed.
func newH2Conn(nc net.Conn, sock *sockConn, client bool, log *slog.Logger) *h2Conn {
	c := &h2Conn{
		nc:           nc,
		sock:         sock,
		client:       client,
		log:          log,
		bw:           bufio.NewWriterSize(nc, copyBufSize+1024), // a full relay buffer plus frame headers: one flush
		streams:      make(map[uint32]*h2Stream),
		nextID:       1,
		sendWin:      h2DefaultWindow,
		recvWin:      h2ConnWindow,
		peerInitWin:  h2DefaultWindow,
		peerMaxFrame: h2DefaultFrameSize,
		settingsCh:   make(chan struct{}),
		ctrlKick:     make(chan struct{}, 1),
		done:         make(chan struct{}),
	}
	c.peerMaxStreams.Store(100) // until the peer's SETTINGS say otherwise
	c.fr = http2.NewFramer(nil, nc)
	c.fr.SetReuseFrames()
	c.fr.SetMaxReadFrameSize(h2MaxReadFrameSize)
	c.fr.ReadMetaHeaders = hpack.NewDecoder(4096, nil)
	c.fr.MaxHeaderListSize = h2MaxHeaderList
	c.fw = http2.NewFramer(c.bw, nil)
	c.henc = hpack.NewEncoder(&c.hbuf)
	c.usable.Store(true)
	return c
}

// start sends our preface and settings and runs the read and control-write
// loops. The caller has already read the client preface on a server.
func (c *h2Conn) start(maxStreams int) error {
	c.maxStreams = maxStreams
	c.wmu.Lock()
	if c.client {
		c.bw.Write(h2Preface)
	}
	settings := []http2.Setting{
		{ID: http2.SettingInitialWindowSize, Val: h2StreamWindow},
		{ID: http2.SettingMaxFrameSize, Val: h2MaxReadFrameSize},
		{ID: http2.SettingMaxHeaderListSize, Val: h2MaxHeaderList},
	}
	if c.client {
		settings = append(settings, http2.Setting{ID: http2.SettingEnablePush, Val: 0})
	} else {
		settings = append(settings, http2.Setting{ID: http2.SettingMaxConcurrentStreams, Val: uint32(maxStreams)})
	}
	c.fw.WriteSettings(settings...)
	c.fw.WriteWindowUpdate(0, h2ConnWindow-h2DefaultWindow)
	err := c.flushLocked()
	c.wmu.Unlock()
	if err != nil {
		c.closeWithError(err)
		return fmt.Errorf("hbone h2: send settings: %w", err)
	}
	go c.ctrlLoop()
	go c.readLoop()
	return nil
}

// flushLocked flushes the write buffer; wmu is held. The TLS records it
// makes leave in one write(2).
func (c *h2Conn) flushLocked() error {
	if c.bw.Buffered() == 0 {
		return nil
	}
	c.refreshWriteDeadlineLocked()
	if c.sock == nil {
		return c.bw.Flush()
	}
	c.sock.beginBatch()
	err := c.bw.Flush()
	if e := c.sock.endBatch(); err == nil {
		err = e
	}
	return err
}

// abandonWriteLocked gives back the n bytes a write on st debited from
// the connection's send window when st was reset or the connection closed
// before it could write (nothing may follow RST_STREAM), and returns why.
// wmu and mu are held; it releases mu.
func (c *h2Conn) abandonWriteLocked(st *h2Stream, n int) error {
	c.sendWin += int64(n)
	err := st.resetErr
	if err == nil {
		err = c.err
	}
	if err == nil {
		err = errConnClosed
	}
	closed := c.closed
	c.mu.Unlock()
	if !closed {
		// A writer before us may have left its frames to our flush.
		if ferr := c.flushIfLastLocked(); ferr != nil {
			c.closeWithError(ferr)
		}
	}
	return err
}

// refreshWriteDeadlineLocked pushes the write deadline out; wmu is held.
// Moving it on every flush costs; a second of slack is fine.
func (c *h2Conn) refreshWriteDeadlineLocked() {
	if now := time.Now(); c.wdl.Sub(now) < h2WriteTimeout-time.Second {
		c.wdl = now.Add(h2WriteTimeout)
		_ = c.nc.SetWriteDeadline(c.wdl)
	}
}

// writeFrameDirect writes one DATA frame on st whose 9-byte header room
// precedes its payload in frame, straight to TLS rather than through the
// write buffer (saving a copy), after anything already buffered. The caller
// debited the send windows for the payload; c.sock is not nil.
func (c *h2Conn) writeFrameDirect(st *h2Stream, frame []byte) error {
	n := len(frame) - 9
	c.lockWriter()
	defer c.wmu.Unlock()
	c.mu.Lock()
	if st.rstSent || c.closed {
		return c.abandonWriteLocked(st, n)
	}
	c.mu.Unlock()
	frame[0], frame[1], frame[2] = byte(n>>16), byte(n>>8), byte(n)
	frame[3] = byte(http2.FrameData)
	frame[4] = 0
	binary.BigEndian.PutUint32(frame[5:], st.id)
	err := c.writeCtrlLocked()
	if err == nil {
		c.refreshWriteDeadlineLocked()
		c.sock.beginBatch()
		err = c.bw.Flush() // frames queued before ours go first
		if err == nil {
			_, err = c.nc.Write(frame)
		}
		if e := c.sock.endBatch(); err == nil {
			err = e
		}
	}
	if err != nil {
		c.closeWithError(err)
	}
	return err
}

// lockWriter takes wmu for a writer that flushes when done; while it waits,
// the writer holding wmu leaves the flush to it (see flushIfLastLocked).
func (c *h2Conn) lockWriter() {
	c.writers.Add(1)
	c.wmu.Lock()
	c.writers.Add(-1)
}

// flushIfLastLocked flushes unless another writer waits for wmu: that one
// will flush, so frames from all streams leave together.
func (c *h2Conn) flushIfLastLocked() error {
	if c.writers.Load() > 0 {
		return nil
	}
	return c.flushLocked()
}

func (c *h2Conn) kick() {
	select {
	case c.ctrlKick <- struct{}{}:
	default:
	}
}

// queueLocked queues a control frame; mu is held. A peer that makes us
// queue answers (PING, SETTINGS, RST_STREAM) faster than it reads them gets
// its connection closed by the read loop.
func (c *h2Conn) queueLocked(f ctrlFrame) {
	if len(c.ctrl) >= h2MaxQueuedCtrl {
		c.ctrlOverflow = true
		return
	}
	c.ctrl = append(c.ctrl, f)
	c.kick()
}

func (c *h2Conn) ctrlLoop() {
	for {
		select {
		case <-c.ctrlKick:
		case <-c.done:
			return
		}
		c.lockWriter()
		err := c.writeCtrlLocked()
		if err == nil {
			err = c.flushIfLastLocked()
		}
		c.wmu.Unlock()
		if err != nil {
			c.closeWithError(err)
			return
		}
	}
}

// writeCtrlLocked writes the queued control frames; wmu is held.
func (c *h2Conn) writeCtrlLocked() error {
	c.mu.Lock()
	q := c.ctrl
	c.ctrl = c.ctrlDone[:0]
	c.mu.Unlock()
	var err error
	for _, f := range q {
		switch f.kind {
		case ctrlSettingsAck:
			err = c.fw.WriteSettingsAck()
		case ctrlHeaderTable:
			c.henc.SetMaxDynamicTableSizeLimit(f.val)
		case ctrlPingAck:
			err = c.fw.WritePing(true, f.ping)
		case ctrlWindowUpdate:
			err = c.fw.WriteWindowUpdate(f.streamID, f.val)
		case ctrlRST:
			err = c.fw.WriteRSTStream(f.streamID, http2.ErrCode(f.val))
		case ctrlGoAway:
			err = c.fw.WriteGoAway(f.streamID, http2.ErrCode(f.val), nil)
		}
		if err != nil {
			break
		}
	}
	c.mu.Lock()
	c.ctrlDone = q[:0]
	c.mu.Unlock()
	return err
}

// closeWithError tears the connection down; every open stream fails with err.
func (c *h2Conn) closeWithError(err error) {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return
	}
	c.closed = true
	c.usable.Store(false)
	if err == nil {
		err = errConnClosed
	}
	c.err = err
	for _, st := range c.streams {
		if st.resetErr == nil {
			st.resetErr = fmt.Errorf("%w: %v", errConnClosed, err)
		}
		st.wakeLocked()
		st.finishLocked()
	}
	close(c.done)
	onClose := c.onClose
	c.mu.Unlock()
	_ = c.nc.Close()
	if onClose != nil {
		onClose(err)
	}
}

// Close closes the connection at once.
func (c *h2Conn) Close() error {
	c.closeWithError(errConnClosed)
	return nil
}

// goAway sends GOAWAY with code and stops new streams; with NO_ERROR the
// connection closes once its streams are done, otherwise at once (then the
// GOAWAY is best effort: it is skipped if a writer is stuck on the socket).
func (c *h2Conn) goAway(code http2.ErrCode, debug string) {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return
	}
	last := c.lastPeerID
	c.goingAway = true
	c.usable.Store(false)
	idle := c.active == 0
	c.mu.Unlock()
	if code == http2.ErrCodeNo {
		c.wmu.Lock()
	} else if !c.wmu.TryLock() {
		c.closeWithError(fmt.Errorf("hbone h2: connection error %v: %s", code, debug))
		return
	}
	_ = c.writeCtrlLocked()
	_ = c.fw.WriteGoAway(last, code, []byte(debug))
	_ = c.flushLocked()
	c.wmu.Unlock()
	switch {
	case code != http2.ErrCodeNo:
		c.closeWithError(fmt.Errorf("hbone h2: sent GOAWAY %v: %s", code, debug))
	case idle:
		go c.gracefulClose(errGoAway)
	}
}

// gracefulClose ends a connection that has no streams left: flush what is
// queued, send FIN (TLS close_notify), and give the peer a moment to close
// its side before closing ours, so that a close with unread input does not
// turn into a TCP RST that could destroy data still in flight to the peer.
func (c *h2Conn) gracefulClose(reason error) {
	c.wmu.Lock()
	err := c.writeCtrlLocked()
	if err == nil {
		err = c.flushLocked()
	}
	c.wmu.Unlock()
	if cw, ok := c.nc.(interface{ CloseWrite() error }); ok && err == nil {
		_ = cw.CloseWrite()
		t := time.NewTimer(time.Second)
		defer t.Stop()
		select {
		case <-c.done: // the peer closed too; the read loop saw EOF
		case <-t.C:
		}
	}
	c.closeWithError(reason)
}

func (c *h2Conn) readLoop() {
	if c.readDone != nil {
		defer close(c.readDone)
	}
	err := c.readFrames()
	var ce http2.ConnectionError
	switch {
	case errors.As(err, &ce):
		c.log.Debug("hbone h2: connection error", "peer", c.nc.RemoteAddr(), "code", http2.ErrCode(ce), "detail", c.fr.ErrorDetail())
		c.goAway(http2.ErrCode(ce), "protocol error")
	case errors.Is(err, http2.ErrFrameTooLarge):
		c.goAway(http2.ErrCodeFrameSize, "frame too large")
	}
	c.closeWithError(err)
}

func (c *h2Conn) readFrames() error {
	for {
		c.mu.Lock()
		overflow := c.ctrlOverflow
		c.mu.Unlock()
		if overflow {
			return http2.ConnectionError(http2.ErrCodeEnhanceYourCalm)
		}
		fh, err := c.fr.ReadFrameHeader()
		if err != nil {
			return err
		}
		if fh.Type == http2.FrameData {
			if err := c.readData(fh); err != nil {
				return err
			}
			continue
		}
		f, err := c.fr.ReadFrameForHeader(fh)
		if err != nil {
			var se http2.StreamError
			if errors.As(err, &se) {
				if err := c.onStreamError(se); err != nil {
					return err
				}
				continue
			}
			return err
		}
		if err := c.handleFrame(f); err != nil {
			return err
		}
	}
}

func (c *h2Conn) handleFrame(f http2.Frame) error {
	switch f := f.(type) {
	case *http2.MetaHeadersFrame:
		return c.onHeaders(f)
	case *http2.SettingsFrame:
		return c.onSettings(f)
	case *http2.WindowUpdateFrame:
		return c.onWindowUpdate(f)
	case *http2.RSTStreamFrame:
		return c.onRST(f)
	case *http2.PingFrame:
		if !f.IsAck() {
			c.mu.Lock()
			c.queueLocked(ctrlFrame{kind: ctrlPingAck, ping: f.Data})
			c.mu.Unlock()
		}
	case *http2.GoAwayFrame:
		c.onGoAwayFrame(f)
	case *http2.PushPromiseFrame:
		return http2.ConnectionError(http2.ErrCodeProtocol)
	}
	// PRIORITY, PRIORITY_UPDATE and unknown frames are ignored.
	return nil
}

// isIdleLocked reports whether id names a stream that was never opened.
func (c *h2Conn) isIdleLocked(id uint32) bool {
	if id%2 == 1 { // client-initiated
		if c.client {
			return id >= c.nextID
		}
		return id > c.lastPeerID
	}
	return true // we never open or accept even (server-initiated) streams
}

func (c *h2Conn) onStreamError(se http2.StreamError) error {
	c.mu.Lock()
	if !c.client && se.StreamID%2 == 1 && se.StreamID > c.lastPeerID {
		// A malformed request opening a new stream: answer 400 and reset.
		c.lastPeerID = se.StreamID
		c.mu.Unlock()
		c.log.Info("hbone h2: malformed request", "peer", c.nc.RemoteAddr(), "stream", se.StreamID, "error", se.Cause)
		st := &h2Stream{c: c, id: se.StreamID}
		c.wmu.Lock()
		err := c.writeHeadersLocked(st, [][2]string{{":status", "400"}}, nil, true)
		c.wmu.Unlock()
		c.mu.Lock()
		c.queueLocked(ctrlFrame{kind: ctrlRST, streamID: se.StreamID, val: uint32(http2.ErrCodeProtocol)})
		c.mu.Unlock()
		return err
	}
	if st := c.streams[se.StreamID]; st != nil {
		st.resetLocked(se.Code, &streamError{code: se.Code, cause: se.Cause})
	} else {
		c.queueLocked(ctrlFrame{kind: ctrlRST, streamID: se.StreamID, val: uint32(se.Code)})
	}
	c.mu.Unlock()
	return nil
}

// readData reads one DATA frame whose header was read; the payload goes
// straight into the stream's buffer.
func (c *h2Conn) readData(fh http2.FrameHeader) error {
	id := fh.StreamID
	if id == 0 {
		return http2.ConnectionError(http2.ErrCodeProtocol)
	}
	total := int64(fh.Length)
	dataLen := total
	var pad int64
	if fh.Flags.Has(http2.FlagDataPadded) {
		var b [1]byte
		if total < 1 {
			return http2.ConnectionError(http2.ErrCodeProtocol)
		}
		if _, err := io.ReadFull(c.nc, b[:]); err != nil {
			return err
		}
		pad = int64(b[0])
		dataLen = total - 1 - pad
		if dataLen < 0 {
			return http2.ConnectionError(http2.ErrCodeProtocol)
		}
	}
	end := fh.Flags.Has(http2.FlagDataEndStream)

	c.mu.Lock()
	if total > c.recvWin {
		c.mu.Unlock()
		return http2.ConnectionError(http2.ErrCodeFlowControl)
	}
	c.recvWin -= total
	st := c.streams[id]
	switch {
	case st == nil:
		if c.isIdleLocked(id) {
			c.mu.Unlock()
			return http2.ConnectionError(http2.ErrCodeProtocol)
		}
		// A closed stream (frames in flight after a reset): give the
		// connection window back and drop the data.
		c.creditLocked(nil, total)
		st = nil
	case st.remoteEnded || (c.client && !st.gotResponse):
		c.creditLocked(nil, total)
		st.resetLocked(http2.ErrCodeStreamClosed, &streamError{code: http2.ErrCodeStreamClosed, cause: errors.New("DATA after END_STREAM or before the response")})
		st = nil
	case total > st.recvWin:
		c.creditLocked(nil, total)
		st.resetLocked(http2.ErrCodeFlowControl, &streamError{code: http2.ErrCodeFlowControl})
		st = nil
	default:
		st.recvWin -= total
		c.creditLocked(st, total-dataLen) // padding counts but is never read
	}
	c.mu.Unlock()

	for dataLen > 0 && st != nil {
		c.mu.Lock()
		if st.readClosed || st.resetErr != nil {
			c.creditLocked(st, dataLen)
			c.mu.Unlock()
			break
		}
		space := st.rbuf.tailSpace()
		c.mu.Unlock()
		k := min(int64(len(space)), dataLen)
		_, err := io.ReadFull(c.nc, space[:k])
		c.mu.Lock()
		st.rbuf.commit(int(k))
		if err != nil {
			c.mu.Unlock()
			return err
		}
		dataLen -= k
		if st.readClosed || st.resetErr != nil && !st.keepBuffered {
			c.creditLocked(st, int64(st.rbuf.discard()))
		} else {
			st.rcond.Signal()
		}
		c.mu.Unlock()
	}
	if skip := dataLen + pad; skip > 0 {
		if _, err := io.CopyN(io.Discard, c.nc, skip); err != nil {
			return err
		}
	}
	if end && st != nil {
		c.mu.Lock()
		st.remoteEnded = true
		st.rcond.Broadcast()
		st.finishLocked()
		c.mu.Unlock()
	}
	return nil
}

// creditLocked records n consumed bytes and queues WINDOW_UPDATEs once a
// quarter of a window has been used. st may be nil for connection-only credit.
func (c *h2Conn) creditLocked(st *h2Stream, n int64) {
	if n <= 0 || c.closed {
		return
	}
	c.recvUnacked += n
	if c.recvUnacked >= h2ConnWindow/4 {
		c.queueLocked(ctrlFrame{kind: ctrlWindowUpdate, val: uint32(c.recvUnacked)})
		c.recvWin += c.recvUnacked
		c.recvUnacked = 0
	}
	if st == nil || st.remoteEnded || st.done {
		return
	}
	st.unacked += n
	if st.unacked >= h2StreamWindow/4 {
		c.queueLocked(ctrlFrame{kind: ctrlWindowUpdate, streamID: st.id, val: uint32(st.unacked)})
		st.recvWin += st.unacked
		st.unacked = 0
	}
}

func (c *h2Conn) onHeaders(f *http2.MetaHeadersFrame) error {
	id := f.StreamID
	c.mu.Lock()
	st := c.streams[id]
	if c.client {
		defer c.mu.Unlock()
		if st == nil {
			if c.isIdleLocked(id) {
				return http2.ConnectionError(http2.ErrCodeProtocol)
			}
			return nil // response on a stream we already reset
		}
		if st.gotResponse { // trailers
			if !f.StreamEnded() {
				st.resetLocked(http2.ErrCodeProtocol, &streamError{code: http2.ErrCodeProtocol, cause: errors.New("HEADERS after response without END_STREAM")})
				return nil
			}
			st.remoteEnded = true
			st.rcond.Broadcast()
			st.finishLocked()
			return nil
		}
		status, err := strconv.Atoi(f.PseudoValue("status"))
		if err != nil || status < 100 || status > 999 {
			st.resetLocked(http2.ErrCodeProtocol, &streamError{code: http2.ErrCodeProtocol, cause: fmt.Errorf("bad :status %q", f.PseudoValue("status"))})
			return nil
		}
		if status < 200 {
			if status == 101 || f.StreamEnded() {
				st.resetLocked(http2.ErrCodeProtocol, &streamError{code: http2.ErrCodeProtocol, cause: fmt.Errorf("bad informational status %d", status)})
			}
			return nil // ignore 1xx
		}
		st.status = status
		st.gotResponse = true
		close(st.respCh)
		if f.StreamEnded() {
			st.remoteEnded = true
			st.rcond.Broadcast()
			st.finishLocked()
		}
		return nil
	}

	// Server.
	if st != nil { // trailers on an open request
		defer c.mu.Unlock()
		if !f.StreamEnded() || st.remoteEnded {
			st.resetLocked(http2.ErrCodeProtocol, &streamError{code: http2.ErrCodeProtocol, cause: errors.New("unexpected HEADERS")})
			return nil
		}
		st.remoteEnded = true
		st.rcond.Broadcast()
		st.finishLocked()
		return nil
	}
	if id%2 == 0 {
		c.mu.Unlock()
		return http2.ConnectionError(http2.ErrCodeProtocol)
	}
	if id <= c.lastPeerID {
		c.mu.Unlock()
		return http2.ConnectionError(http2.ErrCodeStreamClosed)
	}
	c.lastPeerID = id
	// Handlers of reset streams may still run: bounding them too stops a
	// client that opens and resets streams in a loop ("rapid reset").
	if c.goingAway || c.closed || c.active >= c.maxStreams || int(c.handlers.Load()) >= 2*c.maxStreams {
		c.queueLocked(ctrlFrame{kind: ctrlRST, streamID: id, val: uint32(http2.ErrCodeRefusedStream)})
		c.mu.Unlock()
		return nil
	}
	st = c.newStreamLocked(id)
	st.remoteEnded = f.StreamEnded()
	c.mu.Unlock()
	if c.onNewStream != nil {
		c.onNewStream()
	}
	c.handlers.Add(1)
	go func() {
		defer c.handlers.Add(-1)
		c.newStream(st, f.Fields)
	}()
	return nil
}

func (c *h2Conn) onSettings(f *http2.SettingsFrame) error {
	if f.IsAck() {
		return nil
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	err := f.ForeachSetting(func(s http2.Setting) error {
		if err := s.Valid(); err != nil {
			return err
		}
		switch s.ID {
		case http2.SettingInitialWindowSize:
			delta := int64(s.Val) - c.peerInitWin
			c.peerInitWin = int64(s.Val)
			for _, st := range c.streams {
				st.sendWin += delta
				if st.sendWin > h2MaxWindow {
					return http2.ConnectionError(http2.ErrCodeFlowControl)
				}
				st.wcond.Broadcast()
			}
		case http2.SettingMaxFrameSize:
			c.peerMaxFrame = s.Val
		case http2.SettingMaxConcurrentStreams:
			c.peerMaxStreams.Store(s.Val)
		case http2.SettingHeaderTableSize:
			c.queueLocked(ctrlFrame{kind: ctrlHeaderTable, val: s.Val})
		}
		return nil
	})
	if err != nil {
		return err
	}
	c.queueLocked(ctrlFrame{kind: ctrlSettingsAck})
	if !c.gotSettings {
		c.gotSettings = true
		close(c.settingsCh)
	}
	return nil
}

func (c *h2Conn) onWindowUpdate(f *http2.WindowUpdateFrame) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if f.StreamID == 0 {
		c.sendWin += int64(f.Increment)
		if c.sendWin > h2MaxWindow {
			return http2.ConnectionError(http2.ErrCodeFlowControl)
		}
		for _, st := range c.streams {
			st.wcond.Broadcast()
		}
		return nil
	}
	st := c.streams[f.StreamID]
	if st == nil {
		if c.isIdleLocked(f.StreamID) {
			return http2.ConnectionError(http2.ErrCodeProtocol)
		}
		return nil
	}
	st.sendWin += int64(f.Increment)
	if st.sendWin > h2MaxWindow {
		st.resetLocked(http2.ErrCodeFlowControl, &streamError{code: http2.ErrCodeFlowControl})
		return nil
	}
	st.wcond.Broadcast()
	return nil
}

func (c *h2Conn) onRST(f *http2.RSTStreamFrame) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	st := c.streams[f.StreamID]
	if st == nil {
		if c.isIdleLocked(f.StreamID) {
			return http2.ConnectionError(http2.ErrCodeProtocol)
		}
		return nil
	}
	st.rstSent = true // the stream is closed for the peer; send nothing more
	if f.ErrCode == http2.ErrCodeNo && st.remoteEnded {
		// The peer finished its side and asks us to stop sending (RFC
		// 9113 §8.1): buffered data stays readable, writes fail.
		st.resetErr = &streamError{code: f.ErrCode, remote: true}
		st.keepBuffered = true
	} else if f.ErrCode == http2.ErrCodeRefusedStream {
		st.resetErr = errRefusedStream
	} else {
		st.resetErr = &streamError{code: f.ErrCode, remote: true}
	}
	if !st.keepBuffered {
		c.creditLocked(nil, int64(st.rbuf.discard()))
	}
	st.wakeLocked()
	st.finishLocked()
	return nil
}

func (c *h2Conn) onGoAwayFrame(f *http2.GoAwayFrame) {
	c.mu.Lock()
	c.goingAway = true
	c.usable.Store(false)
	if c.client {
		for id, st := range c.streams {
			if id > f.LastStreamID {
				st.resetErr = errRefusedStream
				st.rstSent = true
				st.wakeLocked()
				st.finishLocked()
			}
		}
	}
	idle := c.active == 0
	onGoAway := c.onGoAway
	c.mu.Unlock()
	if f.ErrCode != http2.ErrCodeNo {
		c.log.Debug("hbone h2: peer sent GOAWAY", "peer", c.nc.RemoteAddr(), "code", f.ErrCode, "debug", string(f.DebugData()))
	}
	if onGoAway != nil {
		onGoAway()
	}
	if idle {
		go c.gracefulClose(errGoAway)
	}
}

func (c *h2Conn) newStreamLocked(id uint32) *h2Stream {
	st := &h2Stream{
		c:       c,
		id:      id,
		sendWin: c.peerInitWin,
		recvWin: h2StreamWindow,
	}
	st.rcond.L = &c.mu
	st.wcond.L = &c.mu
	c.streams[id] = st
	c.active++
	return st
}

// openStream starts a CONNECT to authority with extra request headers and
// waits for the response head.
func (c *h2Conn) openStream(ctx context.Context, authority string, hdrs [][2]string) (*h2Stream, int, error) {
	c.wmu.Lock()
	c.mu.Lock()
	if c.closed || c.goingAway {
		err := errGoAway
		if c.closed {
			err = fmt.Errorf("%w: %v", errConnClosed, c.err)
		}
		if c.onStreamDone != nil {
			c.onStreamDone() // the caller's reserved slot
		}
		c.mu.Unlock()
		c.wmu.Unlock()
		return nil, 0, err
	}
	id := c.nextID
	c.nextID += 2
	if c.nextID >= 1<<31 {
		c.goingAway = true // stream IDs exhausted: finish this one, then retire the connection
		c.usable.Store(false)
	}
	st := c.newStreamLocked(id)
	st.respCh = make(chan struct{})
	c.mu.Unlock()
	err := c.writeHeadersLocked(st, [][2]string{{":method", "CONNECT"}, {":authority", authority}}, hdrs, false)
	if err == nil {
		err = c.writeCtrlLocked()
	}
	if err == nil {
		err = c.flushLocked()
	}
	c.wmu.Unlock()
	if err != nil {
		c.closeWithError(err)
		return nil, 0, fmt.Errorf("hbone h2: send CONNECT: %w", err)
	}
	select {
	case <-st.respCh:
		return st, st.status, nil
	case <-ctx.Done():
	case <-c.done:
	}
	c.mu.Lock()
	err = st.resetErr
	if err == nil {
		if st.gotResponse { // raced with the response
			c.mu.Unlock()
			return st, st.status, nil
		}
		if c.err != nil {
			err = c.err
		} else {
			err = ctx.Err()
		}
		st.resetLocked(http2.ErrCodeCancel, err)
	}
	c.mu.Unlock()
	return nil, 0, err
}

// writeHeadersLocked writes a HEADERS frame (and CONTINUATIONs); wmu is held.
func (c *h2Conn) writeHeadersLocked(st *h2Stream, pseudo, regular [][2]string, endStream bool) error {
	c.hbuf.Reset()
	for _, f := range pseudo {
		c.henc.WriteField(hpack.HeaderField{Name: f[0], Value: f[1]})
	}
	for _, f := range regular {
		c.henc.WriteField(hpack.HeaderField{Name: f[0], Value: f[1], Sensitive: false})
	}
	c.mu.Lock()
	maxFrame := int(c.peerMaxFrame)
	if endStream {
		st.localEnded = true
	}
	c.mu.Unlock()
	block := c.hbuf.Bytes()
	first := true
	for len(block) > 0 || first {
		chunk := block
		if len(chunk) > maxFrame {
			chunk = chunk[:maxFrame]
		}
		block = block[len(chunk):]
		var err error
		if first {
			err = c.fw.WriteHeaders(http2.HeadersFrameParam{StreamID: st.id, BlockFragment: chunk, EndStream: endStream, EndHeaders: len(block) == 0})
			first = false
		} else {
			err = c.fw.WriteContinuation(st.id, len(block) == 0, chunk)
		}
		if err != nil {
			return err
		}
	}
	return nil
}

// writeData writes p as DATA frames on st, whose send windows the caller
// already debited, and flushes.
func (c *h2Conn) writeData(st *h2Stream, p []byte, endStream bool) error {
	c.lockWriter()
	defer c.wmu.Unlock()
	c.mu.Lock()
	if st.rstSent || c.closed {
		return c.abandonWriteLocked(st, len(p))
	}
	maxFrame := int(c.peerMaxFrame)
	if endStream {
		st.localEnded = true
		// The stream finishes only after END_STREAM is on the wire (below):
		// finishing may close a draining connection.
		defer func() {
			c.mu.Lock()
			st.finishLocked()
			c.mu.Unlock()
		}()
	}
	c.mu.Unlock()
	// A frame must fit the write buffer, or bufio would write it past our
	// batched flush.
	maxFrame = min(maxFrame, c.bw.Size()-9)
	var hdr [9]byte
	for {
		n := len(p)
		if n > maxFrame {
			n = maxFrame
		}
		last := n == len(p)
		hdr[0], hdr[1], hdr[2] = byte(n>>16), byte(n>>8), byte(n)
		hdr[3] = byte(http2.FrameData)
		hdr[4] = 0
		if last && endStream {
			hdr[4] = byte(http2.FlagDataEndStream)
		}
		binary.BigEndian.PutUint32(hdr[5:], st.id)
		if c.bw.Available() < len(hdr)+n && c.bw.Buffered() > 0 {
			// Flush ourselves rather than let bufio do it: ours is batched.
			if err := c.flushLocked(); err != nil {
				c.closeWithError(err)
				return err
			}
		}
		c.bw.Write(hdr[:])
		if _, err := c.bw.Write(p[:n]); err != nil {
			c.closeWithError(err)
			return err
		}
		p = p[n:]
		if last {
			break
		}
	}
	err := c.writeCtrlLocked()
	if err == nil {
		err = c.flushIfLastLocked()
	}
	if err != nil {
		c.closeWithError(err)
	}
	return err
}

// drain is the graceful shutdown of a server connection: GOAWAY, then close
// when the streams are done or ctx ends.
func (c *h2Conn) drain(ctx context.Context) {
	c.goAway(http2.ErrCodeNo, "shutdown")
	select {
	case <-c.done:
	case <-ctx.Done():
		c.closeWithError(errors.New("hbone h2: drain timeout"))
	}
}

// streamFinishedLocked is called when a stream leaves the map.
func (c *h2Conn) streamFinishedLocked() {
	c.active--
	if c.onStreamDone != nil {
		c.onStreamDone()
	}
	if c.goingAway && c.active == 0 && !c.closed {
		go c.gracefulClose(errGoAway)
	}
}

var _ io.Closer = (*h2Conn)(nil)
