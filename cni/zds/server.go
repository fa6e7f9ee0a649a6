package zds

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
	"golang.org/x/time/rate"

	pb "github.com/meshlite/meshlite/proto/zds"
)

// DefaultSocket is where ztunnel looks for the agent.
const DefaultSocket = "/var/run/ztunnel/ztunnel.sock"

// ErrUnknown is returned by WaitHeld for a pod that is not registered (or
// was removed while waiting).
var ErrUnknown = errors.New("pod not registered with ZDS")

// Server is the ZDS server.
type Server struct {
	path string
	log  *slog.Logger
	// HelloTimeout bounds the wait for ZdsHello; AckTimeout the wait for
	// each Ack. Past either the connection is closed.
	HelloTimeout time.Duration
	AckTimeout   time.Duration
	// Synced, when set, holds every snapshot until it is closed: a
	// snapshot is the whole truth (ztunnel drops each pod it does not
	// name), so an agent that has not yet re-found the node's enrolled
	// pods after a restart must not send one.
	Synced <-chan struct{}

	mu        sync.Mutex
	ln        *net.UnixListener
	workloads map[string]*workload
	conns     []*conn // in accept order; adds go to the last
	changed   chan struct{}
	gen       uint64
	connID    uint64
}

type workload struct {
	info  *pb.WorkloadInfo
	netns *os.File // the server's own descriptor; nil: KeepWorkload only
	gen   uint64
}

type op struct {
	del bool
	uid string
}

type conn struct {
	id  uint64
	uc  *net.UnixConn
	log *slog.Logger

	// Guarded by Server.mu.
	captured bool              // the snapshot was taken; later changes are queued
	ready    bool              // SnapshotSent was acked
	held     map[string]uint64 // uid -> generation ztunnel acked
	queue    []op

	wake    chan struct{}
	dead    chan struct{} // closed by the reader when the connection fails
	resp    chan string   // the reader hands Acks to the writer
	waiting atomic.Bool   // a request awaits its Ack
	readErr error
}

// NewServer returns a server for the socket at path (DefaultSocket if
// empty). Call Listen, then Run.
func NewServer(path string, log *slog.Logger) *Server {
	if path == "" {
		path = DefaultSocket
	}
	return &Server{
		path: path, log: log.With("part", "zds", "socket", path),
		HelloTimeout: 5 * time.Second, AckTimeout: 5 * time.Second,
		workloads: map[string]*workload{}, changed: make(chan struct{}),
	}
}

// Path is the socket's path.
func (s *Server) Path() string { return s.path }

// Listen creates the socket (replacing a stale one), readable only by root:
// whoever connects gets every enrolled pod's network namespace.
func (s *Server) Listen() error {
	if err := os.MkdirAll(filepath.Dir(s.path), 0o755); err != nil {
		return fmt.Errorf("create ZDS socket dir: %w", err)
	}
	if st, err := os.Lstat(s.path); err == nil {
		if st.Mode()&fs.ModeSocket == 0 {
			return fmt.Errorf("ZDS socket path %s exists and is not a socket", s.path)
		}
		if err := os.Remove(s.path); err != nil {
			return fmt.Errorf("remove stale ZDS socket: %w", err)
		}
	}
	ln, err := net.ListenUnix("unixpacket", &net.UnixAddr{Name: s.path, Net: "unixpacket"})
	if err != nil {
		return fmt.Errorf("listen on ZDS socket %s: %w", s.path, err)
	}
	ln.SetUnlinkOnClose(true)
	if err := os.Chmod(s.path, 0o600); err != nil {
		ln.Close()
		return fmt.Errorf("restrict ZDS socket: %w", err)
	}
	s.mu.Lock()
	s.ln = ln
	s.mu.Unlock()
	s.log.Info("ZDS server listening")
	return nil
}

// Run accepts ztunnel connections until ctx ends, then closes them all and
// removes the socket.
func (s *Server) Run(ctx context.Context) error {
	s.mu.Lock()
	ln := s.ln
	s.mu.Unlock()
	if ln == nil {
		return errors.New("zds: Run before Listen")
	}
	var wg sync.WaitGroup
	shutdown := func() {
		ln.Close() // also removes the socket file
		s.mu.Lock()
		for _, c := range s.conns {
			c.uc.Close()
		}
		s.mu.Unlock()
	}
	defer func() {
		shutdown()
		wg.Wait()
	}()
	stop := context.AfterFunc(ctx, shutdown)
	defer stop()
	// A ztunnel stuck reconnecting in a loop must not eat the agent.
	limit := rate.NewLimiter(rate.Limit(5), 5)
	for {
		if err := limit.Wait(ctx); err != nil {
			return nil
		}
		uc, err := ln.AcceptUnix()
		if err != nil {
			if ctx.Err() != nil || errors.Is(err, net.ErrClosed) {
				return nil
			}
			s.log.Error("accept ZDS connection", "err", err)
			continue
		}
		c := s.addConn(uc)
		if ctx.Err() != nil {
			uc.Close()
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			s.serve(ctx, c)
		}()
	}
}

func (s *Server) addConn(uc *net.UnixConn) *conn {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.connID++
	c := &conn{
		id: s.connID, uc: uc, log: s.log.With("conn", s.connID),
		held: map[string]uint64{}, wake: make(chan struct{}, 1),
		dead: make(chan struct{}), resp: make(chan string, 1),
	}
	s.conns = append(s.conns, c)
	c.log.Info("ztunnel connected", "connections", len(s.conns))
	return c
}

func (s *Server) removeConn(c *conn) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for i, x := range s.conns {
		if x == c {
			s.conns = append(s.conns[:i], s.conns[i+1:]...)
			break
		}
	}
	s.signalLocked()
	c.log.Info("ztunnel disconnected", "connections", len(s.conns), "held", len(c.held))
}

// signalLocked wakes every WaitHeld.
func (s *Server) signalLocked() {
	close(s.changed)
	s.changed = make(chan struct{})
}

func (c *conn) poke() {
	select {
	case c.wake <- struct{}{}:
	default:
	}
}

func dup(f *os.File) (*os.File, error) {
	fd, err := unix.FcntlInt(f.Fd(), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("duplicate netns descriptor: %w", err)
	}
	return os.NewFile(uintptr(fd), f.Name()), nil
}

// Add registers (or re-registers, with a new netns) an enrolled pod and
// sends AddWorkload to the newest ztunnel connection. The server keeps its
// own duplicate of netns; the caller keeps ownership of netns.
func (s *Server) Add(uid string, info *pb.WorkloadInfo, netns *os.File) error {
	if uid == "" || netns == nil {
		return errors.New("zds: Add needs a uid and a netns")
	}
	own, err := dup(netns)
	if err != nil {
		return err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.putLocked(uid, info, own)
	if n := len(s.conns); n > 0 {
		c := s.conns[n-1]
		if c.captured {
			c.queue = append(c.queue, op{uid: uid})
			c.poke()
		}
	}
	return nil
}

// Keep registers a pod whose netns the agent cannot open (it was enrolled
// before an agent restart): a new ztunnel connection is told to keep it.
func (s *Server) Keep(uid string, info *pb.WorkloadInfo) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if w, ok := s.workloads[uid]; ok && w.netns != nil {
		return
	}
	s.putLocked(uid, info, nil)
}

func (s *Server) putLocked(uid string, info *pb.WorkloadInfo, netns *os.File) {
	if old, ok := s.workloads[uid]; ok && old.netns != nil {
		old.netns.Close()
	}
	s.gen++
	s.workloads[uid] = &workload{info: info, netns: netns, gen: s.gen}
	s.signalLocked()
}

// Del unregisters a pod and sends DelWorkload to every connection that may
// know it. Unknown pods are ignored.
func (s *Server) Del(uid string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	w, ok := s.workloads[uid]
	if !ok {
		return
	}
	delete(s.workloads, uid)
	if w.netns != nil {
		w.netns.Close()
	}
	for _, c := range s.conns {
		delete(c.held, uid)
		if c.captured {
			c.queue = append(c.queue, op{del: true, uid: uid})
			c.poke()
		}
	}
	s.signalLocked()
}

// Known reports whether uid is registered.
func (s *Server) Known(uid string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	_, ok := s.workloads[uid]
	return ok
}

// Held reports whether a live connection acked the pod's current netns.
func (s *Server) Held(uid string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.heldLocked(uid)
}

func (s *Server) heldLocked(uid string) bool {
	w, ok := s.workloads[uid]
	if !ok {
		return false
	}
	for _, c := range s.conns {
		if g, ok := c.held[uid]; ok && g == w.gen {
			return true
		}
	}
	return false
}

// WaitHeld waits until the pod is held, it is unregistered (ErrUnknown) or
// ctx ends.
func (s *Server) WaitHeld(ctx context.Context, uid string) error {
	for {
		s.mu.Lock()
		_, known := s.workloads[uid]
		held := s.heldLocked(uid)
		ch := s.changed
		s.mu.Unlock()
		if held {
			return nil
		}
		if !known {
			return ErrUnknown
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-ch:
		}
	}
}

// Changed returns a channel closed at the next change of who holds what.
func (s *Server) Changed() <-chan struct{} {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.changed
}

// Connected counts connections that completed their snapshot.
func (s *Server) Connected() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	n := 0
	for _, c := range s.conns {
		if c.ready {
			n++
		}
	}
	return n
}

// serve runs one connection: hello, snapshot, then queued changes.
func (s *Server) serve(ctx context.Context, c *conn) {
	defer s.removeConn(c)
	defer c.uc.Close()
	if err := s.readHello(c); err != nil {
		c.log.Error("ZDS handshake failed; closing", "err", err)
		return
	}
	readerDone := make(chan struct{})
	go func() {
		defer close(readerDone)
		c.read()
	}()
	defer func() {
		c.uc.Close()
		<-readerDone
	}()
	if s.Synced != nil {
		select {
		case <-s.Synced:
		default:
			c.log.Info("snapshot held until the agent knows the node's enrolled pods")
			select {
			case <-s.Synced:
			case <-ctx.Done():
				return
			case <-c.dead:
				s.logReadEnd(c)
				return
			}
		}
	}
	if err := s.snapshot(ctx, c); err != nil {
		c.log.Error("ZDS snapshot failed; closing", "err", err)
		return
	}
	for {
		select {
		case <-ctx.Done():
			return
		case <-c.dead:
			s.logReadEnd(c)
			return
		case <-c.wake:
		}
		for {
			s.mu.Lock()
			if len(c.queue) == 0 {
				s.mu.Unlock()
				break
			}
			o := c.queue[0]
			c.queue = c.queue[1:]
			s.mu.Unlock()
			if err := s.apply(ctx, c, o); err != nil {
				c.log.Error("ZDS update failed; closing", "uid", o.uid, "err", err)
				return
			}
		}
	}
}

func (s *Server) logReadEnd(c *conn) {
	if errors.Is(c.readErr, ErrProtocol) {
		c.log.Error("ztunnel broke the ZDS protocol; closing", "err", c.readErr)
	} else {
		c.log.Info("ZDS connection closed by ztunnel", "err", c.readErr)
	}
}

func (s *Server) readHello(c *conn) error {
	if err := c.uc.SetReadDeadline(time.Now().Add(s.HelloTimeout)); err != nil {
		return err
	}
	buf := make([]byte, MaxMessage)
	oob := make([]byte, unix.CmsgSpace(4*4))
	n, oobn, flags, _, err := c.uc.ReadMsgUnix(buf, oob)
	closeRights(oob[:oobn])
	if err != nil {
		return fmt.Errorf("read ZdsHello: %w", err)
	}
	if err := checkFlags(n, flags); err != nil {
		return err
	}
	h, err := DecodeHello(buf[:n])
	if err != nil {
		return err
	}
	c.log.Info("ztunnel said hello", "version", h.GetVersion().String())
	return c.uc.SetReadDeadline(time.Time{})
}

// read hands each Ack to the writer and ends the connection on anything
// else: an unsolicited message, garbage, or EOF.
func (c *conn) read() {
	buf := make([]byte, MaxMessage)
	oob := make([]byte, unix.CmsgSpace(4*4))
	for {
		n, oobn, flags, _, err := c.uc.ReadMsgUnix(buf, oob)
		closeRights(oob[:oobn])
		if err == nil && n == 0 && flags == 0 {
			err = errors.New("EOF")
		}
		if err == nil {
			err = checkFlags(n, flags)
		}
		if err == nil && !c.waiting.CompareAndSwap(true, false) {
			err = protoErr("message from ztunnel with no request outstanding")
		}
		var ackErr string
		if err == nil {
			ackErr, err = DecodeResponse(buf[:n])
		}
		if err != nil {
			c.readErr = err
			close(c.dead)
			return
		}
		c.resp <- ackErr
	}
}

// send writes one request (with fd, if any) and waits for its Ack. A
// returned error means the connection is unusable.
func (s *Server) send(ctx context.Context, c *conn, req *pb.WorkloadRequest, fd *os.File) (string, error) {
	b, err := encode(req)
	if err != nil {
		return "", err
	}
	var oob []byte
	if fd != nil {
		oob = unix.UnixRights(int(fd.Fd()))
	}
	c.waiting.Store(true)
	if err := c.uc.SetWriteDeadline(time.Now().Add(s.AckTimeout)); err != nil {
		return "", err
	}
	if _, _, err := c.uc.WriteMsgUnix(b, oob, nil); err != nil {
		return "", fmt.Errorf("send to ztunnel: %w", err)
	}
	t := time.NewTimer(s.AckTimeout)
	defer t.Stop()
	select {
	case a := <-c.resp:
		return a, nil
	case <-c.dead:
		return "", fmt.Errorf("waiting for Ack: %w", c.readErr)
	case <-t.C:
		return "", fmt.Errorf("no Ack from ztunnel within %v", s.AckTimeout)
	case <-ctx.Done():
		return "", ctx.Err()
	}
}

type snapItem struct {
	uid   string
	info  *pb.WorkloadInfo
	netns *os.File // a duplicate for this send, or nil for Keep
	gen   uint64
}

func (s *Server) snapshot(ctx context.Context, c *conn) error {
	s.mu.Lock()
	c.captured = true
	c.queue = nil
	items := make([]snapItem, 0, len(s.workloads))
	var dupErr error
	for uid, w := range s.workloads {
		it := snapItem{uid: uid, info: w.info, gen: w.gen}
		if w.netns != nil {
			if it.netns, dupErr = dup(w.netns); dupErr != nil {
				break
			}
		}
		items = append(items, it)
	}
	s.mu.Unlock()
	defer func() {
		for _, it := range items {
			if it.netns != nil {
				it.netns.Close()
			}
		}
	}()
	if dupErr != nil {
		return dupErr
	}
	sort.Slice(items, func(i, j int) bool { return items[i].uid < items[j].uid })
	for _, it := range items {
		log := c.log.With("uid", it.uid, "pod", podName(it.info))
		req := keepRequest(it.uid)
		if it.netns != nil {
			req = addRequest(it.uid, it.info)
		}
		ackErr, err := s.send(ctx, c, req, it.netns)
		if err != nil {
			return err
		}
		if ackErr != "" {
			log.Error("ztunnel refused pod in snapshot; it stays pending", "ack_error", ackErr)
			continue
		}
		s.markHeld(c, it.uid, it.gen)
		log.Debug("pod sent in snapshot", "keep", it.netns == nil)
	}
	ackErr, err := s.send(ctx, c, snapshotSentRequest(), nil)
	if err != nil {
		return err
	}
	if ackErr != "" {
		c.log.Error("ztunnel answered SnapshotSent with an error", "ack_error", ackErr)
	}
	s.mu.Lock()
	c.ready = true
	s.signalLocked()
	s.mu.Unlock()
	c.log.Info("ZDS snapshot sent", "pods", len(items))
	return nil
}

func (s *Server) markHeld(c *conn, uid string, gen uint64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if w, ok := s.workloads[uid]; ok && w.gen == gen {
		c.held[uid] = gen
		s.signalLocked()
	}
}

// apply sends one queued change.
func (s *Server) apply(ctx context.Context, c *conn, o op) error {
	if o.del {
		ackErr, err := s.send(ctx, c, delRequest(o.uid), nil)
		if err != nil {
			return err
		}
		if ackErr != "" {
			c.log.Warn("ztunnel answered DelWorkload with an error", "uid", o.uid, "ack_error", ackErr)
		} else {
			c.log.Debug("pod removed from ztunnel", "uid", o.uid)
		}
		return nil
	}
	s.mu.Lock()
	w, ok := s.workloads[o.uid]
	var fd *os.File
	var info *pb.WorkloadInfo
	var gen uint64
	var err error
	if ok {
		info, gen = w.info, w.gen
		if w.netns != nil {
			fd, err = dup(w.netns)
		}
	}
	s.mu.Unlock()
	if !ok {
		return nil // removed since it was queued; the Del follows
	}
	if err != nil {
		return err
	}
	log := c.log.With("uid", o.uid, "pod", podName(info))
	if fd == nil {
		log.Warn("cannot add a pod without its netns after the snapshot; it stays pending")
		return nil
	}
	defer fd.Close()
	ackErr, err := s.send(ctx, c, addRequest(o.uid, info), fd)
	if err != nil {
		return err
	}
	if ackErr != "" {
		log.Error("ztunnel refused pod; it stays pending", "ack_error", ackErr)
		return nil
	}
	s.markHeld(c, o.uid, gen)
	log.Info("ztunnel holds pod")
	return nil
}

func podName(i *pb.WorkloadInfo) string {
	if i == nil {
		return ""
	}
	return i.GetNamespace() + "/" + i.GetName()
}
