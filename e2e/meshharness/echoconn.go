package meshharness

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"strings"
	"testing"
	"time"
)

// EchoConn is a raw TCP connection to an echo server's line-echo port
// (9090 of EchoPod) that says whether what it sends comes back.
type EchoConn struct{ net.Conn }

// RoundTrip sends msg as a line and checks that the same line comes back
// within 5 s.
func (c EchoConn) RoundTrip(msg string) error {
	c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.WriteString(c, msg+"\n"); err != nil {
		return fmt.Errorf("send: %w", err)
	}
	line, err := bufio.NewReader(io.LimitReader(c, int64(len(msg)+1))).ReadString('\n')
	if err != nil {
		return fmt.Errorf("read the echo: %w", err)
	}
	if strings.TrimSuffix(line, "\n") != msg {
		return fmt.Errorf("echoed %q, sent %q", line, msg)
	}
	return nil
}

// DialEcho opens a raw TCP connection from pod ns/name to addr, closed
// when the test ends.
func (e *Env) DialEcho(t testing.TB, ns, name, addr string) EchoConn {
	t.Helper()
	c, err := e.Sandbox.Dial(e.Ctx, ns, name, addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return EchoConn{c}
}
