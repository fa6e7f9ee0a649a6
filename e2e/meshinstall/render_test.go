package meshinstall

import (
	"context"
	"slices"
	"strings"
	"testing"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"

	"github.com/meshlite/meshlite/e2e/sandbox"
)

func kinds(objs []*unstructured.Unstructured) map[string][]string {
	out := map[string][]string{}
	for _, o := range objs {
		out[o.GetKind()] = append(out[o.GetKind()], o.GetName())
	}
	return out
}

func TestRender_FitsTheChartToTheSandbox(t *testing.T) {
	sb := &sandbox.Sandbox{Dir: "/tmp/sb-state"}
	objs, err := Render(context.Background(), sb, Options{CaptureNamespaces: []string{"a", "b"}, Set: []string{"ztunnel.tunnel=quic"}})
	if err != nil {
		t.Fatal(err)
	}
	var cniArgs, ztArgs, istiodArgs []string
	for _, o := range objs {
		cs, _, _ := unstructured.NestedSlice(o.Object, "spec", "template", "spec", "containers")
		if len(cs) == 0 {
			continue
		}
		c := cs[0].(map[string]any)
		args, _, _ := unstructured.NestedStringSlice(c, "args")
		if !strings.HasPrefix(c["image"].(string), "meshlite/") {
			t.Errorf("%s: image %v is not meshlite/<binary>", o.GetName(), c["image"])
		}
		switch o.GetName() {
		case "istio-cni-node":
			cniArgs = args
		case "ztunnel":
			ztArgs = args
		case "istiod":
			istiodArgs = args
			if n, _, _ := unstructured.NestedInt64(o.Object, "spec", "replicas"); n != 1 {
				t.Errorf("istiod replicas %d in the sandbox", n)
			}
			// As the chart says: kubelet-lite gives the pod's user its token.
			sc, _, _ := unstructured.NestedMap(o.Object, "spec", "template", "spec", "securityContext")
			if sc["runAsUser"] != int64(1337) || sc["runAsNonRoot"] != true {
				t.Errorf("istiod's securityContext in the sandbox is %v, want the chart's non-root uid 1337", sc)
			}
		}
	}
	for _, want := range []string{"--host-root=/tmp/sb-state/nodes/$(NODE_NAME)/root", "--capture-namespaces=a,b"} {
		if !slices.Contains(cniArgs, want) {
			t.Errorf("cni args %q lack %q", cniArgs, want)
		}
	}
	for _, want := range []string{"--xds-address=$(XDS_ADDRESS)", "--tunnel=quic"} {
		if !slices.Contains(ztArgs, want) {
			t.Errorf("ztunnel args %q lack %q", ztArgs, want)
		}
	}
	for _, want := range []string{"--proxy-xds-address=$(POD_IP):15012", "--waypoint-image=meshlite/waypoint:dev"} {
		if !slices.Contains(istiodArgs, want) {
			t.Errorf("istiod args %q lack %q", istiodArgs, want)
		}
	}
}

func TestRender_Components(t *testing.T) {
	sb := &sandbox.Sandbox{Dir: "/tmp/sb-state"}
	objs, err := Render(context.Background(), sb, Options{Components: []string{"istiod"}})
	if err != nil {
		t.Fatal(err)
	}
	k := kinds(objs)
	if len(k["CustomResourceDefinition"]) != 3 || len(k["Namespace"]) != 1 {
		t.Errorf("CRDs %v, namespace %v: always installed", k["CustomResourceDefinition"], k["Namespace"])
	}
	if len(k["DaemonSet"]) != 0 || !slices.Equal(k["Deployment"], []string{"istiod"}) || !slices.Equal(k["ServiceAccount"], []string{"istiod"}) {
		t.Errorf("istiod only rendered %v", k)
	}
	if _, err := Render(context.Background(), sb, Options{Components: []string{"kube-proxy"}}); err == nil {
		t.Error("unknown component accepted")
	}
}
