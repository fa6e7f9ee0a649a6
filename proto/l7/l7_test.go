package l7_test

import (
	"fmt"
	"slices"
	"testing"
	"time"

	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/meshlite/meshlite/proto/l7"
)

// schema pins the field numbers istiod-lite and the waypoint agree on. A
// renumbered, retyped or removed field breaks the wire between two builds;
// adding one means adding it here too.
var schema = map[protoreflect.FullName][]string{
	"meshlite.l7.ServiceConfig": {"namespace=1 string", "name=2 string", "hostname=3 string", "addresses=4 repeated string",
		"ports=5 repeated meshlite.l7.ServicePort", "http_routes=6 repeated meshlite.l7.HTTPRoute", "grpc_routes=7 repeated meshlite.l7.GRPCRoute",
		"authorization_policies=8 repeated meshlite.l7.AuthorizationPolicy", "resilience=9 meshlite.l7.ResiliencePolicy", "waypoint=10 string"},
	"meshlite.l7.ServicePort": {"port=1 uint32", "target_port=2 uint32", "name=3 string", "app_protocol=4 string", "protocol=5 enum meshlite.l7.Protocol"},
	"meshlite.l7.HTTPRoute": {"namespace=1 string", "name=2 string", "ports=3 repeated uint32", "hostnames=4 repeated string",
		"rules=5 repeated meshlite.l7.HTTPRouteRule", "resilience=6 meshlite.l7.ResiliencePolicy"},
	"meshlite.l7.HTTPRouteRule": {"name=1 string", "matches=2 repeated meshlite.l7.HTTPRouteMatch", "filters=3 repeated meshlite.l7.HTTPRouteFilter",
		"backend_refs=4 repeated meshlite.l7.BackendRef", "timeouts=5 meshlite.l7.Timeouts", "retry=6 meshlite.l7.Retry"},
	"meshlite.l7.HTTPRouteMatch": {"path=1 meshlite.l7.PathMatch", "headers=2 repeated meshlite.l7.HeaderMatch",
		"query_params=3 repeated meshlite.l7.QueryParamMatch", "method=4 string"},
	"meshlite.l7.PathMatch":       {"type=1 enum meshlite.l7.PathMatch.Type", "value=2 string"},
	"meshlite.l7.HeaderMatch":     {"type=1 enum meshlite.l7.HeaderMatch.Type", "name=2 string", "value=3 string"},
	"meshlite.l7.QueryParamMatch": {"type=1 enum meshlite.l7.QueryParamMatch.Type", "name=2 string", "value=3 string"},
	"meshlite.l7.HTTPRouteFilter": {"request_header_modifier=1 meshlite.l7.HeaderModifier oneof=kind", "response_header_modifier=2 meshlite.l7.HeaderModifier oneof=kind",
		"url_rewrite=3 meshlite.l7.URLRewrite oneof=kind", "request_redirect=4 meshlite.l7.RequestRedirect oneof=kind", "request_mirror=5 meshlite.l7.RequestMirror oneof=kind"},
	"meshlite.l7.Header":          {"name=1 string", "value=2 string"},
	"meshlite.l7.HeaderModifier":  {"set=1 repeated meshlite.l7.Header", "add=2 repeated meshlite.l7.Header", "remove=3 repeated string"},
	"meshlite.l7.PathModifier":    {"type=1 enum meshlite.l7.PathModifier.Type", "value=2 string"},
	"meshlite.l7.URLRewrite":      {"hostname=1 string", "path=2 meshlite.l7.PathModifier"},
	"meshlite.l7.RequestRedirect": {"scheme=1 string", "hostname=2 string", "path=3 meshlite.l7.PathModifier", "port=4 uint32", "status_code=5 uint32"},
	"meshlite.l7.RequestMirror":   {"backend=1 meshlite.l7.BackendRef", "percent=2 optional double"},
	"meshlite.l7.BackendRef": {"hostname=1 string", "port=2 uint32", "weight=3 uint32", "namespace=4 string", "name=5 string",
		"filters=6 repeated meshlite.l7.HTTPRouteFilter", "invalid=7 string"},
	"meshlite.l7.Timeouts": {"request=1 google.protobuf.Duration", "backend_request=2 google.protobuf.Duration"},
	"meshlite.l7.Retry":    {"attempts=1 uint32", "codes=2 repeated uint32", "backoff=3 google.protobuf.Duration", "retry_on_connect_failure=4 bool"},
	"meshlite.l7.GRPCRoute": {"namespace=1 string", "name=2 string", "ports=3 repeated uint32", "hostnames=4 repeated string",
		"rules=5 repeated meshlite.l7.GRPCRouteRule", "resilience=6 meshlite.l7.ResiliencePolicy"},
	"meshlite.l7.GRPCRouteRule": {"name=1 string", "matches=2 repeated meshlite.l7.GRPCRouteMatch", "filters=3 repeated meshlite.l7.HTTPRouteFilter",
		"backend_refs=4 repeated meshlite.l7.BackendRef", "timeouts=5 meshlite.l7.Timeouts", "retry=6 meshlite.l7.Retry"},
	"meshlite.l7.GRPCRouteMatch":  {"method=1 meshlite.l7.GRPCMethodMatch", "headers=2 repeated meshlite.l7.HeaderMatch"},
	"meshlite.l7.GRPCMethodMatch": {"type=1 enum meshlite.l7.GRPCMethodMatch.Type", "service=2 string", "method=3 string"},
	"meshlite.l7.AuthorizationPolicy": {"name=1 string", "namespace=2 string", "action=3 enum meshlite.l7.AuthorizationPolicy.Action",
		"rules=4 repeated meshlite.l7.AuthorizationRule", "dry_run=5 bool"},
	"meshlite.l7.AuthorizationRule": {"from=1 repeated meshlite.l7.Source", "to=2 repeated meshlite.l7.Operation", "when=3 repeated meshlite.l7.Condition"},
	"meshlite.l7.Source": {"principals=1 repeated string", "not_principals=2 repeated string", "namespaces=3 repeated string",
		"not_namespaces=4 repeated string", "ip_blocks=5 repeated string", "not_ip_blocks=6 repeated string"},
	"meshlite.l7.Operation": {"hosts=1 repeated string", "not_hosts=2 repeated string", "ports=3 repeated uint32", "not_ports=4 repeated uint32",
		"methods=5 repeated string", "not_methods=6 repeated string", "paths=7 repeated string", "not_paths=8 repeated string"},
	"meshlite.l7.Condition": {"key=1 string", "values=2 repeated string", "not_values=3 repeated string"},
	"meshlite.l7.ResiliencePolicy": {"namespace=1 string", "name=2 string", "rate_limit=3 meshlite.l7.RateLimit",
		"circuit_breaker=4 meshlite.l7.CircuitBreaker", "outlier_detection=5 meshlite.l7.OutlierDetection", "fault=6 meshlite.l7.FaultInjection"},
	"meshlite.l7.RateLimit":      {"requests_per_second=1 double", "burst=2 uint32", "per_source_identity=3 bool"},
	"meshlite.l7.CircuitBreaker": {"max_connections=1 uint32", "max_pending_requests=2 uint32", "max_requests_per_connection=3 uint32"},
	"meshlite.l7.OutlierDetection": {"consecutive_5xx=1 uint32", "interval=2 google.protobuf.Duration", "base_ejection_time=3 google.protobuf.Duration",
		"max_ejection_percent=4 uint32"},
	"meshlite.l7.FaultInjection": {"delay=1 meshlite.l7.FaultDelay", "abort=2 meshlite.l7.FaultAbort"},
	"meshlite.l7.FaultDelay":     {"fixed_delay=1 google.protobuf.Duration", "percentage=2 double"},
	"meshlite.l7.FaultAbort":     {"http_status=1 uint32", "percentage=2 double", "grpc_status=3 uint32"},
}

var enums = map[protoreflect.FullName][]string{
	"meshlite.l7.Protocol":                   {"PROTOCOL_UNSPECIFIED=0", "HTTP=1", "HTTP2=2", "GRPC=3", "TCP=4"},
	"meshlite.l7.PathMatch.Type":             {"PATH_PREFIX=0", "EXACT=1", "REGULAR_EXPRESSION=2"},
	"meshlite.l7.HeaderMatch.Type":           {"EXACT=0", "REGULAR_EXPRESSION=1"},
	"meshlite.l7.QueryParamMatch.Type":       {"EXACT=0", "REGULAR_EXPRESSION=1"},
	"meshlite.l7.PathModifier.Type":          {"REPLACE_FULL_PATH=0", "REPLACE_PREFIX_MATCH=1"},
	"meshlite.l7.GRPCMethodMatch.Type":       {"EXACT=0", "REGULAR_EXPRESSION=1"},
	"meshlite.l7.AuthorizationPolicy.Action": {"ALLOW=0", "DENY=1", "AUDIT=2"},
}

func describe(fd protoreflect.FieldDescriptor) string {
	s := fmt.Sprintf("%s=%d ", fd.Name(), fd.Number())
	switch {
	case fd.IsList():
		s += "repeated "
	case fd.HasOptionalKeyword():
		s += "optional "
	}
	switch fd.Kind() {
	case protoreflect.MessageKind:
		s += string(fd.Message().FullName())
	case protoreflect.EnumKind:
		s += "enum " + string(fd.Enum().FullName())
	default:
		s += fd.Kind().String()
	}
	if o := fd.ContainingOneof(); o != nil && !o.IsSynthetic() {
		s += " oneof=" + string(o.Name())
	}
	return s
}

func TestSchema_FieldNumbersArePinned(t *testing.T) {
	file := l7.File_l7_l7_proto
	if file.Package() != "meshlite.l7" || file.Path() != "l7/l7.proto" {
		t.Fatalf("file %s package %s, want l7/l7.proto meshlite.l7", file.Path(), file.Package())
	}
	seen := map[protoreflect.FullName]bool{}
	var walk func(protoreflect.MessageDescriptors)
	walk = func(ms protoreflect.MessageDescriptors) {
		for i := 0; i < ms.Len(); i++ {
			md := ms.Get(i)
			seen[md.FullName()] = true
			want, ok := schema[md.FullName()]
			if !ok {
				t.Errorf("message %s is not pinned in the schema table", md.FullName())
			} else {
				var got []string
				for j := 0; j < md.Fields().Len(); j++ {
					got = append(got, describe(md.Fields().Get(j)))
				}
				slices.Sort(got)
				w := slices.Clone(want)
				slices.Sort(w)
				if !slices.Equal(got, w) {
					t.Errorf("message %s:\n got  %q\n want %q", md.FullName(), got, w)
				}
			}
			for j := 0; j < md.Enums().Len(); j++ {
				checkEnum(t, md.Enums().Get(j), seen)
			}
			walk(md.Messages())
		}
	}
	walk(file.Messages())
	for i := 0; i < file.Enums().Len(); i++ {
		checkEnum(t, file.Enums().Get(i), seen)
	}
	for name := range schema {
		if !seen[name] {
			t.Errorf("pinned message %s is not defined", name)
		}
	}
	for name := range enums {
		if !seen[name] {
			t.Errorf("pinned enum %s is not defined", name)
		}
	}
}

func checkEnum(t *testing.T, ed protoreflect.EnumDescriptor, seen map[protoreflect.FullName]bool) {
	t.Helper()
	seen[ed.FullName()] = true
	var got []string
	for i := 0; i < ed.Values().Len(); i++ {
		v := ed.Values().Get(i)
		got = append(got, fmt.Sprintf("%s=%d", v.Name(), v.Number()))
	}
	if want := enums[ed.FullName()]; !slices.Equal(got, want) {
		t.Errorf("enum %s: got %q, want %q", ed.FullName(), got, want)
	}
}

func TestTypeURL_NamesTheMessage(t *testing.T) {
	want := "type.googleapis.com/" + string((&l7.ServiceConfig{}).ProtoReflect().Descriptor().FullName())
	if l7.TypeURL != want {
		t.Errorf("TypeURL %q, want %q", l7.TypeURL, want)
	}
	if got := l7.ResourceName("default", "reviews.default.svc.cluster.local"); got != "default/reviews.default.svc.cluster.local" {
		t.Errorf("ResourceName = %q", got)
	}
}

// fullConfig sets at least one field of every message.
func fullConfig() *l7.ServiceConfig {
	pct := 50.0
	backend := &l7.BackendRef{Hostname: "reviews-v2.default.svc.cluster.local", Port: 9080, Weight: 10, Namespace: "default", Name: "reviews-v2"}
	mods := &l7.HeaderModifier{Set: []*l7.Header{{Name: "x-a", Value: "1"}}, Add: []*l7.Header{{Name: "x-b", Value: "2"}}, Remove: []string{"x-c"}}
	return &l7.ServiceConfig{
		Namespace: "default", Name: "reviews", Hostname: "reviews.default.svc.cluster.local",
		Addresses: []string{"10.96.0.12"}, Waypoint: "default/waypoint",
		Ports: []*l7.ServicePort{{Port: 9080, TargetPort: 8080, Name: "http", AppProtocol: "http", Protocol: l7.Protocol_HTTP}},
		HttpRoutes: []*l7.HTTPRoute{{
			Namespace: "default", Name: "reviews", Ports: []uint32{9080}, Hostnames: []string{"reviews"},
			Rules: []*l7.HTTPRouteRule{{
				Name: "rule-0",
				Matches: []*l7.HTTPRouteMatch{{
					Path:        &l7.PathMatch{Type: l7.PathMatch_EXACT, Value: "/a"},
					Headers:     []*l7.HeaderMatch{{Type: l7.HeaderMatch_REGULAR_EXPRESSION, Name: "x-user", Value: "j.*"}},
					QueryParams: []*l7.QueryParamMatch{{Name: "q", Value: "1"}},
					Method:      "GET",
				}},
				Filters: []*l7.HTTPRouteFilter{
					{Kind: &l7.HTTPRouteFilter_RequestHeaderModifier{RequestHeaderModifier: mods}},
					{Kind: &l7.HTTPRouteFilter_ResponseHeaderModifier{ResponseHeaderModifier: mods}},
					{Kind: &l7.HTTPRouteFilter_UrlRewrite{UrlRewrite: &l7.URLRewrite{Hostname: "h", Path: &l7.PathModifier{Type: l7.PathModifier_REPLACE_PREFIX_MATCH, Value: "/b"}}}},
					{Kind: &l7.HTTPRouteFilter_RequestRedirect{RequestRedirect: &l7.RequestRedirect{Scheme: "https", Hostname: "x", Port: 8443, StatusCode: 301}}},
					{Kind: &l7.HTTPRouteFilter_RequestMirror{RequestMirror: &l7.RequestMirror{Backend: backend, Percent: &pct}}},
				},
				BackendRefs: []*l7.BackendRef{backend},
				Timeouts:    &l7.Timeouts{Request: durationpb.New(2 * time.Second), BackendRequest: durationpb.New(time.Second)},
				Retry:       &l7.Retry{Attempts: 3, Codes: []uint32{503}, Backoff: durationpb.New(10 * time.Millisecond), RetryOnConnectFailure: true},
			}},
		}},
		GrpcRoutes: []*l7.GRPCRoute{{Name: "g", Rules: []*l7.GRPCRouteRule{{
			Matches: []*l7.GRPCRouteMatch{{Method: &l7.GRPCMethodMatch{Service: "helloworld.Greeter", Method: "SayHello"}}},
			BackendRefs: []*l7.BackendRef{backend, {Port: 9080, Weight: 1, Namespace: "other", Name: "reviews-v3",
				Invalid: "backendRef other/reviews-v3: not permitted, no ReferenceGrant in other allows GRPCRoutes of namespace default"}},
		}}}},
		AuthorizationPolicies: []*l7.AuthorizationPolicy{{
			Name: "deny-admin", Namespace: "default", Action: l7.AuthorizationPolicy_DENY,
			Rules: []*l7.AuthorizationRule{{
				From: []*l7.Source{{Principals: []string{"cluster.local/ns/default/sa/client"}, NotNamespaces: []string{"x"}}},
				To:   []*l7.Operation{{Paths: []string{"/admin*"}, Methods: []string{"GET"}, Ports: []uint32{9080}}},
				When: []*l7.Condition{{Key: "request.headers[x-a]", Values: []string{"1"}}},
			}},
		}},
		Resilience: &l7.ResiliencePolicy{
			Namespace: "default", Name: "tp",
			RateLimit:        &l7.RateLimit{RequestsPerSecond: 10, Burst: 10, PerSourceIdentity: true},
			CircuitBreaker:   &l7.CircuitBreaker{MaxConnections: 1, MaxPendingRequests: 1, MaxRequestsPerConnection: 100},
			OutlierDetection: &l7.OutlierDetection{Consecutive_5Xx: 5, Interval: durationpb.New(time.Second), BaseEjectionTime: durationpb.New(30 * time.Second), MaxEjectionPercent: 50},
			Fault:            &l7.FaultInjection{Delay: &l7.FaultDelay{FixedDelay: durationpb.New(time.Second), Percentage: 10}, Abort: &l7.FaultAbort{HttpStatus: 503, Percentage: 20}},
		},
	}
}

func TestServiceConfig_RoundTripsBinaryAndJSON(t *testing.T) {
	in := fullConfig()
	b, err := proto.Marshal(in)
	if err != nil {
		t.Fatal(err)
	}
	out := &l7.ServiceConfig{}
	if err := proto.Unmarshal(b, out); err != nil {
		t.Fatal(err)
	}
	if !proto.Equal(in, out) {
		t.Fatalf("binary round trip changed the message:\n in  %v\n out %v", in, out)
	}
	j, err := protojson.Marshal(in)
	if err != nil {
		t.Fatal(err)
	}
	out2 := &l7.ServiceConfig{}
	if err := protojson.Unmarshal(j, out2); err != nil {
		t.Fatal(err)
	}
	if !proto.Equal(in, out2) {
		t.Fatalf("JSON round trip changed the message")
	}
	// The optional mirror percent keeps "unset" apart from 0.
	zero := 0.0
	m := &l7.RequestMirror{Percent: &zero}
	b, _ = proto.Marshal(m)
	m2 := &l7.RequestMirror{}
	if err := proto.Unmarshal(b, m2); err != nil || m2.Percent == nil || *m2.Percent != 0 {
		t.Fatalf("percent 0 lost its presence: %v %v", m2, err)
	}
}

// FuzzServiceConfig feeds untrusted xDS bytes to the decoder: it may fail but
// never panic, and what decodes re-encodes to an equal message.
//
//	go test ./proto/l7 -run '^$' -fuzz FuzzServiceConfig -fuzztime 30s
func FuzzServiceConfig(f *testing.F) {
	b, _ := proto.Marshal(fullConfig())
	f.Add(b)
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, data []byte) {
		m := &l7.ServiceConfig{}
		if err := proto.Unmarshal(data, m); err != nil {
			return
		}
		det := proto.MarshalOptions{Deterministic: true}
		b, err := det.Marshal(m)
		if err != nil {
			t.Fatalf("re-encode: %v", err)
		}
		m2 := &l7.ServiceConfig{}
		if err := proto.Unmarshal(b, m2); err != nil {
			t.Fatalf("decode re-encoded: %v", err)
		}
		// Bytes, not proto.Equal: a decoded NaN is never equal to itself.
		b2, err := det.Marshal(m2)
		if err != nil || string(b) != string(b2) {
			t.Fatalf("round trip changed the message (%v)", err)
		}
	})
}
