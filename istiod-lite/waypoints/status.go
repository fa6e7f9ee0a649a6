package waypoints

import (
	"fmt"
	"net/netip"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	gatewayv1 "sigs.k8s.io/gateway-api/apis/v1"

	"github.com/meshlite/meshlite/internal/kube"
)

// ProtocolHBONE is the waypoint listener's protocol.
const ProtocolHBONE gatewayv1.ProtocolType = "HBONE"

// Status computes a waypoint Gateway's status as Istio reports it:
//   - Accepted: True (Accepted) unless the Gateway asks for spec.addresses
//     (UnsupportedAddress) or has no HBONE listener (ListenersNotValid);
//   - Programmed: True (Programmed) once its Service has a cluster IP;
//     False with Invalid (not accepted), NoResources (applying the children
//     failed: applyErr) or AddressNotAssigned;
//   - addresses: the Service's hostname (what peers resolve, and what model
//     reads back) and its cluster IPs;
//   - one listener status per listener: HBONE ones accepted and programmed,
//     others refused with UnsupportedProtocol.
//
// Condition times are kept from gw's current status when the condition's
// status did not change, so an unchanged Gateway computes to its own status.
func (c Config) Status(gw *gatewayv1.Gateway, svc *corev1.Service, applyErr error, now metav1.Time) gatewayv1.GatewayStatus {
	c = c.withDefaults()
	gen := gw.Generation
	cond := func(old []metav1.Condition, t string, ok bool, reason, msg string) metav1.Condition {
		st := metav1.ConditionFalse
		if ok {
			st = metav1.ConditionTrue
		}
		ct := metav1.Condition{Type: t, Status: st, Reason: reason, Message: msg, ObservedGeneration: gen, LastTransitionTime: now}
		for _, o := range old {
			if o.Type == t && o.Status == st {
				ct.LastTransitionTime = o.LastTransitionTime
			}
		}
		return ct
	}

	var st gatewayv1.GatewayStatus
	valid := 0
	for _, l := range gw.Spec.Listeners {
		var old []metav1.Condition
		for _, ol := range gw.Status.Listeners {
			if ol.Name == l.Name {
				old = ol.Conditions
			}
		}
		ls := gatewayv1.ListenerStatus{
			Name: l.Name,
			// Routes attach to the Services a waypoint serves (GAMMA), not
			// to the Gateway; these are the kinds the waypoint reads.
			SupportedKinds: []gatewayv1.RouteGroupKind{
				{Group: ptr(gatewayv1.Group(gatewayv1.GroupName)), Kind: "HTTPRoute"},
				{Group: ptr(gatewayv1.Group(gatewayv1.GroupName)), Kind: "GRPCRoute"},
			},
		}
		if l.Protocol == ProtocolHBONE {
			valid++
			ls.Conditions = []metav1.Condition{
				cond(old, string(gatewayv1.ListenerConditionAccepted), true, string(gatewayv1.ListenerReasonAccepted), "No errors found"),
				cond(old, string(gatewayv1.ListenerConditionProgrammed), true, string(gatewayv1.ListenerReasonProgrammed), "No errors found"),
				cond(old, string(gatewayv1.ListenerConditionResolvedRefs), true, string(gatewayv1.ListenerReasonResolvedRefs), "No errors found"),
			}
		} else {
			msg := fmt.Sprintf("protocol %q is not supported by waypoints (only %s)", l.Protocol, ProtocolHBONE)
			ls.Conditions = []metav1.Condition{
				cond(old, string(gatewayv1.ListenerConditionAccepted), false, string(gatewayv1.ListenerReasonUnsupportedProtocol), msg),
				cond(old, string(gatewayv1.ListenerConditionProgrammed), false, string(gatewayv1.ListenerReasonInvalid), msg),
				cond(old, string(gatewayv1.ListenerConditionResolvedRefs), true, string(gatewayv1.ListenerReasonResolvedRefs), "No errors found"),
			}
		}
		st.Listeners = append(st.Listeners, ls)
	}

	old := gw.Status.Conditions
	accepted := true
	switch {
	case len(gw.Spec.Addresses) > 0:
		accepted = false
		st.Conditions = append(st.Conditions, cond(old, string(gatewayv1.GatewayConditionAccepted), false,
			string(gatewayv1.GatewayReasonUnsupportedAddress), "a waypoint's address is its Service's; spec.addresses is not supported"))
	case valid == 0:
		accepted = false
		st.Conditions = append(st.Conditions, cond(old, string(gatewayv1.GatewayConditionAccepted), false,
			string(gatewayv1.GatewayReasonListenersNotValid), fmt.Sprintf("a waypoint needs a listener of protocol %s (port %d)", ProtocolHBONE, kube.WaypointHBONEPort)))
	default:
		st.Conditions = append(st.Conditions, cond(old, string(gatewayv1.GatewayConditionAccepted), true,
			string(gatewayv1.GatewayReasonAccepted), "Resource accepted"))
	}

	var ips []string
	if svc != nil {
		for _, ip := range svc.Spec.ClusterIPs {
			if _, err := netip.ParseAddr(ip); err == nil {
				ips = append(ips, ip)
			}
		}
		if len(ips) == 0 {
			if _, err := netip.ParseAddr(svc.Spec.ClusterIP); err == nil {
				ips = append(ips, svc.Spec.ClusterIP)
			}
		}
	}
	host := c.Hostname(gw)
	switch {
	case !accepted:
		st.Conditions = append(st.Conditions, cond(old, string(gatewayv1.GatewayConditionProgrammed), false,
			string(gatewayv1.GatewayReasonInvalid), "the Gateway is not accepted"))
	case applyErr != nil:
		st.Conditions = append(st.Conditions, cond(old, string(gatewayv1.GatewayConditionProgrammed), false,
			string(gatewayv1.GatewayReasonNoResources), "deploying the waypoint failed: "+applyErr.Error()))
	case len(ips) == 0:
		st.Conditions = append(st.Conditions, cond(old, string(gatewayv1.GatewayConditionProgrammed), false,
			string(gatewayv1.GatewayReasonAddressNotAssigned), "waiting for the waypoint's Service to get an address"))
	default:
		st.Conditions = append(st.Conditions, cond(old, string(gatewayv1.GatewayConditionProgrammed), true,
			string(gatewayv1.GatewayReasonProgrammed), fmt.Sprintf("Resource programmed, assigned to service(s) %s:%d", host, kube.WaypointHBONEPort)))
		st.Addresses = append(st.Addresses, gatewayv1.GatewayStatusAddress{Type: ptr(gatewayv1.HostnameAddressType), Value: host})
		for _, ip := range ips {
			st.Addresses = append(st.Addresses, gatewayv1.GatewayStatusAddress{Type: ptr(gatewayv1.IPAddressType), Value: ip})
		}
	}
	return st
}

// ClassStatus is the GatewayClass istio-waypoint's status: accepted.
func ClassStatus(gc *gatewayv1.GatewayClass, now metav1.Time) gatewayv1.GatewayClassStatus {
	c := metav1.Condition{
		Type: string(gatewayv1.GatewayClassConditionStatusAccepted), Status: metav1.ConditionTrue,
		Reason: string(gatewayv1.GatewayClassReasonAccepted), Message: "Handled by istiod-lite",
		ObservedGeneration: gc.Generation, LastTransitionTime: now,
	}
	for _, o := range gc.Status.Conditions {
		if o.Type == c.Type && o.Status == c.Status {
			c.LastTransitionTime = o.LastTransitionTime
		}
	}
	return gatewayv1.GatewayClassStatus{Conditions: []metav1.Condition{c}}
}

func ptr[T any](v T) *T { return &v }
