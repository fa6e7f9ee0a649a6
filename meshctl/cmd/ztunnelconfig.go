package cmd

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"net"
	"slices"
	"strconv"
	"strings"

	"github.com/spf13/cobra"

	"github.com/meshlite/meshlite/meshctl/output"
	"github.com/meshlite/meshlite/meshctl/ztunnel"
)

// NodeConfig is one ztunnel's part of `ztunnel-config -o json|yaml`.
type NodeConfig struct {
	Node    string `json:"node"`
	Ztunnel string `json:"ztunnel"`
	Error   string `json:"error,omitempty"`
	Items   any    `json:"items"`
}

// ztunnelConfigKinds are the ztunnel-config subcommands, with istioctl's
// names (and the plural/singular spellings it takes).
var ztunnelConfigKinds = []struct {
	use     string
	aliases []string
	short   string
}{
	{"workloads", []string{"workload", "wl"}, "Workloads as ztunnel holds them (NAMESPACE POD NAME ADDRESS NODE WAYPOINT PROTOCOL)"},
	{"services", []string{"service", "svc"}, "Services as ztunnel holds them (NAMESPACE SERVICE NAME SERVICE VIP WAYPOINT ENDPOINTS)"},
	{"policies", []string{"policy", "authorization", "authz"}, "Authorization policies ztunnel enforces (NAMESPACE POLICY NAME ACTION SCOPE)"},
	{"certificates", []string{"certificate", "certs", "secret"}, "Certificates ztunnel holds for its pods"},
	{"connections", []string{"connection", "conns"}, "Connections ztunnel proxies now, by security"},
}

func newZtunnelConfigCmd(o *Options) *cobra.Command {
	c := &cobra.Command{
		Use:     "ztunnel-config",
		Aliases: []string{"zc"},
		Short:   "What each node's ztunnel holds (its /config_dump, through port-forward)",
	}
	var node string
	c.PersistentFlags().StringVar(&node, "node", "", "only the ztunnel of this node (default: every node's)")
	for _, k := range ztunnelConfigKinds {
		c.AddCommand(&cobra.Command{
			Use:     k.use,
			Aliases: k.aliases,
			Short:   k.short,
			Args:    cobra.NoArgs,
			RunE: func(cmd *cobra.Command, _ []string) error {
				return runZtunnelConfig(cmd.Context(), o, k.use, node)
			},
		})
	}
	return c
}

func runZtunnelConfig(ctx context.Context, o *Options, kind, node string) error {
	f, err := o.format()
	if err != nil {
		return err
	}
	cl, err := o.connect(ctx)
	if err != nil {
		return err
	}
	zc := ztunnel.NewClient(cl.Config, cl.Kube, o.IstioNamespace)
	zc.Timeout = o.Timeout
	lctx, cancel := cl.Ctx(ctx)
	pods, err := zc.Pods(lctx, node)
	cancel()
	if errors.Is(err, ztunnel.ErrNotInstalled) {
		if node != "" {
			return &ExitError{Code: 1, Err: err}
		}
		return notInstalled(ctx, o, cl, err)
	}
	if err != nil {
		return err
	}
	ns := ""
	if cl.NamespaceSet {
		ns = cl.Namespace
	}
	results := zc.Dumps(ctx, pods)
	var failed []string
	for _, r := range results {
		if r.Err != nil {
			failed = append(failed, r.Pod.Node)
			fmt.Fprintf(o.Err, "meshctl: %v\n", r.Err)
		}
	}
	if f != output.Table {
		var out []NodeConfig
		for _, r := range results {
			nc := NodeConfig{Node: r.Pod.Node, Ztunnel: r.Pod.Namespace + "/" + r.Pod.Name}
			if r.Err != nil {
				nc.Error = r.Err.Error()
			} else {
				nc.Items = items(r.Dump, kind, ns)
			}
			out = append(out, nc)
		}
		if err := output.WriteData(o.Out, f, out); err != nil {
			return err
		}
	} else {
		headers, rows := ztunnelTable(results, kind, ns)
		if err := output.WriteTable(o.Out, headers, rows); err != nil {
			return err
		}
	}
	if len(failed) > 0 {
		return &ExitError{Code: 1, Err: fmt.Errorf("the ztunnel on node(s) %s did not answer", strings.Join(failed, ", "))}
	}
	return nil
}

func inNS(ns, itemNS string) bool { return ns == "" || ns == itemNS }

// items is one dump's entries of kind, in namespace ns ("" all).
func items(d *ztunnel.ConfigDump, kind, ns string) any {
	switch kind {
	case "workloads":
		out := []ztunnel.Workload{}
		for _, w := range d.Workloads {
			if inNS(ns, w.Namespace) {
				out = append(out, w)
			}
		}
		return out
	case "services":
		out := []ztunnel.Service{}
		for _, s := range d.Services {
			if inNS(ns, s.Namespace) {
				out = append(out, s)
			}
		}
		return out
	case "policies":
		out := []ztunnel.Policy{}
		for _, p := range d.Policies {
			if inNS(ns, p.Namespace()) {
				out = append(out, p)
			}
		}
		return out
	case "certificates":
		out := []ztunnel.Certificate{}
		for _, c := range d.Certificates {
			if ns == "" || strings.Contains(c.Identity, "/ns/"+ns+"/") {
				out = append(out, c)
			}
		}
		return out
	}
	out := []ztunnel.Connection{}
	for _, c := range d.Connections {
		if ns == "" || connNamespace(d, c) == ns {
			out = append(out, c)
		}
	}
	return out
}

func connNamespace(d *ztunnel.ConfigDump, c ztunnel.Connection) string {
	for _, w := range d.Workloads {
		if w.UID == c.Pod {
			return w.Namespace
		}
	}
	return ""
}

// ztunnelHeaders are istioctl's columns for each kind (plus NODE and
// SECURITY where meshlite shows more).
var ztunnelHeaders = map[string][]string{
	"workloads":    {"NAMESPACE", "POD NAME", "ADDRESS", "NODE", "WAYPOINT", "PROTOCOL"},
	"services":     {"NAMESPACE", "SERVICE NAME", "SERVICE VIP", "WAYPOINT", "ENDPOINTS"},
	"policies":     {"NAMESPACE", "POLICY NAME", "ACTION", "SCOPE"},
	"certificates": {"CERTIFICATE NAME", "TYPE", "STATUS", "VALID CERT", "SERIAL NUMBER", "NOT AFTER", "NOT BEFORE", "NODE"},
	"connections":  {"WORKLOAD", "DIRECTION", "LOCAL", "REMOTE", "REMOTE TARGET", "PROTOCOL", "SECURITY", "NODE"},
}

// ztunnelTable renders the dumps as istioctl's ztunnel-config tables.
// Workloads, services and policies are the same mesh-wide, so rows seen by
// several ztunnels print once; certificates and connections are per node
// and carry a NODE column.
func ztunnelTable(results []ztunnel.Result, kind, ns string) ([]string, [][]string) {
	seen := map[string]bool{}
	var rows [][]string
	add := func(key string, row []string) {
		if key != "" && seen[key] {
			return
		}
		seen[key] = true
		rows = append(rows, row)
	}
	headers := ztunnelHeaders[kind]
	for _, r := range results {
		if r.Dump == nil {
			continue
		}
		d := r.Dump
		switch kind {
		case "workloads":
			for _, w := range d.Workloads {
				if inNS(ns, w.Namespace) {
					add(w.UID, []string{w.Namespace, w.Name, strings.Join(w.Addresses, ","), w.Node, noneIfEmpty(waypointShort(w.Waypoint)), w.Protocol})
				}
			}
		case "services":
			for _, s := range d.Services {
				if !inNS(ns, s.Namespace) {
					continue
				}
				healthy, total := 0, 0
				for _, w := range d.Workloads {
					if slices.Contains(w.Services, s.Namespace+"/"+s.Hostname) {
						total++
						if w.Status == "" || w.Status == "HEALTHY" {
							healthy++
						}
					}
				}
				add(s.Namespace+"/"+s.Hostname, []string{s.Namespace, s.Name, vips(s.Addresses), noneIfEmpty(waypointShort(s.Waypoint)),
					fmt.Sprintf("%d/%d", healthy, total)})
			}
		case "policies":
			for _, p := range d.Policies {
				if inNS(ns, p.Namespace()) {
					action := p.Action
					if p.DryRun {
						action += " (dry run)"
					}
					add(p.Key, []string{p.Namespace(), p.Name(), action, p.Scope})
				}
			}
		case "certificates":
			for _, c := range d.Certificates {
				if ns != "" && !strings.Contains(c.Identity, "/ns/"+ns+"/") {
					continue
				}
				status := "Available"
				if c.State != "valid" {
					status = strings.ToUpper(c.State[:min(1, len(c.State))]) + c.State[min(1, len(c.State)):]
				}
				add("", []string{c.Identity, "Leaf", status, strconv.FormatBool(c.State == "valid"), c.Serial,
					timeCell(c.NotAfter.IsZero(), c.NotAfter.UTC().Format("2006-01-02T15:04:05Z")),
					timeCell(c.NotBefore.IsZero(), c.NotBefore.UTC().Format("2006-01-02T15:04:05Z")), r.Pod.Node})
			}
		default:
			for _, c := range d.Connections {
				if ns != "" && connNamespace(d, c) != ns {
					continue
				}
				wl := c.Pod
				for _, w := range d.Workloads {
					if w.UID == c.Pod {
						wl = w.Namespace + "/" + w.Name
					}
				}
				local, remote, target := c.Src, c.Dst, cmp.Or(c.DstWorkload, c.DstIdentity)
				if strings.HasPrefix(c.Direction, "inbound") {
					local, remote, target = c.Dst, c.Src, cmp.Or(c.SrcWorkload, c.SrcIdentity)
				}
				proto := "TCP"
				if c.Security == ztunnel.SecurityMTLS {
					proto = "HBONE"
				}
				add("", []string{wl, c.Direction, local, remote, target, proto, c.Security, r.Pod.Node})
			}
		}
	}
	slices.SortStableFunc(rows, func(a, b []string) int { return cmp.Compare(strings.Join(a, "\x00"), strings.Join(b, "\x00")) })
	return headers, rows
}

// vips drops the "<network>/" ztunnel puts before a service address, as
// istioctl shows them.
func vips(addrs []string) string {
	out := make([]string, 0, len(addrs))
	for _, a := range addrs {
		if i := strings.IndexByte(a, '/'); i >= 0 && net.ParseIP(a[:i]) == nil {
			a = a[i+1:]
		}
		out = append(out, a)
	}
	return strings.Join(out, ",")
}

func timeCell(zero bool, s string) string {
	if zero {
		return ""
	}
	return s
}

func noneIfEmpty(s string) string { return cmp.Or(s, "None") }

// waypointShort is "<ns>/<hostname>:<port>" reduced to the waypoint's
// name.
func waypointShort(s string) string {
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
