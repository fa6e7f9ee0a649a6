package agentapi

import (
	"context"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

func inode(t *testing.T, f *os.File) uint64 {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		t.Fatal(err)
	}
	return st.Ino
}

// serve answers every request on a real SOCK_SEQPACKET socket with fn.
func serve(t *testing.T, fn func(*Request, *os.File) *Response) string {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "agent.sock")
	l, err := net.ListenUnix("unixpacket", &net.UnixAddr{Name: sock, Net: "unixpacket"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	go func() {
		for {
			c, err := l.AcceptUnix()
			if err != nil {
				return
			}
			req, ns, err := ReadRequest(c, time.Second)
			if err != nil {
				WriteResponse(c, &Response{Error: err.Error()})
			} else {
				WriteResponse(c, fn(req, ns))
				if ns != nil {
					ns.Close()
				}
			}
			c.Close()
		}
	}()
	return sock
}

func TestCall_PassesNetnsDescriptorAndGetsAnswer(t *testing.T) {
	self, err := os.Open("/proc/self/ns/net")
	if err != nil {
		t.Fatal(err)
	}
	defer self.Close()
	want := inode(t, self)
	gotIno := make(chan uint64, 1)
	sock := serve(t, func(r *Request, ns *os.File) *Response {
		if ns == nil {
			gotIno <- 0
		} else {
			gotIno <- inode(t, ns)
		}
		return &Response{State: StateHeld}
	})
	resp, err := Call(context.Background(), sock, &Request{Command: CmdAdd, PodNamespace: "a", PodName: "b", IPs: []string{"10.0.0.1"}}, self)
	if err != nil {
		t.Fatal(err)
	}
	if resp.State != StateHeld {
		t.Errorf("state %q", resp.State)
	}
	if g := <-gotIno; g != want {
		t.Errorf("agent got netns inode %d, want %d", g, want)
	}
}

func TestCall_InvalidRequestGetsClearError(t *testing.T) {
	sock := serve(t, func(*Request, *os.File) *Response { return &Response{State: StateHeld} })
	resp, err := Call(context.Background(), sock, &Request{Command: CmdAdd, PodName: "b", IPs: []string{"not-an-ip"}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(resp.Error, "namespace and name are required") || !strings.Contains(resp.Error, "not-an-ip") {
		t.Errorf("error %q does not say what is wrong", resp.Error)
	}
}

func TestCall_NoAgentFailsFast(t *testing.T) {
	start := time.Now()
	_, err := Call(context.Background(), filepath.Join(t.TempDir(), "none.sock"), &Request{Command: CmdStatus}, nil)
	if err == nil || !strings.Contains(err.Error(), "connect to the node agent") {
		t.Fatalf("err = %v", err)
	}
	if time.Since(start) > time.Second {
		t.Errorf("took %v", time.Since(start))
	}
}

func TestCall_HonoursContextWhileAgentIsSilent(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "slow.sock")
	l, err := net.ListenUnix("unixpacket", &net.UnixAddr{Name: sock, Net: "unixpacket"})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	go func() {
		c, err := l.AcceptUnix()
		if err == nil {
			time.Sleep(2 * time.Second)
			c.Close()
		}
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	start := time.Now()
	_, err = Call(ctx, sock, &Request{Command: CmdStatus}, nil)
	if err == nil || time.Since(start) > time.Second {
		t.Fatalf("err = %v after %v", err, time.Since(start))
	}
}

func TestDecodeRequest_Rejects(t *testing.T) {
	for _, tc := range []struct{ in, want string }{
		{`{`, "decode request"},
		{`{"command":"ADD","podNamespace":"a","podName":"b","extra":1}`, "unknown field"},
		{`{"command":"RUN"}`, "unknown command"},
		{`{"command":"DEL","podNamespace":"a"}`, "required"},
		{`{"command":"ADD","podNamespace":"a","podName":"b","timeoutMillis":-1}`, "out of range"},
		{`{"command":"ADD","podNamespace":"a","podName":"b\n"}`, "not printable"},
		{`{"command":"STATUS"} {}`, "trailing"},
	} {
		_, err := DecodeRequest([]byte(tc.in))
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("DecodeRequest(%s) = %v, want error with %q", tc.in, err, tc.want)
		}
	}
}

func FuzzDecodeRequest(f *testing.F) {
	f.Add([]byte(`{"command":"ADD","podNamespace":"a","podName":"b","podUID":"u","ips":["10.0.0.1"],"timeoutMillis":30000}`))
	f.Add([]byte(`{"command":"STATUS"}`))
	f.Add([]byte(`{"command":"DEL","podNamespace":"a","podName":"b","ips":["::1","x"]}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		r, err := DecodeRequest(b)
		if err != nil {
			return
		}
		if r.Validate() != nil {
			t.Fatal("decoded request does not validate")
		}
		if _, err := r.PodIPs(); err != nil {
			t.Fatal(err)
		}
	})
}

func FuzzDecodeResponse(f *testing.F) {
	f.Add([]byte(`{"state":"held"}`))
	f.Add([]byte(`{"error":"x"}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		r, err := DecodeResponse(b)
		if err == nil && r.State == "" && r.Error == "" {
			t.Fatal("empty response accepted")
		}
	})
}
