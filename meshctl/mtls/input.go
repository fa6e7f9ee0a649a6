package mtls

import (
	"time"

	"github.com/meshlite/meshlite/meshctl/ztunnel"
)

// Input is everything gathered from the cluster.
type Input struct {
	Now time.Time
	// RootNamespace holds mesh-wide PeerAuthentications (istio-system).
	RootNamespace string
	// TrustDomain is the SPIFFE trust domain (cluster.local).
	TrustDomain string
	Namespaces  []Namespace
	// Pods are the pods to report on (the scope asked for); AllPods are
	// every pod in the cluster, to name the peers of connections (nil:
	// Pods).
	Pods, AllPods       []Pod
	PeerAuthentications []PeerAuthentication
	Ztunnels            []Ztunnel
}

// Namespace is a namespace's name and labels.
type Namespace struct {
	Name   string            `json:"name"`
	Labels map[string]string `json:"labels,omitempty"`
}

// Pod is what the verdict needs of a pod.
type Pod struct {
	Namespace      string            `json:"namespace"`
	Name           string            `json:"name"`
	IP             string            `json:"ip"`
	Node           string            `json:"node"`
	ServiceAccount string            `json:"service_account"`
	Labels         map[string]string `json:"labels,omitempty"`
	Annotations    map[string]string `json:"annotations,omitempty"`
	HostNetwork    bool              `json:"host_network,omitempty"`
}

// PeerAuthentication is a security.istio.io PeerAuthentication, reduced to
// what decides a workload's mTLS mode.
type PeerAuthentication struct {
	Namespace string    `json:"namespace"`
	Name      string    `json:"name"`
	Created   time.Time `json:"created"`
	// Selector is spec.selector.matchLabels (empty: the whole namespace,
	// or the mesh in the root namespace).
	Selector map[string]string `json:"selector,omitempty"`
	// Mode is spec.mtls.mode: STRICT, PERMISSIVE, DISABLE or UNSET ("").
	Mode string `json:"mode,omitempty"`
	// PortModes is spec.portLevelMtls.
	PortModes map[uint32]string `json:"port_modes,omitempty"`
}

// Ztunnel is one node's ztunnel and what it answered.
type Ztunnel struct {
	Node string `json:"node"`
	// Pod is "<namespace>/<name>" of the ztunnel pod.
	Pod  string              `json:"pod"`
	Dump *ztunnel.ConfigDump `json:"-"`
	// Err is why it gave no dump ("" when it did).
	Err string `json:"error,omitempty"`
}
