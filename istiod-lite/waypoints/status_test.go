package waypoints

import (
	"errors"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	gatewayv1 "sigs.k8s.io/gateway-api/apis/v1"
)

func gwWith(listeners ...gatewayv1.Listener) *gatewayv1.Gateway {
	return &gatewayv1.Gateway{
		ObjectMeta: metav1.ObjectMeta{Namespace: "ns", Name: "wp", Generation: 3},
		Spec:       gatewayv1.GatewaySpec{GatewayClassName: "istio-waypoint", Listeners: listeners},
	}
}

func cond(st gatewayv1.GatewayStatus, typ string) metav1.Condition {
	for _, c := range st.Conditions {
		if c.Type == typ {
			return c
		}
	}
	return metav1.Condition{}
}

func TestStatus_ReasonsAddressesAndStableTimes(t *testing.T) {
	c := Config{}
	hbone := gatewayv1.Listener{Name: "mesh", Port: 15008, Protocol: ProtocolHBONE}
	svc := &corev1.Service{Spec: corev1.ServiceSpec{ClusterIP: "10.96.0.7", ClusterIPs: []string{"10.96.0.7"}}}
	t0 := metav1.NewTime(time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC))
	t1 := metav1.NewTime(t0.Add(time.Hour))

	gw := gwWith(hbone)
	st := c.Status(gw, svc, nil, t0)
	if a, p := cond(st, "Accepted"), cond(st, "Programmed"); a.Status != metav1.ConditionTrue || p.Status != metav1.ConditionTrue ||
		p.Reason != "Programmed" || p.ObservedGeneration != 3 {
		t.Errorf("conditions %+v", st.Conditions)
	}
	if len(st.Addresses) != 2 || st.Addresses[0].Value != "wp.ns.svc.cluster.local" || st.Addresses[1].Value != "10.96.0.7" {
		t.Errorf("addresses %+v", st.Addresses)
	}
	// Recomputed later with nothing changed: the same status, times kept.
	gw.Status = st
	if again := c.Status(gw, svc, nil, t1); cond(again, "Programmed").LastTransitionTime != t0 || cond(again, "Accepted").LastTransitionTime != t0 {
		t.Errorf("transition times moved: %+v", again.Conditions)
	}
	// The apply fails: not programmed (new time), still accepted (old time).
	failed := c.Status(gw, svc, errors.New("forbidden"), t1)
	if p := cond(failed, "Programmed"); p.Status != metav1.ConditionFalse || p.Reason != "NoResources" || p.LastTransitionTime != t1 {
		t.Errorf("programmed after a failed apply: %+v", p)
	}
	if len(failed.Addresses) != 0 {
		t.Errorf("addresses while not programmed: %v", failed.Addresses)
	}
	// No cluster IP yet.
	if p := cond(c.Status(gwWith(hbone), &corev1.Service{}, nil, t0), "Programmed"); p.Reason != "AddressNotAssigned" {
		t.Errorf("without an IP: %+v", p)
	}
	// Only an HTTP listener: refused.
	bad := c.Status(gwWith(gatewayv1.Listener{Name: "http", Port: 80, Protocol: gatewayv1.HTTPProtocolType}), nil, nil, t0)
	if a := cond(bad, "Accepted"); a.Status != metav1.ConditionFalse || a.Reason != "ListenersNotValid" {
		t.Errorf("HTTP-only gateway: %+v", a)
	}
	if l := bad.Listeners[0]; len(l.SupportedKinds) == 0 || l.Conditions[0].Reason != "UnsupportedProtocol" {
		t.Errorf("listener status %+v", l)
	}
	// spec.addresses: refused.
	withAddr := gwWith(hbone)
	withAddr.Spec.Addresses = []gatewayv1.GatewaySpecAddress{{Value: "10.0.0.1"}}
	if a := cond(c.Status(withAddr, svc, nil, t0), "Accepted"); a.Reason != "UnsupportedAddress" {
		t.Errorf("gateway with spec.addresses: %+v", a)
	}
}
