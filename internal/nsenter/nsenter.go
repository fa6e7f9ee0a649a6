// Package nsenter runs a function inside a network namespace, on an OS
// thread of its own. Sockets the function creates, and processes it forks,
// live in that namespace. It owns only the thread handling: what to run there
// (listeners, iptables, a child process) belongs to the caller.
package nsenter

import (
	"errors"
	"fmt"
	"os"
	"runtime"

	"golang.org/x/sys/unix"
)

// Do runs fn on an OS thread that has joined the network namespace ns (an
// open nsfs file) and moves the thread back afterwards. A thread that cannot
// be moved back stays locked, so the runtime discards it with its goroutine
// instead of running other goroutines in the wrong namespace.
func Do(ns *os.File, fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := os.Open(fmt.Sprintf("/proc/%d/task/%d/ns/net", os.Getpid(), unix.Gettid()))
		if err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("open current netns: %w", err)
			return
		}
		defer orig.Close()
		if err := unix.Setns(int(ns.Fd()), unix.CLONE_NEWNET); err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("enter netns %s: %w", ns.Name(), err)
			return
		}
		ferr := fn()
		if err := unix.Setns(int(orig.Fd()), unix.CLONE_NEWNET); err != nil {
			errc <- errors.Join(ferr, fmt.Errorf("return from netns %s (thread discarded): %w", ns.Name(), err))
			return
		}
		runtime.UnlockOSThread()
		errc <- ferr
	}()
	return <-errc
}

// DoPath is Do for the namespace at path (e.g. /var/run/netns/NAME); an
// empty path runs fn in the current namespace.
func DoPath(path string, fn func() error) error {
	if path == "" {
		return fn()
	}
	f, err := os.Open(path)
	if err != nil {
		return fmt.Errorf("open netns %s: %w", path, err)
	}
	defer f.Close()
	return Do(f, fn)
}
