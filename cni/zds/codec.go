package zds

import (
	"errors"
	"fmt"

	"golang.org/x/sys/unix"
	"google.golang.org/protobuf/proto"

	pb "github.com/meshlite/meshlite/proto/zds"
)

// MaxMessage bounds a datagram read from ztunnel; ztunnel's messages (hello,
// acks) are tiny, so anything larger is a protocol error.
const MaxMessage = 4096

// ErrProtocol marks a message that breaks the protocol; the connection is
// closed (ztunnel reconnects and gets a fresh snapshot).
var ErrProtocol = errors.New("zds protocol error")

func protoErr(format string, args ...any) error {
	return fmt.Errorf("%w: %s", ErrProtocol, fmt.Sprintf(format, args...))
}

// checkFlags rejects datagrams the kernel had to cut.
func checkFlags(n, flags int) error {
	if flags&unix.MSG_TRUNC != 0 {
		return protoErr("message longer than %d bytes", MaxMessage)
	}
	if flags&unix.MSG_CTRUNC != 0 {
		return protoErr("control data truncated")
	}
	return nil
}

// DecodeHello parses ztunnel's first message. Only version V1 is spoken.
func DecodeHello(b []byte) (*pb.ZdsHello, error) {
	if len(b) > MaxMessage {
		return nil, protoErr("hello of %d bytes", len(b))
	}
	var h pb.ZdsHello
	if err := proto.Unmarshal(b, &h); err != nil {
		return nil, protoErr("decode ZdsHello: %v", err)
	}
	if h.GetVersion() != pb.Version_V1 {
		return nil, protoErr("ZdsHello version %v; this agent speaks V1", h.GetVersion())
	}
	return &h, nil
}

// DecodeResponse parses one of ztunnel's answers: it must be an Ack. The
// returned error string is the Ack's (empty on success).
func DecodeResponse(b []byte) (string, error) {
	if len(b) > MaxMessage {
		return "", protoErr("response of %d bytes", len(b))
	}
	var r pb.WorkloadResponse
	if err := proto.Unmarshal(b, &r); err != nil {
		return "", protoErr("decode WorkloadResponse: %v", err)
	}
	ack := r.GetAck()
	if ack == nil {
		return "", protoErr("WorkloadResponse without Ack")
	}
	return ack.GetError(), nil
}

func encode(req *pb.WorkloadRequest) ([]byte, error) {
	b, err := proto.Marshal(req)
	if err != nil {
		return nil, fmt.Errorf("encode WorkloadRequest: %w", err)
	}
	return b, nil
}

func addRequest(uid string, info *pb.WorkloadInfo) *pb.WorkloadRequest {
	return &pb.WorkloadRequest{Payload: &pb.WorkloadRequest_Add{Add: &pb.AddWorkload{Uid: uid, WorkloadInfo: info}}}
}

func keepRequest(uid string) *pb.WorkloadRequest {
	return &pb.WorkloadRequest{Payload: &pb.WorkloadRequest_Keep{Keep: &pb.KeepWorkload{Uid: uid}}}
}

func delRequest(uid string) *pb.WorkloadRequest {
	return &pb.WorkloadRequest{Payload: &pb.WorkloadRequest_Del{Del: &pb.DelWorkload{Uid: uid}}}
}

func snapshotSentRequest() *pb.WorkloadRequest {
	return &pb.WorkloadRequest{Payload: &pb.WorkloadRequest_SnapshotSent{SnapshotSent: &pb.SnapshotSent{}}}
}

// closeRights closes any descriptors ztunnel sent us: it has no business
// sending any, and keeping them would leak.
func closeRights(oob []byte) {
	if len(oob) == 0 {
		return
	}
	msgs, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		return
	}
	for _, m := range msgs {
		if m.Header.Level != unix.SOL_SOCKET || m.Header.Type != unix.SCM_RIGHTS {
			continue
		}
		fds, _ := unix.ParseUnixRights(&m)
		for _, fd := range fds {
			unix.Close(fd)
		}
	}
}
