package waypoints

import (
	"fmt"
	"maps"
	"strings"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	appsv1ac "k8s.io/client-go/applyconfigurations/apps/v1"
	corev1ac "k8s.io/client-go/applyconfigurations/core/v1"
	metav1ac "k8s.io/client-go/applyconfigurations/meta/v1"
	gatewayv1 "sigs.k8s.io/gateway-api/apis/v1"

	"github.com/meshlite/meshlite/internal/kube"
)

// Names of what the controller writes.
const (
	// ControllerName is the GatewayClass controllerName of waypoints, as
	// Istio's.
	ControllerName = "istio.io/mesh-controller"
	// FieldManager owns the fields the controller applies.
	FieldManager = "istiod-lite"

	// LabelGatewayClassName marks the objects made for a Gateway with its
	// class; the controller watches its children by it.
	LabelGatewayClassName = "gateway.networking.k8s.io/gateway-class-name"

	containerName = "istio-proxy"
	// Ports of the waypoint pod.
	statusPort  = 15021
	metricsPort = 15020
)

// Config is what the rendered objects need to know about the mesh.
type Config struct {
	// Image of the waypoint container ("meshlite/waypoint:dev").
	Image string
	// XDSAddress is where waypoints reach istiod-lite's xDS and CA
	// ("istiod.istio-system.svc:15012").
	XDSAddress string
	// XDSServerName is the DNS name istiod-lite's certificate is checked for.
	XDSServerName string
	TrustDomain   string
	ClusterID     string
	DomainSuffix  string
}

func (c Config) withDefaults() Config {
	if c.Image == "" {
		c.Image = "meshlite/waypoint:dev"
	}
	if c.XDSAddress == "" {
		c.XDSAddress = "istiod." + kube.DefaultRootNamespace + ".svc:15012"
	}
	if c.XDSServerName == "" {
		c.XDSServerName = "istiod." + kube.DefaultRootNamespace + ".svc"
	}
	if c.TrustDomain == "" {
		c.TrustDomain = kube.DefaultDomainSuffix
	}
	if c.ClusterID == "" {
		c.ClusterID = kube.DefaultClusterID
	}
	if c.DomainSuffix == "" {
		c.DomainSuffix = kube.DefaultDomainSuffix
	}
	return c
}

// Names are the children's names: Istio names a waypoint's Deployment,
// Service and ServiceAccount after the Gateway, without a class suffix.
func Names(gw *gatewayv1.Gateway) (deployment, service, serviceAccount string) {
	return gw.Name, gw.Name, gw.Name
}

// Hostname is the Service hostname peers reach the waypoint by; it is the
// Gateway's status address (model reads it back).
func (c Config) Hostname(gw *gatewayv1.Gateway) string {
	_, svc, _ := Names(gw)
	return fmt.Sprintf("%s.%s.svc.%s", svc, gw.Namespace, c.DomainSuffix)
}

func ownerRef(gw *gatewayv1.Gateway) *metav1ac.OwnerReferenceApplyConfiguration {
	return metav1ac.OwnerReference().
		WithAPIVersion(gatewayv1.GroupVersion.String()).WithKind("Gateway").
		WithName(gw.Name).WithUID(gw.UID)
}

// infraLabels are the Gateway's spec.infrastructure labels (copied to every
// child, as the Gateway API asks) under ours.
func infraLabels(gw *gatewayv1.Gateway, ours map[string]string) map[string]string {
	out := map[string]string{}
	if inf := gw.Spec.Infrastructure; inf != nil {
		for k, v := range inf.Labels {
			out[string(k)] = string(v)
		}
	}
	maps.Copy(out, ours)
	return out
}

func infraAnnotations(gw *gatewayv1.Gateway) map[string]string {
	out := map[string]string{}
	if inf := gw.Spec.Infrastructure; inf != nil {
		for k, v := range inf.Annotations {
			out[string(k)] = string(v)
		}
	}
	return out
}

func childLabels(gw *gatewayv1.Gateway, managed bool) map[string]string {
	l := map[string]string{
		kube.LabelGatewayName: gw.Name,
		LabelGatewayClassName: string(gw.Spec.GatewayClassName),
	}
	if managed {
		l[kube.LabelGatewayManaged] = kube.ManagedMeshController
	}
	return infraLabels(gw, l)
}

// ServiceAccount renders the waypoint's identity.
func ServiceAccount(gw *gatewayv1.Gateway) *corev1ac.ServiceAccountApplyConfiguration {
	_, _, sa := Names(gw)
	return corev1ac.ServiceAccount(sa, gw.Namespace).
		WithLabels(childLabels(gw, false)).
		WithAnnotations(infraAnnotations(gw)).
		WithOwnerReferences(ownerRef(gw))
}

// Service renders the waypoint's Service: status-port 15021 and one port
// per listener (15008 HBONE), with appProtocol the listener's protocol in
// lower case, as Istio's. It carries the managed label so model never binds
// the waypoint's own Service to a waypoint.
func Service(gw *gatewayv1.Gateway) *corev1ac.ServiceApplyConfiguration {
	_, name, _ := Names(gw)
	tcp := "tcp"
	ports := []*corev1ac.ServicePortApplyConfiguration{
		corev1ac.ServicePort().WithName("status-port").WithPort(statusPort).WithProtocol(corev1.ProtocolTCP).WithAppProtocol(tcp),
	}
	seen := map[int32]bool{statusPort: true}
	for i, l := range gw.Spec.Listeners {
		if seen[int32(l.Port)] {
			continue
		}
		seen[int32(l.Port)] = true
		pn := string(l.Name)
		if pn == "" {
			pn = fmt.Sprintf("%s-%d", strings.ToLower(string(l.Protocol)), i)
		}
		ports = append(ports, corev1ac.ServicePort().WithName(pn).WithPort(int32(l.Port)).
			WithProtocol(corev1.ProtocolTCP).WithAppProtocol(strings.ToLower(string(l.Protocol))))
	}
	return corev1ac.Service(name, gw.Namespace).
		WithLabels(childLabels(gw, true)).
		WithAnnotations(infraAnnotations(gw)).
		WithOwnerReferences(ownerRef(gw)).
		WithSpec(corev1ac.ServiceSpec().
			WithType(corev1.ServiceTypeClusterIP).
			WithSelector(map[string]string{kube.LabelGatewayName: gw.Name}).
			WithPorts(ports...))
}

// Env names the waypoint reads its configuration from (see
// /work/notes/waypoint-deploy-contract.md): environment only, so a flag
// the binary does not know can never stop it.
const (
	EnvXDSAddress    = "XDS_ADDRESS"
	EnvXDSServerName = "XDS_SERVER_NAME"
	EnvTrustDomain   = "TRUST_DOMAIN"
	EnvClusterID     = "CLUSTER_ID"
	EnvDomainSuffix  = "DOMAIN_SUFFIX"
	EnvGatewayName   = "GATEWAY_NAME"
)

// Paths of the credentials in the waypoint pod (as ztunnel's).
const (
	TokenDir = "/var/run/secrets/tokens" // istio-token
	RootDir  = "/var/run/secrets/istio"  // root-cert.pem
)

// Deployment renders the waypoint proxy. Replicas are left to the user (or
// an autoscaler): applying never fights a scale-up.
func (c Config) Deployment(gw *gatewayv1.Gateway) *appsv1ac.DeploymentApplyConfiguration {
	c = c.withDefaults()
	name, _, sa := Names(gw)
	podLabels := infraLabels(gw, map[string]string{
		"sidecar.istio.io/inject":   "false",
		kube.LabelDataplaneMode:     kube.DataplaneModeNone,
		kube.LabelCanonicalName:     name,
		kube.LabelCanonicalRevision: "latest",
		kube.LabelGatewayName:       gw.Name,
		LabelGatewayClassName:       string(gw.Spec.GatewayClassName),
		kube.LabelGatewayManaged:    kube.ManagedMeshController,
	})
	field := func(n, path string) *corev1ac.EnvVarApplyConfiguration {
		return corev1ac.EnvVar().WithName(n).WithValueFrom(corev1ac.EnvVarSource().
			WithFieldRef(corev1ac.ObjectFieldSelector().WithFieldPath(path)))
	}
	val := func(n, v string) *corev1ac.EnvVarApplyConfiguration {
		return corev1ac.EnvVar().WithName(n).WithValue(v)
	}
	container := corev1ac.Container().
		WithName(containerName).
		WithImage(c.Image).
		WithEnv(
			val(EnvXDSAddress, c.XDSAddress),
			val(EnvXDSServerName, c.XDSServerName),
			val(EnvTrustDomain, c.TrustDomain),
			val(EnvClusterID, c.ClusterID),
			val(EnvDomainSuffix, c.DomainSuffix),
			val(EnvGatewayName, gw.Name),
			field("POD_NAME", "metadata.name"),
			field("POD_NAMESPACE", "metadata.namespace"),
			field("INSTANCE_IP", "status.podIP"),
			field("SERVICE_ACCOUNT", "spec.serviceAccountName"),
			field("NODE_NAME", "spec.nodeName"),
		).
		WithPorts(
			corev1ac.ContainerPort().WithName("mesh").WithContainerPort(kube.WaypointHBONEPort).WithProtocol(corev1.ProtocolTCP),
			corev1ac.ContainerPort().WithName("status-port").WithContainerPort(statusPort).WithProtocol(corev1.ProtocolTCP),
			corev1ac.ContainerPort().WithName("metrics").WithContainerPort(metricsPort).WithProtocol(corev1.ProtocolTCP),
		).
		WithReadinessProbe(corev1ac.Probe().
			WithHTTPGet(corev1ac.HTTPGetAction().WithPath("/healthz/ready").WithPort(intstr.FromInt32(statusPort))).
			WithPeriodSeconds(1).WithFailureThreshold(3).WithTimeoutSeconds(1)).
		WithSecurityContext(corev1ac.SecurityContext().
			WithAllowPrivilegeEscalation(false).
			WithPrivileged(false).
			WithCapabilities(corev1ac.Capabilities().WithDrop("ALL"))).
		WithVolumeMounts(
			corev1ac.VolumeMount().WithName("istio-token").WithMountPath(TokenDir).WithReadOnly(true),
			corev1ac.VolumeMount().WithName("istiod-ca-cert").WithMountPath(RootDir).WithReadOnly(true),
		)
	return appsv1ac.Deployment(name, gw.Namespace).
		WithLabels(childLabels(gw, true)).
		WithAnnotations(infraAnnotations(gw)).
		WithOwnerReferences(ownerRef(gw)).
		WithSpec(appsv1ac.DeploymentSpec().
			WithSelector(metav1ac.LabelSelector().WithMatchLabels(map[string]string{kube.LabelGatewayName: gw.Name})).
			WithTemplate(corev1ac.PodTemplateSpec().
				WithLabels(podLabels).
				WithAnnotations(infraAnnotations(gw)).
				WithSpec(corev1ac.PodSpec().
					WithServiceAccountName(sa).
					WithContainers(container).
					WithVolumes(
						corev1ac.Volume().WithName("istio-token").WithProjected(corev1ac.ProjectedVolumeSource().
							WithSources(corev1ac.VolumeProjection().WithServiceAccountToken(
								corev1ac.ServiceAccountTokenProjection().WithAudience(kube.TokenAudience).
									WithExpirationSeconds(43200).WithPath("istio-token")))),
						corev1ac.Volume().WithName("istiod-ca-cert").WithConfigMap(
							corev1ac.ConfigMapVolumeSource().WithName(kube.CARootConfigMap)),
					))))
}
