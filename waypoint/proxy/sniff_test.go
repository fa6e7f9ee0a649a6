package proxy

import (
	"bufio"
	"bytes"
	"net"
	"testing"
	"time"

	"github.com/meshlite/meshlite/proto/l7"
)

func sniffBytes(t testing.TB, data []byte, hint l7.Protocol) sniffed {
	p := &Proxy{cfg: Config{SniffTimeout: 200 * time.Millisecond}}
	a, b := net.Pipe()
	defer a.Close()
	go func() {
		b.Write(data)
		b.Close()
	}()
	return p.sniff(a, bufio.NewReaderSize(a, 4096), hint)
}

func TestSniff(t *testing.T) {
	cases := []struct {
		in   string
		hint l7.Protocol
		want sniffed
	}{
		{"GET / HTTP/1.1\r\n\r\n", 0, sniffH1},
		{"GET / HTTP/1.0\r\n\r\n", 0, sniffH1}, // shorter than the h2 preface
		{"M-SEARCH * HTTP/1.1\r\n", 0, sniffH1},
		{"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 0, sniffH2},
		{"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04", 0, sniffH2},
		{"\x16\x03\x01\x02\x00", 0, sniffTCP}, // TLS ClientHello
		{"SSH-2.0-OpenSSH\r\n", 0, sniffTCP},
		{"", 0, sniffTCP},                       // server-first protocol: nothing sent
		{"", l7.Protocol_HTTP, sniffTCP},        // nothing to parse either way
		{"\x00\x01", l7.Protocol_HTTP, sniffH1}, // HTTP port: let net/http answer 400
		{"GETTTTTTTTTTTTTTTTTTTTTTTT / HTTP/1.1", 0, sniffTCP},
	}
	for _, c := range cases {
		if got := sniffBytes(t, []byte(c.in), c.hint); got != c.want {
			t.Errorf("sniff(%q, %v) = %v, want %v", c.in, c.hint, got, c.want)
		}
	}
}

// FuzzSniff: any first bytes give an answer within the timeout, never a
// panic, and the HTTP/2 preface is always recognised.
//
//	go test ./waypoint/proxy -run '^$' -fuzz FuzzSniff -fuzztime 30s
func FuzzSniff(f *testing.F) {
	f.Add([]byte("GET / HTTP/1.1\r\n\r\n"))
	f.Add([]byte("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"))
	f.Add([]byte("PRI * HTTP/1.1\r\n"))
	f.Add([]byte{0x16, 0x03})
	f.Fuzz(func(t *testing.T, data []byte) {
		if len(data) > 256 {
			data = data[:256]
		}
		got := sniffBytes(t, data, 0)
		if bytes.HasPrefix(data, h2Preface) && got != sniffH2 {
			t.Fatalf("preface not recognised: %v", got)
		}
		if got == sniffH2 && !bytes.HasPrefix(data, h2Preface) {
			t.Fatalf("h2 without the preface")
		}
	})
}
