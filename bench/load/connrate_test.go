package load

import (
	"context"
	"io"
	"net"
	"testing"
	"time"
)

// A loopback echo server in the test's own namespace (/proc/self/ns/net:
// setns to where the thread already is).
func echoServer(t *testing.T, echo bool) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				if echo {
					io.Copy(c, c)
				}
			}()
		}
	}()
	return ln.Addr().String()
}

func TestConnRate_CountsEchoedConnections(t *testing.T) {
	addr := echoServer(t, true)
	rate, err := ConnRate(context.Background(), "/proc/self/ns/net", addr, 2, 300*time.Millisecond)
	if err != nil {
		t.Fatal(err)
	}
	if rate < 50 {
		t.Fatalf("%.0f connections/s on loopback: the loop is not opening new connections", rate)
	}
}

func TestConnRate_FailsWhenTheFarEndDoesNotAnswer(t *testing.T) {
	addr := echoServer(t, false) // accepts and closes: no echo
	if _, err := ConnRate(context.Background(), "/proc/self/ns/net", addr, 1, 200*time.Millisecond); err == nil {
		t.Fatal("no error though no connection was echoed")
	}
}
