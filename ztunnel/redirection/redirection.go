// Package redirection verifies, inside a pod's network namespace, that the
// pod's traffic really reaches ztunnel: the CNI's in-pod iptables chains
// exist and are hooked (nat and mangle), and ztunnel's listeners are open
// there. It reads only (iptables-save, /proc/thread-self/net); installing
// and repairing the rules is the CNI agent's job, never this package's.
//
// meshctl's mTLS verdict shows the result per workload (/config_dump
// "redirection"), and a restarting ztunnel uses Listeners to see that its
// successor has opened its sockets beside its own (SO_REUSEPORT).
package redirection

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/meshlite/meshlite/internal/nsenter"
)

// Ports ztunnel listens on in a pod (see package inpod).
const (
	PortOutbound  = 15001
	PortPlaintext = 15006
	PortHBONE     = 15008
	PortDNS       = 15053
)

// Statuses in /config_dump.
const (
	Verified = "verified"
	Missing  = "missing"
)

// required are the iptables-save lines (or fragments of lines) that must be
// present, per table: the jumps from the built-in chains into the CNI's
// chains, and the captures to ztunnel's ports.
var required = []struct{ table, line string }{
	{"nat", "-A PREROUTING -j ISTIO_PRERT"},
	{"nat", "-A OUTPUT -j ISTIO_OUTPUT"},
	{"nat", "-j REDIRECT --to-ports " + strconv.Itoa(PortOutbound)},
	{"nat", "-j REDIRECT --to-ports " + strconv.Itoa(PortPlaintext)},
	{"mangle", "-A PREROUTING -j ISTIO_PRERT"},
	{"mangle", "-A OUTPUT -j ISTIO_OUTPUT"},
}

// Check verifies the pod netns ns (an open nsfs file): nil when the
// redirection is hooked and ztunnel's listeners are open, else what is
// missing.
func Check(ctx context.Context, ns *os.File) error {
	var save []byte
	var socks sockets
	err := nsenter.Do(ns, func() error {
		var err error
		if socks, err = readSockets(); err != nil {
			return err
		}
		cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		defer cancel()
		cmd := exec.CommandContext(cctx, "iptables-save")
		var stderr bytes.Buffer
		cmd.Stderr = &stderr
		if save, err = cmd.Output(); err != nil {
			return fmt.Errorf("iptables-save: %w (%s)", err, strings.TrimSpace(stderr.String()))
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("inspect pod netns: %w", err)
	}
	var missing []string
	tables := parseSave(save)
	for _, r := range required {
		if !tables.has(r.table, r.line) {
			missing = append(missing, r.table+": "+r.line)
		}
	}
	dnsCaptured := tables.has("nat", "-j REDIRECT --to-ports "+strconv.Itoa(PortDNS))
	for _, p := range []struct {
		proto string
		port  int
		need  bool
	}{
		{"tcp", PortOutbound, true}, {"tcp", PortPlaintext, true}, {"tcp", PortHBONE, true},
		{"udp", PortHBONE, true}, {"udp", PortDNS, dnsCaptured}, {"tcp", PortDNS, dnsCaptured},
	} {
		if p.need && socks.count(p.proto, p.port) == 0 {
			missing = append(missing, fmt.Sprintf("no ztunnel listener on %s %d", p.proto, p.port))
		}
	}
	if len(missing) > 0 {
		return errors.New(strings.Join(missing, "; "))
	}
	return nil
}

// Listeners counts the TCP listeners on port in ns (ztunnel's, and a
// successor's during a handover).
func Listeners(ns *os.File, port int) (int, error) {
	var socks sockets
	err := nsenter.Do(ns, func() error {
		var err error
		socks, err = readSockets()
		return err
	})
	if err != nil {
		return 0, fmt.Errorf("read pod netns sockets: %w", err)
	}
	return socks.count("tcp", port), nil
}

// ListenersHere counts the TCP listeners on port in the calling process's
// own network namespace.
func ListenersHere(port int) (int, error) {
	var socks sockets
	err := nsenter.DoPath("", func() error {
		var err error
		socks, err = readSockets()
		return err
	})
	if err != nil {
		return 0, err
	}
	return socks.count("tcp", port), nil
}

type tables map[string][]string

func parseSave(b []byte) tables {
	t := tables{}
	cur := ""
	sc := bufio.NewScanner(bytes.NewReader(b))
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		switch {
		case strings.HasPrefix(line, "*"):
			cur = line[1:]
		case strings.HasPrefix(line, "-A "):
			t[cur] = append(t[cur], line)
		}
	}
	return t
}

func (t tables) has(table, frag string) bool {
	for _, l := range t[table] {
		if strings.Contains(l, frag) {
			return true
		}
	}
	return false
}

// sockets counts listening TCP sockets (state LISTEN) and bound UDP
// sockets by "proto/port".
type sockets map[string]int

func (s sockets) count(proto string, port int) int { return s[proto+"/"+strconv.Itoa(port)] }

// readSockets reads the calling thread's netns socket tables.
func readSockets() (sockets, error) {
	s := sockets{}
	for _, f := range []struct {
		file, proto, state string
	}{
		{"tcp", "tcp", "0A"}, {"tcp6", "tcp", "0A"}, // 0A: LISTEN
		{"udp", "udp", "07"}, {"udp6", "udp", "07"}, // 07: unconnected
	} {
		b, err := os.ReadFile("/proc/thread-self/net/" + f.file)
		if err != nil {
			if errors.Is(err, os.ErrNotExist) && strings.HasSuffix(f.file, "6") {
				continue // no IPv6 in this kernel
			}
			return nil, fmt.Errorf("read socket table: %w", err)
		}
		for i, line := range strings.Split(string(b), "\n") {
			fields := strings.Fields(line)
			if i == 0 || len(fields) < 4 || fields[3] != f.state {
				continue
			}
			_, portHex, ok := strings.Cut(fields[1], ":")
			if !ok {
				continue
			}
			port, err := strconv.ParseUint(portHex, 16, 16)
			if err != nil {
				continue
			}
			s[f.proto+"/"+strconv.Itoa(int(port))]++
		}
	}
	return s, nil
}

// Checker caches Check per pod for a few seconds: /config_dump may be
// polled, and each check forks iptables-save.
type Checker struct {
	TTL time.Duration
	mu  sync.Mutex
	m   map[string]cached
}

type cached struct {
	at  time.Time
	err error
}

// Status returns Verified or Missing (with why) for the pod key whose netns
// is ns, checking at most once per TTL (3 s).
func (c *Checker) Status(ctx context.Context, key string, ns *os.File) (string, string) {
	ttl := c.TTL
	if ttl <= 0 {
		ttl = 3 * time.Second
	}
	c.mu.Lock()
	if c.m == nil {
		c.m = map[string]cached{}
	}
	e, ok := c.m[key]
	c.mu.Unlock()
	if !ok || time.Since(e.at) > ttl {
		e = cached{at: time.Now(), err: Check(ctx, ns)}
		c.mu.Lock()
		c.m[key] = e
		c.mu.Unlock()
	}
	if e.err != nil {
		return Missing, e.err.Error()
	}
	return Verified, ""
}

// Forget drops a pod's cached result.
func (c *Checker) Forget(key string) {
	c.mu.Lock()
	delete(c.m, key)
	c.mu.Unlock()
}
