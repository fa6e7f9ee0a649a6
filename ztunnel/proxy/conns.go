package proxy

import (
	"context"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/meshlite/meshlite/proto/workload"
)

// Direction is which way a proxied connection goes, seen from the local pod.
type Direction uint8

const (
	// Outbound: from a local pod (captured on 15001).
	Outbound Direction = iota
	// Inbound: HBONE to a local pod (15008).
	Inbound
	// InboundPlaintext: plain TCP to a local pod (captured on 15006).
	InboundPlaintext
)

func (d Direction) String() string {
	switch d {
	case Inbound:
		return "inbound"
	case InboundPlaintext:
		return "inbound-plaintext"
	}
	return "outbound"
}

// Security values of ConnInfo.
const (
	SecurityMTLS      = "mtls"
	SecurityPlaintext = "plaintext"
)

// ConnInfo describes one live connection (the admin interface's table).
type ConnInfo struct {
	ID        uint64 `json:"id"`
	Direction string `json:"direction"`
	// Pod is the local pod's uid.
	Pod string `json:"pod"`
	// Src is the client's address; Dst the destination it asked for.
	Src         string `json:"src"`
	Dst         string `json:"dst"`
	SrcIdentity string `json:"src_identity,omitempty"`
	DstIdentity string `json:"dst_identity,omitempty"`
	// SrcWorkload and DstWorkload are "<namespace>/<name>" when known.
	SrcWorkload string `json:"src_workload,omitempty"`
	DstWorkload string `json:"dst_workload,omitempty"`
	// Security is SecurityMTLS (HBONE) or SecurityPlaintext.
	Security string `json:"security"`
	// Transport is h2, h3 or tcp.
	Transport string `json:"transport"`
	// Route is, for outbound, direct, waypoint or passthrough.
	Route string    `json:"route,omitempty"`
	Start time.Time `json:"start"`
	// BytesSent went to the client, BytesReceived came from it.
	BytesSent     int64 `json:"bytes_sent"`
	BytesReceived int64 `json:"bytes_received"`
}

// connTable holds the live connections.
type connTable struct {
	seq   atomic.Uint64
	mu    sync.Mutex
	conns map[uint64]*tracked
}

// tracked is one live connection: its description, byte counters and
// metric series.
type tracked struct {
	p              *Proxy
	info           ConnInfo
	sent, received atomic.Int64
	sentC, recvC   prometheus.Counter
	labels         []string
	once           sync.Once
}

// connLabels is what a connection's metrics and table entry are made of.
type connLabels struct {
	dir          Direction
	pod          string
	src, dst     netip.AddrPort
	srcWl, dstWl *workload.Workload
	srcID, dstID spiffeid.ID
	svc          *workload.Service
	mtls         bool
	transport    string
	route        string
}

// track records a connection that is about to be relayed.
func (p *Proxy) track(l connLabels) *tracked {
	reporter := "destination"
	if l.dir == Outbound {
		reporter = "source"
	}
	t := &tracked{p: p, labels: labelValues(reporter, l.srcWl, l.dstWl, l.srcID, l.dstID, l.svc, l.mtls)}
	t.info = ConnInfo{
		ID: p.conns.seq.Add(1), Direction: l.dir.String(), Pod: l.pod,
		Src: l.src.String(), Dst: l.dst.String(),
		SrcWorkload: workloadName(l.srcWl), DstWorkload: workloadName(l.dstWl),
		Security: SecurityPlaintext, Transport: l.transport, Route: l.route, Start: time.Now(),
	}
	if !l.srcID.IsZero() {
		t.info.SrcIdentity = l.srcID.String()
	}
	if !l.dstID.IsZero() {
		t.info.DstIdentity = l.dstID.String()
	}
	if l.mtls {
		t.info.Security = SecurityMTLS
	}
	m := p.metrics
	t.sentC = m.sent.WithLabelValues(t.labels...)
	t.recvC = m.received.WithLabelValues(t.labels...)
	m.opened.WithLabelValues(t.labels...).Inc()
	m.active.WithLabelValues(t.info.Direction, t.labels[len(t.labels)-1]).Inc()
	p.conns.mu.Lock()
	p.conns.conns[t.info.ID] = t
	p.conns.mu.Unlock()
	return t
}

func (t *tracked) addSent(n int) {
	t.sent.Add(int64(n))
	t.sentC.Add(float64(n))
}

func (t *tracked) addReceived(n int) {
	t.received.Add(int64(n))
	t.recvC.Add(float64(n))
}

// finish removes the connection from the table and counts it closed; the
// first call wins. Inbound connections get their access log line here (the
// HBONE server relays them, so nothing else sees their end).
func (t *tracked) finish() {
	t.once.Do(func() {
		p := t.p
		p.conns.mu.Lock()
		delete(p.conns.conns, t.info.ID)
		p.conns.mu.Unlock()
		p.metrics.closed.WithLabelValues(t.labels...).Inc()
		p.metrics.active.WithLabelValues(t.info.Direction, t.labels[len(t.labels)-1]).Dec()
		if t.info.Direction == Outbound.String() {
			return
		}
		attrs := []slog.Attr{
			slog.String("direction", t.info.Direction), slog.String("src", t.info.Src), slog.String("dst", t.info.Dst),
			slog.String("src.identity", orNone(t.info.SrcIdentity)), slog.String("dst.workload", t.info.DstWorkload),
			slog.String("security", t.info.Security), slog.String("transport", t.info.Transport),
			slog.Int64("bytes_sent", t.sent.Load()), slog.Int64("bytes_received", t.received.Load()), // to, from the client
			slog.Duration("duration", time.Since(t.info.Start)),
		}
		p.log.LogAttrs(context.Background(), slog.LevelInfo, "inbound connection closed", attrs...)
	})
}

func orNone(s string) string {
	if s == "" {
		return "none"
	}
	return s
}

// Connections returns the live connections, oldest first.
func (p *Proxy) Connections() []ConnInfo {
	p.conns.mu.Lock()
	out := make([]ConnInfo, 0, len(p.conns.conns))
	for _, t := range p.conns.conns {
		ci := t.info
		ci.BytesSent, ci.BytesReceived = t.sent.Load(), t.received.Load()
		out = append(out, ci)
	}
	p.conns.mu.Unlock()
	slices.SortFunc(out, func(a, b ConnInfo) int {
		switch {
		case a.ID < b.ID:
			return -1
		case a.ID > b.ID:
			return 1
		}
		return 0
	})
	return out
}

// countedConn counts the bytes of a relayed connection into its record as
// they flow. clientSide says the conn is the client's end (reads come from
// the client); else it is the app's end (reads go to the client). It keeps
// the half-close and reset behaviour of a TCP connection that the relay
// relies on, and finishes the record when closed.
type countedConn struct {
	net.Conn
	t          *tracked
	clientSide bool
}

func (c *countedConn) Read(b []byte) (int, error) {
	n, err := c.Conn.Read(b)
	if n > 0 {
		if c.clientSide {
			c.t.addReceived(n)
		} else {
			c.t.addSent(n)
		}
	}
	return n, err
}

func (c *countedConn) Write(b []byte) (int, error) {
	n, err := c.Conn.Write(b)
	if n > 0 {
		if c.clientSide {
			c.t.addSent(n)
		} else {
			c.t.addReceived(n)
		}
	}
	return n, err
}

// CloseWrite half-closes (FIN) when the conn can.
func (c *countedConn) CloseWrite() error {
	if cw, ok := c.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return c.Close()
}

// Reset aborts the connection with a TCP RST.
func (c *countedConn) Reset() error {
	if tc, ok := c.Conn.(*net.TCPConn); ok {
		_ = tc.SetLinger(0)
	}
	err := c.Conn.Close()
	c.t.finish()
	return err
}

func (c *countedConn) Close() error {
	err := c.Conn.Close()
	c.t.finish()
	return err
}
