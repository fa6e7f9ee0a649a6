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
