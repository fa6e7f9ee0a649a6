package sandbox

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"golang.org/x/sys/unix"
)

// Lock is a held flock(2) lock; Unlock releases it.
type Lock struct{ f *os.File }

// OpLockPath serialises changes (up, down) to the sandbox at stateDir.
func OpLockPath(stateDir string) string { return absDir(stateDir) + ".lock" }

// UseLockPath is held shared by every test binary using the sandbox.
func UseLockPath(stateDir string) string { return absDir(stateDir) + ".use.lock" }

func openLock(path string) (*os.File, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return nil, fmt.Errorf("create lock dir: %w", err)
	}
	f, err := os.OpenFile(path, os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return nil, fmt.Errorf("open lock %s: %w", path, err)
	}
	return f, nil
}

// lockWait takes the lock (exclusive or shared), polling so ctx can cancel
// the wait.
func lockWait(ctx context.Context, path string, how int) (*Lock, error) {
	f, err := openLock(path)
	if err != nil {
		return nil, err
	}
	for {
		err := unix.Flock(int(f.Fd()), how|unix.LOCK_NB)
		if err == nil {
			return &Lock{f}, nil
		}
		if !errors.Is(err, unix.EWOULDBLOCK) {
			f.Close()
			return nil, fmt.Errorf("lock %s: %w", path, err)
		}
		select {
		case <-ctx.Done():
			f.Close()
			return nil, fmt.Errorf("wait for lock %s: %w", path, ctx.Err())
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// lockTry takes the lock if it is free now; nil, nil means it is held.
func lockTry(path string, how int) (*Lock, error) {
	f, err := openLock(path)
	if err != nil {
		return nil, err
	}
	if err := unix.Flock(int(f.Fd()), how|unix.LOCK_NB); err != nil {
		f.Close()
		if errors.Is(err, unix.EWOULDBLOCK) {
			return nil, nil
		}
		return nil, fmt.Errorf("lock %s: %w", path, err)
	}
	return &Lock{f}, nil
}

// LockChanges takes the change lock of the sandbox at stateDir, waiting
// for it.
func LockChanges(ctx context.Context, stateDir string) (*Lock, error) {
	return lockWait(ctx, OpLockPath(stateDir), unix.LOCK_EX)
}

// Unlock releases the lock. It is safe on a nil Lock.
func (l *Lock) Unlock() {
	if l != nil && l.f != nil {
		l.f.Close() // closing the only descriptor drops the flock
		l.f = nil
	}
}
