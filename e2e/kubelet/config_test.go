package kubelet

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestLoadConfig(t *testing.T) {
	dir := t.TempDir()
	good := `{"nodeName":"sbx-node-1","nodeIP":"172.30.0.11","podCIDR":"10.244.1.0/24","kubeconfig":"/k",
"rootDir":"/r","cniConfDir":"/r/etc/cni/net.d","cniBinDir":"/r/opt/cni/bin","cniCacheDir":"/c","podsDir":"/p",
"imageBinDirs":["/bin"],"clusterDNS":"10.96.0.10","servingCert":"/s.crt","servingKey":"/s.key","clientCAFile":"/ca.crt"}`
	path := filepath.Join(dir, "kubelet.json")
	os.WriteFile(path, []byte(good), 0o600)
	c, err := LoadConfig(path)
	if err != nil {
		t.Fatal(err)
	}
	if c.ClusterDomain != "cluster.local" || c.NodeIP != "172.30.0.11" || len(c.ImageBinDirs) != 1 {
		t.Fatalf("config = %+v", c)
	}
	for name, bad := range map[string]string{
		"bad ip":        strings.Replace(good, `"172.30.0.11"`, `"node-1"`, 1),
		"bad cidr":      strings.Replace(good, `"10.244.1.0/24"`, `"10.244.1.0"`, 1),
		"missing field": strings.Replace(good, `"podsDir":"/p",`, ``, 1),
		"unknown field": strings.Replace(good, `"nodeName"`, `"nodename2":1,"nodeName"`, 1),
		"not json":      "{",
	} {
		os.WriteFile(path, []byte(bad), 0o600)
		if _, err := LoadConfig(path); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}
