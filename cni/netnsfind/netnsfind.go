// Package netnsfind finds a running pod's network namespace from its IP
// address, for pods that were started before the agent could capture them
// (their namespace was labelled later, or the agent restarted). It looks at
// the namespaces pinned under the netns dirs (/var/run/netns, where
// runtimes and the sandbox pin them) and at those of every process
// (/proc/<pid>/ns/net), and picks the one that owns the pod's address.
//
// It reads only; it never changes a namespace.
package netnsfind

import (
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// ErrNotFound means no network namespace holds the address.
var ErrNotFound = errors.New("no network namespace holds the pod IP")

// Finder looks for namespaces under ProcDir and NetnsDirs.
type Finder struct {
	ProcDir   string   // "/proc"
	NetnsDirs []string // ["/var/run/netns"]
	Log       *slog.Logger
}

// New returns a finder over the machine's /proc and /var/run/netns.
func New(log *slog.Logger) *Finder {
	return &Finder{ProcDir: "/proc", NetnsDirs: []string{"/var/run/netns"}, Log: log}
}

type nsKey struct{ dev, ino uint64 }

type candidate struct {
	path  string
	key   nsKey
	names []string // every path seen for it, for the uid hint
}

func keyOf(path string) (nsKey, bool) {
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return nsKey{}, false
	}
	return nsKey{st.Dev, st.Ino}, true
}

// candidates lists distinct network namespaces other than the caller's:
// pinned ones first (cheap, and named), then those of processes.
func (f *Finder) candidates() []*candidate {
	self, _ := keyOf("/proc/thread-self/ns/net")
	seen := map[nsKey]*candidate{}
	var out []*candidate
	add := func(path string) {
		k, ok := keyOf(path)
		if !ok || k == self {
			return
		}
		if c, ok := seen[k]; ok {
			c.names = append(c.names, path)
			return
		}
		c := &candidate{path: path, key: k, names: []string{path}}
		seen[k] = c
		out = append(out, c)
	}
	for _, d := range f.NetnsDirs {
		ents, err := os.ReadDir(d)
		if err != nil {
			continue
		}
		for _, e := range ents {
			add(filepath.Join(d, e.Name()))
		}
	}
	ents, err := os.ReadDir(f.ProcDir)
	if err == nil {
		for _, e := range ents {
			if _, err := strconv.Atoi(e.Name()); err != nil {
				continue
			}
			add(filepath.Join(f.ProcDir, e.Name(), "ns", "net"))
		}
	}
	return out
}

// holds reports whether the namespace at path has one of ips on an
// interface other than lo.
func holds(path string, ips []netip.Addr) (bool, error) {
	ns, err := netns.GetFromPath(path)
	if err != nil {
		return false, err
	}
	defer ns.Close()
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		return false, err
	}
	defer h.Close()
	addrs, err := h.AddrList(nil, netlink.FAMILY_ALL)
	if err != nil {
		return false, err
	}
	for _, a := range addrs {
		ip, ok := netip.AddrFromSlice(a.IP)
		if !ok || ip.IsLoopback() {
			continue
		}
		for _, want := range ips {
			if ip.Unmap() == want {
				return true, nil
			}
		}
	}
	return false, nil
}

// Find opens the network namespace that holds one of ips. hint (the pod
// uid) breaks a tie when several namespaces hold the address (leftovers of
// a dead pod): the one pinned under a name containing it wins. Several
// matches without a deciding hint are an error, never a guess.
func (f *Finder) Find(ips []netip.Addr, hint string) (*os.File, error) {
	if len(ips) == 0 {
		return nil, errors.New("find pod netns: no pod IP")
	}
	var matches []*candidate
	for _, c := range f.candidates() {
		ok, err := holds(c.path, ips)
		if err != nil {
			// Processes come and go while we scan.
			continue
		}
		if ok {
			matches = append(matches, c)
		}
	}
	var pick *candidate
	switch {
	case len(matches) == 0:
		return nil, fmt.Errorf("find pod netns for %v: %w", ips, ErrNotFound)
	case len(matches) == 1:
		pick = matches[0]
	default:
		var hinted []*candidate
		for _, m := range matches {
			for _, n := range m.names {
				if hint != "" && strings.Contains(filepath.Base(n), hint) {
					hinted = append(hinted, m)
					break
				}
			}
		}
		if len(hinted) != 1 {
			var paths []string
			for _, m := range matches {
				paths = append(paths, m.path)
			}
			return nil, fmt.Errorf("find pod netns for %v: %d namespaces hold it (%s); not guessing", ips, len(matches), strings.Join(paths, ", "))
		}
		pick = hinted[0]
	}
	// The path may now name another namespace (a pid reused): check.
	for _, p := range pick.names {
		file, err := os.Open(p)
		if err != nil {
			continue
		}
		var st unix.Stat_t
		if err := unix.Fstat(int(file.Fd()), &st); err != nil || (nsKey{st.Dev, st.Ino}) != pick.key {
			file.Close()
			continue
		}
		if f.Log != nil {
			f.Log.Debug("found pod netns", "ips", ips, "path", p)
		}
		return file, nil
	}
	return nil, fmt.Errorf("find pod netns for %v: %s went away", ips, pick.path)
}
