package kubelet

import (
	"strings"
	"testing"

	v1 "k8s.io/api/core/v1"
	"k8s.io/utils/ptr"
)

const hostResolv = "# host\nnameserver 192.168.1.1\nsearch corp.example\noptions edns0\n"

func TestPodResolvConf(t *testing.T) {
	cases := []struct {
		name   string
		mutate func(*v1.Pod)
		dns    string
		want   string
		ok     bool
	}{
		{
			name: "cluster first",
			dns:  "10.96.0.10",
			want: "nameserver 10.96.0.10\nsearch shop.svc.cluster.local svc.cluster.local cluster.local\noptions ndots:5\n",
			ok:   true,
		},
		{
			name:   "host network falls back to the node's file",
			mutate: func(p *v1.Pod) { p.Spec.HostNetwork = true },
			dns:    "10.96.0.10",
		},
		{
			name:   "cluster first with host net",
			mutate: func(p *v1.Pod) { p.Spec.HostNetwork = true; p.Spec.DNSPolicy = v1.DNSClusterFirstWithHostNet },
			dns:    "10.96.0.10",
			want:   "nameserver 10.96.0.10\nsearch shop.svc.cluster.local svc.cluster.local cluster.local\noptions ndots:5\n",
			ok:     true,
		},
		{
			name: "no cluster DNS configured",
			dns:  "",
		},
		{
			name: "none with dnsConfig",
			mutate: func(p *v1.Pod) {
				p.Spec.DNSPolicy = v1.DNSNone
				p.Spec.DNSConfig = &v1.PodDNSConfig{Nameservers: []string{"1.1.1.1"}, Searches: []string{"a.b"}, Options: []v1.PodDNSConfigOption{{Name: "ndots", Value: ptr.To("2")}}}
			},
			dns:  "10.96.0.10",
			want: "nameserver 1.1.1.1\nsearch a.b\noptions ndots:2\n",
			ok:   true,
		},
		{
			name: "cluster first merges dnsConfig, options replace by name",
			mutate: func(p *v1.Pod) {
				p.Spec.DNSConfig = &v1.PodDNSConfig{Nameservers: []string{"10.96.0.10", "8.8.8.8"}, Searches: []string{"extra.local"}, Options: []v1.PodDNSConfigOption{{Name: "ndots", Value: ptr.To("1")}, {Name: "edns0"}}}
			},
			dns:  "10.96.0.10",
			want: "nameserver 10.96.0.10\nnameserver 8.8.8.8\nsearch shop.svc.cluster.local svc.cluster.local cluster.local extra.local\noptions ndots:1 edns0\n",
			ok:   true,
		},
		{
			name: "default with dnsConfig starts from the node's file",
			mutate: func(p *v1.Pod) {
				p.Spec.DNSPolicy = v1.DNSDefault
				p.Spec.DNSConfig = &v1.PodDNSConfig{Searches: []string{"x.y"}}
			},
			dns:  "10.96.0.10",
			want: "nameserver 192.168.1.1\nsearch corp.example x.y\noptions edns0\n",
			ok:   true,
		},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			pod := testPod()
			if tc.mutate != nil {
				tc.mutate(pod)
			}
			got, ok := podResolvConf(pod, tc.dns, "cluster.local", []byte(hostResolv))
			if ok != tc.ok || got != tc.want {
				t.Fatalf("got (%q, %v), want (%q, %v)", got, ok, tc.want, tc.ok)
			}
		})
	}
}

func TestPodResolvConf_CapsNameservers(t *testing.T) {
	pod := testPod()
	pod.Spec.DNSConfig = &v1.PodDNSConfig{Nameservers: []string{"1.1.1.1", "2.2.2.2", "3.3.3.3"}}
	got, _ := podResolvConf(pod, "10.96.0.10", "cluster.local", nil)
	if n := strings.Count(got, "nameserver"); n != maxNameservers {
		t.Fatalf("%d nameservers in %q", n, got)
	}
}

func TestPodHostsFile(t *testing.T) {
	pod := testPod()
	pod.Spec.Hostname = "db"
	pod.Spec.Subdomain = "backends"
	pod.Spec.HostAliases = []v1.HostAlias{{IP: "10.1.1.1", Hostnames: []string{"foo.local", "bar.local"}}}
	got := podHostsFile(pod, []string{"10.244.1.7"}, "cluster.local")
	for _, want := range []string{
		"127.0.0.1\tlocalhost\n",
		"10.244.1.7\tdb.backends.shop.svc.cluster.local\tdb\n",
		"10.1.1.1\tfoo.local\tbar.local\n",
	} {
		if !strings.Contains(got, want) {
			t.Errorf("hosts file lacks %q:\n%s", want, got)
		}
	}
	long := testPod()
	long.Name = strings.Repeat("a", 70)
	if h, _ := podHostname(long, "cluster.local"); len(h) != 63 {
		t.Errorf("hostname not truncated to 63: %d", len(h))
	}
}
