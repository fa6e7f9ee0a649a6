package peers

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"

	"github.com/meshlite/meshlite/bench/meshenv"
)

// GhostunnelVersion is the release hack/bench-tools.sh builds.
const GhostunnelVersion = "v1.8.4"

// Pair is an mTLS tunnel pair running: the client side listens on
// ClientAddr in the client pod; the server side forwards to the app in the
// server pod.
type Pair struct {
	Name       string
	ClientAddr string
	Procs      []*meshenv.Proc
}

// PairSpec says which tunnel pair to start and on which ports.
type PairSpec struct {
	Kind       string // "ghostunnel", "stunnel4", "haproxy"
	ClientPort int    // loopback port of the client side in the client pod
	ServerPort int    // TLS port of the server side in the server pod
	AppAddr    string // where the server side forwards, in the server pod
}

// StartPair starts spec's client side in (ns, client) and server side in
// (ns, server) with certificates from certs.
func StartPair(ctx context.Context, e *meshenv.Env, ns string, certs *Certs, spec PairSpec) (*Pair, error) {
	clientNS, err := e.Netns(ctx, ns, meshenv.Client)
	if err != nil {
		return nil, err
	}
	serverNS, err := e.Netns(ctx, ns, meshenv.Server)
	if err != nil {
		return nil, err
	}
	serverIP := e.PodIP(ns, meshenv.Server)
	srv := Tunnel{Listen: fmt.Sprintf("0.0.0.0:%d", spec.ServerPort), Target: spec.AppAddr}
	cli := Tunnel{Listen: fmt.Sprintf("127.0.0.1:%d", spec.ClientPort), Target: net.JoinHostPort(serverIP, fmt.Sprint(spec.ServerPort)), ServerIP: serverIP}
	var srvArgv, cliArgv []string
	var name string
	switch spec.Kind {
	case "ghostunnel":
		bin := filepath.Join(e.Tools, "ghostunnel")
		srvArgv = append([]string{bin}, GhostunnelArgs(certs, srv, true)...)
		cliArgv = append([]string{bin}, GhostunnelArgs(certs, cli, false)...)
		// It reports no version of its own when built from the module.
		name = "ghostunnel " + GhostunnelVersion
	case "stunnel4":
		s, c, err := writeConfigs(certs.Dir, "stunnel", StunnelConfig(certs, srv, true), StunnelConfig(certs, cli, false))
		if err != nil {
			return nil, err
		}
		srvArgv, cliArgv = []string{"stunnel4", s}, []string{"stunnel4", c}
		name = "stunnel4 " + ToolVersion("stunnel4", "-version")
	case "haproxy":
		s, c, err := writeConfigs(certs.Dir, "haproxy-tcp", HAProxyTCPConfig(certs, srv, true), HAProxyTCPConfig(certs, cli, false))
		if err != nil {
			return nil, err
		}
		srvArgv, cliArgv = []string{"haproxy", "-db", "-f", s}, []string{"haproxy", "-db", "-f", c}
		name = "haproxy " + ToolVersion("haproxy", "-v") + " TCP+mTLS"
	default:
		return nil, fmt.Errorf("unknown tunnel pair %q", spec.Kind)
	}
	p := &Pair{Name: name + " pair", ClientAddr: cli.Listen}
	sp, err := e.Start(serverNS, spec.Kind+"-server", srvArgv...)
	if err != nil {
		return nil, err
	}
	cp, err := e.Start(clientNS, spec.Kind+"-client", cliArgv...)
	if err != nil {
		return nil, err
	}
	p.Procs = []*meshenv.Proc{sp, cp}
	if err := e.WaitListening(ctx, serverNS, fmt.Sprintf("127.0.0.1:%d", spec.ServerPort), sp); err != nil {
		return nil, fmt.Errorf("%s: %w", p.Name, err)
	}
	if err := e.WaitListening(ctx, clientNS, cli.Listen, cp); err != nil {
		return nil, fmt.Errorf("%s: %w", p.Name, err)
	}
	return p, nil
}

func writeConfigs(dir, name, server, client string) (string, string, error) {
	s, c := filepath.Join(dir, name+"-server.conf"), filepath.Join(dir, name+"-client.conf")
	if err := os.WriteFile(s, []byte(server), 0o644); err != nil {
		return "", "", err
	}
	if err := os.WriteFile(c, []byte(client), 0o644); err != nil {
		return "", "", err
	}
	return s, c, nil
}

// ToolVersion is the first version-looking word a tool prints about
// itself, for the row names ("" when it prints none).
func ToolVersion(bin string, arg string) string {
	out, _ := exec.Command(bin, arg).CombinedOutput()
	return VersionIn(string(out))
}

// VersionIn finds the first word in s that looks like a version (digits
// and dots, optionally led by "v").
func VersionIn(s string) string {
	for _, f := range strings.FieldsFunc(s, func(r rune) bool { return strings.ContainsRune(" \n\t(),/", r) }) {
		w := strings.TrimPrefix(f, "v")
		if i := strings.IndexAny(w, "-+"); i > 0 {
			w = w[:i] // Debian revision: 2.6.12-1+deb12u4
		}
		if len(w) >= 3 && w[0] >= '0' && w[0] <= '9' && strings.Count(w, ".") >= 1 && strings.Trim(w, "0123456789.") == "" {
			return w
		}
	}
	return ""
}
