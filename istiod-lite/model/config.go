package model

import (
	"fmt"

	"github.com/meshlite/meshlite/internal/kube"
)

// Config is what the translation needs to know about the mesh.
type Config struct {
	// ClusterID names this cluster in workload uids ("Kubernetes").
	ClusterID string
	// TrustDomain of workload identities ("cluster.local").
	TrustDomain string
	// DomainSuffix of service hostnames ("cluster.local").
	DomainSuffix string
	// RootNamespace holds mesh-wide policies ("istio-system").
	RootNamespace string
	// Network of this cluster's addresses; empty is the default network.
	Network string
}

// WithDefaults fills empty fields with Istio's defaults.
func (c Config) WithDefaults() Config {
	if c.ClusterID == "" {
		c.ClusterID = kube.DefaultClusterID
	}
	if c.TrustDomain == "" {
		c.TrustDomain = kube.DefaultDomainSuffix
	}
	if c.DomainSuffix == "" {
		c.DomainSuffix = kube.DefaultDomainSuffix
	}
	if c.RootNamespace == "" {
		c.RootNamespace = kube.DefaultRootNamespace
	}
	return c
}

// Hostname is the service hostname of Service ns/name.
func (c Config) Hostname(ns, name string) string {
	return fmt.Sprintf("%s.%s.svc.%s", name, ns, c.DomainSuffix)
}

// ServiceKey is the Address resource name of Service ns/name:
// "<namespace>/<hostname>".
func (c Config) ServiceKey(ns, name string) string {
	return ns + "/" + c.Hostname(ns, name)
}

// PodUID is the Workload uid of pod ns/name: "<cluster>//Pod/<ns>/<name>".
func (c Config) PodUID(ns, name string) string {
	return c.ClusterID + "//Pod/" + ns + "/" + name
}

// EndpointSliceUID is the Workload uid of an address of a slice that does
// not point at a pod.
func (c Config) EndpointSliceUID(ns, slice, ip string) string {
	return c.ClusterID + "/discovery.k8s.io/EndpointSlice/" + ns + "/" + slice + "/" + ip
}

// workloadTrustDomain is the value of Workload.trust_domain: empty when it
// is the default, which clients read as cluster.local.
func (c Config) workloadTrustDomain() string {
	if c.TrustDomain == kube.DefaultDomainSuffix {
		return ""
	}
	return c.TrustDomain
}
