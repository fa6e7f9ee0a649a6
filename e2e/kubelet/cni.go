package kubelet

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"sort"
	"strings"

	"github.com/containernetworking/cni/libcni"
	cnitypes "github.com/containernetworking/cni/pkg/types"
	cnitypes100 "github.com/containernetworking/cni/pkg/types/100"
	v1 "k8s.io/api/core/v1"
)

// loopbackConf is the network the runtime always attaches as "lo", as
// containerd does, independent of the node's conflist.
const loopbackConf = `{"cniVersion":"1.0.0","name":"cni-loopback","type":"loopback"}`

// cniNet runs the node's CNI chain for pods.
type cniNet struct {
	confDir string
	cni     *libcni.CNIConfig
}

func newCNINet(c *Config) *cniNet {
	return &cniNet{
		confDir: c.CNIConfDir,
		cni:     libcni.NewCNIConfigWithCacheDir([]string{c.CNIBinDir}, c.CNICacheDir, nil),
	}
}

// loadChain reads the node's primary network: the lexically first valid
// .conflist/.conf/.json file in the conf dir, as a kubelet's runtime picks it.
// It is read on every pod add, because a CNI agent (meshlite's, Istio's)
// rewrites it to chain itself in.
func (c *cniNet) loadChain() (*libcni.NetworkConfigList, error) {
	files, err := libcni.ConfFiles(c.confDir, []string{".conf", ".conflist", ".json"})
	if err != nil {
		return nil, fmt.Errorf("list CNI configs in %s: %w", c.confDir, err)
	}
	sort.Strings(files)
	var errs []error
	for _, f := range files {
		list, err := loadConfFile(f)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		return list, nil
	}
	return nil, fmt.Errorf("no valid CNI config in %s: %w", c.confDir, errors.Join(errs...))
}

func loadConfFile(path string) (*libcni.NetworkConfigList, error) {
	if strings.HasSuffix(path, ".conflist") {
		list, err := libcni.NetworkConfFromFile(path)
		if err != nil {
			return nil, fmt.Errorf("load %s: %w", path, err)
		}
		return list, nil
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", path, err)
	}
	list, err := confListFromPlugin(b)
	if err != nil {
		return nil, fmt.Errorf("load %s: %w", path, err)
	}
	return list, nil
}

// confListFromPlugin wraps a single-plugin network config (such as loopback)
// in a one-plugin conflist, the only format libcni still runs.
func confListFromPlugin(b []byte) (*libcni.NetworkConfigList, error) {
	var plugin map[string]any
	if err := json.Unmarshal(b, &plugin); err != nil {
		return nil, fmt.Errorf("parse network config: %w", err)
	}
	list := map[string]any{"cniVersion": plugin["cniVersion"], "name": plugin["name"], "plugins": []any{plugin}}
	raw, err := json.Marshal(list)
	if err != nil {
		return nil, err
	}
	return libcni.NetworkConfFromBytes(raw)
}

// runtimeConf is what a kubelet's runtime passes for a pod: the sandbox id,
// netns, eth0, and the K8S_* CNI_ARGS plugins use to find the pod.
func runtimeConf(pod *v1.Pod, netnsPath, ifName string) *libcni.RuntimeConf {
	uid := string(pod.UID)
	rt := &libcni.RuntimeConf{
		ContainerID: uid,
		NetNS:       netnsPath,
		IfName:      ifName,
		Args: [][2]string{
			{"IgnoreUnknown", "1"},
			{"K8S_POD_NAMESPACE", pod.Namespace},
			{"K8S_POD_NAME", pod.Name},
			{"K8S_POD_INFRA_CONTAINER_ID", uid},
			{"K8S_POD_UID", uid},
		},
	}
	var mappings []map[string]any
	for _, c := range pod.Spec.Containers {
		for _, p := range c.Ports {
			if p.HostPort == 0 {
				continue
			}
			proto := strings.ToLower(string(p.Protocol))
			if proto == "" {
				proto = "tcp"
			}
			mappings = append(mappings, map[string]any{
				"hostPort": p.HostPort, "containerPort": p.ContainerPort,
				"protocol": proto, "hostIP": p.HostIP,
			})
		}
	}
	rt.CapabilityArgs = map[string]any{
		"io.kubernetes.cri.pod-annotations": pod.Annotations,
	}
	if len(mappings) > 0 {
		rt.CapabilityArgs["portMappings"] = mappings
	}
	return rt
}

// add attaches the pod: the node chain on eth0 and loopback on lo. It returns
// the pod's IPs, IPv4 first. On failure it undoes what it did.
func (c *cniNet) add(ctx context.Context, pod *v1.Pod, netnsPath string) ([]net.IP, error) {
	list, err := c.loadChain()
	if err != nil {
		return nil, err
	}
	rt := runtimeConf(pod, netnsPath, "eth0")
	res, err := c.cni.AddNetworkList(ctx, list, rt)
	if err != nil {
		// A partial ADD may hold an IP or a veth: DEL releases them.
		_ = c.cni.DelNetworkList(context.WithoutCancel(ctx), list, rt)
		return nil, fmt.Errorf("CNI ADD %s: %w", list.Name, err)
	}
	lo, err := libcni.NetworkPluginConfFromBytes([]byte(loopbackConf))
	if err != nil {
		return nil, fmt.Errorf("parse loopback conf: %w", err)
	}
	if _, err := c.cni.AddNetwork(ctx, lo, runtimeConf(pod, netnsPath, "lo")); err != nil {
		_ = c.del(context.WithoutCancel(ctx), string(pod.UID), netnsPath)
		return nil, fmt.Errorf("CNI ADD loopback: %w", err)
	}
	ips, err := resultIPs(res)
	if err != nil {
		_ = c.del(context.WithoutCancel(ctx), string(pod.UID), netnsPath)
		return nil, fmt.Errorf("CNI ADD %s: %w", list.Name, err)
	}
	return ips, nil
}

// resultIPs picks the pod's addresses from a CNI result: those on an
// interface inside the sandbox, or all when the result names no interface.
func resultIPs(res cnitypes.Result) ([]net.IP, error) {
	if res == nil {
		return nil, errors.New("no result")
	}
	r, err := cnitypes100.NewResultFromResult(res)
	if err != nil {
		return nil, fmt.Errorf("convert CNI result: %w", err)
	}
	var v4, v6 []net.IP
	for _, ip := range r.IPs {
		if ip.Interface != nil && *ip.Interface >= 0 && *ip.Interface < len(r.Interfaces) &&
			r.Interfaces[*ip.Interface].Sandbox == "" {
			continue // an address on the host side
		}
		if ip.Address.IP.To4() != nil {
			v4 = append(v4, ip.Address.IP.To4())
		} else {
			v6 = append(v6, ip.Address.IP)
		}
	}
	ips := append(v4, v6...)
	if len(ips) == 0 {
		return nil, errors.New("result has no pod IP")
	}
	return ips, nil
}

// del detaches the pod from every network it was attached to, using the
// configuration cached at ADD (the conflist may have changed since). Without
// a cache it falls back to the current chain.
func (c *cniNet) del(ctx context.Context, containerID, netnsPath string) error {
	atts, err := c.cni.GetCachedAttachments(containerID)
	if err != nil {
		return fmt.Errorf("read CNI cache for %s: %w", containerID, err)
	}
	if len(atts) == 0 {
		list, err := c.loadChain()
		if err != nil {
			return err
		}
		rt := &libcni.RuntimeConf{ContainerID: containerID, NetNS: netnsPath, IfName: "eth0"}
		if err := c.cni.DelNetworkList(ctx, list, rt); err != nil {
			return fmt.Errorf("CNI DEL %s: %w", list.Name, err)
		}
		return nil
	}
	var errs []error
	for _, a := range atts {
		list, err := libcni.NetworkConfFromBytes(a.Config)
		if err != nil {
			// A cached single-plugin network (loopback).
			if list, err = confListFromPlugin(a.Config); err != nil {
				errs = append(errs, fmt.Errorf("parse cached CNI config %s: %w", a.Network, err))
				continue
			}
		}
		rt := &libcni.RuntimeConf{
			ContainerID:    a.ContainerID,
			NetNS:          netnsPath,
			IfName:         a.IfName,
			Args:           a.CniArgs,
			CapabilityArgs: a.CapabilityArgs,
		}
		if !isNetns(netnsPath) {
			rt.NetNS = "" // plugins must then release what they hold outside it
		}
		if err := c.cni.DelNetworkList(ctx, list, rt); err != nil {
			errs = append(errs, fmt.Errorf("CNI DEL %s (%s): %w", a.Network, a.IfName, err))
		}
	}
	return errors.Join(errs...)
}
