// Package install puts the mesh-cni plugin on a node and keeps it there:
// it copies the plugin binary into the node's CNI bin dir, chains the
// plugin into the node's primary CNI network configuration (appending to
// its plugins, keeping the file valid, writing atomically), re-chains when
// that file is rewritten, and unchains it on uninstall.
//
// It does not decide when to uninstall; the agent does.
package install

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/fsnotify/fsnotify"
)

// Config says where things are, as the agent's container sees them.
type Config struct {
	// ConfDir is the node's CNI config dir (net.d).
	ConfDir string
	// BinDir is the node's CNI bin dir.
	BinDir string
	// PluginBinary is the mesh-cni binary to install.
	PluginBinary string
	// PluginName is the installed binary's name and the plugin's type.
	PluginName string
	// Entry is the plugin's object in the conflist; its "type" must be
	// PluginName.
	Entry map[string]any
	// Resync re-checks the chain this often even without file events.
	Resync time.Duration
}

// Installer installs and keeps the plugin chained.
type Installer struct {
	cfg   Config
	entry json.RawMessage
	log   *slog.Logger

	mu      sync.Mutex
	chained string // the conflist holding our current entry, "" if none
}

// New checks cfg and returns an installer.
func New(cfg Config, log *slog.Logger) (*Installer, error) {
	if cfg.ConfDir == "" || cfg.BinDir == "" || cfg.PluginBinary == "" || cfg.PluginName == "" {
		return nil, errors.New("install: ConfDir, BinDir, PluginBinary and PluginName are required")
	}
	if t, _ := cfg.Entry["type"].(string); t != cfg.PluginName {
		return nil, fmt.Errorf("install: entry type %q is not %q", t, cfg.PluginName)
	}
	if cfg.Resync == 0 {
		cfg.Resync = 30 * time.Second
	}
	e, err := json.Marshal(cfg.Entry)
	if err != nil {
		return nil, fmt.Errorf("install: encode entry: %w", err)
	}
	return &Installer{cfg: cfg, entry: e, log: log.With("part", "install", "confDir", cfg.ConfDir)}, nil
}

// Chained returns the conflist our entry is in ("" until chained).
func (i *Installer) Chained() string {
	i.mu.Lock()
	defer i.mu.Unlock()
	return i.chained
}

// Install copies the binary (when it differs) and chains the plugin.
func (i *Installer) Install() error {
	if err := i.installBinary(); err != nil {
		return err
	}
	_, err := i.Chain()
	return err
}

func (i *Installer) binPath() string { return filepath.Join(i.cfg.BinDir, i.cfg.PluginName) }

func fileSum(path string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return nil, err
	}
	return h.Sum(nil), nil
}

func (i *Installer) installBinary() error {
	src, dst := i.cfg.PluginBinary, i.binPath()
	want, err := fileSum(src)
	if err != nil {
		return fmt.Errorf("read plugin binary %s: %w", src, err)
	}
	if have, err := fileSum(dst); err == nil && bytes.Equal(have, want) {
		return nil
	}
	if err := os.MkdirAll(i.cfg.BinDir, 0o755); err != nil {
		return fmt.Errorf("create CNI bin dir: %w", err)
	}
	in, err := os.Open(src)
	if err != nil {
		return fmt.Errorf("open plugin binary: %w", err)
	}
	defer in.Close()
	tmp, err := os.CreateTemp(i.cfg.BinDir, "."+i.cfg.PluginName+"-*")
	if err != nil {
		return fmt.Errorf("install plugin binary: %w", err)
	}
	defer os.Remove(tmp.Name())
	if _, err := io.Copy(tmp, in); err != nil {
		tmp.Close()
		return fmt.Errorf("install plugin binary: %w", err)
	}
	if err := tmp.Chmod(0o755); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	// Rename over the old binary: a runtime exec'ing it sees old or new.
	if err := os.Rename(tmp.Name(), dst); err != nil {
		return fmt.Errorf("install plugin binary: %w", err)
	}
	i.log.Info("installed CNI plugin binary", "path", dst)
	return nil
}

// writeAtomic replaces path with data through a temp file in the same dir,
// named so no runtime reads it as a config.
func writeAtomic(path string, data []byte, mode os.FileMode) error {
	tmp, err := os.CreateTemp(filepath.Dir(path), ".mesh-cni-*.tmp")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name())
	if _, err := tmp.Write(data); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Chmod(mode); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	return os.Rename(tmp.Name(), path)
}

// Chain puts our entry into the primary config (converting a .conf into a
// .conflist) and takes it out of every other config. It reports whether it
// wrote anything.
func (i *Installer) Chain() (bool, error) {
	i.mu.Lock()
	defer i.mu.Unlock()
	primary, err := Primary(i.cfg.ConfDir)
	if err != nil {
		i.chained = ""
		return false, err
	}
	data, err := os.ReadFile(primary)
	if err != nil {
		i.chained = ""
		return false, fmt.Errorf("read %s: %w", primary, err)
	}
	st, err := os.Stat(primary)
	if err != nil {
		return false, err
	}
	out, changed, err := ChainInto(data, isList(primary), i.entry, i.cfg.PluginName)
	if err != nil {
		i.chained = ""
		return false, fmt.Errorf("chain into %s: %w", primary, err)
	}
	target := primary
	if !isList(primary) {
		target = strings.TrimSuffix(primary, filepath.Ext(primary)) + ".conflist"
	}
	wrote := false
	if changed {
		if err := writeAtomic(target, out, st.Mode().Perm()); err != nil {
			i.chained = ""
			return false, fmt.Errorf("write %s: %w", target, err)
		}
		wrote = true
		if target != primary {
			if err := os.Remove(primary); err != nil {
				return true, fmt.Errorf("remove %s after converting it to %s: %w", primary, target, err)
			}
		}
		i.log.Info("chained CNI plugin into the primary network config", "file", filepath.Base(target))
	}
	i.chained = target
	// Only the primary config may carry us; others could become primary
	// later and should not hold a stale entry.
	if err := i.unchainExcept(target); err != nil {
		return wrote, err
	}
	return wrote, nil
}

func (i *Installer) unchainExcept(keep string) error {
	entries, err := os.ReadDir(i.cfg.ConfDir)
	if err != nil {
		return fmt.Errorf("list %s: %w", i.cfg.ConfDir, err)
	}
	var errs []error
	for _, e := range entries {
		p := filepath.Join(i.cfg.ConfDir, e.Name())
		if p == keep || e.IsDir() || !isList(p) {
			continue
		}
		if err := i.unchainFile(p); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

func (i *Installer) unchainFile(p string) error {
	data, err := os.ReadFile(p)
	if err != nil {
		return fmt.Errorf("read %s: %w", p, err)
	}
	if !json.Valid(data) {
		return nil // not ours to repair, and no runtime reads it
	}
	out, changed, err := Unchain(data, i.cfg.PluginName)
	if err != nil {
		return fmt.Errorf("unchain %s: %w", p, err)
	}
	if !changed {
		return nil
	}
	st, err := os.Stat(p)
	if err != nil {
		return err
	}
	if err := writeAtomic(p, out, st.Mode().Perm()); err != nil {
		return fmt.Errorf("write %s: %w", p, err)
	}
	i.log.Info("removed CNI plugin from network config", "file", filepath.Base(p))
	return nil
}

// Uninstall removes our entry from every conflist. The binary stays: pods
// set up while we were chained are torn down with the configuration the
// runtime cached at ADD, which still names mesh-cni, and a DEL that cannot
// find its plugin fails (containerd retries it forever). Without the agent
// the plugin's DEL is a no-op, so the binary left behind is inert.
func (i *Installer) Uninstall() error {
	i.mu.Lock()
	defer i.mu.Unlock()
	err := i.unchainExcept("")
	i.chained = ""
	return err
}

// Run watches the config dir and re-chains whenever a config changes (and
// every Resync), until ctx ends.
func (i *Installer) Run(ctx context.Context) error {
	w, err := fsnotify.NewWatcher()
	if err != nil {
		return fmt.Errorf("watch %s: %w", i.cfg.ConfDir, err)
	}
	defer w.Close()
	if err := os.MkdirAll(i.cfg.ConfDir, 0o755); err != nil {
		return fmt.Errorf("create %s: %w", i.cfg.ConfDir, err)
	}
	if err := w.Add(i.cfg.ConfDir); err != nil {
		return fmt.Errorf("watch %s: %w", i.cfg.ConfDir, err)
	}
	resync := time.NewTicker(i.cfg.Resync)
	defer resync.Stop()
	// Changes come in bursts (write temp, rename); settle before looking.
	var settle <-chan time.Time
	chain := func(why string) {
		if wrote, err := i.Chain(); err != nil {
			i.log.Warn("cannot chain the CNI plugin yet; will retry", "why", why, "err", err)
		} else if wrote {
			i.log.Info("re-chained the CNI plugin", "why", why)
		}
	}
	for {
		select {
		case <-ctx.Done():
			return nil
		case ev, ok := <-w.Events:
			if !ok {
				return errors.New("config dir watcher closed")
			}
			if strings.HasPrefix(filepath.Base(ev.Name), ".") {
				continue // our own temp files
			}
			if settle == nil {
				settle = time.After(100 * time.Millisecond)
			}
		case err, ok := <-w.Errors:
			if !ok {
				return errors.New("config dir watcher closed")
			}
			i.log.Warn("config dir watch error", "err", err)
		case <-settle:
			settle = nil
			chain("config dir changed")
		case <-resync.C:
			chain("periodic check")
		}
	}
}
