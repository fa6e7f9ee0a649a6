package xds

import (
	"fmt"

	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"google.golang.org/grpc/encoding"
	protocodec "google.golang.org/grpc/encoding/proto"
	"google.golang.org/grpc/mem"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"
)

// fieldResources is DeltaDiscoveryResponse.resources' field number.
const fieldResources protowire.Number = 2

// A response is sent pre-encoded. Protobuf defines the concatenation of
// two encoded messages as their merge, with repeated fields appended, so a
// DeltaDiscoveryResponse is written as a small per-client head (type URL,
// nonce, system version, removals) followed by the resources' encodings,
// which every Resource carries from the cache: a response to a hundred
// clients costs a hundred heads, not a hundred walks over every resource,
// and the body of a full push is one buffer all of them share.

// wireResponse is a DeltaDiscoveryResponse as written on the stream. Only
// the Codec marshals it.
type wireResponse struct {
	head []byte
	body []byte
	// What the head and body hold, for logs and metrics.
	typeURL, nonce string
	resources      int
	removed        int
}

// encodeResponse builds the response for nonce carrying set (whose wire
// encodings are body when body is not nil, else they are concatenated
// here) and the removals.
func encodeResponse(typeURL, nonce, version string, set []*Resource, body []byte, removed []string) (*wireResponse, error) {
	head, err := proto.MarshalOptions{Deterministic: true}.Marshal(&discovery.DeltaDiscoveryResponse{
		TypeUrl: typeURL, Nonce: nonce, SystemVersionInfo: version, RemovedResources: removed,
	})
	if err != nil {
		return nil, fmt.Errorf("encode the %s response head: %w", typeURL, err)
	}
	if body == nil {
		body = appendWire(nil, set)
	}
	return &wireResponse{head: head, body: body, typeURL: typeURL, nonce: nonce, resources: len(set), removed: len(removed)}, nil
}

// appendWire appends the wire encodings of rs to b.
func appendWire(b []byte, rs []*Resource) []byte {
	n := 0
	for _, r := range rs {
		n += len(r.wire)
	}
	if b == nil {
		b = make([]byte, 0, n)
	}
	for _, r := range rs {
		b = append(b, r.wire...)
	}
	return b
}

// Codec is the gRPC codec of a server that serves this package's Delta
// ADS: it writes pre-encoded responses as they are, without copying the
// shared body, and hands every other message to gRPC's proto codec. Give it
// to grpc.NewServer with grpc.ForceServerCodecV2(xds.Codec{}).
type Codec struct{}

var _ encoding.CodecV2 = Codec{}

// protoCodec is gRPC's own, registered by the package imported above.
var protoCodec = encoding.GetCodecV2(protocodec.Name)

// Marshal returns the head and the shared body of a pre-encoded response
// as two buffers (gRPC never writes to them), else the proto encoding of v.
func (Codec) Marshal(v any) (mem.BufferSlice, error) {
	if w, ok := v.(*wireResponse); ok {
		return mem.BufferSlice{mem.SliceBuffer(w.head), mem.SliceBuffer(w.body)}, nil
	}
	return protoCodec.Marshal(v)
}

// Unmarshal is the proto codec's.
func (Codec) Unmarshal(data mem.BufferSlice, v any) error { return protoCodec.Unmarshal(data, v) }

// Name is "proto": on the wire this is the proto codec.
func (Codec) Name() string { return protocodec.Name }
