package zds

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"
	"google.golang.org/protobuf/proto"

	"github.com/meshlite/meshlite/cni/zds/zdstest"
	pb "github.com/meshlite/meshlite/proto/zds"
)

// syncBuf is a goroutine-safe log sink.
type syncBuf struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuf) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuf) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

type fixture struct {
	srv  *Server
	logs *syncBuf
	path string
}

func start(t *testing.T, configure ...func(*Server)) *fixture {
	t.Helper()
	logs := &syncBuf{}
	path := filepath.Join(t.TempDir(), "run", "ztunnel.sock")
	srv := NewServer(path, slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug})))
	srv.HelloTimeout = 500 * time.Millisecond
	srv.AckTimeout = 500 * time.Millisecond
	for _, f := range configure {
		f(srv)
	}
	if err := srv.Listen(); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
		if t.Failed() {
			t.Logf("server log:\n%s", logs.String())
		}
	})
	return &fixture{srv: srv, logs: logs, path: path}
}

// netnsFile opens a network namespace to hand over: the test's own, which
// any process may open.
func netnsFile(t *testing.T) *os.File {
	t.Helper()
	f, err := os.Open("/proc/self/ns/net")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return f
}

func ino(t *testing.T, f *os.File) uint64 {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		t.Fatal(err)
	}
	return st.Ino
}

func info(name string) *pb.WorkloadInfo {
	return &pb.WorkloadInfo{Name: name, Namespace: "shop", ServiceAccount: "sa-" + name}
}

func next(t *testing.T, c *zdstest.Client) (*pb.WorkloadRequest, *os.File) {
	t.Helper()
	req, f, err := c.Next(3 * time.Second)
	if err != nil {
		t.Fatalf("read request: %v", err)
	}
	if f != nil {
		t.Cleanup(func() { f.Close() })
	}
	return req, f
}

func dial(t *testing.T, path string) *zdstest.Client {
	t.Helper()
	c, err := zdstest.Dial(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func waitHeld(t *testing.T, s *Server, uid string, want bool) {
	t.Helper()
	deadline := time.Now().Add(3 * time.Second)
	for s.Held(uid) != want {
		if time.Now().After(deadline) {
			t.Fatalf("Held(%s) stayed %v", uid, !want)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestServer_ReplaysSnapshotWithNetnsThenIncrementalChanges(t *testing.T) {
	fx := start(t)
	ns := netnsFile(t)
	want := ino(t, ns)
	if err := fx.srv.Add("uid-b", info("b"), ns); err != nil {
		t.Fatal(err)
	}
	if err := fx.srv.Add("uid-a", info("a"), ns); err != nil {
		t.Fatal(err)
	}
	if fx.srv.Held("uid-a") {
		t.Fatal("held with no ztunnel connected")
	}
	c := dial(t, fx.path)
	for _, uid := range []string{"uid-a", "uid-b"} { // sorted
		req, f := next(t, c)
		add := req.GetAdd()
		if add == nil || add.GetUid() != uid {
			t.Fatalf("want AddWorkload %s, got %v", uid, req)
		}
		if add.GetWorkloadInfo().GetServiceAccount() != "sa-"+uid[4:] || add.GetWorkloadInfo().GetNamespace() != "shop" {
			t.Errorf("workload info %v", add.GetWorkloadInfo())
		}
		if f == nil || ino(t, f) != want {
			t.Fatalf("AddWorkload %s without the pod's netns fd", uid)
		}
		if fx.srv.Held(uid) {
			t.Errorf("%s held before its Ack", uid)
		}
		if err := c.Ack(""); err != nil {
			t.Fatal(err)
		}
	}
	req, f := next(t, c)
	if req.GetSnapshotSent() == nil || f != nil {
		t.Fatalf("want SnapshotSent, got %v", req)
	}
	if err := c.Ack(""); err != nil {
		t.Fatal(err)
	}
	waitHeld(t, fx.srv, "uid-a", true)
	waitHeld(t, fx.srv, "uid-b", true)
	deadline := time.Now().Add(time.Second)
	for fx.srv.Connected() != 1 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if fx.srv.Connected() != 1 {
		t.Errorf("Connected() = %d", fx.srv.Connected())
	}

	// Incremental: a new pod, then a deletion.
	if err := fx.srv.Add("uid-c", info("c"), ns); err != nil {
		t.Fatal(err)
	}
	req, f = next(t, c)
	if req.GetAdd().GetUid() != "uid-c" || f == nil || ino(t, f) != want {
		t.Fatalf("want AddWorkload uid-c with fd, got %v", req)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	if err := fx.srv.WaitHeld(ctx, "uid-c"); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("WaitHeld before the Ack: %v", err)
	}
	cancel()
	waitc := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
		defer cancel()
		waitc <- fx.srv.WaitHeld(ctx, "uid-c")
	}()
	if err := c.Ack(""); err != nil {
		t.Fatal(err)
	}
	if err := <-waitc; err != nil {
		t.Errorf("WaitHeld after the Ack: %v", err)
	}
	fx.srv.Del("uid-a")
	req, _ = next(t, c)
	if req.GetDel().GetUid() != "uid-a" {
		t.Fatalf("want DelWorkload uid-a, got %v", req)
	}
	if err := c.Ack(""); err != nil {
		t.Fatal(err)
	}
	if fx.srv.Held("uid-a") || fx.srv.Known("uid-a") {
		t.Error("deleted pod still known")
	}
	if err := fx.srv.WaitHeld(context.Background(), "uid-a"); !errors.Is(err, ErrUnknown) {
		t.Errorf("WaitHeld of a deleted pod: %v", err)
	}

	// ztunnel restarts: nothing is held until the new connection acks its
	// snapshot, which has every remaining pod.
	c.Close()
	waitHeld(t, fx.srv, "uid-b", false)
	c2 := dial(t, fx.path)
	var got []string
	for {
		req, f := next(t, c2)
		if req.GetSnapshotSent() != nil {
			c2.Ack("")
			break
		}
		if f == nil {
			t.Errorf("replayed %v without fd", req)
		}
		got = append(got, req.GetAdd().GetUid())
		c2.Ack("")
	}
	if strings.Join(got, ",") != "uid-b,uid-c" {
		t.Errorf("replay after reconnect: %v", got)
	}
	waitHeld(t, fx.srv, "uid-c", true)
}

// A restarted agent re-finds its pods before a snapshot goes out: an early
// snapshot would name none of them, and ztunnel would drop them all.
func TestServer_SnapshotWaitsUntilSynced(t *testing.T) {
	synced := make(chan struct{})
	fx := start(t, func(s *Server) { s.Synced = synced })
	c := dial(t, fx.path)
	if req, _, err := c.Next(300 * time.Millisecond); err == nil {
		t.Fatalf("a snapshot request before the agent synced: %v", req)
	}
	if err := fx.srv.Add("uid-a", info("a"), netnsFile(t)); err != nil {
		t.Fatal(err)
	}
	close(synced)
	req, f := next(t, c)
	if req.GetAdd().GetUid() != "uid-a" || f == nil {
		t.Fatalf("want AddWorkload uid-a with its netns first, got %v", req)
	}
	c.Ack("")
	req, _ = next(t, c)
	if req.GetSnapshotSent() == nil {
		t.Fatalf("want SnapshotSent, got %v", req)
	}
	c.Ack("")
	waitHeld(t, fx.srv, "uid-a", true)
	if !strings.Contains(fx.logs.String(), "snapshot held until the agent knows") {
		t.Error("the held snapshot is not logged")
	}
}

func TestServer_KeepForPodsWithoutNetnsAndAckErrorsStayPending(t *testing.T) {
	fx := start(t)
	fx.srv.Keep("uid-k", info("k"))
	if err := fx.srv.Add("uid-x", info("x"), netnsFile(t)); err != nil {
		t.Fatal(err)
	}
	c := dial(t, fx.path)
	req, f := next(t, c)
	if req.GetKeep().GetUid() != "uid-k" || f != nil {
		t.Fatalf("want KeepWorkload uid-k without fd, got %v", req)
	}
	c.Ack("")
	req, _ = next(t, c)
	if req.GetAdd().GetUid() != "uid-x" {
		t.Fatalf("want AddWorkload uid-x, got %v", req)
	}
	c.Ack("netns has no lo")
	req, _ = next(t, c)
	if req.GetSnapshotSent() == nil {
		t.Fatalf("want SnapshotSent, got %v", req)
	}
	c.Ack("")
	waitHeld(t, fx.srv, "uid-k", true)
	time.Sleep(50 * time.Millisecond)
	if fx.srv.Held("uid-x") {
		t.Error("a pod ztunnel refused counts as held")
	}
	if !strings.Contains(fx.logs.String(), "netns has no lo") {
		t.Error("the refusal is not logged")
	}
	// The connection survives a refusal: a re-add goes through.
	if err := fx.srv.Add("uid-x", info("x"), netnsFile(t)); err != nil {
		t.Fatal(err)
	}
	req, _ = next(t, c)
	if req.GetAdd().GetUid() != "uid-x" {
		t.Fatalf("want AddWorkload uid-x again, got %v", req)
	}
	c.Ack("")
	waitHeld(t, fx.srv, "uid-x", true)
}

func TestServer_AddsGoToNewestConnectionDeletesToAll(t *testing.T) {
	fx := start(t)
	old := dial(t, fx.path)
	if req, _ := next(t, old); req.GetSnapshotSent() == nil {
		t.Fatalf("empty snapshot: got %v", req)
	}
	old.Ack("")
	newer := dial(t, fx.path)
	if req, _ := next(t, newer); req.GetSnapshotSent() == nil {
		t.Fatalf("empty snapshot: got %v", req)
	}
	newer.Ack("")
	deadline := time.Now().Add(time.Second)
	for fx.srv.Connected() != 2 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if err := fx.srv.Add("uid-1", info("p"), netnsFile(t)); err != nil {
		t.Fatal(err)
	}
	if req, _ := next(t, newer); req.GetAdd().GetUid() != "uid-1" {
		t.Fatalf("newest connection got %v", req)
	}
	newer.Ack("")
	if _, _, err := old.Next(200 * time.Millisecond); err == nil {
		t.Fatal("the older connection got the add too")
	}
	fx.srv.Del("uid-1")
	for _, c := range []*zdstest.Client{old, newer} {
		if req, _ := next(t, c); req.GetDel().GetUid() != "uid-1" {
			t.Fatalf("want DelWorkload on every connection, got %v", req)
		}
		c.Ack("")
	}
}

// Bad input from the socket ends that connection with a log line; the
// server keeps serving others.
func TestServer_MalformedInputClosesConnectionNotServer(t *testing.T) {
	fx := start(t)
	if err := fx.srv.Add("uid-1", info("p"), netnsFile(t)); err != nil {
		t.Fatal(err)
	}
	hello := func(v pb.Version) []byte {
		b, _ := proto.Marshal(&pb.ZdsHello{Version: v})
		return b
	}
	self, _ := os.Open("/proc/self/ns/net")
	defer self.Close()
	for _, tc := range []struct {
		name string
		send func(c *zdstest.Client) error
		log  string
	}{
		{"garbage hello", func(c *zdstest.Client) error { return c.SendRaw([]byte{0xff, 0xff, 0xff}, nil) }, "decode ZdsHello"},
		{"unknown version", func(c *zdstest.Client) error { return c.SendRaw(hello(7), nil) }, "this agent speaks V1"},
		// proto3 encodes version 0 as nothing, and an empty datagram reads as EOF.
		{"no version", func(c *zdstest.Client) error { return c.SendRaw(hello(pb.Version_NOT_USED), nil) }, "read ZdsHello"},
		{"oversized hello", func(c *zdstest.Client) error { return c.SendRaw(make([]byte, MaxMessage+10), nil) }, "longer than"},
		{"silence", func(c *zdstest.Client) error { return nil }, "read ZdsHello"},
		{"hello with fds", func(c *zdstest.Client) error {
			return c.SendRaw([]byte{0xff}, []int{int(self.Fd())})
		}, "decode ZdsHello"},
		{"answer that is not an Ack", func(c *zdstest.Client) error {
			if err := c.SendRaw(hello(pb.Version_V1), nil); err != nil {
				return err
			}
			if _, f, err := c.Next(time.Second); err != nil {
				return err
			} else if f != nil {
				f.Close()
			}
			return c.SendRaw([]byte{0x10, 0x01}, nil) // only an unknown field
		}, "without Ack"},
		{"unsolicited message", func(c *zdstest.Client) error {
			if err := c.SendRaw(hello(pb.Version_V1), nil); err != nil {
				return err
			}
			for {
				req, f, err := c.Next(time.Second)
				if err != nil {
					return err
				}
				if f != nil {
					f.Close()
				}
				if err := c.Ack(""); err != nil {
					return err
				}
				if req.GetSnapshotSent() != nil {
					break
				}
			}
			return c.Ack("")
		}, "no request outstanding"},
		{"no Ack", func(c *zdstest.Client) error { return c.SendRaw(hello(pb.Version_V1), nil) }, "no Ack from ztunnel"},
	} {
		before := strings.Count(fx.logs.String(), "ztunnel disconnected")
		c, err := zdstest.DialRaw(fx.path)
		if err != nil {
			t.Fatal(err)
		}
		if err := tc.send(c); err != nil {
			t.Fatalf("%s: %v", tc.name, err)
		}
		deadline := time.Now().Add(3 * time.Second)
		for strings.Count(fx.logs.String(), "ztunnel disconnected") == before && time.Now().Before(deadline) {
			time.Sleep(10 * time.Millisecond)
		}
		c.Close()
		if !strings.Contains(fx.logs.String(), tc.log) {
			t.Errorf("%s: log lacks %q:\n%s", tc.name, tc.log, fx.logs.String())
		}
		if fx.srv.Held("uid-1") {
			// "unsolicited" acked the pod before misbehaving; wait for the drop.
			waitHeld(t, fx.srv, "uid-1", false)
		}
	}
	// Still serving.
	h, err := zdstest.NewHolder(fx.path)
	if err != nil {
		t.Fatal(err)
	}
	h.Start()
	defer h.Close()
	waitHeld(t, fx.srv, "uid-1", true)
}

func TestServer_NoDescriptorLeaks(t *testing.T) {
	fx := start(t)
	ns := netnsFile(t)
	count := func() int {
		es, _ := os.ReadDir("/proc/self/fd")
		return len(es)
	}
	base := count()
	for i := 0; i < 20; i++ {
		if err := fx.srv.Add("uid", info("p"), ns); err != nil {
			t.Fatal(err)
		}
	}
	h, err := zdstest.NewHolder(fx.path)
	if err != nil {
		t.Fatal(err)
	}
	h.Start()
	waitHeld(t, fx.srv, "uid", true)
	h.Close()
	fx.srv.Del("uid")
	deadline := time.Now().Add(2 * time.Second)
	for count() > base && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	if n := count(); n > base {
		t.Errorf("%d descriptors open, %d before", n, base)
	}
}

func TestServer_ListenReplacesStaleSocketAndRunRemovesIt(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "ztunnel.sock")
	for i := 0; i < 2; i++ {
		srv := NewServer(path, slog.New(slog.DiscardHandler))
		if err := srv.Listen(); err != nil {
			t.Fatalf("listen %d: %v", i, err)
		}
		st, err := os.Stat(path)
		if err != nil || st.Mode().Perm() != 0o600 {
			t.Fatalf("socket mode %v, %v", st.Mode(), err)
		}
		if i == 0 {
			continue // leave it behind, as a crashed agent would
		}
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan error)
		go func() { done <- srv.Run(ctx) }()
		cancel()
		if err := <-done; err != nil {
			t.Fatal(err)
		}
		if _, err := os.Stat(path); !os.IsNotExist(err) {
			t.Errorf("socket left after Run: %v", err)
		}
	}
	if err := os.WriteFile(path, []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := NewServer(path, slog.New(slog.DiscardHandler)).Listen(); err == nil || !strings.Contains(err.Error(), "not a socket") {
		t.Errorf("Listen over a regular file: %v", err)
	}
}

func FuzzDecodeHello(f *testing.F) {
	b, _ := proto.Marshal(&pb.ZdsHello{Version: pb.Version_V1})
	f.Add(b)
	f.Add([]byte{0x08, 0x02})
	f.Fuzz(func(t *testing.T, b []byte) {
		h, err := DecodeHello(b)
		if err == nil && h.GetVersion() != pb.Version_V1 {
			t.Fatal("accepted a hello that is not V1")
		}
		if err != nil && !errors.Is(err, ErrProtocol) {
			t.Fatalf("error not marked as protocol error: %v", err)
		}
	})
}

func FuzzDecodeResponse(f *testing.F) {
	ok, _ := proto.Marshal(&pb.WorkloadResponse{Payload: &pb.WorkloadResponse_Ack{Ack: &pb.Ack{}}})
	bad, _ := proto.Marshal(&pb.WorkloadResponse{Payload: &pb.WorkloadResponse_Ack{Ack: &pb.Ack{Error: "no"}}})
	f.Add(ok)
	f.Add(bad)
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, b []byte) {
		_, err := DecodeResponse(b)
		if err != nil && !errors.Is(err, ErrProtocol) {
			t.Fatalf("error not marked as protocol error: %v", err)
		}
	})
}

// A restarting ztunnel's successor connects beside it: it is replayed every
// pod with its netns while the old connection keeps holding them, so the
// pods are held throughout; once the old one leaves, the new one holds
// them alone and gets the new pods.
func TestServer_SecondZtunnelGetsTheReplayWhileTheOldHolds(t *testing.T) {
	fx := start(t)
	if err := fx.srv.Add("uid-1", info("p"), netnsFile(t)); err != nil {
		t.Fatal(err)
	}
	old := dial(t, fx.path)
	if req, f := next(t, old); req.GetAdd().GetUid() != "uid-1" || f == nil {
		t.Fatalf("old ztunnel's snapshot: %v (netns %v)", req, f)
	}
	old.Ack("")
	if req, _ := next(t, old); req.GetSnapshotSent() == nil {
		t.Fatalf("want SnapshotSent, got %v", req)
	}
	old.Ack("")
	waitHeld(t, fx.srv, "uid-1", true)

	newer := dial(t, fx.path)
	req, f := next(t, newer)
	if req.GetAdd().GetUid() != "uid-1" || f == nil {
		t.Fatalf("successor's replay: %v (netns %v)", req, f)
	}
	if !fx.srv.Held("uid-1") {
		t.Fatal("the pod is not held while the successor takes it")
	}
	newer.Ack("")
	if req, _ := next(t, newer); req.GetSnapshotSent() == nil {
		t.Fatalf("want SnapshotSent, got %v", req)
	}
	newer.Ack("")
	old.Close()
	deadline := time.Now().Add(2 * time.Second)
	for fx.srv.Connected() != 1 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if !fx.srv.Held("uid-1") {
		t.Fatal("the pod is not held by the successor after the old ztunnel left")
	}
	if err := fx.srv.Add("uid-2", info("q"), netnsFile(t)); err != nil {
		t.Fatal(err)
	}
	if req, _ := next(t, newer); req.GetAdd().GetUid() != "uid-2" {
		t.Fatalf("successor got %v, want the new pod", req)
	}
	newer.Ack("")
	waitHeld(t, fx.srv, "uid-2", true)
}
