package kubelet

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	v1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
)

func isNotFound(err error) bool { return apierrors.IsNotFound(err) }

// hostPathPassthrough are host paths that stay the real host's instead of
// resolving under the node's RootDir: kernel interfaces, and the netns dir
// (one for the whole machine, where pod netns are pinned).
var hostPathPassthrough = []string{"/proc", "/sys", "/dev", "/var/run/netns", "/run/netns", "/lib/modules"}

// resolveHostPath maps a hostPath volume's path into the node's private
// root: /var/run/ztunnel -> <root>/var/run/ztunnel. The result never leaves
// root (".." is cleaned away first).
func resolveHostPath(root, path string) (string, error) {
	if !filepath.IsAbs(path) {
		return "", fmt.Errorf("hostPath %q is not absolute", path)
	}
	clean := filepath.Clean(path)
	for _, p := range hostPathPassthrough {
		if clean == p || strings.HasPrefix(clean, p+"/") {
			return clean, nil
		}
	}
	if root == "" {
		return "", fmt.Errorf("hostPath %q: node has no root dir", path)
	}
	return filepath.Join(root, clean), nil
}

// prepareHostPath checks or creates a hostPath by its type.
func prepareHostPath(p string, t *v1.HostPathType) error {
	typ := v1.HostPathUnset
	if t != nil {
		typ = *t
	}
	st, err := os.Stat(p)
	exists := err == nil
	switch typ {
	case v1.HostPathUnset:
		if !exists {
			// Kubernetes would create a directory in the bind itself.
			return os.MkdirAll(p, 0o755)
		}
		return nil
	case v1.HostPathDirectoryOrCreate:
		if !exists {
			return os.MkdirAll(p, 0o755)
		}
		if !st.IsDir() {
			return fmt.Errorf("hostPath %s exists and is not a directory", p)
		}
		return nil
	case v1.HostPathFileOrCreate:
		if !exists {
			if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
				return err
			}
			f, err := os.OpenFile(p, os.O_CREATE|os.O_RDONLY, 0o644)
			if err != nil {
				return err
			}
			return f.Close()
		}
		if st.IsDir() {
			return fmt.Errorf("hostPath %s is a directory, not a file", p)
		}
		return nil
	}
	if !exists {
		return fmt.Errorf("hostPath %s (%s) does not exist", p, typ)
	}
	ok := false
	switch typ {
	case v1.HostPathDirectory:
		ok = st.IsDir()
	case v1.HostPathFile:
		ok = st.Mode().IsRegular()
	case v1.HostPathSocket:
		ok = st.Mode()&fs.ModeSocket != 0
	case v1.HostPathCharDev:
		ok = st.Mode()&fs.ModeCharDevice != 0
	case v1.HostPathBlockDev:
		ok = st.Mode()&fs.ModeDevice != 0 && st.Mode()&fs.ModeCharDevice == 0
	default:
		return fmt.Errorf("hostPath type %q not supported", typ)
	}
	if !ok {
		return fmt.Errorf("hostPath %s is not of type %s", p, typ)
	}
	return nil
}

// volFile is one file of a configMap/secret/downwardAPI/projected volume.
type volFile struct {
	data []byte
	mode os.FileMode
	// uid owns the file when set (a token given to the pod's user);
	// otherwise root does.
	uid *int64
}

// volumeOwner is who a pod's volumes are made for, as a kubelet sets it
// up: fsGroup (pod securityContext) owns every file of the pod's
// configMap, secret, downward API, projected and emptyDir volumes, with
// group read (and write for emptyDir) added; fsUser, the uid every
// container of the pod runs as when they all share one, owns the
// service-account token files, which are then 0600. Without either, a
// token file gets the volume's default mode (0644), as with a kubelet.
type volumeOwner struct {
	fsUser, fsGroup *int64
}

// podVolumeOwner reads the owner of pod's volumes from its security
// contexts.
func podVolumeOwner(pod *v1.Pod) volumeOwner {
	var o volumeOwner
	if psc := pod.Spec.SecurityContext; psc != nil && psc.FSGroup != nil {
		g := *psc.FSGroup
		o.fsGroup = &g
	}
	o.fsUser = fsUserOf(pod)
	return o
}

// fsUserOf is the uid all of pod's containers (init and ephemeral ones
// too) run as, or nil when one of them has none set (it would run as the
// image's user, unknown here) or they differ.
func fsUserOf(pod *v1.Pod) *int64 {
	var podUID *int64
	if psc := pod.Spec.SecurityContext; psc != nil {
		podUID = psc.RunAsUser
	}
	var uid *int64
	same := func(sc *v1.SecurityContext) bool {
		u := podUID
		if sc != nil && sc.RunAsUser != nil {
			u = sc.RunAsUser
		}
		if u == nil || (uid != nil && *uid != *u) {
			return false
		}
		uid = u
		return true
	}
	for i := range pod.Spec.InitContainers {
		if !same(pod.Spec.InitContainers[i].SecurityContext) {
			return nil
		}
	}
	for i := range pod.Spec.Containers {
		if !same(pod.Spec.Containers[i].SecurityContext) {
			return nil
		}
	}
	for i := range pod.Spec.EphemeralContainers {
		if !same(pod.Spec.EphemeralContainers[i].SecurityContext) {
			return nil
		}
	}
	if uid == nil {
		return nil
	}
	u := *uid
	return &u
}

// tokenEntry is a cached service-account token of a projected volume.
type tokenEntry struct {
	token   string
	issued  time.Time
	expires time.Time
}

// needsRefresh follows the kubelet: renew at 80% of the lifetime or after
// 24h, whichever comes first.
func (t tokenEntry) needsRefresh(now time.Time) bool {
	if t.token == "" {
		return true
	}
	life := t.expires.Sub(t.issued)
	return now.After(t.issued.Add(life*8/10)) || now.Sub(t.issued) > 24*time.Hour
}

func (p *podRun) getConfigMap(ctx context.Context) func(string) (*v1.ConfigMap, error) {
	if p.r.api == nil {
		return nil
	}
	ns := p.currentPod().Namespace
	return func(name string) (*v1.ConfigMap, error) { return p.r.api.configMap(ctx, ns, name) }
}

func (p *podRun) getSecret(ctx context.Context) func(string) (*v1.Secret, error) {
	if p.r.api == nil {
		return nil
	}
	ns := p.currentPod().Namespace
	return func(name string) (*v1.Secret, error) { return p.r.api.secret(ctx, ns, name) }
}

// setupVolumes makes every volume of the pod and returns where each lives
// on the host.
func (p *podRun) setupVolumes(ctx context.Context, pod *v1.Pod) (map[string]string, error) {
	out := map[string]string{}
	for i := range pod.Spec.Volumes {
		vol := &pod.Spec.Volumes[i]
		path, err := p.setupVolume(ctx, pod, vol)
		if err != nil {
			return nil, fmt.Errorf("volume %q: %w", vol.Name, err)
		}
		out[vol.Name] = path
	}
	return out, nil
}

func (p *podRun) setupVolume(ctx context.Context, pod *v1.Pod, vol *v1.Volume) (string, error) {
	dir := filepath.Join(p.dir, "volumes", vol.Name)
	switch {
	case vol.HostPath != nil:
		hp, err := resolveHostPath(p.r.cfg.RootDir, vol.HostPath.Path)
		if err != nil {
			return "", err
		}
		if err := prepareHostPath(hp, vol.HostPath.Type); err != nil {
			return "", err
		}
		return hp, nil
	case vol.EmptyDir != nil:
		if err := os.MkdirAll(dir, 0o777); err != nil {
			return "", err
		}
		// World-writable like a kubelet's emptyDir, for non-root containers.
		if err := os.Chmod(dir, 0o777); err != nil {
			return "", err
		}
		if g := podVolumeOwner(pod).fsGroup; g != nil {
			// And the fsGroup's, so files made there inherit the group.
			if err := os.Chown(dir, -1, int(*g)); err != nil {
				return "", fmt.Errorf("give %s to fsGroup %d: %w", dir, *g, err)
			}
			return dir, os.Chmod(dir, 0o777|fs.ModeSetgid)
		}
		return dir, nil
	case vol.ConfigMap != nil, vol.Secret != nil, vol.DownwardAPI != nil, vol.Projected != nil:
		files, err := p.volumeFiles(ctx, pod, vol)
		if err != nil {
			return "", err
		}
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return "", err
		}
		return dir, writeVolumeFiles(dir, files, podVolumeOwner(pod).fsGroup)
	}
	return "", errors.New("volume type not supported by the sandbox kubelet")
}

// refreshVolumesLoop keeps configMap, secret, downward API and token files
// current while the pod runs, as a kubelet's volume manager does.
func (p *podRun) refreshVolumesLoop(ctx context.Context) {
	t := time.NewTicker(15 * time.Second)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		pod := p.currentPod()
		for i := range pod.Spec.Volumes {
			vol := &pod.Spec.Volumes[i]
			if vol.ConfigMap == nil && vol.Secret == nil && vol.DownwardAPI == nil && vol.Projected == nil {
				continue
			}
			files, err := p.volumeFiles(ctx, pod, vol)
			if err != nil {
				p.log.Warn("refresh volume", "volume", vol.Name, "err", err)
				continue
			}
			if err := writeVolumeFiles(filepath.Join(p.dir, "volumes", vol.Name), files, podVolumeOwner(pod).fsGroup); err != nil {
				p.log.Warn("refresh volume", "volume", vol.Name, "err", err)
			}
		}
	}
}

func fileMode(m *int32, def os.FileMode) os.FileMode {
	if m != nil {
		return os.FileMode(*m) & 0o777
	}
	return def
}

// volumeFiles computes the files of a configMap, secret, downwardAPI or
// projected volume.
func (p *podRun) volumeFiles(ctx context.Context, pod *v1.Pod, vol *v1.Volume) (map[string]volFile, error) {
	files := map[string]volFile{}
	switch {
	case vol.ConfigMap != nil:
		src := vol.ConfigMap
		return files, p.addConfigMapFiles(ctx, files, src.Name, src.Items, src.Optional, fileMode(src.DefaultMode, 0o644))
	case vol.Secret != nil:
		src := vol.Secret
		return files, p.addSecretFiles(ctx, files, src.SecretName, src.Items, src.Optional, fileMode(src.DefaultMode, 0o644))
	case vol.DownwardAPI != nil:
		return files, p.addDownwardFiles(pod, files, vol.DownwardAPI.Items, fileMode(vol.DownwardAPI.DefaultMode, 0o644))
	case vol.Projected != nil:
		def := fileMode(vol.Projected.DefaultMode, 0o644)
		for i, s := range vol.Projected.Sources {
			var err error
			switch {
			case s.ServiceAccountToken != nil:
				err = p.addTokenFile(ctx, pod, files, vol.Name, s.ServiceAccountToken, def)
			case s.ConfigMap != nil:
				err = p.addConfigMapFiles(ctx, files, s.ConfigMap.Name, s.ConfigMap.Items, s.ConfigMap.Optional, def)
			case s.Secret != nil:
				err = p.addSecretFiles(ctx, files, s.Secret.Name, s.Secret.Items, s.Secret.Optional, def)
			case s.DownwardAPI != nil:
				err = p.addDownwardFiles(pod, files, s.DownwardAPI.Items, def)
			default:
				err = errors.New("projected source type not supported by the sandbox kubelet")
			}
			if err != nil {
				return nil, fmt.Errorf("source %d: %w", i, err)
			}
		}
		return files, nil
	}
	return nil, errors.New("not a file volume")
}

// addKeyFiles adds data keys as files, all of them or just the listed items.
func addKeyFiles(files map[string]volFile, data map[string][]byte, items []v1.KeyToPath, kind, name string, optional *bool, def os.FileMode) error {
	if len(items) == 0 {
		for k, v := range data {
			files[k] = volFile{data: v, mode: def}
		}
		return nil
	}
	for _, it := range items {
		v, ok := data[it.Key]
		if !ok {
			if optional != nil && *optional {
				continue
			}
			return fmt.Errorf("%s %q has no key %q", kind, name, it.Key)
		}
		files[it.Path] = volFile{data: v, mode: fileMode(it.Mode, def)}
	}
	return nil
}

func (p *podRun) addConfigMapFiles(ctx context.Context, files map[string]volFile, name string, items []v1.KeyToPath, optional *bool, def os.FileMode) error {
	cm, err := lookupOptional(p.getConfigMap(ctx), name, optional, "configmap")
	if err != nil || cm == nil {
		return err
	}
	data := map[string][]byte{}
	for k, v := range cm.Data {
		data[k] = []byte(v)
	}
	for k, v := range cm.BinaryData {
		data[k] = v
	}
	return addKeyFiles(files, data, items, "configmap", name, optional, def)
}

func (p *podRun) addSecretFiles(ctx context.Context, files map[string]volFile, name string, items []v1.KeyToPath, optional *bool, def os.FileMode) error {
	s, err := lookupOptional(p.getSecret(ctx), name, optional, "secret")
	if err != nil || s == nil {
		return err
	}
	return addKeyFiles(files, s.Data, items, "secret", name, optional, def)
}

func (p *podRun) addDownwardFiles(pod *v1.Pod, files map[string]volFile, items []v1.DownwardAPIVolumeFile, def os.FileMode) error {
	p.mu.Lock()
	ips := append([]string(nil), p.podIPs...)
	p.mu.Unlock()
	for _, it := range items {
		var v string
		var err error
		switch {
		case it.FieldRef != nil:
			v, err = podFieldValue(pod, it.FieldRef.FieldPath, ips, p.r.cfg.NodeIP)
		case it.ResourceFieldRef != nil:
			c := findContainer(pod, it.ResourceFieldRef.ContainerName)
			if c == nil {
				return fmt.Errorf("downward API item %q: no container %q", it.Path, it.ResourceFieldRef.ContainerName)
			}
			v, err = resourceFieldValue(c, it.ResourceFieldRef, p.r.nodeCPU, p.r.nodeMemory)
		default:
			err = errors.New("no field")
		}
		if err != nil {
			return fmt.Errorf("downward API item %q: %w", it.Path, err)
		}
		files[it.Path] = volFile{data: []byte(v), mode: fileMode(it.Mode, def)}
	}
	return nil
}

func findContainer(pod *v1.Pod, name string) *v1.Container {
	for i := range pod.Spec.Containers {
		if name == "" || pod.Spec.Containers[i].Name == name {
			return &pod.Spec.Containers[i]
		}
	}
	for i := range pod.Spec.InitContainers {
		if pod.Spec.InitContainers[i].Name == name {
			return &pod.Spec.InitContainers[i]
		}
	}
	return nil
}

// addTokenFile adds a service-account token from the TokenRequest API,
// cached and renewed at 80% of its life.
func (p *podRun) addTokenFile(ctx context.Context, pod *v1.Pod, files map[string]volFile, volName string, src *v1.ServiceAccountTokenProjection, def os.FileMode) error {
	if p.r.api == nil {
		return errors.New("service account token: no API access")
	}
	exp := int64(3600)
	if src.ExpirationSeconds != nil {
		exp = *src.ExpirationSeconds
	}
	key := volName + "/" + src.Path
	p.mu.Lock()
	cached := p.tokens[key]
	p.mu.Unlock()
	if cached.needsRefresh(time.Now()) {
		tok, expires, err := p.r.api.token(ctx, pod, src.Audience, exp)
		if err != nil {
			if cached.token != "" && time.Now().Before(cached.expires) {
				p.log.Warn("renew service account token; keeping the current one", "err", err)
			} else {
				return fmt.Errorf("request service account token (audience %q): %w", src.Audience, err)
			}
		} else {
			cached = tokenEntry{token: tok, issued: time.Now(), expires: expires}
			p.mu.Lock()
			p.tokens[key] = cached
			p.mu.Unlock()
		}
	}
	// As a kubelet does: a token made for the pod's user or fsGroup is
	// theirs alone (0600, then group-readable through the fsGroup);
	// otherwise it has the volume's mode, readable by whatever user the
	// containers run as.
	f := volFile{data: []byte(cached.token), mode: def}
	if o := podVolumeOwner(pod); o.fsUser != nil || o.fsGroup != nil {
		f.mode, f.uid = 0o600, o.fsUser
	}
	files[src.Path] = f
	return nil
}

// validVolumePath rejects item paths that would leave the volume dir.
func validVolumePath(rel string) error {
	if rel == "" || filepath.IsAbs(rel) {
		return fmt.Errorf("invalid volume file path %q", rel)
	}
	for _, part := range strings.Split(rel, "/") {
		if part == ".." {
			return fmt.Errorf("invalid volume file path %q", rel)
		}
	}
	return nil
}

// writeVolumeFiles makes dir hold exactly files: changed ones are replaced
// by rename (a running container sees old or new, never half), stale ones
// removed. With fsGroup, the group owns dir and everything in it, and may
// read it (as a kubelet sets up a read-only volume's ownership).
func writeVolumeFiles(dir string, files map[string]volFile, fsGroup *int64) error {
	want := map[string]bool{}
	for rel, f := range files {
		if err := validVolumePath(rel); err != nil {
			return err
		}
		path := filepath.Join(dir, filepath.Clean(rel))
		want[path] = true
		if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
			return fmt.Errorf("create dir for %s: %w", rel, err)
		}
		uid, gid, mode := 0, 0, f.mode
		if f.uid != nil {
			uid = int(*f.uid)
		}
		if fsGroup != nil {
			gid, mode = int(*fsGroup), mode|0o440
		}
		if old, err := os.ReadFile(path); err == nil && bytes.Equal(old, f.data) && ownedAs(path, uid, gid, mode) {
			continue
		}
		if err := writeOwnedFileAtomic(path, f.data, mode, uid, gid); err != nil {
			return err
		}
	}
	err := filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() {
			if fsGroup == nil {
				return nil
			}
			// Directories: the group may list and enter them; new files
			// inherit the group (setgid).
			if err := os.Chown(path, -1, int(*fsGroup)); err != nil {
				return fmt.Errorf("give %s to fsGroup %d: %w", path, *fsGroup, err)
			}
			st, err := os.Stat(path)
			if err != nil {
				return err
			}
			return os.Chmod(path, st.Mode().Perm()|0o550|fs.ModeSetgid)
		}
		if !want[path] {
			return os.Remove(path)
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("volume dir %s: %w", dir, err)
	}
	return nil
}

// ownedAs reports whether path has owner uid:gid and permissions mode.
func ownedAs(path string, uid, gid int, mode os.FileMode) bool {
	st, err := os.Stat(path)
	if err != nil || st.Mode().Perm() != mode {
		return false
	}
	sys, ok := st.Sys().(*syscall.Stat_t)
	return ok && int(sys.Uid) == uid && int(sys.Gid) == gid
}

// writeOwnedFileAtomic is writeFileAtomic for a file owned by uid:gid,
// who own it before it appears under its name.
func writeOwnedFileAtomic(path string, data []byte, mode os.FileMode, uid, gid int) error {
	if uid == 0 && gid == 0 {
		return writeFileAtomic(path, data, mode)
	}
	tmp, err := os.CreateTemp(filepath.Dir(path), ".tmp-"+filepath.Base(path)+"-")
	if err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	defer os.Remove(tmp.Name())
	_, err = tmp.Write(data)
	if err == nil {
		err = tmp.Chown(uid, gid)
	}
	if err == nil {
		// After chown, which may clear mode bits.
		err = tmp.Chmod(mode)
	}
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp.Name(), path)
	}
	if err != nil {
		return fmt.Errorf("write %s (owner %d:%d): %w", path, uid, gid, err)
	}
	return nil
}

// containerMounts lists the bind mounts of a container: resolv.conf and
// hosts of the pod, and its volume mounts.
func (p *podRun) containerMounts(c *v1.Container) ([]initMount, error) {
	p.mu.Lock()
	vols := p.volumes
	p.mu.Unlock()
	var mounts []initMount
	if rc := filepath.Join(p.dir, "resolv.conf"); fileExists(rc) {
		mounts = append(mounts, initMount{Source: rc, Target: "/etc/resolv.conf", ReadOnly: true})
	}
	if h := filepath.Join(p.dir, "hosts"); fileExists(h) && !p.hostNetwork() {
		mounts = append(mounts, initMount{Source: h, Target: "/etc/hosts", ReadOnly: true})
	}
	for _, vm := range c.VolumeMounts {
		src, ok := vols[vm.Name]
		if !ok {
			return nil, fmt.Errorf("volume mount %q: no such volume", vm.Name)
		}
		if vm.SubPath != "" {
			if err := validVolumePath(vm.SubPath); err != nil {
				return nil, fmt.Errorf("volume mount %q: %w", vm.Name, err)
			}
			src = filepath.Join(src, vm.SubPath)
			if _, err := os.Stat(src); os.IsNotExist(err) {
				// As a kubelet does for a missing subPath of a directory volume.
				if err := os.MkdirAll(src, 0o755); err != nil {
					return nil, fmt.Errorf("volume mount %q: create subPath: %w", vm.Name, err)
				}
			}
		}
		prop := ""
		if vm.MountPropagation != nil {
			prop = string(*vm.MountPropagation)
		}
		mounts = append(mounts, initMount{Source: src, Target: vm.MountPath, ReadOnly: vm.ReadOnly, Propagation: prop})
	}
	return mounts, nil
}

func fileExists(p string) bool {
	_, err := os.Stat(p)
	return err == nil
}
