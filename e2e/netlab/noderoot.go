package netlab

import (
	"encoding/json"
	"fmt"
	"io"
	"net/netip"
	"os"
	"path/filepath"
)

// ConflistName is the node's primary CNI configuration; meshlite's CNI
// agent chains itself into it like it would on a real node.
const ConflistName = "10-sandbox.conflist"

// NodeRoot is the layout of a node's private root directory. HostPath
// volumes of pods on the node resolve under it.
type NodeRoot struct {
	Dir        string
	CNIConfDir string // <Dir>/etc/cni/net.d
	CNIBinDir  string // <Dir>/opt/cni/bin
	CNICache   string // <Dir>/var/lib/cni (libcni's result cache)
	IPAMDir    string // <Dir>/var/lib/cni/networks (host-local's leases)
	ZtunnelDir string // <Dir>/var/run/ztunnel
}

// NodeRootAt returns the layout of a node root at dir.
func NodeRootAt(dir string) NodeRoot {
	return NodeRoot{
		Dir:        dir,
		CNIConfDir: filepath.Join(dir, "etc/cni/net.d"),
		CNIBinDir:  filepath.Join(dir, "opt/cni/bin"),
		CNICache:   filepath.Join(dir, "var/lib/cni"),
		IPAMDir:    filepath.Join(dir, "var/lib/cni/networks"),
		ZtunnelDir: filepath.Join(dir, "var/run/ztunnel"),
	}
}

// ReferencePlugins are the CNI plugins every node gets.
var ReferencePlugins = []string{"bridge", "host-local", "loopback", "portmap"}

// Prepare creates the node root's directories, copies the reference CNI
// plugins from pluginDir into its CNI bin dir and writes its conflist for
// podCIDR.
func (r NodeRoot) Prepare(pluginDir string, podCIDR netip.Prefix) error {
	for _, d := range []string{r.CNIConfDir, r.CNIBinDir, r.CNICache, r.IPAMDir, r.ZtunnelDir} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return fmt.Errorf("create node dir: %w", err)
		}
	}
	for _, p := range ReferencePlugins {
		if err := copyFile(filepath.Join(pluginDir, p), filepath.Join(r.CNIBinDir, p), 0o755); err != nil {
			return fmt.Errorf("install CNI plugin %s: %w", p, err)
		}
	}
	conf, err := Conflist(podCIDR, r.IPAMDir)
	if err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(r.CNIConfDir, ConflistName), conf, 0o644); err != nil {
		return fmt.Errorf("write conflist: %w", err)
	}
	return nil
}

// Conflist returns the node's CNI network configuration list: a bridge
// (the pods' gateway, no masquerade: pod IPs are routable across the
// sandbox) with host-local IPAM over podCIDR, then portmap. The kubelet
// brings up the pod's loopback itself.
func Conflist(podCIDR netip.Prefix, ipamDataDir string) ([]byte, error) {
	if !podCIDR.Addr().Is4() || podCIDR.Bits() > 30 {
		return nil, fmt.Errorf("conflist: pod CIDR %s must be IPv4, /30 or wider", podCIDR)
	}
	podCIDR = podCIDR.Masked()
	type obj = map[string]any
	list := obj{
		"cniVersion": "1.0.0",
		"name":       "sandbox",
		"plugins": []obj{
			{
				"type":        "bridge",
				"bridge":      "cni0",
				"isGateway":   true,
				"ipMasq":      false,
				"hairpinMode": true,
				"ipam": obj{
					"type":    "host-local",
					"dataDir": ipamDataDir,
					"ranges": [][]obj{{{
						"subnet":  podCIDR.String(),
						"gateway": podCIDR.Addr().Next().String(),
					}}},
					"routes": []obj{{"dst": "0.0.0.0/0"}},
				},
			},
			{
				"type":         "portmap",
				"capabilities": obj{"portMappings": true},
			},
		},
	}
	b, err := json.MarshalIndent(list, "", "  ")
	if err != nil {
		return nil, fmt.Errorf("encode conflist: %w", err)
	}
	return append(b, '\n'), nil
}

func copyFile(src, dst string, mode os.FileMode) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	tmp := dst + ".tmp"
	out, err := os.OpenFile(tmp, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, mode)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		os.Remove(tmp)
		return err
	}
	if err := out.Close(); err != nil {
		os.Remove(tmp)
		return err
	}
	return os.Rename(tmp, dst)
}
