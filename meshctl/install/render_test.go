package install

import (
	"context"
	"maps"
	"reflect"
	"slices"
	"strings"
	"testing"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
)

func render(t *testing.T, opts Options) *Rendered {
	t.Helper()
	r, err := RenderChart(context.Background(), opts)
	if err != nil {
		t.Fatalf("render: %v", err)
	}
	return r
}

func find(t *testing.T, objs []*unstructured.Unstructured, kind, name string) *unstructured.Unstructured {
	t.Helper()
	for _, o := range objs {
		if o.GetKind() == kind && o.GetName() == name {
			return o
		}
	}
	t.Fatalf("no %s %s among the rendered objects", kind, name)
	return nil
}

func has(objs []*unstructured.Unstructured, kind, name string) bool {
	for _, o := range objs {
		if o.GetKind() == kind && o.GetName() == name {
			return true
		}
	}
	return false
}

// podSpec returns the pod template spec of a workload and its first container.
func podSpec(t *testing.T, o *unstructured.Unstructured) (map[string]any, map[string]any) {
	t.Helper()
	spec, ok, err := unstructured.NestedMap(o.Object, "spec", "template", "spec")
	if !ok || err != nil {
		t.Fatalf("%s %s: no pod spec (%v)", o.GetKind(), o.GetName(), err)
	}
	cs := spec["containers"].([]any)
	return spec, cs[0].(map[string]any)
}

func args(t *testing.T, o *unstructured.Unstructured) []string {
	t.Helper()
	_, c := podSpec(t, o)
	a, _, _ := unstructured.NestedStringSlice(c, "args")
	return a
}

func hostPaths(t *testing.T, o *unstructured.Unstructured) map[string]string {
	t.Helper()
	spec, _ := podSpec(t, o)
	out := map[string]string{}
	for _, v := range spec["volumes"].([]any) {
		vm := v.(map[string]any)
		if p, ok, _ := unstructured.NestedString(vm, "hostPath", "path"); ok {
			out[vm["name"].(string)] = p
		}
	}
	return out
}

func wantArgs(t *testing.T, o *unstructured.Unstructured, want ...string) {
	t.Helper()
	got := args(t, o)
	for _, w := range want {
		if !slices.Contains(got, w) {
			t.Errorf("%s %s: args %q lack %q", o.GetKind(), o.GetName(), got, w)
		}
	}
}

func noArg(t *testing.T, o *unstructured.Unstructured, prefix string) {
	t.Helper()
	for _, a := range args(t, o) {
		if strings.HasPrefix(a, prefix) {
			t.Errorf("%s %s: unexpected arg %q", o.GetKind(), o.GetName(), a)
		}
	}
}

func TestRender_DefaultsMirrorTodaysManifests(t *testing.T) {
	r := render(t, Options{})
	all := r.All()

	if all[0].GetKind() != "Namespace" || all[0].GetName() != "istio-system" {
		t.Fatalf("first object is %s %s, want Namespace istio-system", all[0].GetKind(), all[0].GetName())
	}
	var crds []string
	for _, o := range r.CRDs {
		crds = append(crds, o.GetName())
	}
	if want := []string{"authorizationpolicies.security.istio.io", "peerauthentications.security.istio.io", "trafficpolicies.policy.meshlite.io"}; !reflect.DeepEqual(crds, want) {
		t.Errorf("CRDs %v, want %v", crds, want)
	}
	for _, o := range all[1 : 1+len(r.CRDs)] {
		if o.GetKind() != "CustomResourceDefinition" {
			t.Errorf("apply order: %s %s among the CRDs", o.GetKind(), o.GetName())
		}
	}

	want := map[string][]string{
		"ServiceAccount":      {"istiod", "ztunnel", "istio-cni"},
		"ClusterRole":         {"istiod-lite", "meshlite-cni-agent"},
		"ClusterRoleBinding":  {"istiod-lite", "meshlite-cni-agent"},
		"Role":                {"istiod-lite", "meshlite-cni-agent"},
		"RoleBinding":         {"istiod-lite", "meshlite-cni-agent"},
		"Service":             {"istiod"},
		"Deployment":          {"istiod"},
		"DaemonSet":           {"ztunnel", "istio-cni-node"},
		"PodDisruptionBudget": {"istiod"},
	}
	got := map[string][]string{}
	for _, o := range r.Objects {
		got[o.GetKind()] = append(got[o.GetKind()], o.GetName())
		if ns := o.GetNamespace(); namespaced(o) && ns != "istio-system" {
			t.Errorf("%s %s in namespace %q", o.GetKind(), o.GetName(), ns)
		}
		if o.GetLabels()["app.kubernetes.io/managed-by"] != "meshctl" {
			t.Errorf("%s %s: managed-by %q", o.GetKind(), o.GetName(), o.GetLabels()["app.kubernetes.io/managed-by"])
		}
	}
	for k := range maps.Keys(want) {
		if !slices.Equal(slices.Sorted(slices.Values(got[k])), slices.Sorted(slices.Values(want[k]))) {
			t.Errorf("%s: rendered %v, want %v", k, got[k], want[k])
		}
	}
	for k := range got {
		if _, ok := want[k]; !ok {
			t.Errorf("unexpected %s %v", k, got[k])
		}
	}
	// Helm's install order: identities and RBAC before the workloads.
	first := map[string]int{}
	for i, o := range r.Objects {
		if _, ok := first[o.GetKind()]; !ok {
			first[o.GetKind()] = i
		}
	}
	if first["DaemonSet"] < first["ClusterRoleBinding"] || first["Deployment"] < first["ServiceAccount"] {
		t.Errorf("workloads before their RBAC: %v", first)
	}

	zt := find(t, r.Objects, "DaemonSet", "ztunnel")
	spec, c := podSpec(t, zt)
	if spec["hostNetwork"] != true {
		t.Error("ztunnel: not in the host network")
	}
	add, _, _ := unstructured.NestedStringSlice(c, "securityContext", "capabilities", "add")
	drop, _, _ := unstructured.NestedStringSlice(c, "securityContext", "capabilities", "drop")
	if !reflect.DeepEqual(add, []string{"NET_ADMIN", "SYS_ADMIN", "NET_RAW"}) || !reflect.DeepEqual(drop, []string{"ALL"}) {
		t.Errorf("ztunnel capabilities add %v drop %v", add, drop)
	}
	if p, _, _ := unstructured.NestedBool(c, "securityContext", "privileged"); p {
		t.Error("ztunnel is privileged")
	}
	if hp := hostPaths(t, zt); !reflect.DeepEqual(hp, map[string]string{"cni-ztunnel-sock-dir": "/var/run/ztunnel"}) {
		t.Errorf("ztunnel host paths %v", hp)
	}
	wantArgs(t, zt, "--xds-address=istiod.istio-system.svc:15012", "--xds-server-name=istiod.istio-system.svc",
		"--tunnel=h2", "--trust-domain=cluster.local", "--log-level=info")
	if img := c["image"]; img != "ghcr.io/meshlite/ztunnel:0.1.0" {
		t.Errorf("ztunnel image %v", img)
	}

	cni := find(t, r.Objects, "DaemonSet", "istio-cni-node")
	_, cc := podSpec(t, cni)
	add, _, _ = unstructured.NestedStringSlice(cc, "securityContext", "capabilities", "add")
	if !reflect.DeepEqual(add, []string{"NET_ADMIN", "SYS_ADMIN", "NET_RAW"}) {
		t.Errorf("cni agent capabilities %v", add)
	}
	if hp := hostPaths(t, cni); hp["cni-bin"] != "/opt/cni/bin" || hp["cni-conf"] != "/etc/cni/net.d" || hp["ztunnel"] != "/var/run/ztunnel" {
		t.Errorf("cni agent host paths %v", hp)
	}
	wantArgs(t, cni, "--exclude-namespaces=istio-system,kube-system")
	noArg(t, cni, "--no-dns-capture")
	noArg(t, cni, "--host-root")
	noArg(t, cni, "--capture-namespaces")

	istiod := find(t, r.Objects, "Deployment", "istiod")
	if n, _, _ := unstructured.NestedInt64(istiod.Object, "spec", "replicas"); n != 2 {
		t.Errorf("istiod replicas %d, want 2 (with leader election)", n)
	}
	if m, _, _ := unstructured.NestedInt64(find(t, r.Objects, "PodDisruptionBudget", "istiod").Object, "spec", "minAvailable"); m != 1 {
		t.Errorf("PDB minAvailable %d", m)
	}
	ispec, ic := podSpec(t, istiod)
	if nonRoot, _, _ := unstructured.NestedBool(ispec, "securityContext", "runAsNonRoot"); !nonRoot {
		t.Error("istiod-lite runs as root")
	}
	if img := ic["image"]; img != "ghcr.io/meshlite/istiod-lite:0.1.0" {
		t.Errorf("istiod image %v", img)
	}
	wantArgs(t, istiod, "--grpc-addr=:15012", "--trusted-node-accounts=istio-system/ztunnel", "--trust-domain=cluster.local",
		"--leader-elect=true", "--waypoint-image=ghcr.io/meshlite/waypoint:0.1.0",
		"--proxy-xds-address=istiod.istio-system.svc:15012", "--proxy-xds-server-name=istiod.istio-system.svc")
	// ztunnel rolls with surge and declares no (host) ports.
	if ms, _, _ := unstructured.NestedFieldNoCopy(zt.Object, "spec", "updateStrategy", "rollingUpdate", "maxSurge"); ms != int64(1) {
		t.Errorf("ztunnel maxSurge %v", ms)
	}
	if _, ok := c["ports"]; ok {
		t.Errorf("ztunnel declares ports %v (host ports on a hostNetwork pod block the surge pod)", c["ports"])
	}
	wantArgs(t, zt, "--handover-timeout=10s", "--drain-timeout=15s")

	svc := find(t, r.Objects, "Service", "istiod")
	ports, _, _ := unstructured.NestedSlice(svc.Object, "spec", "ports")
	if len(ports) != 1 || ports[0].(map[string]any)["port"] != int64(15012) {
		t.Errorf("Service istiod ports %v", ports)
	}

	if !strings.Contains(r.Notes, "istio.io/dataplane-mode=ambient") {
		t.Errorf("notes: %q", r.Notes)
	}
}

func TestRender_CustomValuesReachTheArgs(t *testing.T) {
	vals := map[string]any{
		"trustDomain": "example.org",
		"ztunnel":     map[string]any{"tunnel": "quic"},
		"image":       map[string]any{"registry": "registry.local:5000/mesh/", "tag": "v9"},
	}
	r := render(t, Options{
		Namespace: "mesh",
		Values:    vals,
		Set: []string{
			"istiod.replicas=3",
			"cni.binDir=/home/kubernetes/bin",
			"cni.dnsCapture=false",
			"cni.captureNamespaces={a,b}",
			"cni.hostRoot=/var/lib/sandbox/nodes/$(NODE_NAME)/root",
			"logLevel=debug",
			"ztunnel.image=example.com/zt@sha256:abc",
		},
	})
	if _, changed := vals["istiod"]; changed {
		t.Error("Set wrote into the caller's Values")
	}
	istiod := find(t, r.Objects, "Deployment", "istiod")
	if n, _, _ := unstructured.NestedInt64(istiod.Object, "spec", "replicas"); n != 3 {
		t.Errorf("istiod replicas %d, want 3", n)
	}
	pdb := find(t, r.Objects, "PodDisruptionBudget", "istiod")
	if m, _, _ := unstructured.NestedInt64(pdb.Object, "spec", "minAvailable"); m != 1 {
		t.Errorf("PDB minAvailable %d", m)
	}
	wantArgs(t, istiod, "--trust-domain=example.org", "--trusted-node-accounts=mesh/ztunnel", "--root-namespace=mesh", "--log-level=debug",
		"--waypoint-image=registry.local:5000/mesh/waypoint:v9", "--proxy-xds-address=istiod.mesh.svc:15012")
	_, ic := podSpec(t, istiod)
	if ic["image"] != "registry.local:5000/mesh/istiod-lite:v9" {
		t.Errorf("istiod image %v", ic["image"])
	}

	zt := find(t, r.Objects, "DaemonSet", "ztunnel")
	wantArgs(t, zt, "--tunnel=quic", "--trust-domain=example.org", "--xds-address=istiod.mesh.svc:15012", "--xds-server-name=istiod.mesh.svc")
	if _, c := podSpec(t, zt); c["image"] != "example.com/zt@sha256:abc" {
		t.Errorf("ztunnel image %v", c["image"])
	}

	cni := find(t, r.Objects, "DaemonSet", "istio-cni-node")
	if hp := hostPaths(t, cni); hp["cni-bin"] != "/home/kubernetes/bin" {
		t.Errorf("cni bin host path %q", hp["cni-bin"])
	}
	wantArgs(t, cni, "--no-dns-capture", "--exclude-namespaces=mesh,kube-system", "--capture-namespaces=a,b",
		"--host-root=/var/lib/sandbox/nodes/$(NODE_NAME)/root")

	for _, o := range r.Objects {
		if namespaced(o) && o.GetNamespace() != "mesh" {
			t.Errorf("%s %s in namespace %q, want mesh", o.GetKind(), o.GetName(), o.GetNamespace())
		}
	}
	for _, kind := range []string{"ClusterRoleBinding", "RoleBinding"} {
		for _, name := range []string{"istiod-lite", "meshlite-cni-agent"} {
			subj, _, _ := unstructured.NestedSlice(find(t, r.Objects, kind, name).Object, "subjects")
			if ns := subj[0].(map[string]any)["namespace"]; ns != "mesh" {
				t.Errorf("%s %s binds a ServiceAccount in %v", kind, name, ns)
			}
		}
	}
	if r.Namespace.GetName() != "mesh" {
		t.Errorf("namespace object %s", r.Namespace.GetName())
	}
}

func TestRender_XDSAddressFromConfigMap(t *testing.T) {
	r := render(t, Options{Set: []string{"ztunnel.xdsAddressConfigMap=ztunnel-xds"}})
	zt := find(t, r.Objects, "DaemonSet", "ztunnel")
	wantArgs(t, zt, "--xds-address=$(XDS_ADDRESS)", "--xds-server-name=istiod.istio-system.svc")
	_, c := podSpec(t, zt)
	env := c["env"].([]any)
	first := env[0].(map[string]any)
	name, _, _ := unstructured.NestedString(first, "valueFrom", "configMapKeyRef", "name")
	key, _, _ := unstructured.NestedString(first, "valueFrom", "configMapKeyRef", "key")
	// $(XDS_ADDRESS) expands only from a variable defined before the args
	// use it; any position in env works, but it must be there.
	if first["name"] != "XDS_ADDRESS" || name != "ztunnel-xds" || key != "address" {
		t.Errorf("XDS_ADDRESS env %v", first)
	}
}

func TestRender_RejectsBadInput(t *testing.T) {
	tests := []struct {
		name    string
		opts    Options
		wantErr string
	}{
		{"unknown tunnel", Options{Set: []string{"ztunnel.tunnel=tcp"}}, "schema"},
		{"unknown log level", Options{Values: map[string]any{"logLevel": "loud"}}, "schema"},
		{"zero replicas", Options{Set: []string{"istiod.replicas=0"}}, "schema"},
		{"relative CNI dir", Options{Set: []string{"cni.confDir=etc/cni"}}, "schema"},
		{"malformed set", Options{Set: []string{"a[=1"}}, "--set"},
		{"old cluster", Options{KubeVersion: "v1.20.0"}, "needs Kubernetes"},
		{"bad kube version", Options{KubeVersion: "latest"}, "kubernetes version"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Render(context.Background(), tc.opts)
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Fatalf("err %v, want one containing %q", err, tc.wantErr)
			}
		})
	}
}

func TestRender_OneReplicaNoPDB(t *testing.T) {
	r := render(t, Options{Set: []string{"istiod.replicas=1"}})
	if has(r.Objects, "PodDisruptionBudget", "istiod") {
		t.Error("PDB with one replica would block every node drain")
	}
}

func TestRender_Deterministic(t *testing.T) {
	a, b := render(t, Options{}), render(t, Options{})
	if len(a.Objects) != len(b.Objects) {
		t.Fatalf("%d vs %d objects", len(a.Objects), len(b.Objects))
	}
	for i := range a.Objects {
		if !reflect.DeepEqual(a.Objects[i].Object, b.Objects[i].Object) {
			t.Fatalf("object %d differs between renders: %s %s vs %s %s", i,
				a.Objects[i].GetKind(), a.Objects[i].GetName(), b.Objects[i].GetKind(), b.Objects[i].GetName())
		}
	}
}
