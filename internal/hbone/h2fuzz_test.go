package hbone

import (
	"bytes"
	"context"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"sync/atomic"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"

	"github.com/meshlite/meshlite/internal/identity"
)

// h2Frames builds a client frame sequence for seeds and tests.
func h2Frames(fn func(fr *http2.Framer, hdr func(kv ...string) []byte)) []byte {
	var buf, hb bytes.Buffer
	fr := http2.NewFramer(&buf, nil)
	enc := hpack.NewEncoder(&hb)
	hdr := func(kv ...string) []byte {
		hb.Reset()
		for i := 0; i+1 < len(kv); i += 2 {
			enc.WriteField(hpack.HeaderField{Name: kv[i], Value: kv[i+1]})
		}
		return append([]byte(nil), hb.Bytes()...)
	}
	fn(fr, hdr)
	return buf.Bytes()
}

func newRawH2Server(t testing.TB) *Server {
	ca, _ := identity.NewAuthority(tdLocal, time.Hour)
	srv, err := NewServer(ServerConfig{
		Certificates: identity.StaticCertificates(nil),
		Bundle:       ca.Bundle(),
		Authorize:    identity.AuthorizeMemberOf(tdLocal),
		Logger:       slog.New(slog.DiscardHandler),
		Handler: func(ctx context.Context, r *Request) (net.Conn, error) {
			switch r.Target.Port() {
			case 9:
				return newSink(), nil
			case 10:
				c, err := r.Accept()
				if err != nil {
					return nil, err
				}
				go func() { io.Copy(io.Discard, c); c.Close() }()
				return nil, nil
			}
			return nil, ErrDenied
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	return srv
}

// serveRawH2 runs the server side of one HTTP/2 connection (no TLS) over a
// pipe, feeds it input, lets it answer for linger and returns what it wrote.
func serveRawH2(srv *Server, input []byte, linger time.Duration) []byte {
	srvEnd, cliEnd := net.Pipe()
	c := newH2Conn(srvEnd, nil, false, srv.log)
	c.info = &connInfo{transport: H2, peer: mustIDNoT("default", "fuzz"), local: netip.MustParseAddrPort("127.0.0.1:15008"), remote: netip.MustParseAddrPort("127.0.0.1:40000")}
	done := make(chan struct{})
	go func() {
		srv.serveH2Conn(context.Background(), c)
		close(done)
	}()
	out := make(chan []byte, 1)
	go func() {
		b, _ := io.ReadAll(cliEnd)
		out <- b
	}()
	cliEnd.Write(input) // returns once the server has read it all (or hung up)
	if linger > 0 {
		select {
		case <-done:
		case <-time.After(linger):
		}
	}
	cliEnd.Close()
	<-done
	return <-out
}

func mustIDNoT(ns, sa string) (id spiffeid.ID) {
	id, _ = identity.NewID("cluster.local", ns, sa)
	return id
}

func TestRawH2_MalformedRequestsGet400(t *testing.T) {
	srv := newRawH2Server(t)
	input := h2Frames(func(fr *http2.Framer, hdr func(kv ...string) []byte) {
		fr.WriteSettings()
		fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, EndHeaders: true, EndStream: true, BlockFragment: hdr(":method", "CONNECT", ":authority", "example.com:80")})
		fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 3, EndHeaders: true, BlockFragment: hdr(":method", "GET", ":scheme", "https", ":path", "/", ":authority", "127.0.0.1:9")})
		// Framer-level malformation: upper-case header name.
		fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 5, EndHeaders: true, BlockFragment: hdr(":method", "CONNECT", ":authority", "127.0.0.1:9", "Bad-Case", "x")})
		fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 7, EndHeaders: true, BlockFragment: hdr(":method", "CONNECT", ":authority", "127.0.0.1:11")})
	})
	out := serveRawH2(srv, input, 200*time.Millisecond)
	statuses := map[uint32]string{}
	fr := http2.NewFramer(nil, bytes.NewReader(out))
	fr.ReadMetaHeaders = hpack.NewDecoder(4096, nil)
	for {
		f, err := fr.ReadFrame()
		if err != nil {
			break
		}
		if h, ok := f.(*http2.MetaHeadersFrame); ok {
			statuses[h.StreamID] = h.PseudoValue("status")
		}
	}
	want := map[uint32]string{1: "400", 3: "400", 5: "400", 7: "401"}
	for id, st := range want {
		if statuses[id] != st {
			t.Errorf("stream %d: status %q, want %s (all: %v)", id, statuses[id], st, statuses)
		}
	}
}

// FuzzH2ServerFrames feeds arbitrary bytes as client frames (after the
// preface) to a server connection: it must never panic or hang.
func FuzzH2ServerFrames(f *testing.F) {
	f.Add(h2Frames(func(fr *http2.Framer, hdr func(kv ...string) []byte) {
		fr.WriteSettings(http2.Setting{ID: http2.SettingInitialWindowSize, Val: 1 << 20})
		fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, EndHeaders: true, BlockFragment: hdr(":method", "CONNECT", ":authority", "127.0.0.1:9")})
		fr.WriteData(1, false, []byte("hello"))
		fr.WriteDataPadded(1, true, []byte("world"), []byte{0, 0, 0})
		fr.WritePing(false, [8]byte{1})
		fr.WriteWindowUpdate(0, 1000)
	}))
	f.Add(h2Frames(func(fr *http2.Framer, hdr func(kv ...string) []byte) {
		fr.WriteSettings()
		block := hdr(":method", "CONNECT", ":authority", "127.0.0.1:10", "traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
		fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: block[:3]})
		fr.WriteContinuation(1, true, block[3:])
		fr.WriteData(1, false, bytes.Repeat([]byte("x"), 20000))
		fr.WriteRSTStream(1, http2.ErrCodeCancel)
		fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 3, EndHeaders: true, BlockFragment: hdr(":method", "CONNECT", ":authority", "127.0.0.1:12")})
		fr.WriteGoAway(0, http2.ErrCodeNo, nil)
	}))
	f.Add(h2Frames(func(fr *http2.Framer, hdr func(kv ...string) []byte) {
		fr.WriteSettings(http2.Setting{ID: http2.SettingHeaderTableSize, Val: 0}, http2.Setting{ID: http2.SettingMaxFrameSize, Val: 1 << 20})
		fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, EndHeaders: true, EndStream: true, BlockFragment: hdr(":method", "GET", ":path", "/")})
		fr.WriteData(1, true, []byte("after end"))
		fr.WriteData(2, false, []byte("even stream"))
		fr.WriteWindowUpdate(1, 0x7fffffff)
		fr.WritePriority(3, http2.PriorityParam{Weight: 1})
		fr.WriteRawFrame(0xfa, 0, 5, []byte("unknown"))
	}))
	f.Add([]byte{0, 0, 0, 4, 0, 0, 0, 0, 0})
	srv := newRawH2Server(f)
	f.Fuzz(func(t *testing.T, b []byte) {
		serveRawH2(srv, b, 0)
	})
}

// A client that floods PINGs but never reads the answers gets its
// connection closed instead of growing our queue without bound.
func TestRawH2_PingFloodClosesConnection(t *testing.T) {
	srv := newRawH2Server(t)
	srvEnd, cliEnd := net.Pipe()
	defer cliEnd.Close()
	c := newH2Conn(srvEnd, nil, false, srv.log)
	c.info = &connInfo{transport: H2, peer: mustIDNoT("default", "flood")}
	done := make(chan struct{})
	go func() {
		srv.serveH2Conn(context.Background(), c)
		close(done)
	}()
	// Read the server's SETTINGS and WINDOW_UPDATE, then never read again.
	rd := http2.NewFramer(nil, cliEnd)
	for i := 0; i < 2; i++ {
		if _, err := rd.ReadFrame(); err != nil {
			t.Fatal(err)
		}
	}
	ping := h2Frames(func(fr *http2.Framer, _ func(kv ...string) []byte) { fr.WritePing(false, [8]byte{7}) })
	flood := bytes.Repeat(ping, 2*h2MaxQueuedCtrl)
	go cliEnd.Write(flood) // we never read: the server's writer is stuck
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("PING flood did not close the connection")
	}
}

// Streams opened and reset in a loop must not pile up handlers without bound.
func TestRawH2_RapidResetBoundsHandlers(t *testing.T) {
	const maxStreams = 10
	var running, peak atomic.Int32
	release := make(chan struct{})
	ca, _ := identity.NewAuthority(tdLocal, time.Hour)
	srv, err := NewServer(ServerConfig{
		Certificates:      identity.StaticCertificates(nil),
		Bundle:            ca.Bundle(),
		Authorize:         identity.AuthorizeMemberOf(tdLocal),
		Logger:            slog.New(slog.DiscardHandler),
		MaxStreamsPerConn: maxStreams,
		Handler: func(ctx context.Context, r *Request) (net.Conn, error) {
			n := running.Add(1)
			defer running.Add(-1)
			for {
				p := peak.Load()
				if n <= p || peak.CompareAndSwap(p, n) {
					break
				}
			}
			<-release // a handler slow to notice the reset
			return nil, ErrDenied
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	input := h2Frames(func(fr *http2.Framer, hdr func(kv ...string) []byte) {
		fr.WriteSettings()
		block := hdr(":method", "CONNECT", ":authority", "127.0.0.1:9")
		for id := uint32(1); id < 2000; id += 2 {
			fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, EndHeaders: true, BlockFragment: block})
			fr.WriteRSTStream(id, http2.ErrCodeCancel)
		}
	})
	go func() {
		time.Sleep(300 * time.Millisecond)
		close(release)
	}()
	serveRawH2(srv, input, 500*time.Millisecond)
	if p := peak.Load(); p > 2*maxStreams || p == 0 {
		t.Fatalf("peak concurrent handlers = %d, want 1..%d", p, 2*maxStreams)
	}
}
