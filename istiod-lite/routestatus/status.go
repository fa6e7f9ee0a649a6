package routestatus

import (
	"fmt"
	"strings"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	gatewayv1 "sigs.k8s.io/gateway-api/apis/v1"
	gatewayv1beta1 "sigs.k8s.io/gateway-api/apis/v1beta1"

	"github.com/meshlite/meshlite/internal/kube"
	"github.com/meshlite/meshlite/istiod-lite/model"
)

// ControllerName is the controller Istio reports route status of Service
// parents under.
const ControllerName gatewayv1.GatewayController = "istio.io/gateway-controller"

// Istio's extra route condition in ambient mode: whether the parent is
// bound to a waypoint. Istio reports it on HTTPRoutes only, always with
// status True; the message says what is missing.
const (
	ConditionResolvedWaypoints = "ResolvedWaypoints"
	ReasonResolvedWaypoints    = "ResolvedWaypoints"
)

// Messages of the conditions, as Istio words them where it has them.
const (
	msgAccepted          = "Route was valid"
	msgResolvedRefs      = "All references resolved"
	msgWaypointsResolved = "All waypoints resolved"
	// msgNoWaypointLabel is Istio's message when neither the parent Service
	// nor its namespace carries istio.io/use-waypoint.
	msgNoWaypointLabel = "istio.io/use-waypoint label missing from parent and parent namespace; in ambient mode, route will not be respected"
	msgParentNotFound  = "parent not found"
	msgConsumerRoute   = "parent in another namespace: not checked"
)

// Cluster is what a route's status depends on. *model.Store is one; the
// Writer reads informer caches.
type Cluster interface {
	model.WaypointSource
	Service(ns, name string) *corev1.Service
	// ReferenceGrants lists the grants of namespace ns.
	ReferenceGrants(ns string) []*gatewayv1beta1.ReferenceGrant
}

// route is what the computation reads of an HTTPRoute or GRPCRoute.
type route struct {
	kind       string
	meta       metav1.ObjectMeta
	parentRefs []gatewayv1.ParentReference
	backends   []gatewayv1.BackendObjectReference
	status     gatewayv1.RouteStatus
}

// HTTPRouteStatus computes rt's status: the entries of other controllers
// as they are, then one entry of ours per distinct Service parentRef.
// Condition times are kept from rt's status where a condition's status did
// not change, so an unchanged route computes to its own status.
func HTTPRouteStatus(cfg model.Config, c Cluster, rt *gatewayv1.HTTPRoute, now metav1.Time) gatewayv1.RouteStatus {
	r := route{kind: "HTTPRoute", meta: rt.ObjectMeta, parentRefs: rt.Spec.ParentRefs, status: rt.Status.RouteStatus, backends: model.HTTPRouteBackends(rt)}
	return compute(cfg, c, r, now)
}

// GRPCRouteStatus is HTTPRouteStatus for a GRPCRoute (without
// ResolvedWaypoints, as Istio).
func GRPCRouteStatus(cfg model.Config, c Cluster, rt *gatewayv1.GRPCRoute, now metav1.Time) gatewayv1.RouteStatus {
	r := route{kind: "GRPCRoute", meta: rt.ObjectMeta, parentRefs: rt.Spec.ParentRefs, status: rt.Status.RouteStatus, backends: model.GRPCRouteBackends(rt)}
	return compute(cfg, c, r, now)
}

// maxParents is how many entries status.parents may hold.
const maxParents = 32

type cond struct {
	ok              bool
	reason, message string
}

func compute(cfg model.Config, c Cluster, r route, now metav1.Time) gatewayv1.RouteStatus {
	var st gatewayv1.RouteStatus
	for _, p := range r.status.Parents {
		if p.ControllerName != ControllerName {
			st.Parents = append(st.Parents, p)
		}
	}
	refs := resolveRefs(cfg.WithDefaults(), c, r)
	seen := map[string]bool{}
	for _, p := range r.parentRefs {
		if !isService(p) {
			continue // a Gateway's routes are another controller's
		}
		k := parentKey(p, r.meta.Namespace)
		if seen[k] {
			continue
		}
		if len(st.Parents) == maxParents {
			break // the API refuses more; the rest go unreported
		}
		seen[k] = true
		ns := r.meta.Namespace
		if p.Namespace != nil && *p.Namespace != "" {
			ns = string(*p.Namespace)
		}
		conds := map[string]cond{string(gatewayv1.RouteConditionResolvedRefs): refs}
		waypoints := cond{ok: true, reason: ReasonResolvedWaypoints, message: msgWaypointsResolved}
		// A consumer route (parent in another namespace): Gateway API
		// allows it, but meshlite's waypoints apply only the routes of the
		// Service's own namespace. Nothing of the other namespace is
		// looked up, so the status tells the route's author nothing about
		// it (not even whether the Service exists).
		if ns != r.meta.Namespace {
			conds[string(gatewayv1.RouteConditionAccepted)] = cond{reason: string(gatewayv1.RouteReasonUnsupportedValue),
				message: "the parent Service is in another namespace; waypoints apply only routes of the Service's own namespace (producer routes)"}
			waypoints.message = msgConsumerRoute
			if r.kind == "HTTPRoute" {
				conds[ConditionResolvedWaypoints] = waypoints
			}
			st.Parents = append(st.Parents, parentStatus(r, p, k, conds, now))
			continue
		}
		svc := c.Service(ns, string(p.Name))
		switch {
		case svc == nil:
			conds[string(gatewayv1.RouteConditionAccepted)] = cond{reason: string(gatewayv1.RouteReasonNoMatchingParent),
				message: fmt.Sprintf("parent service: %q not found", p.Name)}
			waypoints.message = msgParentNotFound
		default:
			conds[string(gatewayv1.RouteConditionAccepted)] = cond{ok: true, reason: string(gatewayv1.RouteReasonAccepted), message: msgAccepted}
			waypoints.message = waypointMessage(cfg, c, svc)
		}
		if r.kind == "HTTPRoute" {
			conds[ConditionResolvedWaypoints] = waypoints
		}
		st.Parents = append(st.Parents, parentStatus(r, p, k, conds, now))
	}
	return st
}

// parentStatus is the status entry of parentRef p (key k) holding conds,
// each keeping its transition time from the route's current status.
func parentStatus(r route, p gatewayv1.ParentReference, k string, conds map[string]cond, now metav1.Time) gatewayv1.RouteParentStatus {
	var old []metav1.Condition
	for _, op := range r.status.Parents {
		if op.ControllerName == ControllerName && parentKey(op.ParentRef, r.meta.Namespace) == k {
			old = op.Conditions
		}
	}
	ps := gatewayv1.RouteParentStatus{ParentRef: p, ControllerName: ControllerName}
	// Sorted by type, as Istio writes them.
	for _, t := range []string{string(gatewayv1.RouteConditionAccepted), string(gatewayv1.RouteConditionResolvedRefs), ConditionResolvedWaypoints} {
		if cd, ok := conds[t]; ok {
			ps.Conditions = append(ps.Conditions, condition(old, t, cd, r.meta.Generation, now))
		}
	}
	return ps
}

// condition builds one condition, keeping its transition time from old
// when its status is the same.
func condition(old []metav1.Condition, t string, c cond, gen int64, now metav1.Time) metav1.Condition {
	s := metav1.ConditionFalse
	if c.ok {
		s = metav1.ConditionTrue
	}
	out := metav1.Condition{Type: t, Status: s, Reason: c.reason, Message: c.message, ObservedGeneration: gen, LastTransitionTime: now}
	for _, o := range old {
		if o.Type == t && o.Status == s {
			out.LastTransitionTime = o.LastTransitionTime
		}
	}
	return out
}

// resolveRefs checks every backendRef (and mirror backend) in order and
// reports the first that the waypoint cannot use.
func resolveRefs(cfg model.Config, c Cluster, r route) cond {
	for _, b := range r.backends {
		switch ns, problem := model.ResolveBackend(c, r.kind, r.meta.Namespace, b); problem {
		case model.BackendInvalidKind:
			group, kind := "", "Service"
			if b.Group != nil {
				group = string(*b.Group)
			}
			if b.Kind != nil {
				kind = string(*b.Kind)
			}
			return cond{reason: string(gatewayv1.RouteReasonInvalidKind),
				message: fmt.Sprintf("unsupported backendRef kind: group %q kind %q (only Services)", group, kind)}
		case model.BackendNotPermitted:
			return cond{reason: string(gatewayv1.RouteReasonRefNotPermitted),
				message: fmt.Sprintf("backendRef %s/%s not accessible to a %s in namespace %q (missing a ReferenceGrant?)", ns, b.Name, r.kind, r.meta.Namespace)}
		case model.BackendNotFound:
			return cond{reason: string(gatewayv1.RouteReasonBackendNotFound),
				message: fmt.Sprintf("backend(%s) not found", cfg.Hostname(ns, string(b.Name)))}
		}
	}
	return cond{ok: true, reason: string(gatewayv1.RouteReasonResolvedRefs), message: msgResolvedRefs}
}

// waypointMessage says whether svc's routes reach a waypoint.
func waypointMessage(cfg model.Config, c Cluster, svc *corev1.Service) string {
	wp, key := model.ServiceWaypoint(cfg, c, svc)
	switch {
	case wp != nil:
		return msgWaypointsResolved
	case key == "":
		v := svc.Labels[kube.LabelUseWaypoint]
		if v == kube.UseWaypointNone {
			return fmt.Sprintf("Service %s/%s opts out of waypoints (%s: %s); route will not be respected", svc.Namespace, svc.Name, kube.LabelUseWaypoint, v)
		}
		if v != "" {
			// Labelled, but a waypoint's own Service or an ExternalName.
			return fmt.Sprintf("Service %s/%s cannot be bound to a waypoint (type %s or a waypoint's own Service); route will not be respected", svc.Namespace, svc.Name, svc.Spec.Type)
		}
		return msgNoWaypointLabel
	default:
		return fmt.Sprintf("waypoint %s named by istio.io/use-waypoint is not usable (missing, without an address yet, not for service traffic, or not allowing namespace %s); route will not be respected until it is", key, svc.Namespace)
	}
}

func isService(p gatewayv1.ParentReference) bool {
	return p.Kind != nil && *p.Kind == "Service" && (p.Group == nil || *p.Group == "" || *p.Group == "core")
}

// parentKey names a parentRef with its defaults filled in, to match it
// with its entry in the status.
func parentKey(p gatewayv1.ParentReference, routeNS string) string {
	group, kind, ns := gatewayv1.GroupName, "Gateway", routeNS
	if p.Group != nil {
		group = string(*p.Group)
	}
	if group == "core" {
		group = ""
	}
	if p.Kind != nil {
		kind = string(*p.Kind)
	}
	if kind == "Service" && p.Group == nil {
		group = "" // as isService and model read it
	}
	if p.Namespace != nil && *p.Namespace != "" {
		ns = string(*p.Namespace)
	}
	var b strings.Builder
	fmt.Fprintf(&b, "%s/%s/%s/%s", group, kind, ns, p.Name)
	if p.SectionName != nil {
		fmt.Fprintf(&b, "#%s", *p.SectionName)
	}
	if p.Port != nil {
		fmt.Fprintf(&b, ":%d", *p.Port)
	}
	return b.String()
}
