package dns

import (
	"context"
	"os"
	"testing"

	mdns "github.com/miekg/dns"
)

func writeFile(path, s string) error { return os.WriteFile(path, []byte(s), 0o644) }

// FuzzAnswer feeds arbitrary datagrams through the request path as the
// server does (unpack, answer, pack): it must never panic, and whatever it
// answers must pack and carry the query's id.
func FuzzAnswer(f *testing.F) {
	for _, q := range []*mdns.Msg{
		query("echo.app.svc.cluster.local.", mdns.TypeA),
		query("db.app.svc.cluster.local.", mdns.TypeAAAA),
		query("echo.app.svc.cluster.local.app.svc.cluster.local.", mdns.TypeA),
		query("example.com.", mdns.TypeSRV),
	} {
		b, _ := q.Pack()
		f.Add(b, false)
	}
	p, err := New(Config{State: testState(), DomainSuffix: "cluster.local"})
	if err != nil {
		f.Fatal(err)
	}
	f.Fuzz(func(t *testing.T, b []byte, tcp bool) {
		req := new(mdns.Msg)
		if err := req.Unpack(b); err != nil {
			return // the server drops what does not parse
		}
		resp := p.Answer(context.Background(), req, tcp, nil)
		if resp == nil {
			return
		}
		if resp.Id != req.Id || !resp.Response {
			t.Fatalf("answer id %d response %v for query id %d", resp.Id, resp.Response, req.Id)
		}
		if _, err := resp.Pack(); err != nil {
			t.Fatalf("answer does not pack: %v", err)
		}
	})
}
