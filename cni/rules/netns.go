package rules

import (
	"fmt"
	"os"
	"runtime"

	"github.com/vishvananda/netns"
)

// InNetns runs fn on an OS thread that has joined the network namespace ns
// (an open nsfs file) and moves the thread back afterwards. Processes fn
// starts (iptables) and sockets it opens live in ns. A thread that cannot be
// moved back is left locked, so the runtime discards it with the goroutine.
func InNetns(ns *os.File, fn func() error) error {
	type result struct{ err error }
	done := make(chan result, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			runtime.UnlockOSThread()
			done <- result{fmt.Errorf("open current netns: %w", err)}
			return
		}
		defer orig.Close()
		if err := netns.Set(netns.NsHandle(int(ns.Fd()))); err != nil {
			runtime.UnlockOSThread()
			done <- result{fmt.Errorf("enter netns %s: %w", ns.Name(), err)}
			return
		}
		ferr := fn()
		if err := netns.Set(orig); err != nil {
			done <- result{ferr}
			return
		}
		runtime.UnlockOSThread()
		done <- result{ferr}
	}()
	return (<-done).err
}
