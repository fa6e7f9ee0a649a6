package kube

// Enrollment in ambient mode.
const (
	// LabelDataplaneMode on a Namespace or Pod enrolls it ("ambient"); on a
	// Pod, "none" opts it out even when its namespace is enrolled.
	LabelDataplaneMode   = "istio.io/dataplane-mode"
	DataplaneModeAmbient = "ambient"
	DataplaneModeNone    = "none"

	// AnnotationRedirection is set by the CNI agent once the pod's traffic is
	// really captured; only then do peers send it HBONE.
	AnnotationRedirection = "ambient.istio.io/redirection"
	RedirectionEnabled    = "enabled"
)

// Waypoints.
const (
	// WaypointGatewayClass is the gatewayClassName of waypoint Gateways.
	WaypointGatewayClass = "istio-waypoint"
	// DefaultWaypointName is the Gateway name used when none is given.
	DefaultWaypointName = "waypoint"
	// WaypointHBONEPort is the waypoint's HBONE listener port.
	WaypointHBONEPort = 15008

	// LabelUseWaypoint on a Namespace, Service or Pod binds it to the waypoint
	// Gateway of that name ("none" opts out). The value may also be
	// "<namespace>/<name>".
	LabelUseWaypoint = "istio.io/use-waypoint"
	// LabelUseWaypointNamespace names the waypoint's namespace when it is not
	// the object's own.
	LabelUseWaypointNamespace = "istio.io/use-waypoint-namespace"
	UseWaypointNone           = "none"

	// LabelWaypointFor on a waypoint Gateway says which traffic it takes.
	LabelWaypointFor    = "istio.io/waypoint-for"
	WaypointForService  = "service"
	WaypointForWorkload = "workload"
	WaypointForAll      = "all"
	WaypointForNone     = "none"

	// LabelGatewayName marks the pods that are instances of a Gateway.
	LabelGatewayName = "gateway.networking.k8s.io/gateway-name"
	// LabelGatewayManaged marks objects a gateway controller manages; the
	// waypoint's own Service must not be bound to a waypoint.
	LabelGatewayManaged   = "gateway.istio.io/managed"
	ManagedMeshController = "istio.io-mesh-controller"

	// LabelIngressUseWaypoint on a Service asks ingress gateways to route
	// through its waypoint too.
	LabelIngressUseWaypoint = "istio.io/ingress-use-waypoint"
)

// Telemetry and locality labels.
const (
	LabelCanonicalName     = "service.istio.io/canonical-name"
	LabelCanonicalRevision = "service.istio.io/canonical-revision"
	LabelWorkloadName      = "service.istio.io/workload-name"
	LabelTopologySubzone   = "topology.istio.io/subzone"

	// AnnotationTrafficDistribution is the legacy form of
	// Service.spec.trafficDistribution.
	AnnotationTrafficDistribution = "networking.istio.io/traffic-distribution"
)

// Control-plane objects and credentials.
const (
	// CARootConfigMap is published in every namespace with the mesh root
	// certificate under CARootConfigMapKey.
	CARootConfigMap    = "istio-ca-root-cert"
	CARootConfigMapKey = "root-cert.pem"

	// CASecret keeps the self-signed root CA in the control plane's
	// namespace; PluggedCASecret, when present, holds an operator-provided
	// (intermediate) CA instead.
	CASecret        = "istio-ca-secret"
	PluggedCASecret = "cacerts"

	// TokenAudience is the audience of service-account tokens presented to
	// the CA and to xDS.
	TokenAudience = "istio-ca"

	// Extra keys a TokenReview returns for pod-bound tokens.
	ExtraPodName  = "authentication.kubernetes.io/pod-name"
	ExtraPodUID   = "authentication.kubernetes.io/pod-uid"
	ExtraNodeName = "authentication.kubernetes.io/node-name"

	// DefaultClusterID and DefaultDomainSuffix are Istio's defaults.
	DefaultClusterID    = "Kubernetes"
	DefaultDomainSuffix = "cluster.local"
	// DefaultRootNamespace holds mesh-wide policies.
	DefaultRootNamespace = "istio-system"
)

// AmbientEnrolled reports whether a pod with podLabels in a namespace with
// nsLabels is enrolled in ambient mode, as Istio's CNI decides it: the
// namespace or the pod says "ambient", and the pod does not say "none".
// (Host-network pods are never captured; callers check that themselves.)
func AmbientEnrolled(nsLabels, podLabels map[string]string) bool {
	pod := podLabels[LabelDataplaneMode]
	if pod == DataplaneModeNone {
		return false
	}
	return pod == DataplaneModeAmbient || nsLabels[LabelDataplaneMode] == DataplaneModeAmbient
}
