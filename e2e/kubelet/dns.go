package kubelet

import (
	"bufio"
	"bytes"
	"fmt"
	"strings"

	v1 "k8s.io/api/core/v1"
)

// Limits a kubelet applies to a pod's resolv.conf.
const (
	maxNameservers = 3
	maxSearches    = 32
)

// resolvConf is a parsed or computed resolv.conf.
type resolvConf struct {
	nameservers []string
	searches    []string
	options     []string // "name" or "name:value", in order
}

func parseResolvConf(b []byte) resolvConf {
	var rc resolvConf
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		line := sc.Text()
		if i := strings.IndexAny(line, "#;"); i >= 0 {
			line = line[:i]
		}
		f := strings.Fields(line)
		if len(f) == 0 {
			continue
		}
		switch f[0] {
		case "nameserver":
			if len(f) > 1 {
				rc.nameservers = append(rc.nameservers, f[1])
			}
		case "search", "domain":
			// The last of search/domain wins, as in resolv.conf(5).
			rc.searches = append([]string(nil), f[1:]...)
		case "options":
			rc.options = append(rc.options, f[1:]...)
		}
	}
	return rc
}

func (rc resolvConf) String() string {
	var b strings.Builder
	for _, ns := range rc.nameservers {
		fmt.Fprintf(&b, "nameserver %s\n", ns)
	}
	if len(rc.searches) > 0 {
		fmt.Fprintf(&b, "search %s\n", strings.Join(rc.searches, " "))
	}
	if len(rc.options) > 0 {
		fmt.Fprintf(&b, "options %s\n", strings.Join(rc.options, " "))
	}
	return b.String()
}

// podResolvConf computes a pod's resolv.conf by its dnsPolicy and dnsConfig.
// ok=false means the pod uses the node's file unchanged (nothing to mount).
func podResolvConf(pod *v1.Pod, clusterDNS, clusterDomain string, hostResolv []byte) (content string, ok bool) {
	policy := pod.Spec.DNSPolicy
	if policy == "" {
		policy = v1.DNSClusterFirst
	}
	if policy == v1.DNSClusterFirst && pod.Spec.HostNetwork {
		policy = v1.DNSDefault
	}
	if (policy == v1.DNSClusterFirst || policy == v1.DNSClusterFirstWithHostNet) && clusterDNS == "" {
		policy = v1.DNSDefault // no cluster DNS configured: a kubelet falls back too
	}
	var rc resolvConf
	switch policy {
	case v1.DNSClusterFirst, v1.DNSClusterFirstWithHostNet:
		rc.nameservers = []string{clusterDNS}
		rc.searches = []string{
			pod.Namespace + ".svc." + clusterDomain,
			"svc." + clusterDomain,
			clusterDomain,
		}
		rc.options = []string{"ndots:5"}
	case v1.DNSDefault:
		if pod.Spec.DNSConfig == nil {
			return "", false
		}
		rc = parseResolvConf(hostResolv)
	case v1.DNSNone:
	}
	if dc := pod.Spec.DNSConfig; dc != nil {
		rc.nameservers = appendUnique(rc.nameservers, dc.Nameservers...)
		rc.searches = appendUnique(rc.searches, dc.Searches...)
		for _, o := range dc.Options {
			opt := o.Name
			if o.Value != nil {
				opt += ":" + *o.Value
			}
			rc.options = setOption(rc.options, o.Name, opt)
		}
	}
	if len(rc.nameservers) > maxNameservers {
		rc.nameservers = rc.nameservers[:maxNameservers]
	}
	if len(rc.searches) > maxSearches {
		rc.searches = rc.searches[:maxSearches]
	}
	return rc.String(), true
}

func appendUnique(list []string, add ...string) []string {
	for _, a := range add {
		dup := false
		for _, l := range list {
			if l == a {
				dup = true
				break
			}
		}
		if !dup {
			list = append(list, a)
		}
	}
	return list
}

// setOption replaces option name (with or without a value) or appends it.
func setOption(opts []string, name, opt string) []string {
	for i, o := range opts {
		if n, _, _ := strings.Cut(o, ":"); n == name {
			opts[i] = opt
			return opts
		}
	}
	return append(opts, opt)
}

// podHostname is the pod's hostname (spec.hostname or its name, at most 63
// characters) and its FQDN when it has a subdomain.
func podHostname(pod *v1.Pod, clusterDomain string) (string, string) {
	h := pod.Spec.Hostname
	if h == "" {
		h = pod.Name
	}
	if len(h) > 63 {
		h = strings.TrimRight(h[:63], "-.")
	}
	if pod.Spec.Subdomain == "" {
		return h, ""
	}
	return h, h + "." + pod.Spec.Subdomain + "." + pod.Namespace + ".svc." + clusterDomain
}

// podHostsFile is the /etc/hosts of a pod with its own network namespace.
func podHostsFile(pod *v1.Pod, podIPs []string, clusterDomain string) string {
	var b strings.Builder
	b.WriteString("# Kubernetes-managed hosts file (sandbox kubelet-lite).\n")
	b.WriteString("127.0.0.1\tlocalhost\n")
	b.WriteString("::1\tlocalhost ip6-localhost ip6-loopback\n")
	b.WriteString("fe00::0\tip6-localnet\nfe00::0\tip6-mcastprefix\nfe00::1\tip6-allnodes\nfe00::2\tip6-allrouters\n")
	host, fqdn := podHostname(pod, clusterDomain)
	for _, ip := range podIPs {
		if fqdn != "" {
			fmt.Fprintf(&b, "%s\t%s\t%s\n", ip, fqdn, host)
		} else {
			fmt.Fprintf(&b, "%s\t%s\n", ip, host)
		}
	}
	if len(pod.Spec.HostAliases) > 0 {
		b.WriteString("\n# Entries added by HostAliases.\n")
		for _, a := range pod.Spec.HostAliases {
			fmt.Fprintf(&b, "%s\t%s\n", a.IP, strings.Join(a.Hostnames, "\t"))
		}
	}
	return b.String()
}
