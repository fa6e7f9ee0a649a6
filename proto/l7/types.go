package l7

// TypeURL is the Delta ADS type of ServiceConfig resources.
const TypeURL = "type.googleapis.com/meshlite.l7.ServiceConfig"

// MetadataGatewayName is the Node metadata key naming the Gateway a waypoint
// serves (see l7.proto).
const MetadataGatewayName = "GATEWAY_NAME"

// NodeType is the first part of a waypoint's Node id:
// "waypoint~<pod ip>~<pod>.<namespace>~<namespace>.svc.<domain>".
const NodeType = "waypoint"

// ResourceName is the name of a Service's ServiceConfig: "<namespace>/<hostname>".
func ResourceName(namespace, hostname string) string { return namespace + "/" + hostname }
