package proto_test

import (
	"testing"

	"google.golang.org/protobuf/encoding/prototext"
	"google.golang.org/protobuf/proto"

	"github.com/meshlite/meshlite/proto/ca"
	"github.com/meshlite/meshlite/proto/security"
	"github.com/meshlite/meshlite/proto/workload"
	"github.com/meshlite/meshlite/proto/zds"
)

// The fuzz targets feed untrusted bytes (xDS pushes, ZDS datagrams, CA
// requests) to the generated decoders. Decoding may fail, but must never
// panic; whatever decodes must re-encode and decode again to the same message.
//
//	go test ./proto -run '^$' -fuzz FuzzAddress -fuzztime 30s

func FuzzAddress(f *testing.F) {
	f.Add(workloadWire())
	f.Add(serviceWire())
	f.Add([]byte{})
	fuzzRoundTrip(f, func() proto.Message { return &workload.Address{} })
}

func FuzzAuthorization(f *testing.F) {
	f.Add(authorizationWire())
	f.Add([]byte{})
	fuzzRoundTrip(f, func() proto.Message { return &security.Authorization{} })
}

func FuzzWorkloadRequest(f *testing.F) {
	f.Add(zdsAddWire())
	f.Add(msg(2, str(2, "uid")))
	f.Add(raw(3, nil))
	f.Add(msg(5, str(1, "uid")))
	fuzzRoundTrip(f, func() proto.Message { return &zds.WorkloadRequest{} })
}

func FuzzCertificateRequest(f *testing.F) {
	f.Add(cat(str(1, "csr"), varint(3, 3600),
		msg(4, msg(1, str(1, "ImpersonatedIdentity"), msg(2, str(3, "spiffe://cluster.local/ns/a/sa/b"))))))
	fuzzRoundTrip(f, func() proto.Message { return &ca.IstioCertificateRequest{} })
}

func fuzzRoundTrip(f *testing.F, newMsg func() proto.Message) {
	f.Fuzz(func(t *testing.T, in []byte) {
		first := newMsg()
		if err := proto.Unmarshal(in, first); err != nil {
			return // rejecting bad input is fine; panicking is not
		}
		b, err := proto.Marshal(first)
		if err != nil {
			t.Fatalf("re-marshal of a decoded message failed: %v\n%s", err, prototext.Format(first))
		}
		second := newMsg()
		if err := proto.Unmarshal(b, second); err != nil {
			t.Fatalf("decoding our own encoding failed: %v\n%x", err, b)
		}
		if !proto.Equal(first, second) {
			t.Fatalf("round trip changed the message:\n%s\nvs\n%s", prototext.Format(first), prototext.Format(second))
		}
	})
}
