package ztunnel

import (
	"encoding/json"
	"strings"
	"time"
)

// ConfigDump is ztunnel's /config_dump as meshctl reads it. meshctl keeps
// its own copy of the JSON contract (it must not import ztunnel's
// packages) and tolerates fields it does not know and fields an older
// ztunnel does not send (pointers are nil then).
type ConfigDump struct {
	// Ztunnel describes the proxy itself; nil from a ztunnel that does not
	// report it.
	Ztunnel      *Info         `json:"ztunnel,omitempty"`
	Workloads    []Workload    `json:"workloads"`
	Services     []Service     `json:"services"`
	Policies     []Policy      `json:"policies"`
	Certificates []Certificate `json:"certificates"`
	Connections  []Connection  `json:"connections"`
}

// Info is the dump's "ztunnel" object.
type Info struct {
	Node    string `json:"node"`
	Version string `json:"version"`
	Tunnel  string `json:"tunnel"`
}

// Workload is one Workload API workload as ztunnel holds it.
type Workload struct {
	UID            string   `json:"uid"`
	Name           string   `json:"name"`
	Namespace      string   `json:"namespace"`
	Addresses      []string `json:"addresses"`
	Node           string   `json:"node,omitempty"`
	Protocol       string   `json:"protocol"`
	ServiceAccount string   `json:"service_account"`
	TrustDomain    string   `json:"trust_domain,omitempty"`
	Waypoint       string   `json:"waypoint,omitempty"`
	Services       []string `json:"services,omitempty"`
	Policies       []string `json:"authorization_policies,omitempty"`
	Status         string   `json:"status"`
	// Local: this ztunnel holds the pod (its sockets are open in the pod's
	// network namespace).
	Local bool `json:"local"`
	// Redirection is "verified" (ztunnel checked the pod's redirect rules
	// are installed), "missing" (checked, not there; see
	// RedirectionError) or "" (the pod is not this ztunnel's). Nil: the
	// ztunnel does not report it.
	Redirection      *string `json:"redirection,omitempty"`
	RedirectionError string  `json:"redirection_error,omitempty"`
}

// Service is one Workload API service.
type Service struct {
	Name      string   `json:"name"`
	Namespace string   `json:"namespace"`
	Hostname  string   `json:"hostname"`
	Addresses []string `json:"addresses"`
	Ports     []string `json:"ports"`
	Waypoint  string   `json:"waypoint,omitempty"`
}

// Policy is one Authorization as ztunnel received it.
type Policy struct {
	Key    string          `json:"key"`
	Scope  string          `json:"scope"`
	Action string          `json:"action"`
	DryRun bool            `json:"dry_run,omitempty"`
	Spec   json.RawMessage `json:"spec,omitempty"`
}

// Name is the policy's name (the key is "<namespace>/<name>").
func (p Policy) Name() string {
	if i := strings.LastIndexByte(p.Key, '/'); i >= 0 {
		return p.Key[i+1:]
	}
	return p.Key
}

// Namespace is the policy's namespace.
func (p Policy) Namespace() string {
	if i := strings.LastIndexByte(p.Key, '/'); i >= 0 {
		return p.Key[:i]
	}
	return ""
}

// Certificate is one identity's certificate state.
type Certificate struct {
	Identity string `json:"identity"`
	// Pods are the uids of the workloads using it.
	Pods []string `json:"pods"`
	// State is "valid", "pending" (no certificate yet) or "expired".
	State     string    `json:"state"`
	Serial    string    `json:"serial,omitempty"`
	NotBefore time.Time `json:"not_before,omitzero"`
	NotAfter  time.Time `json:"not_after,omitzero"`
	LastError string    `json:"last_error,omitempty"`
}

// Connection is one live connection ztunnel proxies.
type Connection struct {
	Direction string `json:"direction"`
	// Pod is the uid of the local pod (the workload ztunnel proxies for).
	Pod         string `json:"pod"`
	Src         string `json:"src"`
	Dst         string `json:"dst"`
	SrcIdentity string `json:"src_identity,omitempty"`
	DstIdentity string `json:"dst_identity,omitempty"`
	SrcWorkload string `json:"src_workload,omitempty"`
	DstWorkload string `json:"dst_workload,omitempty"`
	// Security is "mtls" or "plaintext".
	Security  string    `json:"security"`
	Transport string    `json:"transport"`
	Route     string    `json:"route,omitempty"`
	Start     time.Time `json:"start,omitzero"`
}

// Security values of Connection.
const (
	SecurityMTLS      = "mtls"
	SecurityPlaintext = "plaintext"
)

// Redirection values of Workload.
const (
	RedirectionVerified = "verified"
	RedirectionMissing  = "missing"
)

// StaticStrictPolicy is the name of the policy istiod derives from a
// STRICT PeerAuthentication; a workload listing it refuses plaintext.
const StaticStrictPolicy = "istio_converted_static_strict"

// ConvertedPeerAuthPrefix starts the names of policies derived from
// PeerAuthentications with port-level settings.
const ConvertedPeerAuthPrefix = "converted_peer_authentication_"

// Decode parses a /config_dump body.
func Decode(b []byte) (*ConfigDump, error) {
	var d ConfigDump
	if err := json.Unmarshal(b, &d); err != nil {
		return nil, err
	}
	return &d, nil
}
