package mtls

import (
	"cmp"
	"fmt"
	"net"
	"slices"
	"strings"
	"time"

	"github.com/meshlite/meshlite/internal/kube"
	"github.com/meshlite/meshlite/meshctl/ztunnel"
)

// Enrollment values: why a pod is, or is not, in the mesh.
const (
	EnrolledByNamespace = "namespace"
	EnrolledByPod       = "pod"
	OptedOut            = "opted-out"
	NotEnrolled         = "none"
	HostNetwork         = "host-network"
)

// Redirection values.
const (
	// RedirVerified: the pod's ztunnel checked the redirect rules are
	// installed in the pod.
	RedirVerified = "verified"
	// RedirAnnotated: the CNI marked the pod redirected and its ztunnel
	// holds it, but this ztunnel does not report a check of its own.
	RedirAnnotated = "annotated"
	// RedirPending: enrolled, not (yet) redirected.
	RedirPending = "pending"
	// RedirMissing: the ztunnel checked and the rules are not there.
	RedirMissing = "missing"
	// RedirNone: not enrolled, nothing to redirect.
	RedirNone = "none"
	// RedirUnknown: the pod's ztunnel did not answer.
	RedirUnknown = "unknown"
)

// Certificate states.
const (
	CertValid    = "valid"
	CertExpiring = "expiring"
	CertExpired  = "expired"
	CertPending  = "pending"
	CertMissing  = "missing"
	CertNone     = "none"
	CertUnknown  = "unknown"
)

// Report is the verdict: the rows and the summary.
type Report struct {
	Workloads []Row   `json:"workloads"`
	Summary   Summary `json:"summary"`
}

// Row is one pod.
type Row struct {
	Namespace string `json:"namespace"`
	Pod       string `json:"pod"`
	Address   string `json:"address"`
	Node      string `json:"node"`
	// Enrolled: the pod is in the mesh; Enrollment says why or why not.
	Enrolled   bool   `json:"enrolled"`
	Enrollment string `json:"enrollment"`
	// Waypoint is the waypoint's name ("" none).
	Waypoint string `json:"waypoint"`
	// Protocol is how peers reach the pod in ztunnel's view: HBONE or TCP
	// ("" when no ztunnel knows the pod).
	Protocol string `json:"protocol"`
	// Mode is the mTLS mode enforced for an enrolled pod ("" when not
	// enrolled: nothing enforces one); ModeConfigured is what the
	// PeerAuthentications say, PortModes their port-level exceptions.
	// ModeSource is "ztunnel" when the pod's ztunnel confirmed the mode by
	// the policies it holds, "config" when only the configuration says so.
	Mode           string            `json:"mode"`
	ModeConfigured string            `json:"mode_configured"`
	PortModes      map[uint32]string `json:"port_modes,omitempty"`
	ModeSource     string            `json:"mode_source,omitempty"`
	// Redirection: verified, annotated, pending, missing, none or unknown.
	Redirection      string `json:"redirection"`
	RedirectionError string `json:"redirection_error,omitempty"`
	Cert             Cert   `json:"cert"`
	Live             Live   `json:"live"`
	// Ztunnel is the ztunnel pod on the pod's node.
	Ztunnel  string   `json:"ztunnel,omitempty"`
	Problems []string `json:"problems,omitempty"`
}

// Cert is the pod's certificate as its ztunnel holds it.
type Cert struct {
	State     string     `json:"state"`
	Identity  string     `json:"identity,omitempty"`
	NotAfter  *time.Time `json:"not_after,omitempty"`
	LastError string     `json:"last_error,omitempty"`
}

// Live counts the pod's open connections by security, both directions.
type Live struct {
	MTLS      int `json:"mtls"`
	Plaintext int `json:"plaintext"`
	// PlaintextConns describe each plaintext connection.
	PlaintextConns []string `json:"plaintext_connections,omitempty"`
}

// Summary is the verdict over the rows.
type Summary struct {
	// OK is false when an enrolled pod talks plaintext, lacks redirection
	// or a certificate, or cannot be checked; meshctl exits 1 then.
	OK bool `json:"ok"`
	// Line says it in one sentence.
	Line               string   `json:"line"`
	Problems           []string `json:"problems,omitempty"`
	Notes              []string `json:"notes,omitempty"`
	Pods               int      `json:"pods"`
	EnrolledPods       int      `json:"enrolled_pods"`
	EnrolledNamespaces []string `json:"enrolled_namespaces,omitempty"`
	MTLSConnections    int      `json:"mtls_connections"`
	PlainConnections   int      `json:"plaintext_connections"`
}

// Compute builds the report.
func Compute(in Input) Report {
	if in.Now.IsZero() {
		in.Now = time.Now()
	}
	if in.TrustDomain == "" {
		in.TrustDomain = kube.DefaultDomainSuffix
	}
	all := in.AllPods
	if all == nil {
		all = in.Pods
	}
	nsLabels := map[string]map[string]string{}
	for _, ns := range in.Namespaces {
		nsLabels[ns.Name] = ns.Labels
	}
	ztByNode := map[string]*Ztunnel{}
	for i := range in.Ztunnels {
		ztByNode[in.Ztunnels[i].Node] = &in.Ztunnels[i]
	}
	// Workload uids ztunnels name in their tables -> "ns/name"; and which
	// pods some ztunnel holds (their connections are counted on their
	// own side).
	uidName := map[string]string{}
	held := map[string]bool{}
	for _, z := range in.Ztunnels {
		if z.Dump == nil {
			continue
		}
		for _, w := range z.Dump.Workloads {
			key := w.Namespace + "/" + w.Name
			uidName[w.UID] = key
			if w.Local {
				held[key] = true
			}
		}
	}
	podByIP := map[string]string{}
	for _, p := range all {
		if p.IP != "" && !p.HostNetwork {
			podByIP[p.IP] = p.Namespace + "/" + p.Name
		}
	}
	live := liveByPod(in.Ztunnels, uidName, podByIP, held)

	var rep Report
	rep.Workloads = []Row{}
	var notes []string
	annotatedOnly := false
	for _, p := range in.Pods {
		key := p.Namespace + "/" + p.Name
		r := Row{Namespace: p.Namespace, Pod: p.Name, Address: p.IP, Node: p.Node}
		switch {
		case p.HostNetwork:
			r.Enrollment = HostNetwork
		case p.Labels[kube.LabelDataplaneMode] == kube.DataplaneModeNone:
			r.Enrollment = OptedOut
		case p.Labels[kube.LabelDataplaneMode] == kube.DataplaneModeAmbient:
			r.Enrollment = EnrolledByPod
		case nsLabels[p.Namespace][kube.LabelDataplaneMode] == kube.DataplaneModeAmbient:
			r.Enrollment = EnrolledByNamespace
		default:
			r.Enrollment = NotEnrolled
		}
		r.Enrolled = !p.HostNetwork && kube.AmbientEnrolled(nsLabels[p.Namespace], p.Labels)
		r.ModeConfigured, r.PortModes = configuredMode(in.PeerAuthentications, in.RootNamespace, p)
		r.PortModes = sortedCopy(r.PortModes)

		z := ztByNode[p.Node]
		var w *ztunnel.Workload
		if z != nil {
			r.Ztunnel = z.Pod
			if z.Dump != nil {
				w = findWorkload(z.Dump, p)
			}
		}
		if w == nil {
			// Another node's ztunnel still says how peers reach it.
			for _, oz := range in.Ztunnels {
				if oz.Dump != nil {
					if ow := findWorkload(oz.Dump, p); ow != nil {
						r.Protocol, r.Waypoint = ow.Protocol, waypointName(ow.Waypoint)
						break
					}
				}
			}
		} else {
			r.Protocol, r.Waypoint = w.Protocol, waypointName(w.Waypoint)
		}
		r.Live = live[key]

		ztDown := z == nil || z.Dump == nil
		if !r.Enrolled {
			r.Redirection, r.Cert.State = RedirNone, CertNone
			if ztDown {
				r.Live = Live{}
			}
			rep.Workloads = append(rep.Workloads, r)
			continue
		}

		// Enforced mode: the policies the pod's ztunnel lists for it.
		r.Mode, r.ModeSource = r.ModeConfigured, "config"
		if w != nil {
			strict := false
			converted := false
			for _, k := range w.Policies {
				strict = strict || strings.HasSuffix(k, "/"+ztunnel.StaticStrictPolicy)
				converted = converted || strings.Contains(k, "/"+ztunnel.ConvertedPeerAuthPrefix)
			}
			switch {
			case len(r.PortModes) > 0:
				if strict || converted {
					r.ModeSource = "ztunnel"
				}
			case strict:
				r.Mode, r.ModeSource = ModeStrict, "ztunnel"
			default:
				r.Mode, r.ModeSource = ModePermissive, "ztunnel"
			}
			if r.Mode != r.ModeConfigured {
				notes = append(notes, fmt.Sprintf("%s: PeerAuthentications say %s but ztunnel on %s enforces %s (not pushed yet?)",
					key, r.ModeConfigured, p.Node, r.Mode))
			}
		}

		switch {
		case z == nil:
			r.Redirection, r.Cert.State = RedirUnknown, CertUnknown
			r.Problems = append(r.Problems, fmt.Sprintf("no ztunnel runs on node %s", p.Node))
		case z.Dump == nil:
			r.Redirection, r.Cert.State = RedirUnknown, CertUnknown
			r.Problems = append(r.Problems, fmt.Sprintf("cannot check: ztunnel on node %s did not answer", p.Node))
		default:
			r.Redirection, r.RedirectionError = redirection(w, p)
			if r.Redirection == RedirAnnotated {
				annotatedOnly = true
			}
			r.Cert = cert(z.Dump, w, p, in.TrustDomain, in.Now)
		}
		if !ztDown {
			switch r.Redirection {
			case RedirVerified, RedirAnnotated:
			case RedirMissing:
				msg := "redirection missing"
				if r.RedirectionError != "" {
					msg += ": " + r.RedirectionError
				}
				r.Problems = append(r.Problems, msg)
			default:
				r.Problems = append(r.Problems, "not redirected into ztunnel yet (redirection pending)")
			}
			switch r.Cert.State {
			case CertValid:
			case CertExpiring:
				notes = append(notes, fmt.Sprintf("%s: certificate %s expires soon (%s)", key, r.Cert.Identity, r.Cert.NotAfter.UTC().Format(time.RFC3339)))
			case CertPending:
				r.Problems = append(r.Problems, "no certificate yet (pending)")
			default:
				r.Problems = append(r.Problems, "certificate "+r.Cert.State)
			}
			if r.Protocol != "HBONE" && r.Redirection != RedirPending {
				r.Problems = append(r.Problems, fmt.Sprintf("peers reach it over %s, not HBONE", cmp.Or(r.Protocol, "nothing (unknown to ztunnel)")))
			}
		}
		if r.Live.Plaintext > 0 {
			r.Problems = append(r.Problems, fmt.Sprintf("%d plaintext connection(s): %s", r.Live.Plaintext, strings.Join(r.Live.PlaintextConns, "; ")))
		}
		rep.Workloads = append(rep.Workloads, r)
	}
	slices.SortFunc(rep.Workloads, func(a, b Row) int {
		return cmp.Or(cmp.Compare(a.Namespace, b.Namespace), cmp.Compare(a.Pod, b.Pod))
	})
	if annotatedOnly {
		notes = append(notes, "redirection \"annotated\": the ztunnel does not report a check of the pod's redirect rules; "+
			"the CNI agent's annotation "+kube.AnnotationRedirection+"="+kube.RedirectionEnabled+" is shown instead")
	}
	rep.Summary = summarize(rep.Workloads, in.Ztunnels, notes)
	return rep
}

func findWorkload(d *ztunnel.ConfigDump, p Pod) *ztunnel.Workload {
	for i := range d.Workloads {
		w := &d.Workloads[i]
		if w.Namespace == p.Namespace && w.Name == p.Name {
			return w
		}
	}
	return nil
}

// waypointName turns ztunnel's "<ns>/<hostname>:<port>" into the
// waypoint's name (the hostname's first label).
func waypointName(s string) string {
	if s == "" {
		return ""
	}
	h := s
	if i := strings.IndexByte(h, '/'); i >= 0 {
		h = h[i+1:]
	}
	if host, _, err := net.SplitHostPort(h); err == nil {
		h = host
	}
	if net.ParseIP(h) != nil {
		return h
	}
	name, _, _ := strings.Cut(h, ".")
	return name
}

func redirection(w *ztunnel.Workload, p Pod) (string, string) {
	annotated := p.Annotations[kube.AnnotationRedirection] == kube.RedirectionEnabled
	if w == nil {
		return RedirPending, ""
	}
	if w.Redirection != nil {
		switch *w.Redirection {
		case ztunnel.RedirectionVerified:
			return RedirVerified, ""
		case ztunnel.RedirectionMissing:
			return RedirMissing, w.RedirectionError
		}
		return RedirPending, w.RedirectionError
	}
	// A ztunnel that does not report its own check: the CNI agent's word,
	// and only while this ztunnel holds the pod.
	if annotated && w.Local {
		return RedirAnnotated, ""
	}
	return RedirPending, ""
}

func cert(d *ztunnel.ConfigDump, w *ztunnel.Workload, p Pod, td string, now time.Time) Cert {
	sa := cmp.Or(p.ServiceAccount, "default")
	if w != nil && w.TrustDomain != "" {
		td = w.TrustDomain
	}
	id := fmt.Sprintf("spiffe://%s/ns/%s/sa/%s", td, p.Namespace, sa)
	var c *ztunnel.Certificate
	for i := range d.Certificates {
		dc := &d.Certificates[i]
		if w != nil && slices.Contains(dc.Pods, w.UID) {
			c = dc
			break
		}
		if c == nil && dc.Identity == id {
			c = dc
		}
	}
	if c == nil {
		return Cert{State: CertMissing, Identity: id}
	}
	out := Cert{Identity: c.Identity, LastError: c.LastError}
	if !c.NotAfter.IsZero() {
		na := c.NotAfter
		out.NotAfter = &na
	}
	switch c.State {
	case "pending":
		out.State = CertPending
	case "expired":
		out.State = CertExpired
	default:
		if c.NotAfter.IsZero() {
			out.State = CertMissing
		} else {
			out.State = certState(c.NotBefore, c.NotAfter, now)
		}
	}
	return out
}

func host(addr string) string {
	if h, _, err := net.SplitHostPort(addr); err == nil {
		return h
	}
	return addr
}

// liveByPod counts each pod's connections: on its own side when a ztunnel
// holds it, and for pods outside the mesh from their peers' side (the only
// place ztunnel sees them).
func liveByPod(zs []Ztunnel, uidName, podByIP map[string]string, held map[string]bool) map[string]Live {
	out := map[string]Live{}
	add := func(pod string, c ztunnel.Connection, desc string) {
		l := out[pod]
		if c.Security == ztunnel.SecurityMTLS {
			l.MTLS++
		} else {
			l.Plaintext++
			l.PlaintextConns = append(l.PlaintextConns, desc)
		}
		out[pod] = l
	}
	for _, z := range zs {
		if z.Dump == nil {
			continue
		}
		for _, c := range z.Dump.Connections {
			inbound := strings.HasPrefix(c.Direction, "inbound")
			peerAddr := c.Dst
			if inbound {
				peerAddr = c.Src
			}
			peer := podByIP[host(peerAddr)]
			local := uidName[c.Pod]
			if local == "" {
				local = c.Pod
			}
			name := func(k, addr string) string {
				if k != "" {
					return k + " " + addr
				}
				return addr
			}
			var desc string
			if inbound {
				desc = fmt.Sprintf("from %s to %s", name(peer, c.Src), c.Dst)
			} else {
				desc = fmt.Sprintf("to %s", name(peer, c.Dst))
			}
			add(local, c, fmt.Sprintf("%s %s (ztunnel on %s)", c.Direction, desc, z.Node))
			if peer != "" && peer != local && !held[peer] {
				dir := "outbound"
				if !inbound {
					dir = "inbound"
				}
				add(peer, c, fmt.Sprintf("%s %s %s (ztunnel on %s)", dir, map[bool]string{true: "to", false: "from"}[inbound], local, z.Node))
			}
		}
	}
	return out
}

func summarize(rows []Row, zs []Ztunnel, notes []string) Summary {
	s := Summary{OK: true, Notes: notes}
	nsSeen := map[string]bool{}
	badNS := map[string]bool{}
	for _, r := range rows {
		s.Pods++
		s.MTLSConnections += r.Live.MTLS
		s.PlainConnections += r.Live.Plaintext
		if !r.Enrolled {
			continue
		}
		s.EnrolledPods++
		if !nsSeen[r.Namespace] {
			nsSeen[r.Namespace] = true
			s.EnrolledNamespaces = append(s.EnrolledNamespaces, r.Namespace)
		}
		for _, p := range r.Problems {
			s.OK = false
			badNS[r.Namespace] = true
			s.Problems = append(s.Problems, fmt.Sprintf("%s/%s: %s", r.Namespace, r.Pod, p))
		}
	}
	slices.Sort(s.EnrolledNamespaces)
	for _, z := range zs {
		if z.Err != "" {
			s.Notes = append(s.Notes, fmt.Sprintf("ztunnel %s on node %s did not answer: %s", z.Pod, z.Node, z.Err))
		}
	}
	switch {
	case !s.OK:
		var bad []string
		for ns := range badNS {
			bad = append(bad, ns)
		}
		slices.Sort(bad)
		s.Line = fmt.Sprintf("FAIL: %d problem(s) in enrolled namespace(s) %s: %s", len(s.Problems), strings.Join(bad, ", "), s.Problems[0])
		if len(s.Problems) > 1 {
			s.Line += fmt.Sprintf(" (and %d more)", len(s.Problems)-1)
		}
	case s.EnrolledPods == 0:
		s.Line = fmt.Sprintf("OK: no enrolled pods among the %d shown; nothing claims mTLS", s.Pods)
	default:
		s.Line = fmt.Sprintf("OK: %d enrolled pod(s) in %s: HBONE, redirected, certificates valid; live connections: %d mTLS (counted at each enrolled end), none plaintext",
			s.EnrolledPods, strings.Join(s.EnrolledNamespaces, ", "), mtlsOfEnrolled(rows))
	}
	return s
}

func mtlsOfEnrolled(rows []Row) int {
	n := 0
	for _, r := range rows {
		if r.Enrolled {
			n += r.Live.MTLS
		}
	}
	return n
}
