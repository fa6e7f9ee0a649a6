package proto_test

import (
	"fmt"
	"slices"
	"strings"
	"testing"

	"google.golang.org/protobuf/reflect/protoreflect"

	"github.com/meshlite/meshlite/proto/ca"
	"github.com/meshlite/meshlite/proto/security"
	"github.com/meshlite/meshlite/proto/workload"
	"github.com/meshlite/meshlite/proto/zds"
)

// istioMessages is the compatibility contract: every message of our four
// proto packages with every field as Istio defines it (name=number, label,
// type, oneof), plus reserved numbers. The facts were taken from Istio's
// workload.proto, authorization.proto, zds.proto (istio/istio pkg/workloadapi,
// pkg/zdsapi) and security/v1alpha1/ca.proto (istio/api). A field that is
// missing, extra, renumbered or retyped in our .proto fails the test.
var istioMessages = map[protoreflect.FullName][]string{
	// istio.workload
	"istio.workload.Address": {
		"workload=1 istio.workload.Workload oneof=type",
		"service=2 istio.workload.Service oneof=type",
	},
	"istio.workload.Service": {
		"name=1 string",
		"namespace=2 string",
		"hostname=3 string",
		"addresses=4 repeated istio.workload.NetworkAddress",
		"ports=5 repeated istio.workload.Port",
		"subject_alt_names=6 repeated string",
		"waypoint=7 istio.workload.GatewayAddress",
		"load_balancing=8 istio.workload.LoadBalancing",
		"ip_families=9 enum istio.workload.IPFamilies",
		"extensions=10 repeated istio.workload.Extension",
		"canonical=11 bool",
		"ingress_use_waypoint=12 bool",
		"weighted_waypoints=13 repeated istio.workload.WeightedWaypoint",
		"visibility=14 enum istio.workload.Service.Visibility",
	},
	"istio.workload.LoadBalancing": {
		"routing_preference=1 repeated enum istio.workload.LoadBalancing.Scope packed",
		"mode=2 enum istio.workload.LoadBalancing.Mode",
		"health_policy=3 enum istio.workload.LoadBalancing.HealthPolicy",
	},
	"istio.workload.Workload": {
		"name=1 string",
		"namespace=2 string",
		"addresses=3 repeated bytes",
		"network=4 string",
		"tunnel_protocol=5 enum istio.workload.TunnelProtocol",
		"trust_domain=6 string",
		"service_account=7 string",
		"waypoint=8 istio.workload.GatewayAddress",
		"node=9 string",
		"canonical_name=10 string",
		"canonical_revision=11 string",
		"workload_type=12 enum istio.workload.WorkloadType",
		"workload_name=13 string",
		"native_tunnel=14 bool",
		"reserved 15",
		"authorization_policies=16 repeated string",
		"status=17 enum istio.workload.WorkloadStatus",
		"cluster_id=18 string",
		"network_gateway=19 istio.workload.GatewayAddress",
		"uid=20 string",
		"hostname=21 string",
		"services=22 map<string, istio.workload.PortList>",
		"application_tunnel=23 istio.workload.ApplicationTunnel",
		"locality=24 istio.workload.Locality",
		"network_mode=25 enum istio.workload.NetworkMode",
		"extensions=26 repeated istio.workload.Extension",
		"capacity=27 google.protobuf.UInt32Value",
	},
	"istio.workload.Locality": {
		"region=1 string",
		"zone=2 string",
		"subzone=3 string",
	},
	"istio.workload.PortList": {
		"ports=1 repeated istio.workload.Port",
	},
	"istio.workload.Port": {
		"service_port=1 uint32",
		"target_port=2 uint32",
		"app_protocol=3 enum istio.workload.AppProtocol",
	},
	"istio.workload.ApplicationTunnel": {
		"protocol=1 enum istio.workload.ApplicationTunnel.Protocol",
		"port=2 uint32",
	},
	"istio.workload.GatewayAddress": {
		"hostname=1 istio.workload.NamespacedHostname oneof=destination",
		"address=2 istio.workload.NetworkAddress oneof=destination",
		"hbone_mtls_port=3 uint32",
		"reserved 4",
		"reserved hbone_single_tls_port",
	},
	"istio.workload.WeightedWaypoint": {
		"destination=1 istio.workload.GatewayAddress",
		"weight=2 uint32",
	},
	"istio.workload.NetworkAddress": {
		"network=1 string",
		"address=2 bytes",
		"length=3 optional uint32",
	},
	"istio.workload.NamespacedHostname": {
		"namespace=1 string",
		"hostname=2 string",
	},
	"istio.workload.Extension": {
		"name=1 string",
		"config=2 google.protobuf.Any",
	},

	// istio.security
	"istio.security.Authorization": {
		"name=1 string",
		"namespace=2 string",
		"scope=3 enum istio.security.Scope",
		"action=4 enum istio.security.Action",
		"groups=5 repeated istio.security.Group",
		"dry_run=6 bool",
		"extensions=7 repeated istio.workload.Extension",
	},
	"istio.security.Group": {
		"rules=1 repeated istio.security.Rules",
	},
	"istio.security.Rules": {
		"reserved 1",
		"matches=2 repeated istio.security.Match",
	},
	"istio.security.Match": {
		"namespaces=1 repeated istio.security.StringMatch",
		"not_namespaces=2 repeated istio.security.StringMatch",
		"principals=3 repeated istio.security.StringMatch",
		"not_principals=4 repeated istio.security.StringMatch",
		"source_ips=5 repeated istio.security.Address",
		"not_source_ips=6 repeated istio.security.Address",
		"destination_ips=7 repeated istio.security.Address",
		"not_destination_ips=8 repeated istio.security.Address",
		"destination_ports=9 repeated uint32 packed",
		"not_destination_ports=10 repeated uint32 packed",
		"service_accounts=11 repeated istio.security.ServiceAccountMatch",
		"not_service_accounts=12 repeated istio.security.ServiceAccountMatch",
		"extensions=13 repeated istio.workload.Extension",
	},
	"istio.security.Address": {
		"address=1 bytes",
		"length=2 uint32",
	},
	"istio.security.ServiceAccountMatch": {
		"namespace=1 string",
		"serviceAccount=2 string",
	},
	"istio.security.StringMatch": {
		"exact=1 string oneof=match_type",
		"prefix=2 string oneof=match_type",
		"suffix=3 string oneof=match_type",
		"presence=4 google.protobuf.Empty oneof=match_type",
	},

	// istio.workload.zds
	"istio.workload.zds.ZdsHello": {
		"version=1 enum istio.workload.zds.Version",
	},
	"istio.workload.zds.WorkloadInfo": {
		"name=1 string",
		"namespace=2 string",
		"service_account=3 string",
		"reserved 4",
		"reserved trust_domain",
	},
	"istio.workload.zds.AddWorkload": {
		"uid=1 string",
		"workload_info=2 istio.workload.zds.WorkloadInfo",
	},
	"istio.workload.zds.KeepWorkload": {
		"uid=1 string",
	},
	"istio.workload.zds.DelWorkload": {
		"uid=2 string",
	},
	"istio.workload.zds.SnapshotSent": {},
	"istio.workload.zds.Ack": {
		"error=1 string",
	},
	"istio.workload.zds.WorkloadRequest": {
		"add=1 istio.workload.zds.AddWorkload oneof=payload",
		"del=2 istio.workload.zds.DelWorkload oneof=payload",
		"snapshot_sent=3 istio.workload.zds.SnapshotSent oneof=payload",
		"keep=5 istio.workload.zds.KeepWorkload oneof=payload",
	},
	"istio.workload.zds.WorkloadResponse": {
		"ack=1 istio.workload.zds.Ack oneof=payload",
	},

	// istio.v1.auth
	"istio.v1.auth.IstioCertificateRequest": {
		"csr=1 string",
		"reserved 2",
		"validity_duration=3 int64",
		"metadata=4 google.protobuf.Struct",
	},
	"istio.v1.auth.IstioCertificateResponse": {
		"cert_chain=1 repeated string",
	},
}

// istioEnums lists every enum value as Istio numbers it.
var istioEnums = map[protoreflect.FullName][]string{
	"istio.workload.IPFamilies":                 {"AUTOMATIC=0", "IPV4_ONLY=1", "IPV6_ONLY=2", "DUAL=3"},
	"istio.workload.NetworkMode":                {"STANDARD=0", "HOST_NETWORK=1"},
	"istio.workload.WorkloadStatus":             {"HEALTHY=0", "UNHEALTHY=1"},
	"istio.workload.WorkloadType":               {"DEPLOYMENT=0", "CRONJOB=1", "POD=2", "JOB=3"},
	"istio.workload.AppProtocol":                {"UNKNOWN=0", "HTTP11=1", "HTTP2=2", "GRPC=3", "TCP=4", "TLS=5"},
	"istio.workload.TunnelProtocol":             {"NONE=0", "HBONE=1", "LEGACY_ISTIO_MTLS=2"},
	"istio.workload.Service.Visibility":         {"PUBLIC=0", "NAMESPACE=1"},
	"istio.workload.LoadBalancing.Scope":        {"UNSPECIFIED_SCOPE=0", "REGION=1", "ZONE=2", "SUBZONE=3", "NODE=4", "CLUSTER=5", "NETWORK=6"},
	"istio.workload.LoadBalancing.Mode":         {"UNSPECIFIED_MODE=0", "STRICT=1", "FAILOVER=2", "PASSTHROUGH=3"},
	"istio.workload.LoadBalancing.HealthPolicy": {"ONLY_HEALTHY=0", "ALLOW_ALL=1"},
	"istio.workload.ApplicationTunnel.Protocol": {"NONE=0", "PROXY=1"},
	"istio.security.Scope":                      {"GLOBAL=0", "NAMESPACE=1", "WORKLOAD_SELECTOR=2"},
	"istio.security.Action":                     {"ALLOW=0", "DENY=1"},
	"istio.workload.zds.Version":                {"NOT_USED=0", "V1=1"},
}

// files are our four proto files, as registered by the generated code.
var files = []protoreflect.FileDescriptor{
	workload.File_workload_workload_proto,
	security.File_security_authorization_proto,
	zds.File_zds_zds_proto,
	ca.File_ca_ca_proto,
}

func TestSchema_FilesUseIstioPackages(t *testing.T) {
	want := map[string]protoreflect.FullName{
		"workload/workload.proto":      "istio.workload",
		"security/authorization.proto": "istio.security",
		"zds/zds.proto":                "istio.workload.zds",
		"ca/ca.proto":                  "istio.v1.auth",
	}
	for _, fd := range files {
		if fd.Syntax() != protoreflect.Proto3 {
			t.Errorf("%s: syntax %v, want proto3", fd.Path(), fd.Syntax())
		}
		pkg, ok := want[fd.Path()]
		if !ok {
			t.Errorf("unexpected file path %q (paths must be relative to proto/)", fd.Path())
			continue
		}
		if fd.Package() != pkg {
			t.Errorf("%s: package %s, want %s", fd.Path(), fd.Package(), pkg)
		}
	}
}

func TestSchema_MessagesMatchIstio(t *testing.T) {
	seen := map[protoreflect.FullName]bool{}
	for _, fd := range files {
		forEachMessage(fd.Messages(), func(md protoreflect.MessageDescriptor) {
			seen[md.FullName()] = true
			want, ok := istioMessages[md.FullName()]
			if !ok {
				t.Errorf("message %s is not in the compatibility table; add it with Istio's numbers", md.FullName())
				return
			}
			got := describeMessage(md)
			if missing, extra := diffSets(want, got); len(missing)+len(extra) > 0 {
				t.Errorf("message %s differs from Istio:\n  missing: %q\n  extra:   %q", md.FullName(), missing, extra)
			}
		})
	}
	for name := range istioMessages {
		if !seen[name] {
			t.Errorf("Istio message %s is not defined", name)
		}
	}
}

func TestSchema_EnumsMatchIstio(t *testing.T) {
	seen := map[protoreflect.FullName]bool{}
	check := func(ed protoreflect.EnumDescriptor) {
		seen[ed.FullName()] = true
		want, ok := istioEnums[ed.FullName()]
		if !ok {
			t.Errorf("enum %s is not in the compatibility table", ed.FullName())
			return
		}
		var got []string
		for i := 0; i < ed.Values().Len(); i++ {
			v := ed.Values().Get(i)
			got = append(got, fmt.Sprintf("%s=%d", v.Name(), v.Number()))
		}
		if missing, extra := diffSets(want, got); len(missing)+len(extra) > 0 {
			t.Errorf("enum %s differs from Istio:\n  missing: %q\n  extra:   %q", ed.FullName(), missing, extra)
		}
	}
	for _, fd := range files {
		for i := 0; i < fd.Enums().Len(); i++ {
			check(fd.Enums().Get(i))
		}
		forEachMessage(fd.Messages(), func(md protoreflect.MessageDescriptor) {
			for i := 0; i < md.Enums().Len(); i++ {
				check(md.Enums().Get(i))
			}
		})
	}
	for name := range istioEnums {
		if !seen[name] {
			t.Errorf("Istio enum %s is not defined", name)
		}
	}
}

func TestSchema_CertificateServiceMatchesIstio(t *testing.T) {
	services := ca.File_ca_ca_proto.Services()
	if services.Len() != 1 {
		t.Fatalf("ca.proto defines %d services, want 1", services.Len())
	}
	sd := services.Get(0)
	if sd.FullName() != "istio.v1.auth.IstioCertificateService" {
		t.Errorf("service %s, want istio.v1.auth.IstioCertificateService", sd.FullName())
	}
	if sd.Methods().Len() != 1 {
		t.Fatalf("service has %d methods, want 1", sd.Methods().Len())
	}
	m := sd.Methods().Get(0)
	if m.Name() != "CreateCertificate" || m.IsStreamingClient() || m.IsStreamingServer() ||
		m.Input().FullName() != "istio.v1.auth.IstioCertificateRequest" ||
		m.Output().FullName() != "istio.v1.auth.IstioCertificateResponse" {
		t.Errorf("method %s(%s) -> %s (streaming %v/%v), want unary CreateCertificate(IstioCertificateRequest) -> IstioCertificateResponse",
			m.Name(), m.Input().FullName(), m.Output().FullName(), m.IsStreamingClient(), m.IsStreamingServer())
	}
	// The gRPC path is what goes on the wire.
	if got, want := ca.IstioCertificateService_CreateCertificate_FullMethodName,
		"/istio.v1.auth.IstioCertificateService/CreateCertificate"; got != want {
		t.Errorf("gRPC method path %q, want %q", got, want)
	}
}

// forEachMessage visits messages and their nested messages, skipping the
// synthetic map-entry messages.
func forEachMessage(mds protoreflect.MessageDescriptors, fn func(protoreflect.MessageDescriptor)) {
	for i := 0; i < mds.Len(); i++ {
		md := mds.Get(i)
		if md.IsMapEntry() {
			continue
		}
		fn(md)
		forEachMessage(md.Messages(), fn)
	}
}

// describeMessage renders a message's fields and reservations in the
// notation of istioMessages.
func describeMessage(md protoreflect.MessageDescriptor) []string {
	var out []string
	for i := 0; i < md.Fields().Len(); i++ {
		out = append(out, describeField(md.Fields().Get(i)))
	}
	for i := 0; i < md.ReservedRanges().Len(); i++ {
		r := md.ReservedRanges().Get(i) // [start, end)
		for n := r[0]; n < r[1]; n++ {
			out = append(out, fmt.Sprintf("reserved %d", n))
		}
	}
	for i := 0; i < md.ReservedNames().Len(); i++ {
		out = append(out, fmt.Sprintf("reserved %s", md.ReservedNames().Get(i)))
	}
	return out
}

func describeField(fd protoreflect.FieldDescriptor) string {
	var b strings.Builder
	fmt.Fprintf(&b, "%s=%d ", fd.Name(), fd.Number())
	switch {
	case fd.IsMap():
		fmt.Fprintf(&b, "map<%s, %s>", typeName(fd.MapKey()), typeName(fd.MapValue()))
	default:
		if fd.Cardinality() == protoreflect.Repeated {
			b.WriteString("repeated ")
		}
		if fd.HasOptionalKeyword() {
			b.WriteString("optional ")
		}
		b.WriteString(typeName(fd))
		if fd.IsPacked() {
			b.WriteString(" packed")
		}
	}
	if od := fd.ContainingOneof(); od != nil && !od.IsSynthetic() {
		fmt.Fprintf(&b, " oneof=%s", od.Name())
	}
	return b.String()
}

func typeName(fd protoreflect.FieldDescriptor) string {
	switch fd.Kind() {
	case protoreflect.MessageKind, protoreflect.GroupKind:
		return string(fd.Message().FullName())
	case protoreflect.EnumKind:
		return "enum " + string(fd.Enum().FullName())
	default:
		return fd.Kind().String()
	}
}

func diffSets(want, got []string) (missing, extra []string) {
	for _, w := range want {
		if !slices.Contains(got, w) {
			missing = append(missing, w)
		}
	}
	for _, g := range got {
		if !slices.Contains(want, g) {
			extra = append(extra, g)
		}
	}
	return missing, extra
}
