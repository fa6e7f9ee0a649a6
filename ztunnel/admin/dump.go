package admin

import (
	"encoding/json"
	"net/netip"
	"slices"
	"strconv"

	"google.golang.org/protobuf/encoding/protojson"

	"github.com/meshlite/meshlite/proto/workload"
	"github.com/meshlite/meshlite/ztunnel/certs"
	"github.com/meshlite/meshlite/ztunnel/proxy"
	"github.com/meshlite/meshlite/ztunnel/state"
)

// ConfigDump is what /config_dump returns.
type ConfigDump struct {
	// Ztunnel says which ztunnel answered.
	Ztunnel      *Info            `json:"ztunnel,omitempty"`
	Workloads    []Workload       `json:"workloads"`
	Services     []Service        `json:"services"`
	Policies     []Policy         `json:"policies"`
	Certificates []certs.Status   `json:"certificates"`
	Connections  []proxy.ConnInfo `json:"connections"`
}

// Workload is a Workload API workload, with addresses as text.
type Workload struct {
	UID       string   `json:"uid"`
	Name      string   `json:"name"`
	Namespace string   `json:"namespace"`
	Addresses []string `json:"addresses"`
	Node      string   `json:"node,omitempty"`
	Network   string   `json:"network,omitempty"`
	// Protocol is HBONE or TCP, as istioctl shows it.
	Protocol          string   `json:"protocol"`
	ServiceAccount    string   `json:"service_account"`
	TrustDomain       string   `json:"trust_domain,omitempty"`
	Waypoint          string   `json:"waypoint,omitempty"`
	Services          []string `json:"services,omitempty"`
	Policies          []string `json:"authorization_policies,omitempty"`
	Status            string   `json:"status"`
	ClusterID         string   `json:"cluster_id,omitempty"`
	WorkloadName      string   `json:"workload_name,omitempty"`
	CanonicalName     string   `json:"canonical_name,omitempty"`
	CanonicalRevision string   `json:"canonical_revision,omitempty"`
	// Local says this ztunnel holds the pod (its sockets are open in the
	// pod's network namespace).
	Local bool `json:"local"`
	// Redirection is, for a local pod, "verified" (ztunnel found the
	// in-pod rules hooked and its own listeners open in the pod's netns,
	// checked within the last few seconds) or "missing" (with
	// RedirectionError saying what); "" when the pod is not local.
	Redirection      string `json:"redirection"`
	RedirectionError string `json:"redirection_error,omitempty"`
}

// Info describes the ztunnel itself.
type Info struct {
	Node    string `json:"node"`
	Version string `json:"version"`
	// Tunnel is the outbound HBONE transport setting: h2, quic or auto.
	Tunnel string `json:"tunnel"`
	// Draining is true once the ztunnel was told to stop and hands its
	// pods over / drains its connections.
	Draining bool `json:"draining,omitempty"`
	// H2Fallbacks are the endpoints auto mode remembered as unreachable
	// over QUIC: tunnels to them use HTTP/2 until the time given.
	H2Fallbacks []proxy.Fallback `json:"h2_fallbacks,omitempty"`
}

// Service is a Workload API service.
type Service struct {
	Name      string   `json:"name"`
	Namespace string   `json:"namespace"`
	Hostname  string   `json:"hostname"`
	Addresses []string `json:"addresses"`
	// Ports are "service_port->target_port" (target 0: same port).
	Ports         []string `json:"ports"`
	Waypoint      string   `json:"waypoint,omitempty"`
	LoadBalancing string   `json:"load_balancing,omitempty"`
}

// Policy is an Authorization as received, with its key.
type Policy struct {
	Key    string          `json:"key"`
	Scope  string          `json:"scope"`
	Action string          `json:"action"`
	DryRun bool            `json:"dry_run,omitempty"`
	Spec   json.RawMessage `json:"spec"`
}

// BuildDump assembles a ConfigDump; local lists the uids of the pods this
// ztunnel holds.
func BuildDump(snap state.Snapshot, local []string, cs []certs.Status, conns []proxy.ConnInfo) ConfigDump {
	d := ConfigDump{Workloads: []Workload{}, Services: []Service{}, Policies: []Policy{}, Certificates: cs, Connections: conns}
	if d.Certificates == nil {
		d.Certificates = []certs.Status{}
	}
	if d.Connections == nil {
		d.Connections = []proxy.ConnInfo{}
	}
	for _, w := range snap.Workloads {
		v := Workload{UID: w.GetUid(), Name: w.GetName(), Namespace: w.GetNamespace(), Addresses: []string{},
			Node: w.GetNode(), Network: w.GetNetwork(), Protocol: "TCP", ServiceAccount: w.GetServiceAccount(),
			TrustDomain: w.GetTrustDomain(), Waypoint: gateway(w.GetWaypoint()), Policies: w.GetAuthorizationPolicies(),
			Status: w.GetStatus().String(), ClusterID: w.GetClusterId(), WorkloadName: w.GetWorkloadName(),
			CanonicalName: w.GetCanonicalName(), CanonicalRevision: w.GetCanonicalRevision(),
			Local: slices.Contains(local, w.GetUid())}
		if w.GetTunnelProtocol() == workload.TunnelProtocol_HBONE {
			v.Protocol = "HBONE"
		}
		if v.ServiceAccount == "" {
			v.ServiceAccount = "default"
		}
		for _, a := range w.GetAddresses() {
			v.Addresses = append(v.Addresses, ipString(a))
		}
		for k := range w.GetServices() {
			v.Services = append(v.Services, k)
		}
		slices.Sort(v.Services)
		d.Workloads = append(d.Workloads, v)
	}
	for _, s := range snap.Services {
		v := Service{Name: s.GetName(), Namespace: s.GetNamespace(), Hostname: s.GetHostname(), Addresses: []string{},
			Ports: []string{}, Waypoint: gateway(s.GetWaypoint())}
		for _, a := range s.GetAddresses() {
			v.Addresses = append(v.Addresses, networkAddr(a))
		}
		for _, p := range s.GetPorts() {
			v.Ports = append(v.Ports, strconv.Itoa(int(p.GetServicePort()))+"->"+strconv.Itoa(int(p.GetTargetPort())))
		}
		if lb := s.GetLoadBalancing(); lb != nil {
			v.LoadBalancing = lb.GetMode().String()
		}
		d.Services = append(d.Services, v)
	}
	for i, p := range snap.Policies {
		v := Policy{Key: p.Key, Scope: p.Scope.String(), Action: p.Action.String(), DryRun: p.DryRun, Spec: json.RawMessage("null")}
		if i < len(snap.Authorizations) && snap.Authorizations[i] != nil {
			if b, err := protojson.Marshal(snap.Authorizations[i]); err == nil {
				v.Spec = b
			}
		}
		d.Policies = append(d.Policies, v)
	}
	return d
}

func ipString(b []byte) string {
	ip, ok := netip.AddrFromSlice(b)
	if !ok {
		return "invalid"
	}
	return ip.Unmap().String()
}

func networkAddr(a *workload.NetworkAddress) string {
	s := ipString(a.GetAddress())
	if a.Length != nil {
		s += "/" + strconv.Itoa(int(a.GetLength()))
	}
	if a.GetNetwork() != "" {
		s = a.GetNetwork() + "/" + s
	}
	return s
}

func gateway(g *workload.GatewayAddress) string {
	if g == nil {
		return ""
	}
	port := g.GetHboneMtlsPort()
	if port == 0 {
		port = state.DefaultHBONEPort
	}
	if h := g.GetHostname(); h != nil {
		return h.GetNamespace() + "/" + h.GetHostname() + ":" + strconv.Itoa(int(port))
	}
	return networkAddr(g.GetAddress()) + ":" + strconv.Itoa(int(port))
}
