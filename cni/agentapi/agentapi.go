// Package agentapi is the protocol between the mesh-cni plugin and the node
// agent: one JSON request and one JSON response per connection over a unix
// SOCK_SEQPACKET socket, the request carrying the pod's network namespace
// as an SCM_RIGHTS file descriptor (so the agent needs no view of the
// runtime's netns paths). It owns the messages, their validation and the
// framing; what the agent does with a request is the agent's business.
package agentapi

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// MaxMessage bounds a request or response datagram.
const MaxMessage = 16 << 10

// Commands.
const (
	CmdAdd    = "ADD"
	CmdDel    = "DEL"
	CmdCheck  = "CHECK"
	CmdStatus = "STATUS"
)

// States the agent answers with.
const (
	// StateNotEnrolled: the pod is not in the mesh; start it now.
	StateNotEnrolled = "not-enrolled"
	// StateHeld: the pod's traffic is redirected and ztunnel holds its
	// netns; start it now.
	StateHeld = "held"
	// StatePending: redirected, but ztunnel does not hold it (yet): its
	// traffic goes nowhere. The plugin fails ADD so the runtime retries.
	StatePending = "pending"
	// StateRemoved answers DEL.
	StateRemoved = "removed"
	// StateReady answers STATUS.
	StateReady = "ready"
)

// Request is what the plugin asks.
type Request struct {
	Command      string   `json:"command"`
	PodNamespace string   `json:"podNamespace,omitempty"`
	PodName      string   `json:"podName,omitempty"`
	PodUID       string   `json:"podUID,omitempty"`
	ContainerID  string   `json:"containerID,omitempty"`
	Netns        string   `json:"netns,omitempty"` // the runtime's path, for logs
	IfName       string   `json:"ifName,omitempty"`
	IPs          []string `json:"ips,omitempty"`
	// TimeoutMillis is how long the plugin waits for the answer; an ADD
	// answers pending shortly before it runs out.
	TimeoutMillis int64 `json:"timeoutMillis,omitempty"`
}

// Response is the agent's answer. Error set means the request failed.
type Response struct {
	State string `json:"state,omitempty"`
	Error string `json:"error,omitempty"`
}

// Timeout is the request's timeout as a duration.
func (r *Request) Timeout() time.Duration { return time.Duration(r.TimeoutMillis) * time.Millisecond }

// PodIPs parses IPs.
func (r *Request) PodIPs() ([]netip.Addr, error) {
	var out []netip.Addr
	for _, s := range r.IPs {
		a, err := netip.ParseAddr(s)
		if err != nil {
			return nil, fmt.Errorf("pod IP %q: %w", s, err)
		}
		out = append(out, a.Unmap())
	}
	return out, nil
}

// Validate checks a request as the agent receives it.
func (r *Request) Validate() error {
	switch r.Command {
	case CmdStatus:
		return nil
	case CmdAdd, CmdDel, CmdCheck:
	default:
		return fmt.Errorf("unknown command %q", r.Command)
	}
	var errs []error
	if r.PodNamespace == "" || r.PodName == "" {
		errs = append(errs, errors.New("pod namespace and name are required"))
	}
	for _, s := range []string{r.PodNamespace, r.PodName, r.PodUID, r.ContainerID, r.IfName} {
		if len(s) > 253 || strings.ContainsAny(s, "\x00\n") {
			errs = append(errs, fmt.Errorf("field %.40q too long or not printable", s))
		}
	}
	if len(r.IPs) > 8 {
		errs = append(errs, fmt.Errorf("%d pod IPs; at most 8", len(r.IPs)))
	}
	if _, err := r.PodIPs(); err != nil {
		errs = append(errs, err)
	}
	if r.TimeoutMillis < 0 || r.TimeoutMillis > int64(time.Hour/time.Millisecond) {
		errs = append(errs, fmt.Errorf("timeout %dms out of range", r.TimeoutMillis))
	}
	return errors.Join(errs...)
}

// DecodeRequest parses and validates one request datagram.
func DecodeRequest(b []byte) (*Request, error) {
	if len(b) > MaxMessage {
		return nil, fmt.Errorf("request of %d bytes exceeds %d", len(b), MaxMessage)
	}
	var r Request
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&r); err != nil {
		return nil, fmt.Errorf("decode request: %w", err)
	}
	if dec.More() {
		return nil, errors.New("decode request: trailing data")
	}
	if err := r.Validate(); err != nil {
		return nil, fmt.Errorf("invalid %s request: %w", r.Command, err)
	}
	return &r, nil
}

// DecodeResponse parses one response datagram.
func DecodeResponse(b []byte) (*Response, error) {
	var r Response
	if err := json.Unmarshal(b, &r); err != nil {
		return nil, fmt.Errorf("decode agent response: %w", err)
	}
	switch r.State {
	case StateNotEnrolled, StateHeld, StatePending, StateRemoved, StateReady:
	case "":
		if r.Error == "" {
			return nil, errors.New("agent response has neither state nor error")
		}
	default:
		return nil, fmt.Errorf("agent response has unknown state %q", r.State)
	}
	return &r, nil
}

// Call sends req (with netns as SCM_RIGHTS when non-nil) to the agent at
// socket and waits for the answer until ctx ends.
func Call(ctx context.Context, socket string, req *Request, netns *os.File) (*Response, error) {
	body, err := json.Marshal(req)
	if err != nil {
		return nil, fmt.Errorf("encode request: %w", err)
	}
	d := net.Dialer{}
	c, err := d.DialContext(ctx, "unixpacket", socket)
	if err != nil {
		return nil, fmt.Errorf("connect to the node agent at %s: %w", socket, err)
	}
	defer c.Close()
	uc := c.(*net.UnixConn)
	if dl, ok := ctx.Deadline(); ok {
		if err := uc.SetDeadline(dl); err != nil {
			return nil, err
		}
	}
	stop := context.AfterFunc(ctx, func() { uc.SetDeadline(time.Now()) })
	defer stop()
	var oob []byte
	if netns != nil {
		oob = unix.UnixRights(int(netns.Fd()))
	}
	if _, _, err := uc.WriteMsgUnix(body, oob, nil); err != nil {
		return nil, fmt.Errorf("send %s request to the node agent: %w", req.Command, err)
	}
	buf := make([]byte, MaxMessage)
	n, _, flags, _, err := uc.ReadMsgUnix(buf, nil)
	if err != nil {
		if ctx.Err() != nil {
			return nil, fmt.Errorf("wait for the node agent's answer to %s: %w", req.Command, ctx.Err())
		}
		return nil, fmt.Errorf("read the node agent's answer to %s: %w", req.Command, err)
	}
	if flags&unix.MSG_TRUNC != 0 {
		return nil, errors.New("the node agent's answer was truncated")
	}
	if n == 0 {
		return nil, errors.New("the node agent closed the connection without answering")
	}
	return DecodeResponse(buf[:n])
}

// ReadRequest reads one request from a plugin connection. The returned file
// is the netns the plugin passed (nil if none); the caller closes it. Any
// further descriptors are closed.
func ReadRequest(c *net.UnixConn, timeout time.Duration) (*Request, *os.File, error) {
	if err := c.SetReadDeadline(time.Now().Add(timeout)); err != nil {
		return nil, nil, err
	}
	buf := make([]byte, MaxMessage+1)
	oob := make([]byte, unix.CmsgSpace(4*4))
	n, oobn, flags, _, err := c.ReadMsgUnix(buf, oob)
	if err != nil {
		return nil, nil, fmt.Errorf("read plugin request: %w", err)
	}
	fds, ferr := parseRights(oob[:oobn])
	var netns *os.File
	for i, fd := range fds {
		if i == 0 {
			netns = os.NewFile(uintptr(fd), "netns-from-plugin")
			continue
		}
		unix.Close(fd)
	}
	fail := func(err error) (*Request, *os.File, error) {
		if netns != nil {
			netns.Close()
		}
		return nil, nil, err
	}
	if ferr != nil {
		return fail(ferr)
	}
	if flags&(unix.MSG_TRUNC|unix.MSG_CTRUNC) != 0 {
		return fail(fmt.Errorf("plugin request truncated (flags %#x)", flags))
	}
	req, err := DecodeRequest(buf[:n])
	if err != nil {
		return fail(err)
	}
	return req, netns, nil
}

// parseRights returns every descriptor in SCM_RIGHTS messages of oob.
func parseRights(oob []byte) ([]int, error) {
	if len(oob) == 0 {
		return nil, nil
	}
	msgs, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		return nil, fmt.Errorf("parse control message: %w", err)
	}
	var fds []int
	for _, m := range msgs {
		if m.Header.Level != unix.SOL_SOCKET || m.Header.Type != unix.SCM_RIGHTS {
			continue
		}
		got, err := unix.ParseUnixRights(&m)
		if err != nil {
			return fds, fmt.Errorf("parse SCM_RIGHTS: %w", err)
		}
		fds = append(fds, got...)
	}
	return fds, nil
}

// WriteResponse answers a plugin.
func WriteResponse(c *net.UnixConn, resp *Response) error {
	body, err := json.Marshal(resp)
	if err != nil {
		return fmt.Errorf("encode response: %w", err)
	}
	if err := c.SetWriteDeadline(time.Now().Add(5 * time.Second)); err != nil {
		return err
	}
	if _, err := c.Write(body); err != nil {
		return fmt.Errorf("write response: %w", err)
	}
	return nil
}
