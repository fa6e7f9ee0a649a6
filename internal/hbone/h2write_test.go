package hbone

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"sync"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// TestH2_DataFramesRespectPeerMaxFrameSize checks that DATA frames grow past
// 16 KiB only when the peer's SETTINGS_MAX_FRAME_SIZE allows it (Istio's
// peers keep the default).
func TestH2_DataFramesRespectPeerMaxFrameSize(t *testing.T) {
	for _, tc := range []struct {
		name    string
		peerMax uint32 // 0: not announced
	}{
		{"default", 0},
		{"32KiB", 32 << 10},
		{"1MiB", 1 << 20},
	} {
		t.Run(tc.name, func(t *testing.T) {
			limit := uint32(h2DefaultFrameSize)
			if tc.peerMax != 0 {
				limit = tc.peerMax
			}
			largest := writeToRawPeer(t, tc.peerMax, 256<<10)
			if largest > int(limit) {
				t.Fatalf("largest DATA frame %d bytes, peer allows %d", largest, limit)
			}
			if limit > h2DefaultFrameSize && largest <= h2DefaultFrameSize {
				t.Fatalf("largest DATA frame %d bytes although the peer allows %d", largest, limit)
			}
		})
	}
}

// writeToRawPeer opens a tunnel from our client to a hand-driven HTTP/2
// peer announcing peerMax, writes size bytes and returns the largest DATA
// frame the peer received.
func writeToRawPeer(t *testing.T, peerMax uint32, size int) int {
	cli, peer := net.Pipe()
	defer peer.Close()
	c := newH2Conn(cli, nil, true, slog.New(slog.DiscardHandler))
	defer c.Close()
	started := make(chan error, 1)
	go func() { started <- c.start(0) }()
	preface := make([]byte, len(h2Preface))
	if _, err := io.ReadFull(peer, preface); err != nil || !bytes.Equal(preface, h2Preface) {
		t.Fatalf("client preface %q: %v", preface, err)
	}
	rfr := http2.NewFramer(nil, peer)
	rfr.SetMaxReadFrameSize(1 << 24)
	for i := 0; i < 2; i++ { // SETTINGS and the connection WINDOW_UPDATE
		if _, err := rfr.ReadFrame(); err != nil {
			t.Fatal(err)
		}
	}
	if err := <-started; err != nil {
		t.Fatal(err)
	}
	frames := make(chan any, 1024)
	go func() { // everything the client sends from now on
		defer close(frames)
		for {
			f, err := rfr.ReadFrame()
			if err != nil {
				return
			}
			if d, ok := f.(*http2.DataFrame); ok {
				frames <- dataSeen{n: len(d.Data())}
				continue
			}
			frames <- f
		}
	}()
	var wmu sync.Mutex
	wfr := http2.NewFramer(peer, nil)
	settings := []http2.Setting{{ID: http2.SettingInitialWindowSize, Val: 8 << 20}}
	if peerMax != 0 {
		settings = append(settings, http2.Setting{ID: http2.SettingMaxFrameSize, Val: peerMax})
	}
	wmu.Lock()
	if err := wfr.WriteSettings(settings...); err != nil {
		t.Fatal(err)
	}
	if err := wfr.WriteWindowUpdate(0, 8<<20); err != nil {
		t.Fatal(err)
	}
	wmu.Unlock()

	type opened struct {
		st  *h2Stream
		err error
	}
	op := make(chan opened, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		st, status, err := c.openStream(ctx, "127.0.0.1:9", nil)
		if err == nil && status != 200 {
			err = fmt.Errorf("status %d", status)
		}
		op <- opened{st, err}
	}()
	var hbuf bytes.Buffer
	henc := hpack.NewEncoder(&hbuf)
	largest, got := 0, 0
	var wrote chan error
	timeout := time.After(10 * time.Second)
	for got < size {
		select {
		case f, ok := <-frames:
			if !ok {
				t.Fatalf("connection closed after %d bytes", got)
			}
			switch f := f.(type) {
			case *http2.HeadersFrame:
				henc.WriteField(hpack.HeaderField{Name: ":status", Value: "200"})
				wmu.Lock()
				err := wfr.WriteHeaders(http2.HeadersFrameParam{StreamID: f.StreamID, BlockFragment: hbuf.Bytes(), EndHeaders: true})
				wmu.Unlock()
				if err != nil {
					t.Fatal(err)
				}
				o := <-op
				if o.err != nil {
					t.Fatal(o.err)
				}
				wrote = make(chan error, 1)
				go func() {
					_, err := o.st.Write(make([]byte, size))
					wrote <- err
				}()
			case dataSeen:
				got += f.n
				largest = max(largest, f.n)
			}
		case <-timeout:
			t.Fatalf("timed out after %d of %d bytes", got, size)
		}
	}
	if err := <-wrote; err != nil {
		t.Fatal(err)
	}
	return largest
}

// dataSeen is a DATA frame the raw peer received: its payload length.
type dataSeen struct{ n int }

// TestTunnel_ConcurrentStreamsKeepTheirBytesInOrder uploads different data
// on many tunnels of one pooled HTTP/2 connection at once, in writes of
// random sizes, so that frames of all streams are coalesced into shared
// flushes and TLS records; every stream's bytes must arrive whole and in order.
func TestTunnel_ConcurrentStreamsKeepTheirBytesInOrder(t *testing.T) {
	const streams = 16
	size := int64(16 << 20)
	if raceEnabled {
		size = 2 << 20
	}
	e := newEnv(t)
	type sum struct {
		sha [32]byte
		n   int64
	}
	sums := make(chan sum, streams)
	up := tcpServer(t, func(c *net.TCPConn) {
		defer c.Close()
		h := sha256.New()
		n, _ := io.Copy(h, c)
		var s sum
		copy(s.sha[:], h.Sum(nil))
		s.n = n
		sums <- s
	})
	sent := make(chan sum, streams)
	var wg sync.WaitGroup
	for i := 0; i < streams; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c, err := e.dial(H2, up)
			if err != nil {
				t.Error(err)
				return
			}
			defer c.Close()
			r := rand.New(rand.NewPCG(uint64(i), 7))
			src := newPattern(uint64(100+i), size)
			h := sha256.New()
			buf := make([]byte, 200<<10)
			var n int64
			for {
				k := 1 + r.IntN(len(buf)) // odd sizes: frame boundaries fall anywhere
				k, rerr := src.Read(buf[:k])
				if k > 0 {
					h.Write(buf[:k])
					if _, err := c.Write(buf[:k]); err != nil {
						t.Errorf("stream %d: write: %v", i, err)
						return
					}
					n += int64(k)
				}
				if errors.Is(rerr, io.EOF) {
					break
				}
			}
			if err := c.CloseWrite(); err != nil {
				t.Errorf("stream %d: close write: %v", i, err)
			}
			var s sum
			copy(s.sha[:], h.Sum(nil))
			s.n = n
			sent <- s
			io.Copy(io.Discard, c) // the upstream closes after reading all
		}()
	}
	wg.Wait()
	if st := e.client.Stats(); st.H2Conns != 1 {
		t.Errorf("stats %+v: want the tunnels on one connection", st)
	}
	close(sent)
	want := map[[32]byte]int64{}
	for s := range sent {
		want[s.sha] = s.n
	}
	if len(want) != streams {
		t.Fatalf("%d distinct streams sent, want %d", len(want), streams)
	}
	for i := 0; i < streams; i++ {
		select {
		case s := <-sums:
			if n, ok := want[s.sha]; !ok || n != s.n {
				t.Fatalf("upstream received %d bytes matching no stream's data", s.n)
			}
			delete(want, s.sha)
		case <-time.After(30 * time.Second):
			t.Fatalf("%d streams never completed upstream", streams-i)
		}
	}
}

// fakeSock counts the writes reaching the socket.
type fakeSock struct {
	net.Conn
	writes [][]byte
}

func (f *fakeSock) Write(p []byte) (int, error) {
	f.writes = append(f.writes, append([]byte(nil), p...))
	return len(p), nil
}

func TestSockConn_GathersWritesOnlyInABatch(t *testing.T) {
	data := make([]byte, 600<<10)
	for i := range data {
		data[i] = byte(i * 7)
	}
	f := &fakeSock{}
	s := &sockConn{Conn: f}

	// Outside a batch every write goes through.
	s.Write(data[:10])
	s.Write(data[10:20])
	if len(f.writes) != 2 {
		t.Fatalf("%d socket writes outside a batch, want 2", len(f.writes))
	}
	// In a batch, records are gathered into one write, split only at sockWriteMax.
	f.writes = nil
	s.beginBatch()
	var want []byte
	for off := 0; off < 300<<10; off += 16 << 10 {
		s.Write(data[off : off+16<<10])
		want = append(want, data[off:off+16<<10]...)
	}
	if err := s.endBatch(); err != nil {
		t.Fatal(err)
	}
	if len(f.writes) != 2 || !bytes.Equal(bytes.Join(f.writes, nil), want) {
		t.Fatalf("%d socket writes for 300 KiB in a batch, want 2 (256 KiB at most each) carrying the data in order", len(f.writes))
	}
}
