package mtls

import (
	"maps"
	"time"

	"k8s.io/apimachinery/pkg/labels"
)

// mTLS modes as meshctl reports them. DISABLE is PERMISSIVE for ambient
// workloads: ztunnel accepts plaintext either way.
const (
	ModeStrict     = "STRICT"
	ModePermissive = "PERMISSIVE"
)

func normMode(m string) string {
	switch m {
	case ModeStrict:
		return ModeStrict
	case ModePermissive, "DISABLE":
		return ModePermissive
	}
	return "" // UNSET inherits
}

// configuredMode is the mTLS mode the PeerAuthentications give a pod, as
// istiod resolves it: the oldest mesh-wide policy (root namespace, no
// selector), overridden by the oldest namespace-wide one, overridden by the
// oldest one selecting the pod; UNSET inherits. ports are the workload
// policy's port-level modes that differ from the pod's mode.
func configuredMode(pas []PeerAuthentication, root string, p Pod) (mode string, ports map[uint32]string) {
	var mesh, ns, wl *PeerAuthentication
	older := func(cur *PeerAuthentication, pa *PeerAuthentication) *PeerAuthentication {
		if cur == nil || pa.Created.Before(cur.Created) || (pa.Created.Equal(cur.Created) && pa.Name < cur.Name) {
			return pa
		}
		return cur
	}
	for i := range pas {
		pa := &pas[i]
		switch {
		case pa.Namespace == root && len(pa.Selector) == 0:
			mesh = older(mesh, pa)
		case pa.Namespace != p.Namespace:
		case len(pa.Selector) == 0:
			ns = older(ns, pa)
		case labels.SelectorFromSet(pa.Selector).Matches(labels.Set(p.Labels)):
			wl = older(wl, pa)
		}
	}
	if p.Namespace == root {
		ns = nil // the root namespace's selector-less policy is the mesh's
	}
	mode = ModePermissive
	for _, pa := range []*PeerAuthentication{mesh, ns, wl} {
		if pa != nil && normMode(pa.Mode) != "" {
			mode = normMode(pa.Mode)
		}
	}
	if wl != nil {
		for port, m := range wl.PortModes {
			if m = normMode(m); m != "" && m != mode {
				if ports == nil {
					ports = map[uint32]string{}
				}
				ports[port] = m
			}
		}
	}
	return mode, ports
}

// sortedCopy keeps callers from sharing maps with the input.
func sortedCopy(m map[uint32]string) map[uint32]string {
	if m == nil {
		return nil
	}
	return maps.Clone(m)
}

// certState says how a certificate stands at now: "expired", "expiring"
// (less than a quarter of its lifetime or an hour left) or "valid".
func certState(notBefore, notAfter, now time.Time) string {
	left := notAfter.Sub(now)
	if left <= 0 {
		return CertExpired
	}
	life := notAfter.Sub(notBefore)
	if left < time.Hour || (life > 0 && left < life/4) {
		return CertExpiring
	}
	return CertValid
}
