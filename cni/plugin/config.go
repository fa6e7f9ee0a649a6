package plugin

import (
	"encoding/json"
	"errors"
	"fmt"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/containernetworking/cni/pkg/types"
	types100 "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/cni/pkg/version"
)

// Type is the plugin's type in a conflist (and its binary's name).
const Type = "mesh-cni"

// Defaults of the plugin's settings.
const (
	DefaultAgentSocket = "/var/run/meshlite/cni/agent.sock"
	DefaultAddTimeout  = 30 * time.Second
)

// Config is the plugin's entry in the node's conflist, as the runtime
// passes it on stdin (with name, cniVersion and prevResult filled in).
type Config struct {
	types.PluginConf

	// AgentSocket is the node agent's unix socket, as the runtime sees it.
	AgentSocket string `json:"agent_socket,omitempty"`
	// AddTimeout bounds how long ADD waits for ztunnel to take an enrolled
	// pod; past it ADD fails and the runtime retries ("30s").
	AddTimeout string `json:"add_timeout,omitempty"`
	// ExcludeNamespaces are never asked about, even when the agent is
	// down: their pods start at once (the control plane's own, say).
	ExcludeNamespaces []string `json:"exclude_namespaces,omitempty"`
	// CaptureNamespaces, when set, limits the mesh to these namespaces
	// (a staged rollout); pods elsewhere start at once, unasked.
	CaptureNamespaces []string `json:"capture_namespaces,omitempty"`

	addTimeout time.Duration
}

// Timeout is the parsed AddTimeout.
func (c *Config) Timeout() time.Duration { return c.addTimeout }

// ParseConfig parses and checks the plugin's stdin, including prevResult
// (converted to the 1.0 result types, whatever version it came in).
func ParseConfig(stdin []byte) (*Config, error) {
	var c Config
	if err := json.Unmarshal(stdin, &c); err != nil {
		return nil, fmt.Errorf("parse %s network configuration: %w", Type, err)
	}
	var errs []error
	if c.CNIVersion == "" {
		errs = append(errs, errors.New("cniVersion is required"))
	}
	if c.Type != "" && c.Type != Type {
		errs = append(errs, fmt.Errorf("type %q is not %q", c.Type, Type))
	}
	if c.AgentSocket == "" {
		c.AgentSocket = DefaultAgentSocket
	}
	if !filepath.IsAbs(c.AgentSocket) || len(c.AgentSocket) > 107 {
		errs = append(errs, fmt.Errorf("agent_socket %q must be an absolute path of at most 107 bytes", c.AgentSocket))
	}
	c.addTimeout = DefaultAddTimeout
	if c.AddTimeout != "" {
		d, err := time.ParseDuration(c.AddTimeout)
		switch {
		case err != nil:
			errs = append(errs, fmt.Errorf("add_timeout: %w", err))
		case d < time.Second || d > 10*time.Minute:
			errs = append(errs, fmt.Errorf("add_timeout %s out of range [1s, 10m]", d))
		default:
			c.addTimeout = d
		}
	}
	for _, ns := range append(append([]string(nil), c.ExcludeNamespaces...), c.CaptureNamespaces...) {
		if ns == "" || strings.ContainsAny(ns, "/ \x00") {
			errs = append(errs, fmt.Errorf("exclude_namespaces/capture_namespaces: %q is not a namespace name", ns))
		}
	}
	if err := errors.Join(errs...); err != nil {
		return nil, fmt.Errorf("%s configuration: %w", Type, err)
	}
	if c.RawPrevResult != nil {
		b, err := json.Marshal(c.RawPrevResult)
		if err != nil {
			return nil, fmt.Errorf("re-encode prevResult: %w", err)
		}
		res, err := version.NewResult(c.CNIVersion, b)
		if err != nil {
			return nil, fmt.Errorf("parse prevResult: %w", err)
		}
		c.RawPrevResult = nil
		if c.PrevResult, err = types100.NewResultFromResult(res); err != nil {
			return nil, fmt.Errorf("convert prevResult to the current result version: %w", err)
		}
	}
	return &c, nil
}

// excluded reports whether pods of namespace ns skip the agent: it is
// excluded, or outside the namespaces the mesh is limited to.
func (c *Config) excluded(ns string) bool {
	if len(c.CaptureNamespaces) > 0 && !slices.Contains(c.CaptureNamespaces, ns) {
		return true
	}
	return slices.Contains(c.ExcludeNamespaces, ns)
}

// podIPs lists the pod's addresses from prevResult: those on an interface
// inside the sandbox, or all when the result names no interface.
func (c *Config) podIPs() []string {
	r, ok := c.PrevResult.(*types100.Result)
	if !ok || r == nil {
		return nil
	}
	var out []string
	for _, ip := range r.IPs {
		if ip.Interface != nil && *ip.Interface >= 0 && *ip.Interface < len(r.Interfaces) &&
			r.Interfaces[*ip.Interface].Sandbox == "" {
			continue
		}
		out = append(out, ip.Address.IP.String())
	}
	return out
}
