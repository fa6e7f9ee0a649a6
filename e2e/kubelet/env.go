package kubelet

import (
	"fmt"
	"math"
	"sort"
	"strconv"
	"strings"

	v1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
)

// defaultPath is the PATH a container gets when its env sets none (an image
// would bring its own).
const defaultPath = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

// envContext is what a container's environment is computed from.
type envContext struct {
	pod      *v1.Pod
	hostname string
	podIPs   []string
	hostIP   string
	// apiHost/apiPort fill KUBERNETES_SERVICE_*; empty leaves them out.
	apiHost, apiPort string
	// nodeCPU (cores) and nodeMemory (bytes) stand in for unset limits in
	// resourceFieldRef, as node allocatable does in Kubernetes.
	nodeCPU    int64
	nodeMemory int64
	configMap  func(name string) (*v1.ConfigMap, error)
	secret     func(name string) (*v1.Secret, error)
}

// orderedEnv keeps the first position of each name and its last value.
type orderedEnv struct {
	names []string
	vals  map[string]string
}

func (e *orderedEnv) set(k, v string) {
	if e.vals == nil {
		e.vals = map[string]string{}
	}
	if _, ok := e.vals[k]; !ok {
		e.names = append(e.names, k)
	}
	e.vals[k] = v
}

func (e *orderedEnv) get(k string) (string, bool) {
	v, ok := e.vals[k]
	return v, ok
}

func (e *orderedEnv) list() []string {
	out := make([]string, 0, len(e.names))
	for _, k := range e.names {
		out = append(out, k+"="+e.vals[k])
	}
	return out
}

// buildEnv computes a container's environment as a kubelet does: defaults,
// the kubernetes service variables, envFrom, then env, where each value may
// reference variables defined before it as $(NAME).
func buildEnv(c *v1.Container, ec envContext) ([]string, error) {
	var env orderedEnv
	env.set("PATH", defaultPath)
	env.set("HOSTNAME", ec.hostname)
	env.set("HOME", "/root")
	if ec.apiHost != "" {
		hp := ec.apiHost
		if strings.Contains(hp, ":") {
			hp = "[" + hp + "]"
		}
		url := "tcp://" + hp + ":" + ec.apiPort
		env.set("KUBERNETES_SERVICE_HOST", ec.apiHost)
		env.set("KUBERNETES_SERVICE_PORT", ec.apiPort)
		env.set("KUBERNETES_SERVICE_PORT_HTTPS", ec.apiPort)
		env.set("KUBERNETES_PORT", url)
		prefix := "KUBERNETES_PORT_" + ec.apiPort + "_TCP"
		env.set(prefix, url)
		env.set(prefix+"_PROTO", "tcp")
		env.set(prefix+"_PORT", ec.apiPort)
		env.set(prefix+"_ADDR", ec.apiHost)
	}

	for _, from := range c.EnvFrom {
		switch {
		case from.ConfigMapRef != nil:
			ref := from.ConfigMapRef
			cm, err := lookupOptional(ec.configMap, ref.Name, ref.Optional, "configmap")
			if err != nil {
				return nil, err
			}
			if cm == nil {
				continue
			}
			for _, k := range sortedKeys(cm.Data) {
				env.set(from.Prefix+k, cm.Data[k])
			}
		case from.SecretRef != nil:
			ref := from.SecretRef
			s, err := lookupOptional(ec.secret, ref.Name, ref.Optional, "secret")
			if err != nil {
				return nil, err
			}
			if s == nil {
				continue
			}
			keys := make([]string, 0, len(s.Data))
			for k := range s.Data {
				keys = append(keys, k)
			}
			sort.Strings(keys)
			for _, k := range keys {
				env.set(from.Prefix+k, string(s.Data[k]))
			}
		}
	}

	for _, ev := range c.Env {
		if ev.ValueFrom == nil {
			env.set(ev.Name, expandVars(ev.Value, env.get))
			continue
		}
		v, ok, err := envValueFrom(c, ev.ValueFrom, ec)
		if err != nil {
			return nil, fmt.Errorf("env %s: %w", ev.Name, err)
		}
		if ok {
			env.set(ev.Name, v)
		}
	}
	return env.list(), nil
}

func sortedKeys(m map[string]string) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}

// lookupOptional fetches a referenced object; a missing optional one is nil.
func lookupOptional[T any](get func(string) (*T, error), name string, optional *bool, kind string) (*T, error) {
	if get == nil {
		return nil, fmt.Errorf("%s %q: no API access", kind, name)
	}
	obj, err := get(name)
	if err != nil {
		if optional != nil && *optional && isNotFound(err) {
			return nil, nil
		}
		return nil, fmt.Errorf("get %s %q: %w", kind, name, err)
	}
	return obj, nil
}

// envValueFrom resolves one valueFrom; ok=false means "leave unset"
// (an optional key that is missing).
func envValueFrom(c *v1.Container, src *v1.EnvVarSource, ec envContext) (string, bool, error) {
	switch {
	case src.FieldRef != nil:
		v, err := podFieldValue(ec.pod, src.FieldRef.FieldPath, ec.podIPs, ec.hostIP)
		return v, err == nil, err
	case src.ResourceFieldRef != nil:
		v, err := resourceFieldValue(c, src.ResourceFieldRef, ec.nodeCPU, ec.nodeMemory)
		return v, err == nil, err
	case src.ConfigMapKeyRef != nil:
		ref := src.ConfigMapKeyRef
		cm, err := lookupOptional(ec.configMap, ref.Name, ref.Optional, "configmap")
		if err != nil || cm == nil {
			return "", false, err
		}
		if v, ok := cm.Data[ref.Key]; ok {
			return v, true, nil
		}
		if v, ok := cm.BinaryData[ref.Key]; ok {
			return string(v), true, nil
		}
		if ref.Optional != nil && *ref.Optional {
			return "", false, nil
		}
		return "", false, fmt.Errorf("configmap %q has no key %q", ref.Name, ref.Key)
	case src.SecretKeyRef != nil:
		ref := src.SecretKeyRef
		s, err := lookupOptional(ec.secret, ref.Name, ref.Optional, "secret")
		if err != nil || s == nil {
			return "", false, err
		}
		if v, ok := s.Data[ref.Key]; ok {
			return string(v), true, nil
		}
		if ref.Optional != nil && *ref.Optional {
			return "", false, nil
		}
		return "", false, fmt.Errorf("secret %q has no key %q", ref.Name, ref.Key)
	}
	return "", false, fmt.Errorf("unsupported valueFrom")
}

// podFieldValue answers a downward-API fieldRef.
func podFieldValue(pod *v1.Pod, path string, podIPs []string, hostIP string) (string, error) {
	if k, ok := subscript(path, "metadata.labels"); ok {
		return pod.Labels[k], nil
	}
	if k, ok := subscript(path, "metadata.annotations"); ok {
		return pod.Annotations[k], nil
	}
	switch path {
	case "metadata.name":
		return pod.Name, nil
	case "metadata.namespace":
		return pod.Namespace, nil
	case "metadata.uid":
		return string(pod.UID), nil
	case "metadata.labels":
		return formatMap(pod.Labels), nil
	case "metadata.annotations":
		return formatMap(pod.Annotations), nil
	case "spec.nodeName":
		return pod.Spec.NodeName, nil
	case "spec.serviceAccountName":
		return pod.Spec.ServiceAccountName, nil
	case "status.hostIP":
		return hostIP, nil
	case "status.hostIPs":
		return hostIP, nil
	case "status.podIP":
		if len(podIPs) > 0 {
			return podIPs[0], nil
		}
		return "", nil
	case "status.podIPs":
		return strings.Join(podIPs, ","), nil
	}
	return "", fmt.Errorf("unsupported fieldRef %q", path)
}

// subscript parses `prefix['key']`.
func subscript(path, prefix string) (string, bool) {
	if !strings.HasPrefix(path, prefix+"['") || !strings.HasSuffix(path, "']") {
		return "", false
	}
	return path[len(prefix)+2 : len(path)-2], true
}

// formatMap renders labels or annotations as the downward API does: sorted
// `key="value"` lines.
func formatMap(m map[string]string) string {
	var b strings.Builder
	for i, k := range sortedKeys(m) {
		if i > 0 {
			b.WriteByte('\n')
		}
		b.WriteString(k + "=" + strconv.Quote(m[k]))
	}
	return b.String()
}

// resourceFieldValue answers a resourceFieldRef: the container's request or
// limit divided by the divisor, rounded up; an unset limit is the node's.
func resourceFieldValue(c *v1.Container, ref *v1.ResourceFieldSelector, nodeCPU, nodeMemory int64) (string, error) {
	kind, res, ok := strings.Cut(ref.Resource, ".")
	if !ok || (kind != "limits" && kind != "requests") {
		return "", fmt.Errorf("unsupported resource %q", ref.Resource)
	}
	list := c.Resources.Limits
	if kind == "requests" {
		list = c.Resources.Requests
	}
	q, set := list[v1.ResourceName(res)]
	divisor := ref.Divisor
	if divisor.IsZero() {
		divisor = resource.MustParse("1")
	}
	switch v1.ResourceName(res) {
	case v1.ResourceCPU:
		if !set {
			if kind == "requests" {
				return "0", nil
			}
			q = *resource.NewQuantity(nodeCPU, resource.DecimalSI)
		}
		return strconv.FormatInt(ceilDiv(q.MilliValue(), divisor.MilliValue()), 10), nil
	case v1.ResourceMemory, v1.ResourceEphemeralStorage:
		if !set {
			if kind == "requests" {
				return "0", nil
			}
			q = *resource.NewQuantity(nodeMemory, resource.BinarySI)
		}
		return strconv.FormatInt(ceilDiv(q.Value(), divisor.Value()), 10), nil
	}
	return "", fmt.Errorf("unsupported resource %q", ref.Resource)
}

func ceilDiv(a, b int64) int64 {
	if b <= 0 {
		return a
	}
	return int64(math.Ceil(float64(a) / float64(b)))
}
