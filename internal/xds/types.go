package xds

// Type URLs of the ambient Workload API.
const (
	TypeAddress       = "type.googleapis.com/istio.workload.Address"
	TypeAuthorization = "type.googleapis.com/istio.security.Authorization"
)

// Wildcard is the explicit wildcard subscription name.
const Wildcard = "*"

// Node metadata keys the server checks against the client's credentials.
const (
	MetadataNamespace      = "NAMESPACE"
	MetadataServiceAccount = "SERVICE_ACCOUNT"
	MetadataName           = "NAME"
	MetadataClusterID      = "CLUSTER_ID"
)

// AddressAlias is the on-demand lookup name of an IP in a network:
// "<network>/<ip>".
func AddressAlias(network, ip string) string { return network + "/" + ip }
