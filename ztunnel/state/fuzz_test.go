package state

import (
	"net/netip"
	"testing"

	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/meshlite/meshlite/internal/xds"
	"github.com/meshlite/meshlite/proto/security"
	"github.com/meshlite/meshlite/proto/workload"
)

// FuzzApply feeds arbitrary resource bodies of both types to Apply, then
// resolves and evaluates lookups against whatever was accepted.
func FuzzApply(f *testing.F) {
	key := "default/echo.default.svc.cluster.local"
	for _, m := range []proto.Message{
		&workload.Address{Type: &workload.Address_Workload{Workload: wl("default", "a", "10.0.0.1", hbone, inService(key, 80, 8080))}},
		&workload.Address{Type: &workload.Address_Service{Service: svc("default", "echo", "10.96.0.10", 80, 8080)}},
		&security.Authorization{Name: "p", Namespace: "default", Scope: security.Scope_NAMESPACE},
	} {
		b, _ := proto.Marshal(m)
		f.Add(b, true)
		f.Add(b, false)
	}
	f.Fuzz(func(t *testing.T, body []byte, isAddr bool) {
		s := New(nil)
		typ := xds.TypeAuthorization
		if isAddr {
			typ = xds.TypeAddress
		}
		res := []*discovery.Resource{{Name: "r", Resource: &anypb.Any{TypeUrl: typ, Value: body}}}
		if err := s.Apply(typ, res, nil); err != nil {
			return
		}
		for _, dst := range []string{"10.0.0.1:80", "10.96.0.10:80", "[::1]:80"} {
			_, _ = s.Resolve(nil, "", netip.MustParseAddrPort(dst))
		}
		for _, w := range s.Snapshot().Workloads {
			_, _ = s.Resolve(w, w.GetNetwork(), netip.MustParseAddrPort("10.96.0.10:80"))
			_, _ = s.Policies(nil, w)
		}
		if err := s.Apply(typ, nil, []string{"r"}); err != nil {
			t.Fatalf("removal failed: %v", err)
		}
	})
}
