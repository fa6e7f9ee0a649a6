package xds

import (
	"context"
	"fmt"
	"testing"

	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc"
	"google.golang.org/protobuf/proto"

	ixds "github.com/meshlite/meshlite/internal/xds"
	"github.com/meshlite/meshlite/istiod-lite/authn"
	"github.com/meshlite/meshlite/proto/workload"
)

func wl(uid, ip string, services ...string) *Resource {
	w := &workload.Workload{Uid: uid, Name: uid, Addresses: [][]byte{[]byte(ip)}}
	r, err := NewResource(ixds.TypeAddress, uid, &workload.Address{Type: &workload.Address_Workload{Workload: w}}, []string{"/" + ip}, services)
	if err != nil {
		panic(err)
	}
	return r
}

func svc(key string) *Resource {
	r, err := NewResource(ixds.TypeAddress, key, &workload.Address{Type: &workload.Address_Service{Service: &workload.Service{Hostname: key}}}, []string{"/vip-" + key}, nil)
	if err != nil {
		panic(err)
	}
	return r
}

func TestCache_UpdatesOnlyChangedContentAndIndexes(t *testing.T) {
	c := NewCache()
	if n := c.Update(ixds.TypeAddress, []*Resource{wl("a", "1"), wl("b", "2", "ns/s"), svc("ns/s")}, nil); n != 3 {
		t.Fatalf("first update changed %d, want 3", n)
	}
	ch, since := c.TakeChanges()
	if len(ch[ixds.TypeAddress]) != 3 || since.IsZero() {
		t.Fatalf("changes = %v since %v", ch, since)
	}
	// Same content: nothing changes, nothing is signalled.
	if n := c.Update(ixds.TypeAddress, []*Resource{wl("a", "1")}, nil); n != 0 {
		t.Errorf("identical update changed %d", n)
	}
	if ch, _ := c.TakeChanges(); ch != nil {
		t.Errorf("identical update recorded %v", ch)
	}
	if r := c.Resolve(ixds.TypeAddress, "/2"); r == nil || r.Name != "b" {
		t.Errorf("alias /2 resolves to %v", r)
	}
	if m := c.Members(ixds.TypeAddress, "ns/s"); len(m) != 1 || m[0] != "b" {
		t.Errorf("members of ns/s = %v", m)
	}
	// b moves to another IP and leaves the service.
	c.Update(ixds.TypeAddress, []*Resource{wl("b", "3")}, nil)
	if c.Resolve(ixds.TypeAddress, "/2") != nil || c.Resolve(ixds.TypeAddress, "/3") == nil {
		t.Error("alias index not moved with the workload")
	}
	if m := c.Members(ixds.TypeAddress, "ns/s"); len(m) != 0 {
		t.Errorf("members of ns/s after leaving = %v", m)
	}
	c.Update(ixds.TypeAddress, nil, []string{"a", "nonexistent"})
	ch, _ = c.TakeChanges()
	if _, ok := ch[ixds.TypeAddress]["a"]; !ok || len(ch[ixds.TypeAddress]) != 2 {
		t.Errorf("changes after move+remove = %v, want b and a", ch)
	}
	if c.Resolve(ixds.TypeAddress, "/1") != nil {
		t.Error("removed workload still resolvable by alias")
	}
}

// fakeStream is the server side of a stream for logic tests.
type fakeStream struct {
	grpc.ServerStream
	sent []*discovery.DeltaDiscoveryResponse
}

func (f *fakeStream) Send(r *discovery.DeltaDiscoveryResponse) error {
	f.sent = append(f.sent, r)
	return nil
}

// SendMsg decodes what the server's codec writes, as a client would.
func (f *fakeStream) SendMsg(m any) error {
	b, err := Codec{}.Marshal(m)
	if err != nil {
		return err
	}
	r := &discovery.DeltaDiscoveryResponse{}
	if err := proto.Unmarshal(b.Materialize(), r); err != nil {
		return fmt.Errorf("decode response: %w", err)
	}
	f.sent = append(f.sent, r)
	return nil
}
func (f *fakeStream) Recv() (*discovery.DeltaDiscoveryRequest, error) {
	return nil, fmt.Errorf("unused")
}
func (f *fakeStream) Context() context.Context { return context.Background() }

func newTestConn(c *Cache) (*conn, *fakeStream) {
	s := NewServer(c, nil, Options{})
	fs := &fakeStream{}
	return &conn{id: "t", caller: &authn.Caller{Namespace: "ns", ServiceAccount: "sa"}, srv: s, stream: fs,
		subs: map[string]*subscription{}, wake: make(chan struct{}, 1), log: s.log}, fs
}

func names(r *discovery.DeltaDiscoveryResponse) []string {
	var out []string
	for _, x := range r.Resources {
		out = append(out, x.Name)
	}
	return out
}

func TestConn_InitialVersionsNackAndUnsubscribe(t *testing.T) {
	c := NewCache()
	a, b := wl("a", "1"), wl("b", "2")
	c.Update(ixds.TypeAddress, []*Resource{a, b}, nil)
	c.TakeChanges()
	cn, fs := newTestConn(c)

	// Resuming: the client holds a (current) and a stale b and a gone z.
	must(t, cn.handle(&discovery.DeltaDiscoveryRequest{TypeUrl: ixds.TypeAddress,
		InitialResourceVersions: map[string]string{"a": a.Version, "b": "old", "z": "old"}}))
	r := fs.sent[0]
	if got := names(r); len(got) != 1 || got[0] != "b" || len(r.RemovedResources) != 1 || r.RemovedResources[0] != "z" {
		t.Fatalf("resume response: %v removed %v; want b, removed z", got, r.RemovedResources)
	}
	must(t, cn.handle(&discovery.DeltaDiscoveryRequest{TypeUrl: ixds.TypeAddress, ResponseNonce: r.Nonce}))

	// b changes; the client rejects it; the server goes back to the old b.
	b2 := wl("b", "22")
	c.Update(ixds.TypeAddress, []*Resource{b2}, nil)
	ch, since := c.TakeChanges()
	cn.enqueue(ch, since)
	must(t, cn.push())
	r = fs.sent[len(fs.sent)-1]
	must(t, cn.handle(&discovery.DeltaDiscoveryRequest{TypeUrl: ixds.TypeAddress, ResponseNonce: r.Nonce,
		ErrorDetail: &status.Status{Code: 3, Message: "bad"}}))
	sub := cn.subs[ixds.TypeAddress]
	if sub.sent["b"] != b.Version || sub.nacks != 1 || sub.lastNack != "bad" {
		t.Fatalf("after NACK: client holds b@%s (want %s), nacks %d", sub.sent["b"], b.Version, sub.nacks)
	}
	// The same content is not resent by itself; the next change is.
	b3 := wl("b", "23")
	c.Update(ixds.TypeAddress, []*Resource{b3}, nil)
	ch, since = c.TakeChanges()
	cn.enqueue(ch, since)
	n := len(fs.sent)
	must(t, cn.push())
	if len(fs.sent) != n+1 || names(fs.sent[n])[0] != "b" {
		t.Fatalf("the change after a NACK was not pushed")
	}
	must(t, cn.handle(&discovery.DeltaDiscoveryRequest{TypeUrl: ixds.TypeAddress, ResponseNonce: fs.sent[n].Nonce}))
	if sub.lastAckedNonce != fs.sent[n].Nonce || sub.sent["b"] != b3.Version {
		t.Errorf("ACK not recorded: %+v", sub)
	}

	// Authorization for a client with no policies: an empty response.
	must(t, cn.handle(&discovery.DeltaDiscoveryRequest{TypeUrl: ixds.TypeAuthorization}))
	if last := fs.sent[len(fs.sent)-1]; last.TypeUrl != ixds.TypeAuthorization || len(last.Resources) != 0 {
		t.Errorf("authorization response %v, want empty", last)
	}
	// Unknown types are ignored, not answered.
	n = len(fs.sent)
	must(t, cn.handle(&discovery.DeltaDiscoveryRequest{TypeUrl: "type.googleapis.com/envoy.config.cluster.v3.Cluster"}))
	if len(fs.sent) != n {
		t.Error("answered an unknown type")
	}
}

func TestConn_OnDemandUnsubscribeStopsPushes(t *testing.T) {
	c := NewCache()
	c.Update(ixds.TypeAddress, []*Resource{wl("a", "1"), wl("b", "2")}, nil)
	c.TakeChanges()
	cn, fs := newTestConn(c)
	must(t, cn.handle(&discovery.DeltaDiscoveryRequest{TypeUrl: ixds.TypeAddress, ResourceNamesSubscribe: []string{"/1"}}))
	if got := names(fs.sent[0]); len(got) != 1 || got[0] != "a" {
		t.Fatalf("lookup of /1 returned %v", got)
	}
	must(t, cn.handle(&discovery.DeltaDiscoveryRequest{TypeUrl: ixds.TypeAddress, ResourceNamesUnsubscribe: []string{"/1"}}))
	c.Update(ixds.TypeAddress, []*Resource{wl("a", "1", "x/y")}, nil)
	ch, since := c.TakeChanges()
	cn.enqueue(ch, since)
	n := len(fs.sent)
	must(t, cn.push())
	if len(fs.sent) != n {
		t.Errorf("pushed %v after unsubscribe", names(fs.sent[n]))
	}
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

// FuzzConnHandle feeds arbitrary request sequences to a client's state
// machine: it must never panic, and every answer must be well formed.
func FuzzConnHandle(f *testing.F) {
	seed := func(reqs ...*discovery.DeltaDiscoveryRequest) []byte {
		var out []byte
		for _, r := range reqs {
			b, _ := proto.Marshal(r)
			out = append(out, byte(len(b)))
			out = append(out, b...)
		}
		return out
	}
	f.Add(seed(&discovery.DeltaDiscoveryRequest{TypeUrl: ixds.TypeAddress, InitialResourceVersions: map[string]string{"a": "x"}},
		&discovery.DeltaDiscoveryRequest{TypeUrl: ixds.TypeAddress, ResponseNonce: "1", ErrorDetail: &status.Status{Message: "no"}}))
	f.Add(seed(&discovery.DeltaDiscoveryRequest{TypeUrl: ixds.TypeAddress, ResourceNamesSubscribe: []string{"/1", "*", "ns/s"}},
		&discovery.DeltaDiscoveryRequest{TypeUrl: ixds.TypeAddress, ResourceNamesUnsubscribe: []string{"*", "/1"}, ResponseNonce: "99999999999999999999"}))
	f.Fuzz(func(t *testing.T, data []byte) {
		c := NewCache()
		c.Update(ixds.TypeAddress, []*Resource{wl("a", "1", "ns/s"), wl("b", "2"), svc("ns/s")}, nil)
		cn, fs := newTestConn(c)
		for len(data) > 0 {
			n := int(data[0])
			data = data[1:]
			if n > len(data) {
				n = len(data)
			}
			req := &discovery.DeltaDiscoveryRequest{}
			if err := proto.Unmarshal(data[:n], req); err != nil {
				return
			}
			data = data[n:]
			if err := cn.handle(req); err != nil {
				t.Fatal(err)
			}
			c.Update(ixds.TypeAddress, []*Resource{wl("b", fmt.Sprint(len(data)))}, []string{"gone"})
			ch, since := c.TakeChanges()
			cn.enqueue(ch, since)
			if err := cn.push(); err != nil {
				t.Fatal(err)
			}
		}
		for _, r := range fs.sent {
			if r.Nonce == "" || r.TypeUrl == "" {
				t.Fatalf("malformed response %v", r)
			}
		}
	})
}

func TestCache_AllIsSortedAndFollowsChanges(t *testing.T) {
	c := NewCache()
	c.Update(ixds.TypeAddress, []*Resource{wl("b", "2"), wl("a", "1")}, nil)
	first := c.All(ixds.TypeAddress)
	if len(first) != 2 || first[0].Name != "a" || first[1].Name != "b" {
		t.Fatalf("All = %v", first)
	}
	c.Update(ixds.TypeAddress, []*Resource{wl("c", "3")}, []string{"a"})
	got := c.All(ixds.TypeAddress)
	if len(got) != 2 || got[0].Name != "b" || got[1].Name != "c" {
		t.Fatalf("All after change = %v", got)
	}
	if first[0].Name != "a" {
		t.Error("an earlier snapshot was modified")
	}
}

// The pre-encoded response decodes to exactly the response the resources
// and fields make as messages: same resources in order (name, version,
// aliases, body), removals, nonce, type and version.
func TestEncodeResponse_DecodesAsTheMessage(t *testing.T) {
	set := []*Resource{wl("a", "1", "ns/s"), svc("ns/s"), wl("b", "2")}
	removed := []string{"gone", "ünïcode"}
	want := &discovery.DeltaDiscoveryResponse{TypeUrl: ixds.TypeAddress, Nonce: "7", SystemVersionInfo: "42", RemovedResources: removed}
	for _, r := range set {
		want.Resources = append(want.Resources, &discovery.Resource{Name: r.Name, Version: r.Version, Aliases: r.Aliases, Resource: r.Body})
	}
	for _, body := range [][]byte{nil, appendWire(nil, set)} {
		w, err := encodeResponse(ixds.TypeAddress, "7", "42", set, body, removed)
		must(t, err)
		bs, err := Codec{}.Marshal(w)
		must(t, err)
		got := &discovery.DeltaDiscoveryResponse{}
		must(t, proto.Unmarshal(bs.Materialize(), got))
		if !proto.Equal(got, want) {
			t.Fatalf("decoded\n%v\nwant\n%v", got, want)
		}
		if w.resources != 3 || w.removed != 2 || w.nonce != "7" {
			t.Errorf("response summary %+v", w)
		}
	}
	// Any other message goes through the proto codec.
	bs, err := Codec{}.Marshal(want)
	must(t, err)
	got := &discovery.DeltaDiscoveryResponse{}
	must(t, Codec{}.Unmarshal(bs, got))
	if !proto.Equal(got, want) {
		t.Fatalf("proto round trip: %v", got)
	}
}

// Clients that hold nothing share one encoded body; a change builds a new
// one and leaves the one already handed out alone; a client that holds part
// gets only the rest, encoded for it.
func TestConn_FullPushSharesOneBody(t *testing.T) {
	c := NewCache()
	c.Update(ixds.TypeAddress, []*Resource{wl("a", "1"), wl("b", "2"), svc("ns/s")}, nil)
	c.TakeChanges()
	bodies := func(cn *conn) *wireResponse {
		return capture(t, cn, &discovery.DeltaDiscoveryRequest{TypeUrl: ixds.TypeAddress})
	}
	c1, _ := newTestConn(c)
	c2, _ := newTestConn(c)
	w1, w2 := bodies(c1), bodies(c2)
	if w1.resources != 3 || len(w1.body) == 0 || &w1.body[0] != &w2.body[0] {
		t.Fatalf("two fresh clients did not share the body (%d resources)", w1.resources)
	}
	if w1.nonce == "" || string(w1.head) == "" {
		t.Fatal("empty head")
	}
	before := append([]byte(nil), w1.body...)
	c.Update(ixds.TypeAddress, []*Resource{wl("a", "11")}, nil)
	c3, _ := newTestConn(c)
	w3 := bodies(c3)
	if &w3.body[0] == &w1.body[0] || string(w3.body) == string(before) {
		t.Fatal("the body was not rebuilt after a change")
	}
	if string(w1.body) != string(before) {
		t.Fatal("a body already handed out was modified")
	}
	// Resuming with a and s current: only b is sent.
	c4, fs := newTestConn(c)
	must(t, c4.handle(&discovery.DeltaDiscoveryRequest{TypeUrl: ixds.TypeAddress, InitialResourceVersions: map[string]string{
		"a": c.Get(ixds.TypeAddress, "a").Version, "ns/s": c.Get(ixds.TypeAddress, "ns/s").Version}}))
	if got := names(fs.sent[0]); len(got) != 1 || got[0] != "b" {
		t.Fatalf("resume sent %v, want b", got)
	}

	// What one client holds is its own: a push to c1 leaves c2's state.
	c.TakeChanges()
	c.Update(ixds.TypeAddress, []*Resource{wl("b", "22")}, nil)
	ch, since := c.TakeChanges()
	c1.enqueue(ch, since)
	must(t, c1.push())
	if c1.subs[ixds.TypeAddress].sent["b"] == c2.subs[ixds.TypeAddress].sent["b"] {
		t.Fatal("a push to one client changed what another holds")
	}

	// Resuming with nothing current gets the shared body and the removal;
	// a NACK of it restores exactly what the client held.
	held := map[string]string{"a": "old", "b": "old", "ns/s": "old", "gone": "old"}
	c5, _ := newTestConn(c)
	w5 := capture(t, c5, &discovery.DeltaDiscoveryRequest{TypeUrl: ixds.TypeAddress, InitialResourceVersions: held})
	snap := c.snapshot(ixds.TypeAddress)
	if w5.resources != 3 || w5.removed != 1 || &w5.body[0] != &snap.body[0] {
		t.Fatalf("stale resume: %d resources, %d removed, shared body %v", w5.resources, w5.removed, &w5.body[0] == &snap.body[0])
	}
	must(t, c5.handle(&discovery.DeltaDiscoveryRequest{TypeUrl: ixds.TypeAddress, ResponseNonce: w5.nonce,
		ErrorDetail: &status.Status{Code: 3, Message: "bad"}}))
	if got := c5.subs[ixds.TypeAddress].sent; len(got) != len(held) || got["a"] != "old" || got["gone"] != "old" {
		t.Fatalf("after NACK the client holds %v, want %v", got, held)
	}
	if len(snap.versions) != 3 || snap.versions["a"] != c.Get(ixds.TypeAddress, "a").Version {
		t.Fatalf("the shared snapshot was modified: %v", snap.versions)
	}
}

// capture has cn handle req and returns the response it sends, as built.
func capture(t *testing.T, cn *conn, req *discovery.DeltaDiscoveryRequest) *wireResponse {
	t.Helper()
	var got *wireResponse
	cn.stream = &captureStream{f: func(w *wireResponse) { got = w }}
	must(t, cn.handle(req))
	if got == nil {
		t.Fatal("no response")
	}
	return got
}

type captureStream struct {
	fakeStream
	f func(*wireResponse)
}

func (s *captureStream) SendMsg(m any) error {
	w, ok := m.(*wireResponse)
	if !ok {
		return fmt.Errorf("sent %T, want a pre-encoded response", m)
	}
	s.f(w)
	return nil
}
