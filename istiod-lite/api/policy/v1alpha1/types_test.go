package v1alpha1

import (
	"encoding/json"
	"strings"
	"testing"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"sigs.k8s.io/yaml"
)

func decodeYAML(t testing.TB, s string) (*TrafficPolicy, error) {
	t.Helper()
	var u unstructured.Unstructured
	if err := yaml.Unmarshal([]byte(s), &u.Object); err != nil {
		t.Fatal(err)
	}
	return Decode(&u)
}

func TestDecode_ReadsEveryPartAndRefusesWhatTheSchemaCannot(t *testing.T) {
	p, err := decodeYAML(t, `
apiVersion: policy.meshlite.io/v1alpha1
kind: TrafficPolicy
metadata: {name: p, namespace: ns}
spec:
  targetRefs: [{kind: Service, name: web}, {group: gateway.networking.k8s.io, kind: HTTPRoute, name: r}]
  rateLimit: {requestsPerSecond: 2.5, burst: 5, perSourceIdentity: true}
  circuitBreaker: {maxConnections: 1, maxPendingRequests: 2, maxRequestsPerConnection: 3}
  outlierDetection: {consecutive5xx: 4, interval: 1m30s, baseEjectionTime: 250ms, maxEjectionPercent: 60}
  faultInjection: {delay: {fixed: 2s, percentage: 12.5}, abort: {httpStatus: 503, percentage: 1, grpcStatus: 14}}
`)
	if err != nil {
		t.Fatal(err)
	}
	s := p.Spec
	if p.Namespace != "ns" || len(s.TargetRefs) != 2 || s.RateLimit.RequestsPerSecond != 2.5 || !s.RateLimit.PerSourceIdentity ||
		s.CircuitBreaker.MaxRequestsPerConnection != 3 || s.OutlierDetection.Interval != "1m30s" ||
		s.FaultInjection.Delay.Percentage != 12.5 || s.FaultInjection.Abort.GRPCStatus != 14 {
		t.Errorf("decoded %+v", s)
	}
	for name, doc := range map[string]string{
		"bad duration":     `{spec: {targetRefs: [{kind: Service, name: a}], faultInjection: {delay: {fixed: soon, percentage: 1}}}}`,
		"negative":         `{spec: {targetRefs: [{kind: Service, name: a}], outlierDetection: {consecutive5xx: 1, interval: -5s}}}`,
		"no targets":       `{spec: {rateLimit: {requestsPerSecond: 1}}}`,
		"route in core":    `{spec: {targetRefs: [{kind: HTTPRoute, name: a}], rateLimit: {requestsPerSecond: 1}}}`,
		"unknown kind":     `{spec: {targetRefs: [{kind: Pod, name: a}], rateLimit: {requestsPerSecond: 1}}}`,
		"wrong field type": `{spec: {targetRefs: [{kind: Service, name: a}], rateLimit: {requestsPerSecond: fast}}}`,
	} {
		if _, err := decodeYAML(t, doc); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}

func TestCRD_IsTheTrafficPolicyDefinition(t *testing.T) {
	var crd map[string]any
	if err := yaml.Unmarshal(CRD, &crd); err != nil {
		t.Fatal(err)
	}
	b, _ := json.Marshal(crd)
	for _, want := range []string{`"name":"trafficpolicies.policy.meshlite.io"`, `"kind":"TrafficPolicy"`, `"name":"v1alpha1"`,
		`"rateLimit"`, `"circuitBreaker"`, `"outlierDetection"`, `"faultInjection"`, `"targetRefs"`} {
		if !strings.Contains(string(b), want) {
			t.Errorf("CRD lacks %s", want)
		}
	}
}

// FuzzDecode: any object is decoded or refused with an error, never a panic.
func FuzzDecode(f *testing.F) {
	f.Add(`{"spec":{"targetRefs":[{"kind":"Service","name":"a"}],"rateLimit":{"requestsPerSecond":1}}}`)
	f.Add(`{"spec":{"targetRefs":[{"kind":"Service","name":"a"}],"outlierDetection":{"consecutive5xx":1,"interval":"1h2m3s4ms"}}}`)
	f.Add(`{"spec":{"faultInjection":{"delay":{"fixed":"9999999999h"}}}}`)
	f.Add(`{"metadata":{"name":7},"spec":[]}`)
	f.Fuzz(func(t *testing.T, s string) {
		var u unstructured.Unstructured
		if err := json.Unmarshal([]byte(s), &u.Object); err != nil || u.Object == nil {
			return
		}
		p, err := Decode(&u)
		if err == nil && (p == nil || len(p.Spec.TargetRefs) == 0) {
			t.Fatalf("accepted without targets: %s", s)
		}
	})
}
