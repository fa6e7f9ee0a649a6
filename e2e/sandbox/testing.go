package sandbox

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// T is the part of testing.TB that Start uses.
type T interface {
	Helper()
	Fatalf(format string, args ...any)
	Logf(format string, args ...any)
}

// M is the part of testing.M that TestMain uses.
type M interface{ Run() int }

// shared is this test binary's hold on the sandbox.
var shared struct {
	sync.Mutex
	inMain bool
	sb     *Sandbox
	err    error
	use    *Lock
	dir    string
}

// TestMain runs a test binary's tests and then lets go of the sandbox,
// tearing it down if this binary was its last user and it is not
// persistent. Call it from the package's TestMain:
//
//	func TestMain(m *testing.M) { sandbox.TestMain(m) }
func TestMain(m M) {
	shared.Lock()
	shared.inMain = true
	shared.Unlock()
	code := m.Run()
	if err := release(); err != nil {
		fmt.Fprintln(os.Stderr, "sandbox: release:", err)
		if code == 0 {
			code = 1
		}
	}
	os.Exit(code)
}

// keepRequested reports MESHLITE_SANDBOX_KEEP=1: keep the sandbox after
// the tests (for debugging; `sandbox down` removes it).
func keepRequested() bool { return os.Getenv("MESHLITE_SANDBOX_KEEP") == "1" }

// Start returns the sandbox for this test binary, bringing one up (or
// joining the one already running) on first use. It fails the test, never
// skips it, when the sandbox cannot run: without root, or without the kube
// binaries (run hack/kube-bins.sh), the CNI plugins (hack/cni-plugins.sh)
// or bin/sandbox.
func Start(t T) *Sandbox {
	t.Helper()
	shared.Lock()
	defer shared.Unlock()
	if !shared.inMain {
		t.Fatalf("sandbox.Start needs the package's TestMain to call sandbox.TestMain(m)")
	}
	if shared.sb == nil && shared.err == nil {
		start := time.Now()
		shared.sb, shared.err = acquire(context.Background())
		if shared.err == nil {
			t.Logf("sandbox ready in %v (state %s)", time.Since(start).Round(time.Millisecond), shared.sb.Dir)
		}
	}
	if shared.err != nil {
		t.Fatalf("sandbox: %v", shared.err)
	}
	return shared.sb
}

func testLogger() *slog.Logger {
	lvl := slog.LevelWarn
	if os.Getenv("MESHLITE_SANDBOX_DEBUG") == "1" {
		lvl = slog.LevelDebug
	}
	return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: lvl}))
}

// acquire brings up or joins the sandbox and holds the use lock shared.
func acquire(ctx context.Context) (*Sandbox, error) {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Minute)
	defer cancel()
	dir := StateDirFromEnv()
	for {
		op, err := LockChanges(ctx, dir)
		if err != nil {
			return nil, err
		}
		// Join first, without waiting: an exclusive holder (a test that
		// runs `sandbox down` itself) goes first, and this loop tries again
		// after it.
		use, err := lockTry(UseLockPath(dir), unix.LOCK_SH)
		if err != nil || use == nil {
			op.Unlock()
			if err != nil {
				return nil, err
			}
			select {
			case <-ctx.Done():
				return nil, fmt.Errorf("wait for the exclusive sandbox user to finish: %w", ctx.Err())
			case <-time.After(500 * time.Millisecond):
			}
			continue
		}
		sb, _, err := Up(ctx, Options{StateDir: dir, Persistent: keepRequested(), Log: testLogger()})
		if err != nil && !keepRequested() {
			// The error quotes the failing part's log; leave no half
			// sandbox behind (MESHLITE_SANDBOX_KEEP=1 keeps it to debug).
			if derr := Down(ctx, dir, testLogger()); derr != nil {
				err = fmt.Errorf("%w; cleaning up: %v", err, derr)
			}
		}
		op.Unlock()
		if err != nil {
			use.Unlock()
			return nil, err
		}
		shared.use = use
		shared.dir = dir
		return sb, nil
	}
}

// release drops this binary's use of the sandbox and tears it down if no
// other binary uses it and it is not persistent.
func release() error {
	shared.Lock()
	defer shared.Unlock()
	if shared.use == nil {
		return nil
	}
	shared.use.Unlock()
	shared.use = nil
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	op, err := LockChanges(ctx, shared.dir)
	if err != nil {
		return err
	}
	defer op.Unlock()
	last, err := lockTry(UseLockPath(shared.dir), unix.LOCK_EX)
	if err != nil || last == nil {
		return err
	}
	defer last.Unlock()
	st, err := loadState(shared.dir)
	if err != nil || st.Persistent || keepRequested() {
		return nil
	}
	return Down(ctx, shared.dir, testLogger())
}

// Exclusive waits until no other test binary uses the sandbox at stateDir
// and keeps others out until the returned function is called. Use it in a
// test that brings the sandbox down or up itself (for example through the
// CLI, which takes the change lock on its own).
func Exclusive(ctx context.Context, stateDir string) (func(), error) {
	l, err := lockWait(ctx, UseLockPath(stateDir), unix.LOCK_EX)
	if err != nil {
		return nil, err
	}
	return l.Unlock, nil
}
