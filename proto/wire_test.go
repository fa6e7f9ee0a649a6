package proto_test

import (
	"bytes"
	"testing"

	"google.golang.org/protobuf/encoding/prototext"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/emptypb"
	"google.golang.org/protobuf/types/known/structpb"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/meshlite/meshlite/proto/ca"
	"github.com/meshlite/meshlite/proto/security"
	"github.com/meshlite/meshlite/proto/workload"
	"github.com/meshlite/meshlite/proto/zds"
)

// The tests below encode messages by hand, field number by field number, as
// Istio's own code puts them on the wire, and check that they decode into the
// Go fields that carry that meaning here, and that they round-trip through our
// encoder.

// Small builders over protowire so the encodings read like the schema.

func cat(parts ...[]byte) []byte { return bytes.Join(parts, nil) }

func str(num protowire.Number, s string) []byte {
	b := protowire.AppendTag(nil, num, protowire.BytesType)
	return protowire.AppendString(b, s)
}

func raw(num protowire.Number, v []byte) []byte {
	b := protowire.AppendTag(nil, num, protowire.BytesType)
	return protowire.AppendBytes(b, v)
}

func msg(num protowire.Number, fields ...[]byte) []byte { return raw(num, cat(fields...)) }

func varint(num protowire.Number, v uint64) []byte {
	b := protowire.AppendTag(nil, num, protowire.VarintType)
	return protowire.AppendVarint(b, v)
}

func packed(num protowire.Number, vs ...uint64) []byte {
	var p []byte
	for _, v := range vs {
		p = protowire.AppendVarint(p, v)
	}
	return raw(num, p)
}

// Istio's numbers, spelled out once so the encodings below say which field
// they mean.
const (
	// Address
	addrWorkload = 1
	addrService  = 2
	// Workload
	wlName           = 1
	wlNamespace      = 2
	wlAddresses      = 3
	wlNetwork        = 4
	wlTunnelProtocol = 5
	wlTrustDomain    = 6
	wlServiceAccount = 7
	wlWaypoint       = 8
	wlNode           = 9
	wlCanonicalName  = 10
	wlWorkloadType   = 12
	wlAuthzPolicies  = 16
	wlStatus         = 17
	wlClusterID      = 18
	wlUID            = 20
	wlServices       = 22
	wlNetworkMode    = 25
	wlCapacity       = 27
	// Service
	svcName          = 1
	svcNamespace     = 2
	svcHostname      = 3
	svcAddresses     = 4
	svcPorts         = 5
	svcWaypoint      = 7
	svcLoadBalancing = 8
	svcIPFamilies    = 9
	svcCanonical     = 11
	svcVisibility    = 14
)

func workloadWire() []byte {
	return msg(addrWorkload,
		str(wlName, "reviews-v1-abc"),
		str(wlNamespace, "default"),
		raw(wlAddresses, []byte{10, 244, 1, 7}),
		str(wlNetwork, "net1"),
		varint(wlTunnelProtocol, 1), // HBONE
		str(wlTrustDomain, "cluster.local"),
		str(wlServiceAccount, "bookinfo-reviews"),
		msg(wlWaypoint,
			msg(2, str(1, "net1"), raw(2, []byte{10, 96, 0, 9})), // address: NetworkAddress
			varint(3, 15008), // hbone_mtls_port
		),
		str(wlNode, "node-a"),
		str(wlCanonicalName, "reviews"),
		varint(wlWorkloadType, 2), // POD
		str(wlAuthzPolicies, "default/allow-ingress"),
		varint(wlStatus, 1), // UNHEALTHY
		str(wlClusterID, "Kubernetes"),
		str(wlUID, "Kubernetes//Pod/default/reviews-v1-abc"),
		msg(wlServices, // one map entry: key=1, value=2
			str(1, "default/reviews.default.svc.cluster.local"),
			msg(2, msg(1, varint(1, 9080), varint(2, 8080))), // PortList{ports: [Port{service_port, target_port}]}
		),
		varint(wlNetworkMode, 1),      // HOST_NETWORK
		msg(wlCapacity, varint(1, 3)), // UInt32Value{value: 3}
	)
}

func TestWire_WorkloadFieldsMeanWhatIstioMeans(t *testing.T) {
	want := &workload.Address{Type: &workload.Address_Workload{Workload: &workload.Workload{
		Uid:            "Kubernetes//Pod/default/reviews-v1-abc",
		Name:           "reviews-v1-abc",
		Namespace:      "default",
		Addresses:      [][]byte{{10, 244, 1, 7}},
		Network:        "net1",
		TunnelProtocol: workload.TunnelProtocol_HBONE,
		TrustDomain:    "cluster.local",
		ServiceAccount: "bookinfo-reviews",
		Waypoint: &workload.GatewayAddress{
			Destination: &workload.GatewayAddress_Address{Address: &workload.NetworkAddress{
				Network: "net1", Address: []byte{10, 96, 0, 9},
			}},
			HboneMtlsPort: 15008,
		},
		Node:                  "node-a",
		CanonicalName:         "reviews",
		WorkloadType:          workload.WorkloadType_POD,
		AuthorizationPolicies: []string{"default/allow-ingress"},
		Status:                workload.WorkloadStatus_UNHEALTHY,
		ClusterId:             "Kubernetes",
		Services: map[string]*workload.PortList{
			"default/reviews.default.svc.cluster.local": {Ports: []*workload.Port{{ServicePort: 9080, TargetPort: 8080}}},
		},
		NetworkMode: workload.NetworkMode_HOST_NETWORK,
		Capacity:    wrapperspb.UInt32(3),
	}}}
	checkWire(t, workloadWire(), &workload.Address{}, want)
}

func serviceWire() []byte {
	return msg(addrService,
		str(svcName, "reviews"),
		str(svcNamespace, "default"),
		str(svcHostname, "reviews.default.svc.cluster.local"),
		msg(svcAddresses, str(1, "net1"), raw(2, []byte{10, 96, 0, 20})),
		msg(svcPorts, varint(1, 9080), varint(2, 8080), varint(3, 1)), // app_protocol HTTP11
		msg(svcWaypoint,
			msg(1, str(1, "default"), str(2, "waypoint.default.svc.cluster.local")), // hostname: NamespacedHostname
			varint(3, 15008),
		),
		msg(svcLoadBalancing,
			packed(1, 6, 1), // routing_preference [NETWORK, REGION]
			varint(2, 2),    // mode FAILOVER
		),
		varint(svcIPFamilies, 3), // DUAL
		varint(svcCanonical, 1),
		varint(svcVisibility, 1), // NAMESPACE
	)
}

func TestWire_ServiceFieldsMeanWhatIstioMeans(t *testing.T) {
	want := &workload.Address{Type: &workload.Address_Service{Service: &workload.Service{
		Name:      "reviews",
		Namespace: "default",
		Hostname:  "reviews.default.svc.cluster.local",
		Addresses: []*workload.NetworkAddress{{Network: "net1", Address: []byte{10, 96, 0, 20}}},
		Ports:     []*workload.Port{{ServicePort: 9080, TargetPort: 8080, AppProtocol: workload.AppProtocol_HTTP11}},
		Waypoint: &workload.GatewayAddress{
			Destination: &workload.GatewayAddress_Hostname{Hostname: &workload.NamespacedHostname{
				Namespace: "default", Hostname: "waypoint.default.svc.cluster.local",
			}},
			HboneMtlsPort: 15008,
		},
		LoadBalancing: &workload.LoadBalancing{
			RoutingPreference: []workload.LoadBalancing_Scope{workload.LoadBalancing_NETWORK, workload.LoadBalancing_REGION},
			Mode:              workload.LoadBalancing_FAILOVER,
		},
		IpFamilies: workload.IPFamilies_DUAL,
		Canonical:  true,
		Visibility: workload.Service_NAMESPACE,
	}}}
	checkWire(t, serviceWire(), &workload.Address{}, want)
}

func TestWire_NetworkAddressLengthKeepsPresence(t *testing.T) {
	// A CIDR with an explicit /0 must stay distinguishable from a host
	// address, which omits the field.
	cidr := cat(raw(2, []byte{0, 0, 0, 0}), varint(3, 0))
	zero := uint32(0)
	checkWire(t, cidr, &workload.NetworkAddress{}, &workload.NetworkAddress{Address: []byte{0, 0, 0, 0}, Length: &zero})

	host := raw(2, []byte{10, 0, 0, 1})
	got := &workload.NetworkAddress{}
	if err := proto.Unmarshal(host, got); err != nil {
		t.Fatal(err)
	}
	if got.Length != nil {
		t.Errorf("host address decoded with length %d, want no length", *got.Length)
	}
}

func authorizationWire() []byte {
	return cat(
		str(1, "allow-frontend"),
		str(2, "bookinfo"),
		varint(3, 2), // scope WORKLOAD_SELECTOR
		varint(4, 1), // action DENY
		msg(5, // groups: Group
			msg(1, // rules: Rules
				msg(2, // matches: Match
					msg(1, str(2, "team-")),                               // namespaces: StringMatch{prefix}
					msg(3, str(1, "cluster.local/ns/a/sa/front")),         // principals: StringMatch{exact}
					msg(4, raw(4, nil)),                                   // not_principals: StringMatch{presence}
					msg(5, raw(1, []byte{192, 168, 0, 0}), varint(2, 16)), // source_ips: Address
					msg(8, raw(1, []byte{10, 0, 0, 1}), varint(2, 32)),    // not_destination_ips
					packed(9, 80, 443),                                    // destination_ports
					packed(10, 15021),                                     // not_destination_ports
					msg(11, str(1, "a"), str(2, "front")),                 // service_accounts
				),
			),
		),
		varint(6, 1), // dry_run
	)
}

func TestWire_AuthorizationFieldsMeanWhatIstioMeans(t *testing.T) {
	want := &security.Authorization{
		Name:      "allow-frontend",
		Namespace: "bookinfo",
		Scope:     security.Scope_WORKLOAD_SELECTOR,
		Action:    security.Action_DENY,
		Groups: []*security.Group{{Rules: []*security.Rules{{Matches: []*security.Match{{
			Namespaces:          []*security.StringMatch{{MatchType: &security.StringMatch_Prefix{Prefix: "team-"}}},
			Principals:          []*security.StringMatch{{MatchType: &security.StringMatch_Exact{Exact: "cluster.local/ns/a/sa/front"}}},
			NotPrincipals:       []*security.StringMatch{{MatchType: &security.StringMatch_Presence{Presence: &emptypb.Empty{}}}},
			SourceIps:           []*security.Address{{Address: []byte{192, 168, 0, 0}, Length: 16}},
			NotDestinationIps:   []*security.Address{{Address: []byte{10, 0, 0, 1}, Length: 32}},
			DestinationPorts:    []uint32{80, 443},
			NotDestinationPorts: []uint32{15021},
			ServiceAccounts:     []*security.ServiceAccountMatch{{Namespace: "a", ServiceAccount: "front"}},
		}}}}}},
		DryRun: true,
	}
	checkWire(t, authorizationWire(), &security.Authorization{}, want)
}

func TestWire_AuthorizationAcceptsUnpackedPorts(t *testing.T) {
	// Encoders may send repeated scalars unpacked; parsers must accept both.
	in := msg(5, msg(1, msg(2, varint(9, 80), varint(9, 443))))
	got := &security.Authorization{}
	if err := proto.Unmarshal(in, got); err != nil {
		t.Fatal(err)
	}
	ports := got.GetGroups()[0].GetRules()[0].GetMatches()[0].GetDestinationPorts()
	if len(ports) != 2 || ports[0] != 80 || ports[1] != 443 {
		t.Errorf("destination_ports = %v, want [80 443]", ports)
	}
}

func zdsAddWire() []byte {
	return msg(1, // add
		str(1, "1f0a6c4e-0b8e-4d8a-9d8e-2c1b3a4d5e6f"),
		msg(2, str(1, "reviews-v1-abc"), str(2, "default"), str(3, "bookinfo-reviews")),
	)
}

func TestWire_ZDSMessagesMeanWhatIstioMeans(t *testing.T) {
	const uid = "1f0a6c4e-0b8e-4d8a-9d8e-2c1b3a4d5e6f"
	cases := []struct {
		name string
		wire []byte
		into proto.Message
		want proto.Message
	}{
		{"hello", varint(1, 1), &zds.ZdsHello{}, &zds.ZdsHello{Version: zds.Version_V1}},
		{"add", zdsAddWire(), &zds.WorkloadRequest{}, &zds.WorkloadRequest{Payload: &zds.WorkloadRequest_Add{Add: &zds.AddWorkload{
			Uid: uid,
			WorkloadInfo: &zds.WorkloadInfo{
				Name: "reviews-v1-abc", Namespace: "default", ServiceAccount: "bookinfo-reviews",
			},
		}}}},
		// DelWorkload's uid is field 2 in Istio, unlike the others.
		{"del", msg(2, str(2, uid)), &zds.WorkloadRequest{}, &zds.WorkloadRequest{Payload: &zds.WorkloadRequest_Del{Del: &zds.DelWorkload{Uid: uid}}}},
		{"snapshot sent", raw(3, nil), &zds.WorkloadRequest{}, &zds.WorkloadRequest{Payload: &zds.WorkloadRequest_SnapshotSent{SnapshotSent: &zds.SnapshotSent{}}}},
		{"keep", msg(5, str(1, uid)), &zds.WorkloadRequest{}, &zds.WorkloadRequest{Payload: &zds.WorkloadRequest_Keep{Keep: &zds.KeepWorkload{Uid: uid}}}},
		{"ack ok", raw(1, nil), &zds.WorkloadResponse{}, &zds.WorkloadResponse{Payload: &zds.WorkloadResponse_Ack{Ack: &zds.Ack{}}}},
		{"ack error", msg(1, str(1, "netns gone")), &zds.WorkloadResponse{}, &zds.WorkloadResponse{Payload: &zds.WorkloadResponse_Ack{Ack: &zds.Ack{Error: "netns gone"}}}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) { checkWire(t, tc.wire, tc.into, tc.want) })
	}
}

func TestWire_ZDSHelloIsTwoBytes(t *testing.T) {
	// ztunnel's first datagram; a fixed, tiny message.
	b, err := proto.Marshal(&zds.ZdsHello{Version: zds.Version_V1})
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(b, []byte{0x08, 0x01}) {
		t.Errorf("ZdsHello{V1} = %x, want 0801", b)
	}
}

func TestWire_CertificateRequestFieldsMeanWhatIstioMeans(t *testing.T) {
	const csr = "-----BEGIN CERTIFICATE REQUEST-----\nMIIB\n-----END CERTIFICATE REQUEST-----\n"
	in := cat(
		str(1, csr),
		varint(3, 86400), // validity_duration, seconds
		msg(4, // metadata: Struct{fields: map<string, Value>}
			msg(1, str(1, "ImpersonatedIdentity"), msg(2, str(3, "spiffe://cluster.local/ns/default/sa/reviews"))),
		),
	)
	want := &ca.IstioCertificateRequest{
		Csr:              csr,
		ValidityDuration: 86400,
		Metadata: &structpb.Struct{Fields: map[string]*structpb.Value{
			"ImpersonatedIdentity": structpb.NewStringValue("spiffe://cluster.local/ns/default/sa/reviews"),
		}},
	}
	checkWire(t, in, &ca.IstioCertificateRequest{}, want)

	resp := cat(str(1, "leaf"), str(1, "root"))
	checkWire(t, resp, &ca.IstioCertificateResponse{}, &ca.IstioCertificateResponse{CertChain: []string{"leaf", "root"}})
}

// checkWire decodes wire into into and requires it to equal want, then
// requires want to survive a marshal/unmarshal round trip unchanged.
func checkWire(t *testing.T, wire []byte, into, want proto.Message) {
	t.Helper()
	if err := proto.Unmarshal(wire, into); err != nil {
		t.Fatalf("unmarshal %x: %v", wire, err)
	}
	if u := into.ProtoReflect().GetUnknown(); u != nil {
		t.Errorf("decoded with unknown fields %x: a field number is not where Istio has it", u)
	}
	if !proto.Equal(into, want) {
		t.Errorf("decoded\n%s\nwant\n%s", prototext.Format(into), prototext.Format(want))
	}
	b, err := proto.Marshal(want)
	if err != nil {
		t.Fatalf("marshal: %v", err)
	}
	back := want.ProtoReflect().New().Interface()
	if err := proto.Unmarshal(b, back); err != nil {
		t.Fatalf("unmarshal own encoding: %v", err)
	}
	if !proto.Equal(back, want) {
		t.Errorf("round trip changed the message:\n%s\nwant\n%s", prototext.Format(back), prototext.Format(want))
	}
}
