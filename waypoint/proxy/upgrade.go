package proxy

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"sync/atomic"
	"time"

	"github.com/meshlite/meshlite/internal/hbone"
	"github.com/meshlite/meshlite/proto/l7"
	"github.com/meshlite/meshlite/waypoint/route"
)

// HTTP/1.1 protocol upgrades. Like Istio's waypoints (Envoy with a websocket
// upgrade config), the waypoint passes WebSocket upgrades on: the request
// goes through the usual steps (authz, route, faults, rate limit, filters,
// circuit breaker, retries until the answer) with its Upgrade and
// Connection headers, on an upstream connection of its own; on 101 Switching
// Protocols the client's connection and the upstream one are spliced until
// both sides are done. Other upgrade tokens (h2c, ...) are hop-by-hop
// headers like any other and are dropped, so those requests go on as plain
// HTTP.

// upgradeType is the protocol an HTTP/1.1 request asks to switch to when the
// waypoint passes that upgrade on ("websocket" as the client spelled it),
// else "". Ordinary requests cost one map lookup.
func upgradeType(r *http.Request) string {
	if r.ProtoMajor != 1 {
		return ""
	}
	up := r.Header["Upgrade"]
	if len(up) != 1 {
		return ""
	}
	t := strings.TrimSpace(up[0])
	if !strings.EqualFold(t, "websocket") || !hasToken(r.Header["Connection"], "upgrade") {
		return ""
	}
	return t
}

// hasToken reports whether a comma-separated header lists token.
func hasToken(values []string, token string) bool {
	for _, v := range values {
		for v != "" {
			var t string
			t, v, _ = strings.Cut(v, ",")
			if strings.EqualFold(strings.TrimSpace(t), token) {
				return true
			}
		}
	}
	return false
}

// upgradeTransport sends an upgrade request on a new upstream connection:
// after a 101 the connection belongs to the upgraded stream, so it never
// comes from or goes back to a pool. The request's context (the route's
// timeouts, the client going away) applies until the answer's head is in;
// an upgraded stream lives on without it.
type upgradeTransport struct {
	p   *Proxy
	src netip.Addr
}

// aLongTimeAgo is a deadline that makes blocked reads and writes return.
var aLongTimeAgo = time.Unix(1, 0)

func (u *upgradeTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	ctx := req.Context()
	c, err := u.p.dialEndpoint(ctx, u.src, req.URL.Host)
	if err != nil {
		return nil, err
	}
	stop := context.AfterFunc(ctx, func() { _ = c.SetDeadline(aLongTimeAgo) })
	fail := func(what string, err error) (*http.Response, error) {
		stop()
		c.Close()
		if ctx.Err() != nil {
			err = ctx.Err()
		}
		return nil, fmt.Errorf("upgrade request to %s: %s: %w", req.URL.Host, what, err)
	}
	if err := req.Write(c); err != nil {
		return fail("write", err)
	}
	br := bufio.NewReader(c)
	var resp *http.Response
	for {
		resp, err = http.ReadResponse(br, req)
		if err != nil {
			return fail("read answer", err)
		}
		// Informational answers (100 Continue) come before the real one.
		if resp.StatusCode >= 200 || resp.StatusCode == http.StatusSwitchingProtocols {
			break
		}
	}
	if resp.StatusCode != http.StatusSwitchingProtocols {
		// Not switched: an ordinary answer, read under the same deadline;
		// the connection is not reused.
		resp.Body = &closeConnBody{ReadCloser: resp.Body, c: c, stop: stop}
		return resp, nil
	}
	if !stop() {
		// The deadline fired (or is firing): the stream would start broken.
		c.Close()
		return nil, fmt.Errorf("upgrade request to %s: %w", req.URL.Host, context.Cause(ctx))
	}
	resp.Body = &upgradedConn{Conn: c, r: br}
	return resp, nil
}

// closeConnBody closes the upstream connection with the answer's body.
type closeConnBody struct {
	io.ReadCloser
	c    net.Conn
	stop func() bool
}

func (b *closeConnBody) Close() error {
	err := b.ReadCloser.Close()
	b.stop()
	b.c.Close()
	return err
}

// upgradedConn is the upstream side of a switched connection; bytes the
// backend sent right behind its 101 may wait in r.
type upgradedConn struct {
	net.Conn
	r *bufio.Reader
}

func (c *upgradedConn) Read(b []byte) (int, error) { return c.r.Read(b) }
func (c *upgradedConn) CloseWrite() error          { return closeWriteConn(c.Conn) }
func (c *upgradedConn) Reset() error               { return resetConn(c.Conn) }

// hijackedConn is the client side of a switched connection. Bytes the client
// sent right behind its request may wait in the server's reader, which must
// not read the connection itself any more.
type hijackedConn struct {
	net.Conn
	r *bufio.Reader
}

func (c *hijackedConn) Read(b []byte) (int, error) {
	if c.r.Buffered() > 0 {
		return c.r.Read(b) // only what is buffered
	}
	return c.Conn.Read(b)
}
func (c *hijackedConn) CloseWrite() error { return closeWriteConn(c.Conn) }
func (c *hijackedConn) Reset() error      { return resetConn(c.Conn) }

// closeWriteConn half-closes c when it can (tunnels, TCP), else closes it.
func closeWriteConn(c net.Conn) error {
	if cw, ok := c.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return c.Close()
}

// resetConn aborts c so that the peer sees a reset.
func resetConn(c net.Conn) error {
	switch c := c.(type) {
	case interface{ Reset() error }:
		return c.Reset()
	case *net.TCPConn:
		_ = c.SetLinger(0)
		return c.Close()
	}
	return c.Close()
}

// switchProtocols answers the client's upgrade with the backend's 101 and
// splices the two connections until both directions are done. A half-close
// on one side becomes a half-close on the other; a reset aborts both; a
// stream idle for Config.UpgradeIdleTimeout is closed on both sides.
//
// It runs inside the request's handler, so an open upgraded stream holds
// its destination's circuit-breaker slot (maxConnections / maxPending
// requests) until it ends, as in Envoy, where the upgraded stream stays an
// active request.
func (p *Proxy) switchProtocols(w *respWriter, resp *http.Response, mods []*l7.HeaderModifier, st *reqState) {
	up, ok := resp.Body.(*upgradedConn)
	upType := resp.Header.Get("Upgrade")
	if !ok || st.upgrade == "" || !strings.EqualFold(upType, st.upgrade) || !hasToken(resp.Header["Connection"], "upgrade") {
		resp.Body.Close()
		p.log.Info("upstream switched protocols without a matching upgrade", "upstream", st.access.Upstream,
			"asked", st.upgrade, "answered", upType)
		p.localReply(w, st, http.StatusBadGateway, "upstream switched to a protocol that was not asked for")
		return
	}
	h := w.Header()
	for k, vs := range resp.Header {
		h[k] = vs
	}
	removeHopHeaders(h)
	for _, m := range mods {
		route.ApplyHeaders(h, m)
	}
	h.Set("Connection", "Upgrade")
	h.Set("Upgrade", upType)
	// Registered before the connection leaves the server's hands, so Run
	// (which closes upgraded streams after the server has shut down) waits
	// for this one too; once Run waits, no new stream starts.
	if !p.track() {
		up.Close()
		p.localReply(w, st, http.StatusServiceUnavailable, "waypoint shutting down")
		return
	}
	defer p.wg.Done()
	conn, brw, err := http.NewResponseController(w.w).Hijack()
	if err != nil {
		up.Close()
		p.log.Info("cannot take over the client connection for an upgrade", "error", err)
		p.localReply(w, st, http.StatusInternalServerError, "upgrade not possible on this connection")
		return
	}
	w.wrote, w.status = true, http.StatusSwitchingProtocols
	client := &hijackedConn{Conn: conn, r: brw.Reader}
	defer client.Close()
	defer up.Close()
	// The server no longer owns the connection: the 101 head is ours to write.
	_, _ = brw.WriteString("HTTP/1.1 101 Switching Protocols\r\n")
	_ = h.Write(brw)
	_, _ = brw.WriteString("\r\n")
	if err := brw.Flush(); err != nil {
		p.log.Debug("writing the 101 to the client failed", "error", err)
		return
	}
	// The proxy stopping ends upgraded streams (the server's Shutdown does
	// not see hijacked connections).
	stop := context.AfterFunc(p.stopping, func() {
		client.Close()
		up.Close()
	})
	defer stop()
	// Neither side sending for UpgradeIdleTimeout ends the stream.
	idle := newIdleTimer(p.cfg.UpgradeIdleTimeout, func() {
		p.log.Debug("upgraded stream idle, closing", "upstream", st.access.Upstream, "timeout", p.cfg.UpgradeIdleTimeout)
		client.Close()
		up.Close()
	})
	defer idle.stop()
	in, out, err := hbone.Relay(&activeConn{Conn: client, idle: idle}, &activeConn{Conn: up, idle: idle})
	st.upgradedIn, w.bytes = in, w.bytes+out
	p.log.Debug("upgraded stream done", "src.identity", st.ci.peer, "upstream", st.access.Upstream,
		"protocol", upType, "sent", in, "received", out, "error", err)
}

// idleTimer calls fire once nothing was read on an upgraded stream for d.
// Reads only store a timestamp; the timer re-arms itself for what is left
// when it wakes early, so busy streams cost no timer resets.
type idleTimer struct {
	start   time.Time
	last    atomic.Int64 // nanoseconds since start of the latest read
	stopped atomic.Bool
	t       *time.Timer
}

func newIdleTimer(d time.Duration, fire func()) *idleTimer {
	it := &idleTimer{start: time.Now()}
	// Armed only once it.t is set: the callback reads it.t.
	it.t = time.AfterFunc(time.Hour, func() {
		if it.stopped.Load() {
			return
		}
		if left := time.Duration(it.last.Load()) + d - time.Since(it.start); left > 0 {
			it.t.Reset(left)
			return
		}
		fire()
	})
	it.t.Reset(d)
	return it
}

// touch pushes the deadline to d from now.
func (it *idleTimer) touch() { it.last.Store(int64(time.Since(it.start))) }

func (it *idleTimer) stop() {
	it.stopped.Store(true)
	it.t.Stop()
}

// activeConn is one side of an upgraded stream: every read on it counts as
// activity for the whole stream. It keeps the side's CloseWrite and Reset.
type activeConn struct {
	net.Conn
	idle *idleTimer
}

func (c *activeConn) Read(b []byte) (int, error) {
	n, err := c.Conn.Read(b)
	if n > 0 {
		c.idle.touch()
	}
	return n, err
}

func (c *activeConn) CloseWrite() error { return closeWriteConn(c.Conn) }

func (c *activeConn) Reset() error { return resetConn(c.Conn) }
