package inpod

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
	"google.golang.org/protobuf/proto"

	"github.com/meshlite/meshlite/proto/zds"
	"github.com/meshlite/meshlite/ztunnel/podnet"
)

// recorder is a Server that records what it was given.
type recorder struct {
	mu      sync.Mutex
	serving map[string]*Sockets
	stopped map[string]int
	refuse  map[string]bool
}

func newRecorder() *recorder {
	return &recorder{serving: map[string]*Sockets{}, stopped: map[string]int{}, refuse: map[string]bool{}}
}

func (r *recorder) Prepare(ctx context.Context, p Pod) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.refuse[p.UID] {
		return fmt.Errorf("no certificate for %s", p.UID)
	}
	return nil
}

func (r *recorder) Serve(ctx context.Context, p Pod, s *Sockets) {
	r.mu.Lock()
	r.serving[p.UID] = s
	r.mu.Unlock()
	<-ctx.Done()
	r.mu.Lock()
	delete(r.serving, p.UID)
	r.stopped[p.UID]++
	r.mu.Unlock()
}

func (r *recorder) get(uid string) *Sockets {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.serving[uid]
}

func newNetns(t *testing.T, suffix string) *os.File {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Fatal("needs root (network namespaces): run the tests as root, as make test and CI do")
	}
	name := fmt.Sprintf("zt-test-%d-%s", os.Getpid()%100000, suffix)
	if out, err := exec.Command("ip", "netns", "add", name).CombinedOutput(); err != nil {
		t.Fatalf("ip netns add: %v %s", err, out)
	}
	t.Cleanup(func() { exec.Command("ip", "netns", "del", name).Run() })
	if out, err := exec.Command("ip", "netns", "exec", name, "ip", "link", "set", "lo", "up").CombinedOutput(); err != nil {
		t.Fatalf("lo up: %v %s", err, out)
	}
	f, err := os.Open("/var/run/netns/" + name)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return f
}

// agent is a minimal ZDS server: it accepts one connection at a time.
type agent struct {
	t    *testing.T
	ln   *net.UnixListener
	path string
}

func newAgent(t *testing.T) *agent {
	path := filepath.Join(t.TempDir(), "ztunnel.sock")
	ln, err := net.ListenUnix("unixpacket", &net.UnixAddr{Name: path, Net: "unixpacket"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	return &agent{t: t, ln: ln, path: path}
}

func (a *agent) accept() *net.UnixConn {
	a.t.Helper()
	a.ln.SetDeadline(time.Now().Add(10 * time.Second))
	c, err := a.ln.AcceptUnix()
	if err != nil {
		a.t.Fatal(err)
	}
	a.t.Cleanup(func() { c.Close() })
	buf := make([]byte, 1024)
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	n, _, _, _, err := c.ReadMsgUnix(buf, nil)
	if err != nil {
		a.t.Fatal(err)
	}
	var h zds.ZdsHello
	if err := proto.Unmarshal(buf[:n], &h); err != nil || h.GetVersion() != zds.Version_V1 {
		a.t.Fatalf("hello = %v, %v", &h, err)
	}
	return c
}

// send writes raw bytes with fds and returns the Ack's error string.
func sendRaw(t *testing.T, c *net.UnixConn, b []byte, fds ...*os.File) string {
	t.Helper()
	var oob []byte
	if len(fds) > 0 {
		ints := make([]int, len(fds))
		for i, f := range fds {
			ints[i] = int(f.Fd())
		}
		oob = unix.UnixRights(ints...)
	}
	if _, _, err := c.WriteMsgUnix(b, oob, nil); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 4096)
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	n, _, _, _, err := c.ReadMsgUnix(buf, nil)
	if err != nil {
		t.Fatalf("read Ack: %v", err)
	}
	var r zds.WorkloadResponse
	if err := proto.Unmarshal(buf[:n], &r); err != nil || r.GetAck() == nil {
		t.Fatalf("response %v, %v", &r, err)
	}
	return r.GetAck().GetError()
}

func send(t *testing.T, c *net.UnixConn, req *zds.WorkloadRequest, fds ...*os.File) string {
	t.Helper()
	b, err := proto.Marshal(req)
	if err != nil {
		t.Fatal(err)
	}
	return sendRaw(t, c, b, fds...)
}

func addReq(uid string) *zds.WorkloadRequest {
	return &zds.WorkloadRequest{Payload: &zds.WorkloadRequest_Add{Add: &zds.AddWorkload{Uid: uid,
		WorkloadInfo: &zds.WorkloadInfo{Name: "p", Namespace: "default", ServiceAccount: "sa"}}}}
}
func delReq(uid string) *zds.WorkloadRequest {
	return &zds.WorkloadRequest{Payload: &zds.WorkloadRequest_Del{Del: &zds.DelWorkload{Uid: uid}}}
}
func keepReq(uid string) *zds.WorkloadRequest {
	return &zds.WorkloadRequest{Payload: &zds.WorkloadRequest_Keep{Keep: &zds.KeepWorkload{Uid: uid}}}
}
func snapReq() *zds.WorkloadRequest {
	return &zds.WorkloadRequest{Payload: &zds.WorkloadRequest_SnapshotSent{SnapshotSent: &zds.SnapshotSent{}}}
}

func startClient(t *testing.T, a *agent, srv Server) *Client {
	t.Helper()
	c, err := New(Config{Socket: a.path, Server: srv, Log: slog.New(slog.DiscardHandler), MinBackoff: 20 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { c.Run(ctx); close(done) }()
	t.Cleanup(func() { cancel(); <-done })
	return c
}

// listening reports whether TCP port on loopback accepts in ns.
func listening(t *testing.T, nsf *os.File, port int) bool {
	t.Helper()
	f, err := os.Open(fmt.Sprintf("/proc/self/fd/%d", nsf.Fd()))
	if err != nil {
		t.Fatal(err)
	}
	ns, err := podnet.FromFile(f)
	if err != nil {
		t.Fatal(err)
	}
	defer ns.Close()
	var c net.Conn
	err = ns.Do(func() (err error) {
		c, err = net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", port), time.Second)
		return
	})
	if err != nil {
		return false
	}
	c.Close()
	return true
}

func TestClient_AddServesSocketsInPodNetnsAndDelClosesThem(t *testing.T) {
	nsf := newNetns(t, "a")
	a := newAgent(t)
	rec := newRecorder()
	startClient(t, a, rec)
	conn := a.accept()

	if e := send(t, conn, addReq("uid-a"), nsf); e != "" {
		t.Fatalf("Add refused: %s", e)
	}
	if e := send(t, conn, snapReq()); e != "" {
		t.Fatalf("SnapshotSent: %s", e)
	}
	waitFor(t, func() bool { return rec.get("uid-a") != nil })
	s := rec.get("uid-a")
	for _, port := range []int{PortOutbound, PortPlaintext, PortHBONE, PortDNS} {
		if !listening(t, nsf, port) {
			t.Errorf("port %d not listening in the pod netns", port)
		}
	}
	// Every socket carries ztunnel's mark.
	for name, fd := range map[string]func() (int, error){
		"15001": rawMark(s.Outbound), "15006": rawMark(s.Plaintext), "15008": rawMark(s.HBONE),
		"15008/udp": rawMark(s.HBONEUDP), "15053": rawMark(s.DNSTCP), "15053/udp": rawMark(s.DNSUDP),
	} {
		m, err := fd()
		if err != nil || m != podnet.Mark {
			t.Errorf("socket %s mark %#x, %v", name, m, err)
		}
	}
	// The sockets are not in this (the test's) netns.
	if c, err := net.DialTimeout("tcp", "127.0.0.1:15001", 200*time.Millisecond); err == nil {
		c.Close()
		t.Error("15001 reachable in the host netns")
	}

	if e := send(t, conn, delReq("uid-a")); e != "" {
		t.Fatalf("Del: %s", e)
	}
	if listening(t, nsf, PortOutbound) {
		t.Fatal("15001 still listening after DelWorkload")
	}
	rec.mu.Lock()
	stopped := rec.stopped["uid-a"]
	rec.mu.Unlock()
	if stopped != 1 {
		t.Fatalf("Serve stopped %d times", stopped)
	}
	// Deleting again is fine.
	if e := send(t, conn, delReq("uid-a")); e != "" {
		t.Fatalf("second Del: %s", e)
	}
}

func rawMark(c syscall.Conn) func() (int, error) {
	return func() (int, error) {
		rc, err := c.SyscallConn()
		if err != nil {
			return 0, err
		}
		var m int
		var serr error
		if err := rc.Control(func(fd uintptr) { m, serr = unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_MARK) }); err != nil {
			return 0, err
		}
		return m, serr
	}
}

func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal("condition not met in time")
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func TestClient_ReconnectSnapshotKeepsAndDrops(t *testing.T) {
	nsA, nsB := newNetns(t, "ka"), newNetns(t, "kb")
	a := newAgent(t)
	rec := newRecorder()
	cl := startClient(t, a, rec)
	conn := a.accept()
	for uid, f := range map[string]*os.File{"uid-a": nsA, "uid-b": nsB} {
		if e := send(t, conn, addReq(uid), f); e != "" {
			t.Fatalf("Add %s: %s", uid, e)
		}
	}
	send(t, conn, snapReq())
	waitFor(t, func() bool { return rec.get("uid-a") != nil && rec.get("uid-b") != nil })
	sockA := rec.get("uid-a")

	// The agent restarts: the new connection keeps a, re-adds nothing else.
	conn.Close()
	conn = a.accept()
	if e := send(t, conn, keepReq("uid-a")); e != "" {
		t.Fatalf("Keep: %s", e)
	}
	if e := send(t, conn, keepReq("uid-unknown")); e == "" {
		t.Fatal("Keep of an unknown pod accepted")
	}
	send(t, conn, snapReq())
	waitFor(t, func() bool { return rec.get("uid-b") == nil })
	if rec.get("uid-a") != sockA || !listening(t, nsA, PortOutbound) {
		t.Fatal("kept pod lost its sockets")
	}
	if listening(t, nsB, PortOutbound) {
		t.Fatal("dropped pod still listening")
	}
	if e := send(t, conn, keepReq("uid-a")); e == "" {
		t.Fatal("Keep after SnapshotSent accepted")
	}
	// A re-add with the same netns keeps the same sockets.
	if e := send(t, conn, addReq("uid-a"), nsA); e != "" {
		t.Fatalf("re-add: %s", e)
	}
	if rec.get("uid-a") != sockA {
		t.Fatal("re-add with the same netns replaced the sockets")
	}
	if got := cl.Pods(); len(got) != 1 || got[0] != "uid-a" {
		t.Fatalf("pods = %v", got)
	}
}

func TestClient_RefusesMalformedAndKeepsServing(t *testing.T) {
	nsA := newNetns(t, "m")
	a := newAgent(t)
	rec := newRecorder()
	rec.refuse["uid-refused"] = true
	startClient(t, a, rec)
	conn := a.accept()
	regular, err := os.Open("/proc/self/status")
	if err != nil {
		t.Fatal(err)
	}
	defer regular.Close()
	tests := []struct {
		name string
		b    []byte
		fds  []*os.File
	}{
		{"garbage", []byte{0xff, 0xff, 0xff}, nil},
		// A zero-length datagram reads as EOF on SEQPACKET, so "no payload"
		// is sent as a request carrying only an unknown field (4).
		{"request without payload", []byte{0x22, 0x00}, nil},
		{"add without fd", mustMarshal(t, addReq("uid-x")), nil},
		{"add with two fds", mustMarshal(t, addReq("uid-x")), []*os.File{nsA, nsA}},
		{"add without uid", mustMarshal(t, addReq("")), []*os.File{nsA}},
		{"add with a non-netns fd", mustMarshal(t, addReq("uid-x")), []*os.File{regular}},
		{"fd on a del", mustMarshal(t, delReq("uid-x")), []*os.File{nsA}},
		{"del without uid", mustMarshal(t, delReq("")), nil},
		{"server refuses pod", mustMarshal(t, addReq("uid-refused")), []*os.File{nsA}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if e := sendRaw(t, conn, tt.b, tt.fds...); e == "" {
				t.Fatal("accepted")
			}
		})
	}
	// The refused pod opened nothing.
	if listening(t, nsA, PortOutbound) {
		t.Fatal("refused pod got sockets")
	}
	// The connection still works.
	if e := send(t, conn, addReq("uid-a"), nsA); e != "" {
		t.Fatalf("Add after bad input: %s", e)
	}
	waitFor(t, func() bool { return rec.get("uid-a") != nil })
}

func mustMarshal(t *testing.T, m proto.Message) []byte {
	b, err := proto.Marshal(m)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// FuzzHandle feeds arbitrary datagrams to the message handler.
func FuzzHandle(f *testing.F) {
	for _, r := range []*zds.WorkloadRequest{addReq("u"), delReq("u"), keepReq("u"), snapReq(), {}} {
		b, _ := proto.Marshal(r)
		f.Add(b)
	}
	f.Add([]byte{0x0a, 0x80})
	rec := newRecorder()
	c, err := New(Config{Server: rec, Log: slog.New(slog.DiscardHandler),
		open: func(context.Context, *podnet.NS) (*Sockets, error) { return nil, fmt.Errorf("not in fuzz") }})
	if err != nil {
		f.Fatal(err)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		c.snapshot = map[string]struct{}{}
		r := c.handle(context.Background(), b, nil, 0)
		if r.GetAck() == nil {
			t.Fatal("no Ack")
		}
	})
}

// A successor's sockets open beside a predecessor's, except QUIC's: a UDP
// socket shared by SO_REUSEPORT would get part of the predecessor's QUIC
// flows (the kernel hashes datagrams over the group), so the successor
// binds it only once the predecessor has let it go.
func TestOpenSockets_QUICSocketIsExclusiveTheRestShared(t *testing.T) {
	nsf := newNetns(t, "q")
	open := func() *Sockets {
		t.Helper()
		dup, err := os.Open(nsf.Name())
		if err != nil {
			t.Fatal(err)
		}
		ns, err := podnet.FromFile(dup)
		if err != nil {
			t.Fatal(err)
		}
		s, err := OpenSockets(context.Background(), ns)
		if err != nil {
			ns.Close()
			t.Fatalf("open sockets: %v", err)
		}
		t.Cleanup(func() { s.Close() })
		return s
	}
	old := open()
	if old.HBONEUDP == nil {
		t.Fatal("the first ztunnel got no QUIC socket")
	}
	succ := open()
	if succ.Outbound == nil || succ.HBONE == nil || succ.DNSUDP == nil {
		t.Fatalf("successor's shared sockets missing: %+v", succ)
	}
	if succ.HBONEUDP != nil {
		t.Fatal("successor bound the QUIC socket while the predecessor holds it")
	}
	if _, err := ListenHBONEUDP(context.Background(), succ.NS); !errors.Is(err, unix.EADDRINUSE) {
		t.Fatalf("binding QUIC beside the predecessor: %v, want EADDRINUSE", err)
	}
	old.HBONEUDP.Close()
	udp, err := ListenHBONEUDP(context.Background(), succ.NS)
	if err != nil {
		t.Fatalf("binding QUIC once the predecessor let it go: %v", err)
	}
	udp.Close()
}
