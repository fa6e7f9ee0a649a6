package proxy

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// limitedPool is the upstream pool for destinations whose TrafficPolicy sets
// circuitBreaker.maxRequestsPerConnection: every connection (an HTTP/1.1
// keep-alive connection or an h2c connection) carries at most max requests,
// then is closed once the requests on it are done; new requests go to
// another connection. For HTTP/2 that is Envoy's drain: no new streams after
// the max-th, the open ones finish.
//
// http.Transport's own pool cannot be told which connection a request will
// get, so this pool keeps net/http client connections (Transport.
// NewClientConn) itself. A request is counted when it reserves its slot,
// under the pool's lock, and the connection leaves the pool in the same step
// when that was its last: no other request can pick it afterwards.
type limitedPool struct {
	tr   *http.Transport // dials and speaks HTTP/1.1 or h2c; its own pool is unused
	h2   bool
	max  uint32
	idle time.Duration // an unused connection is closed after this

	mu    sync.Mutex
	conns map[string][]*limitedConn // endpoint "<ip>:<port>" -> connections that take more requests
}

type limitedConn struct {
	pool *limitedPool
	addr string
	cc   *http.ClientConn
	used uint32 // requests counted on it (under pool.mu)
	// retired: it took its last request (or the pool let it go); it closes
	// when nothing is in flight on it any more.
	retired atomic.Bool
	timer   *time.Timer // closes it when it sat unused for pool.idle
}

func newLimitedPool(tr *http.Transport, h2 bool, max uint32, idle time.Duration) *limitedPool {
	return &limitedPool{tr: tr, h2: h2, max: max, idle: idle, conns: map[string][]*limitedConn{}}
}

// RoundTrip sends req on a connection to req.URL.Host that has taken fewer
// than max requests, or on a new one.
func (lp *limitedPool) RoundTrip(req *http.Request) (*http.Response, error) {
	resp, died, err := lp.roundTrip(req, true)
	if err == nil || !died || req.Context().Err() != nil || !replayable(req) {
		return resp, err
	}
	// A kept-alive connection can go away just as it is picked (the server
	// closed it while idle, or sent GOAWAY). http.Transport retries such
	// requests on a new connection when that is safe; so does this pool, once,
	// and only when that connection died before any answer. This stacks with
	// the route's own retry policy (which counts it as one attempt), as
	// http.Transport's retry does.
	if req.GetBody != nil {
		body, berr := req.GetBody()
		if berr != nil {
			return nil, err
		}
		r := *req
		r.Body = body
		req = &r
	}
	resp, _, err = lp.roundTrip(req, false)
	return resp, err
}

// roundTrip sends req on a pooled (mayReuse) or new connection. died reports
// that it failed on a reused connection that broke before any answer came.
func (lp *limitedPool) roundTrip(req *http.Request, mayReuse bool) (resp *http.Response, died bool, err error) {
	c, last, reused, err := lp.get(req.Context(), req.URL.Host, mayReuse)
	if err != nil {
		return nil, false, err
	}
	if last && !lp.h2 && !req.Close {
		// Tell the server too (Connection: close).
		r := *req
		r.Close = true
		req = &r
	}
	resp, err = c.cc.RoundTrip(req)
	died = err != nil && reused && resp == nil && (c.cc.Err() != nil || connClosedErr(err))
	return resp, died, err
}

// connClosedErr reports whether err says the connection itself went away
// (closed, reset, cut short), not that the request or its answer was bad.
func connClosedErr(err error) bool {
	return errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, net.ErrClosed) ||
		errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE)
}

// replayable is http.Transport's rule for sending a request again after its
// connection failed: idempotent, and a body that can be had again.
func replayable(r *http.Request) bool {
	if r.Body != nil && r.Body != http.NoBody && r.GetBody == nil {
		return false
	}
	switch r.Method {
	case "GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE":
		return true
	}
	_, ok := r.Header["Idempotency-Key"]
	if !ok {
		_, ok = r.Header["X-Idempotency-Key"]
	}
	return ok
}

// get returns a connection with a slot reserved for one request, and
// whether that request is its last.
func (lp *limitedPool) get(ctx context.Context, addr string, mayReuse bool) (c *limitedConn, last, reused bool, err error) {
	if mayReuse {
		lp.mu.Lock()
		list := lp.conns[addr]
		for i := len(list) - 1; i >= 0; i-- {
			c := list[i]
			// Reserve fails while an HTTP/1.1 connection is busy or an HTTP/2
			// one is at its stream limit or going away.
			if c.cc.Reserve() != nil {
				if c.cc.Err() != nil {
					list = slices.Delete(list, i, i+1)
				}
				continue
			}
			c.used++
			if last = c.used >= lp.max; last {
				c.retired.Store(true)
				list = slices.Delete(list, i, i+1)
			}
			lp.setList(addr, list)
			lp.mu.Unlock()
			return c, last, true, nil
		}
		lp.setList(addr, list)
		lp.mu.Unlock()
	}
	cc, err := lp.tr.NewClientConn(ctx, "http", addr)
	if err != nil {
		return nil, false, false, err
	}
	if err := cc.Reserve(); err != nil {
		cc.Close()
		return nil, false, false, fmt.Errorf("new upstream connection to %s: %w", addr, err)
	}
	c = &limitedConn{pool: lp, addr: addr, cc: cc, used: 1}
	c.timer = time.AfterFunc(time.Hour, c.idleTimeout)
	c.timer.Stop()
	last = lp.max <= 1
	c.retired.Store(last)
	cc.SetStateHook(c.stateChanged)
	if !last {
		lp.mu.Lock()
		lp.conns[addr] = append(lp.conns[addr], c)
		lp.mu.Unlock()
	}
	return c, last, false, nil
}

// setList stores an endpoint's connections (under mu).
func (lp *limitedPool) setList(addr string, list []*limitedConn) {
	if len(list) == 0 {
		delete(lp.conns, addr)
		return
	}
	lp.conns[addr] = list
}

// stateChanged is the connection's state hook: net/http calls it when a
// request on it ends or it closes. It must not take pool.mu: net/http may
// call it from Reserve, which runs under pool.mu.
func (c *limitedConn) stateChanged(cc *http.ClientConn) {
	if cc.InFlight() != 0 {
		return
	}
	switch {
	case c.retired.Load():
		cc.Close() // its last request is done
	case cc.Err() != nil:
		c.timer.Reset(0) // closed by the peer: out of the pool now
	default:
		c.timer.Reset(c.pool.idle)
	}
}

// idleTimeout closes the connection if it is still unused (or closed), and
// takes it out of the pool.
func (c *limitedConn) idleTimeout() {
	lp := c.pool
	lp.mu.Lock()
	// Reservations happen under mu, so InFlight cannot grow meanwhile.
	if c.cc.Err() == nil && (c.cc.InFlight() != 0 || c.retired.Load()) {
		lp.mu.Unlock()
		return
	}
	lp.dropLocked(c)
	lp.mu.Unlock()
	c.cc.Close()
}

// dropLocked takes c out of the pool (under mu).
func (lp *limitedPool) dropLocked(c *limitedConn) {
	list := lp.conns[c.addr]
	if i := slices.Index(list, c); i >= 0 {
		lp.setList(c.addr, slices.Delete(list, i, i+1))
	}
}

// CloseIdleConnections closes the connections nothing is using and lets the
// others finish their requests and close (the proxy calls it when it evicts
// the pool or stops). Connections made later time out when unused.
func (lp *limitedPool) CloseIdleConnections() {
	lp.mu.Lock()
	var all []*limitedConn
	for _, list := range lp.conns {
		all = append(all, list...)
	}
	clear(lp.conns)
	for _, c := range all {
		c.retired.Store(true)
	}
	lp.mu.Unlock()
	for _, c := range all {
		c.timer.Stop()
		if c.cc.InFlight() == 0 {
			c.cc.Close()
		}
	}
}
