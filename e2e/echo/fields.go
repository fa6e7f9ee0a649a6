package echo

import (
	"bufio"
	"fmt"
	"os"
	"sort"
	"strings"
)

// Names of the fields of an answer.
const (
	FieldVersion       = "ServiceVersion"
	FieldServicePort   = "ServicePort"
	FieldProtocol      = "Proto" // HTTP/1.1, HTTP/2.0, GRPC
	FieldMethod        = "Method"
	FieldURL           = "URL"
	FieldHost          = "Host"
	FieldPod           = "Pod"
	FieldNamespace     = "Namespace"
	FieldPodIP         = "PodIP"
	FieldNode          = "Node"
	FieldHostname      = "Hostname"
	FieldPeer          = "Peer" // the remote address the server saw
	FieldRequestHeader = "RequestHeader"
	FieldMessage       = "Message" // the gRPC request's message
	FieldBody          = "Body"    // the HTTP request body, last
)

// Identity is who the server is, from the downward API env a pod passes.
type Identity struct {
	Pod, Namespace, PodIP, Node, Hostname, Version string
}

// IdentityFromEnv reads POD_NAME, POD_NAMESPACE, POD_IP, NODE_NAME and
// SERVICE_VERSION.
func IdentityFromEnv() Identity {
	h, _ := os.Hostname()
	return Identity{
		Pod:       os.Getenv("POD_NAME"),
		Namespace: os.Getenv("POD_NAMESPACE"),
		PodIP:     os.Getenv("POD_IP"),
		Node:      os.Getenv("NODE_NAME"),
		Hostname:  h,
		Version:   os.Getenv("SERVICE_VERSION"),
	}
}

// fieldWriter builds an answer.
type fieldWriter struct{ b strings.Builder }

func (w *fieldWriter) add(k, v string) {
	// One field a line: a value may not break the format.
	v = strings.NewReplacer("\r", `\r`, "\n", `\n`).Replace(v)
	fmt.Fprintf(&w.b, "%s=%s\n", k, v)
}

func (w *fieldWriter) identity(id Identity, port int) {
	w.add(FieldVersion, id.Version)
	w.add(FieldServicePort, fmt.Sprint(port))
	w.add(FieldPod, id.Pod)
	w.add(FieldNamespace, id.Namespace)
	w.add(FieldPodIP, id.PodIP)
	w.add(FieldNode, id.Node)
	w.add(FieldHostname, id.Hostname)
}

// headers adds one RequestHeader line per value, sorted by name.
func (w *fieldWriter) headers(h map[string][]string) {
	names := make([]string, 0, len(h))
	for k := range h {
		names = append(names, k)
	}
	sort.Strings(names)
	for _, k := range names {
		for _, v := range h[k] {
			w.add(FieldRequestHeader, k+": "+v)
		}
	}
}

func (w *fieldWriter) String() string { return w.b.String() }

// Fields is a parsed answer: each key with its values in order.
type Fields map[string][]string

// Get is the first value of key ("" if none).
func (f Fields) Get(key string) string {
	if v := f[key]; len(v) > 0 {
		return v[0]
	}
	return ""
}

// Header is the first value of request header name as the server saw it
// (case-insensitive name).
func (f Fields) Header(name string) string {
	for _, h := range f[FieldRequestHeader] {
		k, v, ok := strings.Cut(h, ": ")
		if ok && strings.EqualFold(k, name) {
			return v
		}
	}
	return ""
}

// ParseFields parses an answer. Lines without '=' are ignored; the Body
// field takes the rest of the text.
func ParseFields(s string) Fields {
	f := Fields{}
	sc := bufio.NewScanner(strings.NewReader(s))
	sc.Buffer(make([]byte, 64<<10), 16<<20)
	for sc.Scan() {
		line := sc.Text()
		k, v, ok := strings.Cut(line, "=")
		if !ok || k == "" {
			continue
		}
		if k == FieldBody {
			if i := strings.Index(s, "\n"+FieldBody+"="); i >= 0 {
				v = s[i+len(FieldBody)+2:]
			} else if strings.HasPrefix(s, FieldBody+"=") {
				v = s[len(FieldBody)+1:]
			}
			f[k] = append(f[k], v)
			break
		}
		f[k] = append(f[k], v)
	}
	return f
}
