package hbone

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"sync"
	"sync/atomic"
	"time"

	"github.com/quic-go/quic-go"
	"github.com/quic-go/quic-go/http3"
)

// h3Stream is what HTTP/3 request streams offer on both ends
// (*http3.Stream on the server, *http3.RequestStream on the client).
type h3Stream interface {
	io.ReadWriteCloser
	CancelRead(quic.StreamErrorCode)
	CancelWrite(quic.StreamErrorCode)
	SetDeadline(time.Time) error
	SetReadDeadline(time.Time) error
	SetWriteDeadline(time.Time) error
}

// h3Conn is one HBONE tunnel on an HTTP/3 stream. It implements Conn.
type h3Conn struct {
	str           h3Stream
	local, remote net.Addr
	eof           atomic.Bool // peer's FIN read
	wclosed       atomic.Bool // our FIN sent
	finishOnce    sync.Once
	onFinish      func()
}

var _ Conn = (*h3Conn)(nil)

func newH3Conn(str h3Stream, local, remote net.Addr, onFinish func()) *h3Conn {
	return &h3Conn{str: str, local: local, remote: remote, onFinish: onFinish}
}

func (c *h3Conn) finish() {
	c.finishOnce.Do(func() {
		if c.onFinish != nil {
			c.onFinish()
		}
	})
}

func (c *h3Conn) Read(p []byte) (int, error) {
	n, err := c.str.Read(p)
	if errors.Is(err, io.EOF) {
		c.eof.Store(true)
		if c.wclosed.Load() {
			c.finish()
		}
	}
	return n, err
}

func (c *h3Conn) Write(p []byte) (int, error) {
	if c.wclosed.Load() {
		return 0, errWriteAfterHalf
	}
	return c.str.Write(p)
}

// CloseWrite sends FIN on the stream.
func (c *h3Conn) CloseWrite() error {
	if c.wclosed.Swap(true) {
		return nil
	}
	err := c.str.Close()
	if c.eof.Load() {
		c.finish()
	}
	return err
}

// Reset resets both directions with H3_CONNECT_ERROR (RFC 9114 §4.4).
func (c *h3Conn) Reset() error {
	c.wclosed.Store(true)
	c.str.CancelWrite(quic.StreamErrorCode(http3.ErrCodeConnectError))
	c.str.CancelRead(quic.StreamErrorCode(http3.ErrCodeConnectError))
	c.finish()
	return nil
}

// Close ends the tunnel like close(2): FIN if not yet sent, and if the
// peer's FIN has not been read, STOP_SENDING(H3_NO_ERROR).
func (c *h3Conn) Close() error {
	if !c.wclosed.Swap(true) {
		_ = c.str.Close()
	}
	if !c.eof.Load() {
		c.str.CancelRead(quic.StreamErrorCode(http3.ErrCodeNoError))
	}
	c.finish()
	return nil
}

func (c *h3Conn) LocalAddr() net.Addr                { return c.local }
func (c *h3Conn) RemoteAddr() net.Addr               { return c.remote }
func (c *h3Conn) SetDeadline(t time.Time) error      { return c.str.SetDeadline(t) }
func (c *h3Conn) SetReadDeadline(t time.Time) error  { return c.str.SetReadDeadline(t) }
func (c *h3Conn) SetWriteDeadline(t time.Time) error { return c.str.SetWriteDeadline(t) }

// h3Client is one pooled QUIC connection with its HTTP/3 client.
type h3Client struct {
	qc *quic.Conn
	cc *http3.ClientConn
	tr *quic.Transport
}

func (h *h3Client) close() {
	h.qc.CloseWithError(quic.ApplicationErrorCode(http3.ErrCodeNoError), "")
}

// open sends CONNECT authority on a new stream and waits for the response.
func (h *h3Client) open(ctx context.Context, authority string, hdrs [][2]string, onFinish func()) (Conn, int, error) {
	rs, err := h.cc.OpenRequestStream(ctx)
	if err != nil {
		if ctx.Err() != nil {
			return nil, 0, fmt.Errorf("hbone h3: open stream: %w", err)
		}
		// Nothing was sent (typically the server sent GOAWAY: it is
		// draining): the caller may try a fresh connection.
		return nil, 0, fmt.Errorf("%w: open stream: %v", errGoAway, err)
	}
	abort := func() {
		rs.CancelWrite(quic.StreamErrorCode(http3.ErrCodeRequestCanceled))
		rs.CancelRead(quic.StreamErrorCode(http3.ErrCodeRequestCanceled))
	}
	header := make(http.Header, len(hdrs))
	for _, f := range hdrs {
		header[http.CanonicalHeaderKey(f[0])] = []string{f[1]}
	}
	req := &http.Request{Method: http.MethodConnect, Host: authority, URL: &url.URL{Host: authority}, Header: header}
	if err := rs.SendRequestHeader(req); err != nil {
		abort()
		return nil, 0, fmt.Errorf("hbone h3: send CONNECT: %w", err)
	}
	stop := context.AfterFunc(ctx, abort)
	resp, err := rs.ReadResponse()
	if !stop() {
		return nil, 0, ctx.Err()
	}
	if err != nil {
		abort()
		var se *quic.StreamError
		if errors.As(err, &se) && se.Remote && se.ErrorCode == quic.StreamErrorCode(http3.ErrCodeRequestRejected) {
			// Refused unprocessed (RFC 9114 §4.1.1.1; e.g. beyond the
			// server's GOAWAY): safe to retry on a fresh connection.
			return nil, 0, fmt.Errorf("%w: %v", errRefusedStream, err)
		}
		return nil, 0, fmt.Errorf("hbone h3: read response: %w", err)
	}
	if resp.StatusCode != http.StatusOK {
		abort()
		return nil, resp.StatusCode, nil
	}
	return newH3Conn(rs, h.qc.LocalAddr(), h.qc.RemoteAddr(), onFinish), http.StatusOK, nil
}
