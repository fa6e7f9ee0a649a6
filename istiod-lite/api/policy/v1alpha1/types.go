// Package v1alpha1 is meshlite's TrafficPolicy API (group policy.meshlite.io,
// version v1alpha1): the resilience policy of Services and routes served by
// a waypoint (rate limits, circuit breaking, outlier ejection, fault
// injection), documented in docs/traffic-policy.md. It holds the Go types,
// the CRD (CRD, trafficpolicy-crd.yaml) and the decoding of the objects a
// dynamic informer delivers; it decides nothing about what they mean.
package v1alpha1

import (
	_ "embed"
	"fmt"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
)

// Group and Version of the API.
const (
	Group   = "policy.meshlite.io"
	Version = "v1alpha1"
	Kind    = "TrafficPolicy"
)

// Resource is the TrafficPolicy resource for dynamic clients and informers.
var Resource = schema.GroupVersionResource{Group: Group, Version: Version, Resource: "trafficpolicies"}

// CRD is the CustomResourceDefinition (YAML) of TrafficPolicy.
//
//go:embed trafficpolicy-crd.yaml
var CRD []byte

// TrafficPolicy attaches resilience settings to Services and routes.
type TrafficPolicy struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`
	Spec              TrafficPolicySpec `json:"spec"`
}

// TrafficPolicySpec is what a TrafficPolicy asks for; every part is
// optional, but one must be set.
type TrafficPolicySpec struct {
	// TargetRefs are Services (group "") or HTTPRoutes/GRPCRoutes (group
	// gateway.networking.k8s.io) of the policy's namespace.
	TargetRefs       []TargetRef       `json:"targetRefs"`
	RateLimit        *RateLimit        `json:"rateLimit,omitempty"`
	CircuitBreaker   *CircuitBreaker   `json:"circuitBreaker,omitempty"`
	OutlierDetection *OutlierDetection `json:"outlierDetection,omitempty"`
	FaultInjection   *FaultInjection   `json:"faultInjection,omitempty"`
}

// TargetRef names a Service or route in the policy's namespace.
type TargetRef struct {
	Group string `json:"group,omitempty"`
	Kind  string `json:"kind"`
	Name  string `json:"name"`
}

// RateLimit is a local token bucket per route rule.
type RateLimit struct {
	RequestsPerSecond float64 `json:"requestsPerSecond"`
	// Burst is the bucket size; 0: max(1, ceil(requestsPerSecond)).
	Burst int32 `json:"burst,omitempty"`
	// PerSourceIdentity keeps one bucket per source SPIFFE identity.
	PerSourceIdentity bool `json:"perSourceIdentity,omitempty"`
}

// CircuitBreaker limits the load on a Service's backends.
type CircuitBreaker struct {
	MaxConnections           int32 `json:"maxConnections,omitempty"`
	MaxPendingRequests       int32 `json:"maxPendingRequests,omitempty"`
	MaxRequestsPerConnection int32 `json:"maxRequestsPerConnection,omitempty"`
}

// OutlierDetection ejects endpoints that keep failing. Durations are
// Gateway API durations ("10s", "1m30s", "500ms").
type OutlierDetection struct {
	Consecutive5xx     int32  `json:"consecutive5xx"`
	Interval           string `json:"interval,omitempty"`
	BaseEjectionTime   string `json:"baseEjectionTime,omitempty"`
	MaxEjectionPercent int32  `json:"maxEjectionPercent,omitempty"`
}

// FaultInjection delays and aborts a share of requests.
type FaultInjection struct {
	Delay *FaultDelay `json:"delay,omitempty"`
	Abort *FaultAbort `json:"abort,omitempty"`
}

// FaultDelay holds Percentage percent of requests for Fixed.
type FaultDelay struct {
	Fixed      string  `json:"fixed"`
	Percentage float64 `json:"percentage"`
}

// FaultAbort answers Percentage percent of requests with HTTPStatus.
type FaultAbort struct {
	HTTPStatus int32   `json:"httpStatus"`
	GRPCStatus int32   `json:"grpcStatus,omitempty"`
	Percentage float64 `json:"percentage"`
}

// Decode converts an object of a dynamic informer and checks what the CRD's
// schema cannot (durations parse).
func Decode(u *unstructured.Unstructured) (*TrafficPolicy, error) {
	var p TrafficPolicy
	if err := runtime.DefaultUnstructuredConverter.FromUnstructured(u.Object, &p); err != nil {
		return nil, fmt.Errorf("TrafficPolicy %s/%s: %w", u.GetNamespace(), u.GetName(), err)
	}
	if err := p.Validate(); err != nil {
		return nil, fmt.Errorf("TrafficPolicy %s/%s: %w", p.Namespace, p.Name, err)
	}
	return &p, nil
}

// Validate checks the fields the schema leaves loose.
func (p *TrafficPolicy) Validate() error {
	if len(p.Spec.TargetRefs) == 0 {
		return fmt.Errorf("no targetRefs")
	}
	for _, r := range p.Spec.TargetRefs {
		switch {
		case r.Kind == "Service" && (r.Group == "" || r.Group == "core"):
		case (r.Kind == "HTTPRoute" || r.Kind == "GRPCRoute") && r.Group == "gateway.networking.k8s.io":
		default:
			return fmt.Errorf("targetRef %s/%s %q is not a Service or an HTTPRoute/GRPCRoute", r.Group, r.Kind, r.Name)
		}
	}
	if od := p.Spec.OutlierDetection; od != nil {
		for _, d := range []string{od.Interval, od.BaseEjectionTime} {
			if _, err := ParseDuration(d); err != nil {
				return err
			}
		}
	}
	if f := p.Spec.FaultInjection; f != nil && f.Delay != nil {
		if _, err := ParseDuration(f.Delay.Fixed); err != nil {
			return err
		}
	}
	return nil
}

// ParseDuration parses a Gateway API duration; "" is 0.
func ParseDuration(s string) (time.Duration, error) {
	if s == "" {
		return 0, nil
	}
	d, err := time.ParseDuration(s)
	if err != nil || d < 0 {
		return 0, fmt.Errorf("duration %q: not a non-negative duration like 10s or 250ms", s)
	}
	return d, nil
}
