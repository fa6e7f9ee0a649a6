package hbone

import (
	"io"
	"testing"
)

func TestTunnel_EchoRoundTrip(t *testing.T) {
	e := newEnv(t)
	echo := echoServer(t)
	for _, tr := range transports {
		t.Run(tr.String(), func(t *testing.T) {
			c, err := e.dial(tr, echo)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := c.Write([]byte("hello")); err != nil {
				t.Fatal(err)
			}
			if err := c.CloseWrite(); err != nil {
				t.Fatal(err)
			}
			b, err := io.ReadAll(c)
			if err != nil {
				t.Fatal(err)
			}
			if string(b) != "hello" {
				t.Fatalf("got %q", b)
			}
			c.Close()
		})
	}
}
