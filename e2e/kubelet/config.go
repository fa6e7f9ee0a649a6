package kubelet

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
)

// Config is what the sandbox writes for each node's kubelet-lite (as JSON, at
// <StateDir>/nodes/<NodeName>/kubelet.json) and what `sandbox kubelet --config`
// reads. It is the only contract between the cluster launcher and kubelet-lite.
type Config struct {
	NodeName string `json:"nodeName"`
	// NodeIP is the node's underlay address; the kubelet API listens on NodeIP:10250.
	NodeIP string `json:"nodeIP"`
	// PodCIDR is the node's pod range, e.g. 10.244.1.0/24 (also set on the Node object).
	PodCIDR string `json:"podCIDR"`
	// Kubeconfig authenticates the kubelet to the kube-apiserver (as system:node:<name>).
	Kubeconfig string `json:"kubeconfig"`

	// RootDir is the node's private root: hostPath volumes of pods on this node
	// resolve under it (hostPath /etc/cni/net.d -> <RootDir>/etc/cni/net.d).
	RootDir string `json:"rootDir"`
	// CNIConfDir and CNIBinDir are the node's net.d and CNI bin dirs (under RootDir).
	CNIConfDir string `json:"cniConfDir"`
	CNIBinDir  string `json:"cniBinDir"`
	// CNICacheDir keeps libcni's result cache per node.
	CNICacheDir string `json:"cniCacheDir"`
	// PodsDir holds per-pod state: logs, tokens, volumes.
	PodsDir string `json:"podsDir"`

	// ImageBinDirs are searched for a binary named after an image's last path
	// element without tag: image "meshlite/echo:dev" runs <dir>/echo.
	ImageBinDirs []string `json:"imageBinDirs"`

	// ClusterDNS and ClusterDomain go into each pod's resolv.conf.
	ClusterDNS string `json:"clusterDNS"`
	// NetnsPrefix starts the names of pod network namespaces (default
	// PodNetnsPrefix); each sandbox instance has its own.
	NetnsPrefix   string `json:"netnsPrefix,omitempty"`
	ClusterDomain string `json:"clusterDomain"`

	// ServingCert/ServingKey serve the kubelet API on 10250; ClientCAFile
	// verifies the kube-apiserver's client certificate.
	ServingCert  string `json:"servingCert"`
	ServingKey   string `json:"servingKey"`
	ClientCAFile string `json:"clientCAFile"`
}

// LoadConfig reads and checks a kubelet.json.
func LoadConfig(path string) (*Config, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read kubelet config: %w", err)
	}
	var c Config
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&c); err != nil {
		return nil, fmt.Errorf("parse kubelet config %s: %w", path, err)
	}
	if err := c.validate(); err != nil {
		return nil, fmt.Errorf("kubelet config %s: %w", path, err)
	}
	return &c, nil
}

func (c *Config) validate() error {
	var errs []error
	need := func(name, v string) {
		if v == "" {
			errs = append(errs, fmt.Errorf("%s is required", name))
		}
	}
	need("nodeName", c.NodeName)
	need("kubeconfig", c.Kubeconfig)
	need("cniConfDir", c.CNIConfDir)
	need("cniBinDir", c.CNIBinDir)
	need("cniCacheDir", c.CNICacheDir)
	need("podsDir", c.PodsDir)
	need("rootDir", c.RootDir)
	need("servingCert", c.ServingCert)
	need("servingKey", c.ServingKey)
	need("clientCAFile", c.ClientCAFile)
	if net.ParseIP(c.NodeIP) == nil {
		errs = append(errs, fmt.Errorf("nodeIP %q is not an IP address", c.NodeIP))
	}
	if _, _, err := net.ParseCIDR(c.PodCIDR); err != nil {
		errs = append(errs, fmt.Errorf("podCIDR %q: %w", c.PodCIDR, err))
	}
	if c.ClusterDNS != "" && net.ParseIP(c.ClusterDNS) == nil {
		errs = append(errs, fmt.Errorf("clusterDNS %q is not an IP address", c.ClusterDNS))
	}
	if c.ClusterDomain == "" {
		c.ClusterDomain = "cluster.local"
	}
	return errors.Join(errs...)
}
