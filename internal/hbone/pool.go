package hbone

import (
	"context"
	"errors"
	"math"
	"net/netip"
	"sync"
	"time"
)

// poolKey is what a pooled connection is shared by: the identities and IPs
// of both ends (DESIGN.md §1), plus the transport and the endpoint port.
type poolKey struct {
	transport Transport
	srcID     string
	dstIDs    string
	srcIP     netip.Addr
	endpoint  netip.AddrPort
}

// pooledConn is one HTTP/2 or QUIC connection in the pool.
type pooledConn struct {
	p   *pool
	key poolKey
	h2  *h2Conn
	h3  *h3Client

	// guarded by p.mu
	streams   int  // tunnels reserved or open
	broken    bool // evicted: no new tunnels
	idleSince time.Time
	idleTimer *time.Timer
}

func (pc *pooledConn) usable() bool {
	if pc.h2 != nil {
		return pc.h2.usable.Load()
	}
	return pc.h3.qc.Context().Err() == nil
}

// limit is how many concurrent tunnels the connection may carry.
func (pc *pooledConn) limit() int {
	if pc.h2 != nil {
		return min(pc.p.maxStreams, int(pc.h2.peerMaxStreams.Load()))
	}
	return math.MaxInt // QUIC: one connection per key; the server's stream limit applies
}

func (pc *pooledConn) close() {
	if pc.h2 != nil {
		pc.h2.goAway(0, "idle") // NO_ERROR: closes once idle, which it is
		return
	}
	pc.h3.close()
}

var errClientClosed = errors.New("hbone: client closed")

type dialCall struct {
	done    chan struct{}
	pc      *pooledConn
	err     error
	waiters int
	cancel  context.CancelFunc
}

type poolEntry struct {
	conns   []*pooledConn
	dialing *dialCall
}

// pool shares connections per key. Its lock is never held during a dial or
// handshake; a dial in flight is shared by every caller that needs a new
// connection for the key (a per-key singleflight).
type pool struct {
	maxStreams  int
	idleTimeout time.Duration
	dialTimeout time.Duration

	mu      sync.Mutex
	entries map[poolKey]*poolEntry
	closed  bool
}

func newPool(maxStreams int, idle, dialTimeout time.Duration) *pool {
	return &pool{maxStreams: maxStreams, idleTimeout: idle, dialTimeout: dialTimeout, entries: map[poolKey]*poolEntry{}}
}

func (p *pool) entryLocked(key poolKey) *poolEntry {
	e := p.entries[key]
	if e == nil {
		e = &poolEntry{}
		p.entries[key] = e
	}
	return e
}

func (p *pool) dropEntryIfEmptyLocked(key poolKey, e *poolEntry) {
	if len(e.conns) == 0 && e.dialing == nil && p.entries[key] == e {
		delete(p.entries, key)
	}
}

// acquire reserves a tunnel slot on a connection for key, dialling one with
// dial if none has room. The caller must release the slot (the connection's
// stream-done hook does).
func (p *pool) acquire(ctx context.Context, key poolKey, dial func(context.Context, *pooledConn) error) (*pooledConn, error) {
	for {
		p.mu.Lock()
		if p.closed {
			p.mu.Unlock()
			return nil, errClientClosed
		}
		e := p.entryLocked(key)
		for _, pc := range e.conns {
			if !pc.broken && pc.streams < pc.limit() && pc.usable() {
				pc.streams++
				p.mu.Unlock()
				return pc, nil
			}
		}
		dc := e.dialing
		if dc == nil {
			dc = p.startDialLocked(key, e, dial)
		}
		dc.waiters++
		p.mu.Unlock()

		select {
		case <-dc.done:
			p.mu.Lock()
			dc.waiters--
			p.mu.Unlock()
			if dc.err != nil {
				return nil, dc.err
			}
			// Loop: take a slot on the new connection, or dial again if
			// others filled it first.
		case <-ctx.Done():
			p.mu.Lock()
			dc.waiters--
			if dc.waiters == 0 {
				select {
				case <-dc.done:
				default:
					// Nobody wants this dial any more: stop it; a later
					// caller starts a fresh one.
					dc.cancel()
					if e := p.entries[key]; e != nil && e.dialing == dc {
						e.dialing = nil
					}
				}
			}
			p.mu.Unlock()
			return nil, ctx.Err()
		}
	}
}

func (p *pool) startDialLocked(key poolKey, e *poolEntry, dial func(context.Context, *pooledConn) error) *dialCall {
	dctx, cancel := context.WithTimeout(context.Background(), p.dialTimeout)
	dc := &dialCall{done: make(chan struct{}), cancel: cancel}
	e.dialing = dc
	pc := &pooledConn{p: p, key: key}
	go func() {
		err := dial(dctx, pc)
		cancel()
		p.mu.Lock()
		e := p.entryLocked(key)
		if e.dialing == dc {
			e.dialing = nil
		}
		closeIt := false
		if err == nil {
			if p.closed {
				err, closeIt = errClientClosed, true
			} else {
				e.conns = append(e.conns, pc)
				p.armIdleLocked(pc) // in case every waiter has gone
			}
		}
		dc.pc, dc.err = pc, err
		close(dc.done)
		p.dropEntryIfEmptyLocked(key, e)
		p.mu.Unlock()
		if closeIt {
			pc.close()
		}
	}()
	return dc
}

// release returns a tunnel slot.
func (p *pool) release(pc *pooledConn) {
	p.mu.Lock()
	pc.streams--
	if pc.streams == 0 && !pc.broken {
		p.armIdleLocked(pc)
	}
	p.mu.Unlock()
}

// armIdleLocked starts the idle clock of a connection that has no tunnel.
// One timer per connection, re-armed, so that busy connections going idle
// often do not pile up timers.
func (p *pool) armIdleLocked(pc *pooledConn) {
	pc.idleSince = time.Now()
	if pc.idleTimer == nil {
		pc.idleTimer = time.AfterFunc(p.idleTimeout, func() { p.idleCheck(pc) })
		return
	}
	pc.idleTimer.Reset(p.idleTimeout)
}

func (p *pool) idleCheck(pc *pooledConn) {
	p.mu.Lock()
	if pc.streams > 0 || pc.broken {
		p.mu.Unlock()
		return // busy again (release re-arms) or gone
	}
	if left := p.idleTimeout - time.Since(pc.idleSince); left > 0 {
		pc.idleTimer.Reset(left)
		p.mu.Unlock()
		return
	}
	p.removeLocked(pc)
	p.mu.Unlock()
	pc.close()
}

// evict takes a connection out of the pool (broken, or going away).
func (p *pool) evict(pc *pooledConn) {
	p.mu.Lock()
	p.removeLocked(pc)
	p.mu.Unlock()
}

func (p *pool) removeLocked(pc *pooledConn) {
	pc.broken = true
	if pc.idleTimer != nil {
		pc.idleTimer.Stop()
	}
	e := p.entries[pc.key]
	if e == nil {
		return
	}
	for i, c := range e.conns {
		if c == pc {
			e.conns = append(e.conns[:i], e.conns[i+1:]...)
			break
		}
	}
	p.dropEntryIfEmptyLocked(pc.key, e)
}

func (p *pool) close() {
	p.mu.Lock()
	p.closed = true
	var all []*pooledConn
	for _, e := range p.entries {
		all = append(all, e.conns...)
		for _, pc := range e.conns {
			pc.broken = true
		}
		e.conns = nil
		if e.dialing != nil {
			e.dialing.cancel()
		}
	}
	p.mu.Unlock()
	for _, pc := range all {
		if pc.h2 != nil {
			pc.h2.Close()
		} else {
			pc.h3.close()
		}
	}
}

// PoolStats counts pooled connections and the tunnels on them.
type PoolStats struct {
	H2Conns, H3Conns int
	Tunnels          int
}

func (p *pool) stats() PoolStats {
	p.mu.Lock()
	defer p.mu.Unlock()
	var s PoolStats
	for _, e := range p.entries {
		for _, pc := range e.conns {
			if pc.h2 != nil {
				s.H2Conns++
			} else {
				s.H3Conns++
			}
			s.Tunnels += pc.streams
		}
	}
	return s
}
