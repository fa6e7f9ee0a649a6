// Package plugin is the mesh-cni chained CNI plugin. On ADD it asks the node
// agent whether the pod is enrolled in ambient mode and, when it is, waits
// until the agent reports the pod's traffic redirected and its netns held by
// ztunnel; only then does it pass the previous result on, so an enrolled pod
// never starts outside the mesh. It fails closed: an unreachable agent or a
// ztunnel that does not take the pod in time is a CNI error (the runtime
// retries), never a silent pass. Pods that are not enrolled are not delayed.
//
// It holds no state and never touches iptables itself: the agent does.
package plugin

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"time"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"
	types100 "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/cni/pkg/version"

	"github.com/meshlite/meshlite/cni/agentapi"
)

// Supported lists the CNI spec versions the plugin speaks.
var Supported = version.PluginSupports("1.0.0", "1.1.0")

// ErrPluginNotAvailable is CNI 1.1's STATUS code for "cannot service ADD".
const ErrPluginNotAvailable uint = 50

// caller sends one request to the agent (agentapi.Call, replaced in tests).
type caller func(ctx context.Context, socket string, req *agentapi.Request, netns *os.File) (*agentapi.Response, error)

// Plugin runs the CNI commands.
type Plugin struct {
	call   caller
	log    *slog.Logger
	stdout io.Writer
}

// New returns the plugin, logging to stderr (the runtime keeps it).
func New() *Plugin {
	return &Plugin{
		call:   agentapi.Call,
		log:    slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn})).With("plugin", Type),
		stdout: os.Stdout,
	}
}

// Main runs the plugin as the runtime invokes it.
func Main() {
	p := New()
	skel.PluginMainFuncs(skel.CNIFuncs{
		Add: p.Add, Del: p.Del, Check: p.Check, Status: p.Status, GC: p.GC,
	}, Supported, "meshlite mesh-cni: captures ambient pods' traffic into ztunnel")
}

// k8sArgs are the CNI_ARGS a Kubernetes runtime passes.
type k8sArgs struct {
	types.CommonArgs
	K8S_POD_NAMESPACE          types.UnmarshallableString //nolint:revive // CNI_ARGS key
	K8S_POD_NAME               types.UnmarshallableString //nolint:revive
	K8S_POD_INFRA_CONTAINER_ID types.UnmarshallableString //nolint:revive
	K8S_POD_UID                types.UnmarshallableString //nolint:revive
}

func loadArgs(s string) (*k8sArgs, error) {
	a := &k8sArgs{}
	if err := types.LoadArgs(s, a); err != nil {
		return nil, types.NewError(types.ErrInvalidEnvironmentVariables, "parse CNI_ARGS", err.Error())
	}
	return a, nil
}

func parse(stdin []byte) (*Config, error) {
	c, err := ParseConfig(stdin)
	if err != nil {
		return nil, types.NewError(types.ErrInvalidNetworkConfig, "invalid mesh-cni configuration", err.Error())
	}
	return c, nil
}

// passThrough prints prevResult unchanged (an empty result when there is
// none, as the first plugin of a chain would).
func (p *Plugin) passThrough(c *Config) error {
	res := c.PrevResult
	if res == nil {
		res = &types100.Result{CNIVersion: c.CNIVersion}
	}
	r, err := res.GetAsVersion(c.CNIVersion)
	if err != nil {
		return types.NewError(types.ErrIncompatibleCNIVersion, "convert result", err.Error())
	}
	if err := r.PrintTo(p.stdout); err != nil {
		return types.NewError(types.ErrIOFailure, "write result", err.Error())
	}
	return nil
}

func openNetns(path string) (*os.File, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, types.NewError(types.ErrInvalidNetNS, "open pod network namespace", err.Error())
	}
	return f, nil
}

// Add asks the agent about the pod and waits, for an enrolled pod, until
// ztunnel holds it.
func (p *Plugin) Add(args *skel.CmdArgs) error {
	c, err := parse(args.StdinData)
	if err != nil {
		return err
	}
	ka, err := loadArgs(args.Args)
	if err != nil {
		return err
	}
	ns, name := string(ka.K8S_POD_NAMESPACE), string(ka.K8S_POD_NAME)
	if ns == "" || name == "" || c.excluded(ns) {
		return p.passThrough(c)
	}
	netns, err := openNetns(args.Netns)
	if err != nil {
		return err
	}
	defer netns.Close()
	req := &agentapi.Request{
		Command: agentapi.CmdAdd, PodNamespace: ns, PodName: name, PodUID: string(ka.K8S_POD_UID),
		ContainerID: args.ContainerID, Netns: args.Netns, IfName: args.IfName, IPs: c.podIPs(),
		TimeoutMillis: c.Timeout().Milliseconds(),
	}
	// The agent answers pending shortly before the timeout; allow for that.
	ctx, cancel := context.WithTimeout(context.Background(), c.Timeout()+5*time.Second)
	defer cancel()
	resp, err := p.call(ctx, c.AgentSocket, req, netns)
	if err != nil {
		p.log.Warn("ADD: node agent unreachable", "pod", ns+"/"+name, "err", err)
		return types.NewError(types.ErrTryAgainLater,
			fmt.Sprintf("mesh-cni: cannot reach the meshlite CNI agent, so cannot tell whether pod %s/%s must be captured; not starting it", ns, name),
			err.Error())
	}
	if resp.Error != "" {
		return types.NewError(types.ErrTryAgainLater,
			fmt.Sprintf("mesh-cni: the meshlite CNI agent failed to set up pod %s/%s", ns, name), resp.Error)
	}
	switch resp.State {
	case agentapi.StateNotEnrolled, agentapi.StateHeld:
		return p.passThrough(c)
	case agentapi.StatePending:
		return types.NewError(types.ErrTryAgainLater,
			fmt.Sprintf("mesh-cni: pod %s/%s is enrolled in ambient mode but ztunnel has not taken it over within %s; not starting it uncaptured (will retry)", ns, name, c.Timeout()),
			"its traffic is redirected to ztunnel's ports; start or fix ztunnel on this node")
	default:
		return types.NewError(types.ErrInternal, fmt.Sprintf("mesh-cni: unexpected agent answer %q to ADD", resp.State), "")
	}
}

// Del tells the agent the pod is going. It never fails on an unreachable
// agent: the pod must be able to go, and the agent also learns of deletions
// from the API server.
func (p *Plugin) Del(args *skel.CmdArgs) error {
	c, err := parse(args.StdinData)
	if err != nil {
		return err
	}
	ka, err := loadArgs(args.Args)
	if err != nil {
		return err
	}
	ns, name := string(ka.K8S_POD_NAMESPACE), string(ka.K8S_POD_NAME)
	if ns == "" || name == "" || c.excluded(ns) {
		return nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	req := &agentapi.Request{
		Command: agentapi.CmdDel, PodNamespace: ns, PodName: name, PodUID: string(ka.K8S_POD_UID),
		ContainerID: args.ContainerID, Netns: args.Netns, IfName: args.IfName, TimeoutMillis: 10000,
	}
	resp, err := p.call(ctx, c.AgentSocket, req, nil)
	if err != nil {
		p.log.Warn("DEL: node agent unreachable; it will clean up from the API server", "pod", ns+"/"+name, "err", err)
		return nil
	}
	if resp.Error != "" {
		p.log.Warn("DEL: node agent reported an error", "pod", ns+"/"+name, "err", resp.Error)
	}
	return nil
}

// Check asks the agent whether an enrolled pod's redirection is complete
// and held by ztunnel.
func (p *Plugin) Check(args *skel.CmdArgs) error {
	c, err := parse(args.StdinData)
	if err != nil {
		return err
	}
	if c.PrevResult == nil {
		return types.NewError(types.ErrInvalidNetworkConfig, "mesh-cni: CHECK needs prevResult", "")
	}
	ka, err := loadArgs(args.Args)
	if err != nil {
		return err
	}
	ns, name := string(ka.K8S_POD_NAMESPACE), string(ka.K8S_POD_NAME)
	if ns == "" || name == "" || c.excluded(ns) {
		return nil
	}
	netns, err := openNetns(args.Netns)
	if err != nil {
		return err
	}
	defer netns.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	req := &agentapi.Request{
		Command: agentapi.CmdCheck, PodNamespace: ns, PodName: name, PodUID: string(ka.K8S_POD_UID),
		ContainerID: args.ContainerID, Netns: args.Netns, IfName: args.IfName, IPs: c.podIPs(), TimeoutMillis: 10000,
	}
	resp, err := p.call(ctx, c.AgentSocket, req, netns)
	if err != nil {
		return types.NewError(types.ErrTryAgainLater, "mesh-cni: cannot reach the meshlite CNI agent for CHECK", err.Error())
	}
	if resp.Error != "" {
		return types.NewError(types.ErrInternal, fmt.Sprintf("mesh-cni: pod %s/%s fails CHECK", ns, name), resp.Error)
	}
	switch resp.State {
	case agentapi.StateNotEnrolled, agentapi.StateHeld:
		return nil
	case agentapi.StatePending:
		return types.NewError(types.ErrInternal, fmt.Sprintf("mesh-cni: pod %s/%s is redirected but ztunnel does not hold it", ns, name), "")
	}
	return types.NewError(types.ErrInternal, fmt.Sprintf("mesh-cni: unexpected agent answer %q to CHECK", resp.State), "")
}

// Status reports whether the agent can serve ADD.
func (p *Plugin) Status(args *skel.CmdArgs) error {
	c, err := parse(args.StdinData)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	resp, err := p.call(ctx, c.AgentSocket, &agentapi.Request{Command: agentapi.CmdStatus, TimeoutMillis: 5000}, nil)
	if err != nil {
		return types.NewError(ErrPluginNotAvailable, "mesh-cni: the meshlite CNI agent is not reachable", err.Error())
	}
	if resp.Error != "" || resp.State != agentapi.StateReady {
		return types.NewError(ErrPluginNotAvailable, "mesh-cni: the meshlite CNI agent is not ready", resp.Error)
	}
	return nil
}

// GC has nothing to collect: the agent forgets pods on DEL and when the
// API server says they are gone.
func (p *Plugin) GC(args *skel.CmdArgs) error {
	_, err := parse(args.StdinData)
	return err
}
