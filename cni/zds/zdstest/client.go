// Package zdstest is a small ZDS client, the part of ztunnel the CNI tests
// need until ztunnel exists: it connects to the agent's socket, says hello,
// reads requests with the netns descriptors they carry and answers them.
// Real socket, real descriptors; it only does not proxy anything.
package zdstest

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"sync"
	"time"

	"golang.org/x/sys/unix"
	"google.golang.org/protobuf/proto"

	pb "github.com/meshlite/meshlite/proto/zds"
)

// Client is one ZDS connection.
type Client struct {
	uc *net.UnixConn
}

// Dial connects to the agent at path and sends ZdsHello{V1}.
func Dial(path string) (*Client, error) {
	uc, err := net.DialUnix("unixpacket", nil, &net.UnixAddr{Name: path, Net: "unixpacket"})
	if err != nil {
		return nil, fmt.Errorf("connect to ZDS at %s: %w", path, err)
	}
	c := &Client{uc: uc}
	if err := c.SendRaw(mustMarshal(&pb.ZdsHello{Version: pb.Version_V1}), nil); err != nil {
		uc.Close()
		return nil, err
	}
	return c, nil
}

// DialRaw connects without saying hello (for protocol-error tests).
func DialRaw(path string) (*Client, error) {
	uc, err := net.DialUnix("unixpacket", nil, &net.UnixAddr{Name: path, Net: "unixpacket"})
	if err != nil {
		return nil, err
	}
	return &Client{uc: uc}, nil
}

func mustMarshal(m proto.Message) []byte {
	b, err := proto.Marshal(m)
	if err != nil {
		panic(err)
	}
	return b
}

// Close closes the connection.
func (c *Client) Close() error { return c.uc.Close() }

// SendRaw writes one datagram, with fds as SCM_RIGHTS when given.
func (c *Client) SendRaw(b []byte, fds []int) error {
	var oob []byte
	if len(fds) > 0 {
		oob = unix.UnixRights(fds...)
	}
	if _, _, err := c.uc.WriteMsgUnix(b, oob, nil); err != nil {
		return fmt.Errorf("write to ZDS: %w", err)
	}
	return nil
}

// Next reads one request and the netns descriptor that came with it (nil
// if none; the caller closes it).
func (c *Client) Next(timeout time.Duration) (*pb.WorkloadRequest, *os.File, error) {
	if err := c.uc.SetReadDeadline(time.Now().Add(timeout)); err != nil {
		return nil, nil, err
	}
	buf := make([]byte, 4096)
	oob := make([]byte, unix.CmsgSpace(4*4))
	n, oobn, _, _, err := c.uc.ReadMsgUnix(buf, oob)
	if err != nil {
		return nil, nil, err
	}
	if n == 0 {
		return nil, nil, errors.New("EOF")
	}
	var fds []int
	if oobn > 0 {
		msgs, err := unix.ParseSocketControlMessage(oob[:oobn])
		if err != nil {
			return nil, nil, err
		}
		for _, m := range msgs {
			got, err := unix.ParseUnixRights(&m)
			if err != nil {
				return nil, nil, err
			}
			fds = append(fds, got...)
		}
	}
	var f *os.File
	for i, fd := range fds {
		if i == 0 {
			f = os.NewFile(uintptr(fd), "netns-from-agent")
		} else {
			unix.Close(fd)
		}
	}
	var req pb.WorkloadRequest
	if err := proto.Unmarshal(buf[:n], &req); err != nil {
		if f != nil {
			f.Close()
		}
		return nil, nil, fmt.Errorf("decode WorkloadRequest: %w", err)
	}
	return &req, f, nil
}

// Ack answers the last request; a non-empty errText refuses it.
func (c *Client) Ack(errText string) error {
	return c.SendRaw(mustMarshal(&pb.WorkloadResponse{Payload: &pb.WorkloadResponse_Ack{Ack: &pb.Ack{Error: errText}}}), nil)
}

// Pod is what an acking client knows about a pod it holds.
type Pod struct {
	Info  *pb.WorkloadInfo
	Netns *os.File // nil for a kept pod
}

// Holder is a ZDS client that acks everything and remembers the pods it
// holds, as a ztunnel that takes every pod would.
type Holder struct {
	c  *Client
	mu sync.Mutex
	// Pods by uid.
	pods         map[string]Pod
	snapshotDone bool
	log          []string
	changed      chan struct{}
	done         chan struct{}
	err          error
	// OnAdd, when set before Start, runs for every AddWorkload before the
	// Ack (a test ztunnel can open sockets in the netns there).
	OnAdd func(uid string, info *pb.WorkloadInfo, netns *os.File)
}

// NewHolder dials the agent; call Start to begin serving.
func NewHolder(path string) (*Holder, error) {
	c, err := Dial(path)
	if err != nil {
		return nil, err
	}
	return &Holder{c: c, pods: map[string]Pod{}, changed: make(chan struct{}), done: make(chan struct{})}, nil
}

// Start serves requests until Close or the connection ends.
func (h *Holder) Start() {
	go func() {
		defer close(h.done)
		for {
			req, f, err := h.c.Next(24 * time.Hour)
			if err != nil {
				h.mu.Lock()
				h.err = err
				h.mu.Unlock()
				return
			}
			h.handle(req, f)
			if err := h.c.Ack(""); err != nil {
				h.mu.Lock()
				h.err = err
				h.mu.Unlock()
				return
			}
		}
	}()
}

func (h *Holder) handle(req *pb.WorkloadRequest, f *os.File) {
	if a := req.GetAdd(); a != nil && h.OnAdd != nil {
		h.OnAdd(a.GetUid(), a.GetWorkloadInfo(), f)
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	defer func() { close(h.changed); h.changed = make(chan struct{}) }()
	switch {
	case req.GetAdd() != nil:
		a := req.GetAdd()
		if old, ok := h.pods[a.GetUid()]; ok && old.Netns != nil {
			old.Netns.Close()
		}
		h.pods[a.GetUid()] = Pod{Info: a.GetWorkloadInfo(), Netns: f}
		h.log = append(h.log, "add "+a.GetUid())
		return
	case req.GetKeep() != nil:
		if _, ok := h.pods[req.GetKeep().GetUid()]; !ok {
			h.pods[req.GetKeep().GetUid()] = Pod{}
		}
		h.log = append(h.log, "keep "+req.GetKeep().GetUid())
	case req.GetDel() != nil:
		if old, ok := h.pods[req.GetDel().GetUid()]; ok && old.Netns != nil {
			old.Netns.Close()
		}
		delete(h.pods, req.GetDel().GetUid())
		h.log = append(h.log, "del "+req.GetDel().GetUid())
	case req.GetSnapshotSent() != nil:
		h.snapshotDone = true
		h.log = append(h.log, "snapshot-sent")
	}
	if f != nil {
		f.Close()
	}
}

// Log lists what the agent sent, in order ("add <uid>", "del <uid>",
// "keep <uid>", "snapshot-sent").
func (h *Holder) Log() []string {
	h.mu.Lock()
	defer h.mu.Unlock()
	return append([]string(nil), h.log...)
}

// Has reports whether the holder holds uid.
func (h *Holder) Has(uid string) bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	_, ok := h.pods[uid]
	return ok
}

// Pods lists the uids held.
func (h *Holder) Pods() map[string]Pod {
	h.mu.Lock()
	defer h.mu.Unlock()
	out := map[string]Pod{}
	for k, v := range h.pods {
		out[k] = v
	}
	return out
}

// WaitFor waits until cond holds on the holder's state or ctx ends.
func (h *Holder) WaitFor(ctx context.Context, cond func(pods map[string]Pod, snapshotDone bool) bool) error {
	for {
		h.mu.Lock()
		ok := cond(h.pods, h.snapshotDone)
		ch, err := h.changed, h.err
		h.mu.Unlock()
		if ok {
			return nil
		}
		if err != nil {
			return fmt.Errorf("ZDS connection ended: %w", err)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-ch:
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// Close ends the connection and releases every held netns.
func (h *Holder) Close() {
	h.c.Close()
	<-h.done
	h.mu.Lock()
	defer h.mu.Unlock()
	for _, p := range h.pods {
		if p.Netns != nil {
			p.Netns.Close()
		}
	}
	h.pods = map[string]Pod{}
}
