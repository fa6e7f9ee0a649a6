package kubelet

import (
	"reflect"
	"strings"
	"testing"

	v1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime/schema"
)

func envMap(list []string) map[string]string {
	m := map[string]string{}
	for _, kv := range list {
		k, v, _ := strings.Cut(kv, "=")
		m[k] = v
	}
	return m
}

func testPod() *v1.Pod {
	return &v1.Pod{
		ObjectMeta: metav1.ObjectMeta{
			Name: "web-1", Namespace: "shop", UID: "uid-1",
			Labels:      map[string]string{"app": "web", "version": "v2"},
			Annotations: map[string]string{"note": "a \"quoted\" value"},
		},
		Spec: v1.PodSpec{NodeName: "sbx-node-1", ServiceAccountName: "web-sa"},
	}
}

func TestBuildEnv_FieldRefsExpansionAndOrder(t *testing.T) {
	pod := testPod()
	optional := true
	c := &v1.Container{
		Name: "app",
		EnvFrom: []v1.EnvFromSource{
			{Prefix: "CM_", ConfigMapRef: &v1.ConfigMapEnvSource{LocalObjectReference: v1.LocalObjectReference{Name: "cfg"}}},
			{SecretRef: &v1.SecretEnvSource{LocalObjectReference: v1.LocalObjectReference{Name: "gone"}, Optional: &optional}},
		},
		Env: []v1.EnvVar{
			{Name: "POD_NAME", ValueFrom: &v1.EnvVarSource{FieldRef: &v1.ObjectFieldSelector{FieldPath: "metadata.name"}}},
			{Name: "POD_NAMESPACE", ValueFrom: &v1.EnvVarSource{FieldRef: &v1.ObjectFieldSelector{FieldPath: "metadata.namespace"}}},
			{Name: "POD_IP", ValueFrom: &v1.EnvVarSource{FieldRef: &v1.ObjectFieldSelector{FieldPath: "status.podIP"}}},
			{Name: "POD_IPS", ValueFrom: &v1.EnvVarSource{FieldRef: &v1.ObjectFieldSelector{FieldPath: "status.podIPs"}}},
			{Name: "HOST_IP", ValueFrom: &v1.EnvVarSource{FieldRef: &v1.ObjectFieldSelector{FieldPath: "status.hostIP"}}},
			{Name: "NODE", ValueFrom: &v1.EnvVarSource{FieldRef: &v1.ObjectFieldSelector{FieldPath: "spec.nodeName"}}},
			{Name: "SA", ValueFrom: &v1.EnvVarSource{FieldRef: &v1.ObjectFieldSelector{FieldPath: "spec.serviceAccountName"}}},
			{Name: "VERSION", ValueFrom: &v1.EnvVarSource{FieldRef: &v1.ObjectFieldSelector{FieldPath: "metadata.labels['version']"}}},
			{Name: "GREETING", Value: "hi $(POD_NAME) on $(NODE), $$(POD_NAME) $(LATER)"},
			{Name: "LATER", Value: "later"},
			{Name: "KEY", ValueFrom: &v1.EnvVarSource{ConfigMapKeyRef: &v1.ConfigMapKeySelector{LocalObjectReference: v1.LocalObjectReference{Name: "cfg"}, Key: "mode"}}},
			{Name: "PASS", ValueFrom: &v1.EnvVarSource{SecretKeyRef: &v1.SecretKeySelector{LocalObjectReference: v1.LocalObjectReference{Name: "creds"}, Key: "password"}}},
			{Name: "CM_mode", Value: "overridden"},
		},
	}
	ec := envContext{
		pod: pod, hostname: "web-1", podIPs: []string{"10.244.1.5", "fd00::5"}, hostIP: "172.30.0.11",
		apiHost: "172.30.0.1", apiPort: "6443",
		configMap: func(name string) (*v1.ConfigMap, error) {
			if name != "cfg" {
				return nil, apierrors.NewNotFound(schema.GroupResource{Resource: "configmaps"}, name)
			}
			return &v1.ConfigMap{Data: map[string]string{"mode": "fast", "level": "3"}}, nil
		},
		secret: func(name string) (*v1.Secret, error) {
			if name != "creds" {
				return nil, apierrors.NewNotFound(schema.GroupResource{Resource: "secrets"}, name)
			}
			return &v1.Secret{Data: map[string][]byte{"password": []byte("s3cret")}}, nil
		},
	}
	list, err := buildEnv(c, ec)
	if err != nil {
		t.Fatal(err)
	}
	m := envMap(list)
	want := map[string]string{
		"POD_NAME": "web-1", "POD_NAMESPACE": "shop", "POD_IP": "10.244.1.5", "POD_IPS": "10.244.1.5,fd00::5",
		"HOST_IP": "172.30.0.11", "NODE": "sbx-node-1", "SA": "web-sa", "VERSION": "v2",
		"GREETING": "hi web-1 on sbx-node-1, $(POD_NAME) $(LATER)",
		"KEY":      "fast", "PASS": "s3cret", "CM_level": "3", "CM_mode": "overridden",
		"KUBERNETES_SERVICE_HOST": "172.30.0.1", "KUBERNETES_SERVICE_PORT": "6443",
		"KUBERNETES_PORT_6443_TCP_ADDR": "172.30.0.1", "HOSTNAME": "web-1", "PATH": defaultPath,
	}
	for k, v := range want {
		if m[k] != v {
			t.Errorf("%s = %q, want %q", k, m[k], v)
		}
	}
	// A redefined name keeps its first position, with the last value.
	count := 0
	for _, kv := range list {
		if strings.HasPrefix(kv, "CM_mode=") {
			count++
		}
	}
	if count != 1 {
		t.Errorf("CM_mode appears %d times", count)
	}
}

func TestBuildEnv_MissingRequiredKeyIsAnError(t *testing.T) {
	c := &v1.Container{Env: []v1.EnvVar{{Name: "K", ValueFrom: &v1.EnvVarSource{
		ConfigMapKeyRef: &v1.ConfigMapKeySelector{LocalObjectReference: v1.LocalObjectReference{Name: "cfg"}, Key: "absent"},
	}}}}
	_, err := buildEnv(c, envContext{pod: testPod(), configMap: func(string) (*v1.ConfigMap, error) {
		return &v1.ConfigMap{Data: map[string]string{}}, nil
	}})
	if err == nil || !strings.Contains(err.Error(), "absent") {
		t.Fatalf("want missing-key error, got %v", err)
	}
	optional := true
	c.Env[0].ValueFrom.ConfigMapKeyRef.Optional = &optional
	list, err := buildEnv(c, envContext{pod: testPod(), configMap: func(string) (*v1.ConfigMap, error) {
		return &v1.ConfigMap{}, nil
	}})
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := envMap(list)["K"]; ok {
		t.Fatal("optional missing key must leave the variable unset")
	}
	// Without API access a reference is a clear error, not a crash.
	if _, err := buildEnv(c, envContext{pod: testPod()}); err == nil {
		t.Fatal("want error without API access")
	}
}

func TestPodFieldValue_LabelsAndAnnotationsFormat(t *testing.T) {
	pod := testPod()
	got, err := podFieldValue(pod, "metadata.labels", nil, "")
	if err != nil || got != "app=\"web\"\nversion=\"v2\"" {
		t.Fatalf("labels = %q, %v", got, err)
	}
	got, _ = podFieldValue(pod, "metadata.annotations", nil, "")
	if got != `note="a \"quoted\" value"` {
		t.Fatalf("annotations = %q", got)
	}
	if _, err := podFieldValue(pod, "spec.bogus", nil, ""); err == nil {
		t.Fatal("unknown field must be an error")
	}
}

func TestResourceFieldValue(t *testing.T) {
	c := &v1.Container{Resources: v1.ResourceRequirements{
		Limits:   v1.ResourceList{v1.ResourceCPU: resource.MustParse("1500m"), v1.ResourceMemory: resource.MustParse("256Mi")},
		Requests: v1.ResourceList{v1.ResourceCPU: resource.MustParse("250m")},
	}}
	cases := []struct {
		res, divisor, want string
	}{
		{"limits.cpu", "", "2"},      // rounded up to whole cores
		{"limits.cpu", "1m", "1500"}, // millicores
		{"limits.memory", "1Mi", "256"},
		{"limits.memory", "", "268435456"},
		{"requests.cpu", "1m", "250"},
		{"requests.memory", "", "0"},
	}
	for _, tc := range cases {
		ref := &v1.ResourceFieldSelector{Resource: tc.res}
		if tc.divisor != "" {
			ref.Divisor = resource.MustParse(tc.divisor)
		}
		got, err := resourceFieldValue(c, ref, 8, 1<<30)
		if err != nil || got != tc.want {
			t.Errorf("%s/%s = %q, %v; want %q", tc.res, tc.divisor, got, err, tc.want)
		}
	}
	// Unset limits are the node's.
	got, _ := resourceFieldValue(&v1.Container{}, &v1.ResourceFieldSelector{Resource: "limits.cpu"}, 8, 1<<30)
	if got != "8" {
		t.Errorf("unset cpu limit = %q, want node's 8", got)
	}
	if _, err := resourceFieldValue(c, &v1.ResourceFieldSelector{Resource: "limits.gpu"}, 8, 1); err == nil {
		t.Error("unsupported resource must be an error")
	}
}

func TestEnvLookupAndExpandAll(t *testing.T) {
	l := envLookup([]string{"A=1", "B=x=y", "A=2"})
	got := expandAll([]string{"$(A)", "$(B)", "$(C)"}, l)
	if !reflect.DeepEqual(got, []string{"2", "x=y", "$(C)"}) {
		t.Fatalf("got %q", got)
	}
	if expandAll(nil, l) != nil {
		t.Fatal("nil stays nil")
	}
}
