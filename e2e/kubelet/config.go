package kubelet

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
	ClusterDNS    string `json:"clusterDNS"`
	ClusterDomain string `json:"clusterDomain"`

	// ServingCert/ServingKey serve the kubelet API on 10250; ClientCAFile
	// verifies the kube-apiserver's client certificate.
	ServingCert  string `json:"servingCert"`
	ServingKey   string `json:"servingKey"`
	ClientCAFile string `json:"clientCAFile"`
}
