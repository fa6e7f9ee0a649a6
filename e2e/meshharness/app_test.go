package meshharness

import (
	"maps"
	"slices"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/runtime"

	"github.com/meshlite/meshlite/e2e/cluster/manifest"
)

// decodeOne decodes yaml, which must hold one object, into out.
func decodeOne(t *testing.T, yaml string, out any) {
	t.Helper()
	objs, err := manifest.Decode([]byte(yaml))
	if err != nil || len(objs) != 1 {
		t.Fatalf("decode: %d objects, %v\n%s", len(objs), err, yaml)
	}
	if err := runtime.DefaultUnstructuredConverter.FromUnstructured(objs[0].Object, out); err != nil {
		t.Fatalf("convert %s: %v\n%s", objs[0].GetKind(), err, yaml)
	}
}

// checkEchoContainer checks c is the echo server EchoContainer describes.
func checkEchoContainer(t *testing.T, c corev1.Container) {
	t.Helper()
	wantArgs := []string{"server", "--http-ports", "8080", "--tcp-ports", "9090", "--grpc-ports", ""}
	if c.Name != "echo" || c.Image != "meshlite/echo:dev" || !slices.Equal(c.Args, wantArgs) {
		t.Errorf("container %s, image %s, args %q; want echo, meshlite/echo:dev, %q", c.Name, c.Image, c.Args, wantArgs)
	}
	want := map[string]string{"POD_NAME": "metadata.name", "POD_NAMESPACE": "metadata.namespace", "POD_IP": "status.podIP", "NODE_NAME": "spec.nodeName"}
	got := map[string]string{}
	for _, e := range c.Env {
		if e.ValueFrom != nil && e.ValueFrom.FieldRef != nil {
			got[e.Name] = e.ValueFrom.FieldRef.FieldPath
		}
	}
	if !maps.Equal(got, want) {
		t.Errorf("downward-API env %v, want %v", got, want)
	}
}

func TestEchoPodWithLabels_IsThePodWithTheLabelsAsStrings(t *testing.T) {
	labels := map[string]string{"app": "echo", "istio.io/dataplane-mode": "none", "flaky": "yes", "n": "1"}
	var p corev1.Pod
	decodeOne(t, EchoPodWithLabels("ns-a", "server-0", "node-1", "echo", labels), &p)
	if p.Kind != "Pod" || p.Namespace != "ns-a" || p.Name != "server-0" || p.Spec.NodeName != "node-1" || p.Spec.ServiceAccountName != "echo" {
		t.Errorf("pod %s %s/%s on %q as %q", p.Kind, p.Namespace, p.Name, p.Spec.NodeName, p.Spec.ServiceAccountName)
	}
	if !maps.Equal(p.Labels, labels) {
		t.Errorf("labels %v, want %v", p.Labels, labels)
	}
	if len(p.Spec.Containers) != 1 {
		t.Fatalf("%d containers, want 1", len(p.Spec.Containers))
	}
	c := p.Spec.Containers[0]
	checkEchoContainer(t, c)
	if r := c.ReadinessProbe; r == nil || r.HTTPGet == nil || r.HTTPGet.Path != "/ready" || r.HTTPGet.Port.IntValue() != 8080 || r.PeriodSeconds != 1 {
		t.Errorf("readiness probe %+v, want GET /ready on 8080 every second", r)
	}
	if g := p.Spec.TerminationGracePeriodSeconds; g == nil || *g != 1 {
		t.Errorf("termination grace %v, want 1 s", g)
	}
}

func TestEchoPod_IsLabelledWithItsApp(t *testing.T) {
	var p corev1.Pod
	decodeOne(t, EchoPod("ns-a", "client", "node-0", "client", "client"), &p)
	if !maps.Equal(p.Labels, map[string]string{"app": "client"}) {
		t.Errorf("labels %v, want app=client", p.Labels)
	}
}

func TestEchoContainer_FitsAPodTemplateWithFieldsOfItsOwn(t *testing.T) {
	yaml := `apiVersion: apps/v1
kind: Deployment
metadata: {name: echo, namespace: ns-a}
spec:
  selector: {matchLabels: {app: echo}}
  template:
    metadata: {labels: {app: echo}}
    spec:
      containers:
` + EchoContainer("      ") + `        ports:
        - {name: tcp, containerPort: 9090}
`
	var d appsv1.Deployment
	decodeOne(t, yaml, &d)
	cs := d.Spec.Template.Spec.Containers
	if len(cs) != 1 {
		t.Fatalf("%d containers, want 1:\n%s", len(cs), yaml)
	}
	checkEchoContainer(t, cs[0])
	if len(cs[0].Ports) != 1 || cs[0].Ports[0].ContainerPort != 9090 {
		t.Errorf("the caller's ports field got lost: %+v", cs[0].Ports)
	}
}
