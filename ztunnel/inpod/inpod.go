// Package inpod is ztunnel's side of ZDS: it connects to the CNI node
// agent's unix SOCK_SEQPACKET socket, says ZdsHello{V1}, and for each pod
// the agent hands over (AddWorkload with the netns fd as SCM_RIGHTS) opens
// ztunnel's sockets inside that pod's network namespace (15001, 15006,
// 15008 TCP and UDP, 15053 TCP and UDP; all marked 0x539), runs them through
// a Server, and Acks. DelWorkload, and pods left out of a reconnect's
// snapshot, close them (an open socket keeps a dead netns alive).
//
// It owns the ZDS connection and each pod's sockets; what is served on them
// is the Server's business.
package inpod

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"sync"
	"time"

	"golang.org/x/sys/unix"
	"google.golang.org/protobuf/proto"

	"github.com/meshlite/meshlite/proto/zds"
	"github.com/meshlite/meshlite/ztunnel/podnet"
)

// DefaultSocket is where the CNI agent listens.
const DefaultSocket = "/var/run/ztunnel/ztunnel.sock"

// Ports ztunnel opens in every pod.
const (
	PortOutbound  = 15001
	PortPlaintext = 15006
	PortHBONE     = 15008
	PortDNS       = 15053
)

// maxMessage bounds one ZDS datagram (the agent's messages are small).
const maxMessage = 64 << 10

// maxFDs is how many descriptors one datagram may carry before the kernel
// truncates (we need one; more are closed and refused).
const maxFDs = 8

// Sockets are one pod's in-netns sockets.
type Sockets struct {
	NS        *podnet.NS
	Outbound  *net.TCPListener // 15001
	Plaintext *net.TCPListener // 15006
	HBONE     *net.TCPListener // 15008
	HBONEUDP  *net.UDPConn     // 15008
	DNSTCP    *net.TCPListener // 15053
	DNSUDP    *net.UDPConn     // 15053
}

// Close closes every socket and the netns handle.
func (s *Sockets) Close() error {
	errs := []error{s.closeSockets()}
	if s.NS != nil {
		errs = append(errs, s.NS.Close())
	}
	return errors.Join(errs...)
}

// closeSockets closes the sockets but not the netns handle, which a Serve
// still running may use (the redirection check enters it).
func (s *Sockets) closeSockets() error {
	var errs []error
	for _, c := range []interface{ Close() error }{s.Outbound, s.Plaintext, s.HBONE, s.HBONEUDP, s.DNSTCP, s.DNSUDP} {
		if c == nil || c == (*net.TCPListener)(nil) || c == (*net.UDPConn)(nil) {
			continue
		}
		if err := c.Close(); err != nil && !errors.Is(err, net.ErrClosed) {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// Pod is a pod handed over by the agent.
type Pod struct {
	UID  string
	Info *zds.WorkloadInfo
}

// Server serves a pod's sockets. Serve runs until ctx ends (the pod was
// deleted or ztunnel stops) and must not close the sockets (inpod does,
// after Serve returns). Prepare runs before the Ack; an error refuses the
// pod (e.g. no certificate yet).
type Server interface {
	Prepare(ctx context.Context, pod Pod) error
	Serve(ctx context.Context, pod Pod, s *Sockets)
}

// Config configures a Client.
type Config struct {
	// Socket is the agent's socket path (DefaultSocket).
	Socket string
	Server Server
	Log    *slog.Logger
	// Reconnect backoff, doubling from MinBackoff (100 ms) to MaxBackoff (5 s).
	MinBackoff, MaxBackoff time.Duration
	// open opens a pod's sockets (tests replace it).
	open func(ctx context.Context, ns *podnet.NS) (*Sockets, error)
}

// Client is the ZDS client.
type Client struct {
	cfg Config
	log *slog.Logger

	mu   sync.Mutex
	pods map[string]*podRun
	// snapshot collects the uids added or kept since the connection
	// started; nil once SnapshotSent arrived.
	snapshot map[string]struct{}
}

type podRun struct {
	pod     Pod
	sockets *Sockets
	cancel  context.CancelFunc
	done    chan struct{}
}

// New returns a client; Run connects it.
func New(cfg Config) (*Client, error) {
	if cfg.Server == nil {
		return nil, errors.New("inpod: no server")
	}
	if cfg.Socket == "" {
		cfg.Socket = DefaultSocket
	}
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	if cfg.MinBackoff <= 0 {
		cfg.MinBackoff = 100 * time.Millisecond
	}
	if cfg.MaxBackoff <= 0 {
		cfg.MaxBackoff = 5 * time.Second
	}
	if cfg.open == nil {
		cfg.open = OpenSockets
	}
	return &Client{cfg: cfg, log: cfg.Log, pods: map[string]*podRun{}}, nil
}

// Pods returns the uids of the pods being served.
func (c *Client) Pods() []string {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := make([]string, 0, len(c.pods))
	for uid := range c.pods {
		out = append(out, uid)
	}
	return out
}

// Run keeps a connection to the agent until ctx ends, reconnecting with
// backoff; pods stay served across reconnects (the agent's next snapshot
// says which to keep). On return every pod's sockets are closed.
func (c *Client) Run(ctx context.Context) error {
	defer c.closeAll()
	backoff := c.cfg.MinBackoff
	for {
		err := c.session(ctx)
		if ctx.Err() != nil {
			return nil
		}
		c.log.Warn("ZDS connection ended; reconnecting", "socket", c.cfg.Socket, "error", err, "in", backoff)
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, c.cfg.MaxBackoff)
		if err == nil {
			backoff = c.cfg.MinBackoff
		}
	}
}

func (c *Client) session(ctx context.Context) error {
	var d net.Dialer
	nc, err := d.DialContext(ctx, "unixpacket", c.cfg.Socket)
	if err != nil {
		return fmt.Errorf("connect to CNI agent: %w", err)
	}
	conn := nc.(*net.UnixConn)
	stop := context.AfterFunc(ctx, func() { conn.Close() })
	defer stop()
	defer conn.Close()
	hello, _ := proto.Marshal(&zds.ZdsHello{Version: zds.Version_V1})
	if _, _, err := conn.WriteMsgUnix(hello, nil, nil); err != nil {
		return fmt.Errorf("send ZdsHello: %w", err)
	}
	c.mu.Lock()
	c.snapshot = map[string]struct{}{}
	c.mu.Unlock()
	c.log.Info("connected to the CNI agent", "socket", c.cfg.Socket)
	buf := make([]byte, maxMessage)
	oob := make([]byte, unix.CmsgSpace(4*maxFDs))
	for {
		n, oobn, flags, _, err := conn.ReadMsgUnix(buf, oob)
		if err != nil {
			return fmt.Errorf("read from CNI agent: %w", err)
		}
		if n == 0 && oobn == 0 {
			return errors.New("CNI agent closed the connection")
		}
		resp := c.handle(ctx, buf[:n], oob[:oobn], flags)
		b, err := proto.Marshal(resp)
		if err != nil {
			return fmt.Errorf("encode Ack: %w", err)
		}
		if _, _, err := conn.WriteMsgUnix(b, nil, nil); err != nil {
			return fmt.Errorf("send Ack: %w", err)
		}
	}
}

func ack(err error) *zds.WorkloadResponse {
	a := &zds.Ack{}
	if err != nil {
		a.Error = err.Error()
	}
	return &zds.WorkloadResponse{Payload: &zds.WorkloadResponse_Ack{Ack: a}}
}

// receivedFDs extracts SCM_RIGHTS descriptors from control data.
func receivedFDs(oob []byte) ([]*os.File, error) {
	if len(oob) == 0 {
		return nil, nil
	}
	msgs, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		return nil, fmt.Errorf("parse control data: %w", err)
	}
	var files []*os.File
	for _, m := range msgs {
		if m.Header.Level != unix.SOL_SOCKET || m.Header.Type != unix.SCM_RIGHTS {
			continue
		}
		fds, err := unix.ParseUnixRights(&m)
		if err != nil {
			closeAll(files)
			return nil, fmt.Errorf("parse SCM_RIGHTS: %w", err)
		}
		for _, fd := range fds {
			files = append(files, os.NewFile(uintptr(fd), "zds-fd"))
		}
	}
	return files, nil
}

func closeAll(files []*os.File) {
	for _, f := range files {
		f.Close()
	}
}

// handle processes one datagram and returns its Ack. It never panics on
// bad input: malformed messages get an Ack with an error and a log line,
// and any descriptors they carried are closed.
func (c *Client) handle(ctx context.Context, b, oob []byte, flags int) *zds.WorkloadResponse {
	files, err := receivedFDs(oob)
	if err == nil && flags&unix.MSG_TRUNC != 0 {
		err = fmt.Errorf("message longer than %d bytes", maxMessage)
	}
	if err == nil && flags&unix.MSG_CTRUNC != 0 {
		err = fmt.Errorf("more than %d descriptors", maxFDs)
	}
	var req zds.WorkloadRequest
	if err == nil {
		if uerr := proto.Unmarshal(b, &req); uerr != nil {
			err = fmt.Errorf("decode WorkloadRequest: %w", uerr)
		}
	}
	if err != nil {
		closeAll(files)
		c.log.Error("malformed ZDS message", "error", err)
		return ack(err)
	}
	if _, isAdd := req.GetPayload().(*zds.WorkloadRequest_Add); !isAdd && len(files) > 0 {
		closeAll(files)
		err := errors.New("descriptors sent with a message that takes none")
		c.log.Error("malformed ZDS message", "error", err)
		return ack(err)
	}
	switch p := req.GetPayload().(type) {
	case *zds.WorkloadRequest_Add:
		err = c.add(ctx, p.Add, files)
	case *zds.WorkloadRequest_Keep:
		err = c.keep(p.Keep.GetUid())
	case *zds.WorkloadRequest_Del:
		err = c.del(p.Del.GetUid())
	case *zds.WorkloadRequest_SnapshotSent:
		c.snapshotSent()
	default:
		err = errors.New("WorkloadRequest without a known payload")
	}
	if err != nil {
		c.log.Error("ZDS request failed", "error", err)
	}
	return ack(err)
}

func (c *Client) add(ctx context.Context, a *zds.AddWorkload, files []*os.File) error {
	if a.GetUid() == "" {
		closeAll(files)
		return errors.New("AddWorkload without uid")
	}
	if len(files) != 1 {
		closeAll(files)
		return fmt.Errorf("AddWorkload %s carried %d descriptors, want 1 (the pod netns)", a.GetUid(), len(files))
	}
	log := c.log.With("uid", a.GetUid(), "pod", a.GetWorkloadInfo().GetNamespace()+"/"+a.GetWorkloadInfo().GetName())
	ns, err := podnet.FromFile(files[0])
	if err != nil {
		return fmt.Errorf("AddWorkload %s: %w", a.GetUid(), err)
	}
	pod := Pod{UID: a.GetUid(), Info: a.GetWorkloadInfo()}
	// Replayed after a reconnect with the same netns: keep the sockets
	// (and the connections on them) as they are.
	c.mu.Lock()
	if old, ok := c.pods[pod.UID]; ok && sameNS(old.sockets.NS, ns) {
		if c.snapshot != nil {
			c.snapshot[pod.UID] = struct{}{}
		}
		c.mu.Unlock()
		ns.Close()
		log.Debug("pod re-added with the same netns; keeping its sockets")
		return nil
	}
	c.mu.Unlock()
	// A different netns (the pod's sandbox was recreated): replace.
	c.stop(pod.UID)
	if err := c.cfg.Server.Prepare(ctx, pod); err != nil {
		ns.Close()
		return fmt.Errorf("AddWorkload %s: prepare: %w", a.GetUid(), err)
	}
	socks, err := c.cfg.open(ctx, ns)
	if err != nil {
		ns.Close()
		return fmt.Errorf("AddWorkload %s: %w", a.GetUid(), err)
	}
	rctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	run := &podRun{pod: pod, sockets: socks, cancel: cancel, done: make(chan struct{})}
	c.mu.Lock()
	c.pods[pod.UID] = run
	if c.snapshot != nil {
		c.snapshot[pod.UID] = struct{}{}
	}
	c.mu.Unlock()
	go func() {
		defer close(run.done)
		c.cfg.Server.Serve(rctx, pod, socks)
	}()
	log.Info("pod enrolled: serving its sockets")
	return nil
}

func sameNS(a, b *podnet.NS) bool {
	if a == nil || b == nil {
		return false
	}
	var sa, sb unix.Stat_t
	if unix.Fstat(int(a.Fd()), &sa) != nil || unix.Fstat(int(b.Fd()), &sb) != nil {
		return false
	}
	return sa.Dev == sb.Dev && sa.Ino == sb.Ino
}

func (c *Client) keep(uid string) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.snapshot == nil {
		return fmt.Errorf("KeepWorkload %s after SnapshotSent", uid)
	}
	if _, ok := c.pods[uid]; !ok {
		return fmt.Errorf("KeepWorkload %s: pod not held", uid)
	}
	c.snapshot[uid] = struct{}{}
	return nil
}

func (c *Client) del(uid string) error {
	if uid == "" {
		return errors.New("DelWorkload without uid")
	}
	if c.stop(uid) {
		c.log.Info("pod removed: sockets closed", "uid", uid)
	}
	return nil // deleting an unknown pod is already done
}

// snapshotSent drops every pod the agent did not replay.
func (c *Client) snapshotSent() {
	c.mu.Lock()
	var drop []string
	if c.snapshot != nil {
		for uid := range c.pods {
			if _, ok := c.snapshot[uid]; !ok {
				drop = append(drop, uid)
			}
		}
	}
	c.snapshot = nil
	c.mu.Unlock()
	for _, uid := range drop {
		c.stop(uid)
		c.log.Info("pod not in the agent's snapshot: sockets closed", "uid", uid)
	}
}

// stop ends a pod's serving and closes its sockets; reports whether the
// pod was held.
func (c *Client) stop(uid string) bool {
	c.mu.Lock()
	run, ok := c.pods[uid]
	delete(c.pods, uid)
	c.mu.Unlock()
	if !ok {
		return false
	}
	run.cancel()
	// Close the sockets first so a Serve blocked in Accept returns; the
	// netns handle only once Serve is done with it.
	if err := run.sockets.closeSockets(); err != nil {
		c.log.Warn("closing pod sockets", "uid", uid, "error", err)
	}
	<-run.done
	if err := run.sockets.Close(); err != nil {
		c.log.Warn("closing pod netns", "uid", uid, "error", err)
	}
	return true
}

// closeAll stops serving every pod when ztunnel stops: all pods at once,
// each Serve stopping its listeners and draining its connections (bounded
// by the server's drain period), then the sockets close.
func (c *Client) closeAll() {
	c.mu.Lock()
	runs := make([]*podRun, 0, len(c.pods))
	for uid, r := range c.pods {
		runs = append(runs, r)
		delete(c.pods, uid)
	}
	c.mu.Unlock()
	for _, r := range runs {
		r.cancel()
	}
	for _, r := range runs {
		<-r.done
		if err := r.sockets.Close(); err != nil {
			c.log.Warn("closing pod sockets", "uid", r.pod.UID, "error", err)
		}
	}
}

// ListenHBONEUDP binds the pod's QUIC socket (15008/udp) without
// SO_REUSEPORT, so at most one ztunnel holds it: a predecessor keeps it,
// serving and then draining its QUIC connections, until it closes it, and
// only then may a successor bind it. Shared, the kernel would move
// established QUIC connections between the two processes (datagrams are
// spread by a hash over the group's members), breaking their tunnels.
// It fails with EADDRINUSE while another ztunnel holds the socket.
func ListenHBONEUDP(ctx context.Context, ns *podnet.NS) (*net.UDPConn, error) {
	return ns.ListenUDPExclusive(ctx, netip.AddrPortFrom(netip.IPv4Unspecified(), PortHBONE))
}

// OpenSockets opens ztunnel's sockets in ns (IPv4 wildcard addresses).
func OpenSockets(ctx context.Context, ns *podnet.NS) (*Sockets, error) {
	s := &Sockets{NS: ns}
	fail := func(err error) (*Sockets, error) {
		s.NS = nil // the caller still owns ns on failure
		s.Close()
		return nil, err
	}
	wild := netip.IPv4Unspecified()
	var err error
	if s.Outbound, err = ns.Listen(ctx, netip.AddrPortFrom(wild, PortOutbound)); err != nil {
		return fail(err)
	}
	if s.Plaintext, err = ns.Listen(ctx, netip.AddrPortFrom(wild, PortPlaintext)); err != nil {
		return fail(err)
	}
	if s.HBONE, err = ns.Listen(ctx, netip.AddrPortFrom(wild, PortHBONE)); err != nil {
		return fail(err)
	}
	// QUIC's socket is exclusive (see ListenHBONEUDP): while a predecessor
	// still holds it, HBONEUDP stays nil and the server binds it later.
	if s.HBONEUDP, err = ListenHBONEUDP(ctx, ns); err != nil && !errors.Is(err, unix.EADDRINUSE) {
		return fail(err)
	}
	if s.DNSTCP, err = ns.Listen(ctx, netip.AddrPortFrom(wild, PortDNS)); err != nil {
		return fail(err)
	}
	if s.DNSUDP, err = ns.ListenUDP(ctx, netip.AddrPortFrom(wild, PortDNS)); err != nil {
		return fail(err)
	}
	// When a ztunnel hands the pod over to its successor and closes its
	// listeners, connections still in their accept queues move to the
	// successor's listeners instead of being reset.
	if err := ns.Do(func() error {
		return os.WriteFile("/proc/sys/net/ipv4/tcp_migrate_req", []byte("1"), 0)
	}); err != nil {
		slog.Default().Debug("inpod: cannot enable tcp_migrate_req in pod netns", "error", err)
	}
	return s, nil
}
