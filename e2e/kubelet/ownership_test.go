package kubelet

import (
	"context"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	v1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

func i64(v int64) *int64 { return &v }

func TestFsUserOf(t *testing.T) {
	ctr := func(uid *int64) v1.Container {
		c := v1.Container{Name: "c"}
		if uid != nil {
			c.SecurityContext = &v1.SecurityContext{RunAsUser: uid}
		}
		return c
	}
	for _, tc := range []struct {
		name   string
		podUID *int64
		init   []v1.Container
		ctrs   []v1.Container
		want   *int64
	}{
		{"pod runAsUser", i64(1337), nil, []v1.Container{ctr(nil), ctr(nil)}, i64(1337)},
		{"containers agree", nil, nil, []v1.Container{ctr(i64(7)), ctr(i64(7))}, i64(7)},
		{"container overrides pod", i64(1337), nil, []v1.Container{ctr(i64(0))}, i64(0)},
		{"containers differ", nil, nil, []v1.Container{ctr(i64(7)), ctr(i64(8))}, nil},
		{"one container unset", nil, nil, []v1.Container{ctr(i64(7)), ctr(nil)}, nil},
		{"init container differs", i64(1337), []v1.Container{ctr(i64(0))}, []v1.Container{ctr(nil)}, nil},
		{"nothing set", nil, nil, []v1.Container{ctr(nil)}, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			pod := &v1.Pod{Spec: v1.PodSpec{InitContainers: tc.init, Containers: tc.ctrs}}
			if tc.podUID != nil {
				pod.Spec.SecurityContext = &v1.PodSecurityContext{RunAsUser: tc.podUID}
			}
			got := fsUserOf(pod)
			if (got == nil) != (tc.want == nil) || (got != nil && *got != *tc.want) {
				t.Errorf("fsUserOf = %v, want %v", deref(got), deref(tc.want))
			}
		})
	}
}

func deref(p *int64) any {
	if p == nil {
		return "nil"
	}
	return *p
}

// volumeAPI serves one ConfigMap, one Secret and tokens (a fake of the API
// server for volume setup only).
type volumeAPI struct{}

func (volumeAPI) configMap(_ context.Context, ns, name string) (*v1.ConfigMap, error) {
	return &v1.ConfigMap{Data: map[string]string{"ca.crt": "root-ca"}}, nil
}

func (volumeAPI) secret(_ context.Context, ns, name string) (*v1.Secret, error) {
	return &v1.Secret{Data: map[string][]byte{"key.pem": []byte("secret-key")}}, nil
}

func (volumeAPI) token(_ context.Context, pod *v1.Pod, audience string, exp int64) (string, time.Time, error) {
	return "token-for-" + audience, time.Now().Add(time.Hour), nil
}

// volumePod has the volumes a service-account pod gets (the admission's
// projected kube-api-access volume) plus a Secret volume with mode 0400.
func volumePod(sc *v1.PodSecurityContext, ctrs ...v1.Container) *v1.Pod {
	return &v1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "p", Namespace: "ns"},
		Spec: v1.PodSpec{
			SecurityContext: sc,
			Containers:      ctrs,
			Volumes: []v1.Volume{
				{Name: "kube-api-access", VolumeSource: v1.VolumeSource{Projected: &v1.ProjectedVolumeSource{
					DefaultMode: ptrMode(0o644),
					Sources: []v1.VolumeProjection{
						{ServiceAccountToken: &v1.ServiceAccountTokenProjection{Path: "token", Audience: "istio-ca"}},
						{ConfigMap: &v1.ConfigMapProjection{LocalObjectReference: v1.LocalObjectReference{Name: "kube-root-ca.crt"},
							Items: []v1.KeyToPath{{Key: "ca.crt", Path: "ca.crt"}}}},
						{DownwardAPI: &v1.DownwardAPIProjection{Items: []v1.DownwardAPIVolumeFile{
							{Path: "meta/namespace", FieldRef: &v1.ObjectFieldSelector{FieldPath: "metadata.namespace"}}}}},
					},
				}}},
				{Name: "certs", VolumeSource: v1.VolumeSource{Secret: &v1.SecretVolumeSource{SecretName: "certs", DefaultMode: ptrMode(0o400)}}},
			},
		},
	}
}

func ptrMode(m int32) *int32 { return &m }

// setUpVolumes runs the kubelet's volume setup for pod into a directory
// every user can reach (as a bind mount makes the volume reachable in the
// container).
func setUpVolumes(t *testing.T, pod *v1.Pod) map[string]string {
	t.Helper()
	dir := t.TempDir()
	for _, d := range []string{filepath.Dir(dir), dir} {
		if err := os.Chmod(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	p := &podRun{r: &runner{api: volumeAPI{}, cfg: &Config{}}, dir: dir, pod: pod, tokens: map[string]tokenEntry{},
		log: slog.New(slog.NewTextHandler(io.Discard, nil))}
	vols, err := p.setupVolumes(context.Background(), pod)
	if err != nil {
		t.Fatal(err)
	}
	return vols
}

// owner returns path's uid, gid and permission bits.
func owner(t *testing.T, path string) (int, int, os.FileMode) {
	t.Helper()
	st, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	sys := st.Sys().(*syscall.Stat_t)
	return int(sys.Uid), int(sys.Gid), st.Mode() & (os.ModePerm | os.ModeSetgid)
}

// readAs reads path as a process with uid, gid and groups, as a container
// would after the kubelet drops root.
func readAs(path string, uid, gid uint32, groups ...uint32) (string, error) {
	cmd := exec.Command("cat", path)
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uid, Gid: gid, Groups: groups}}
	out, err := cmd.CombinedOutput()
	return string(out), err
}

func needRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Fatal("needs root (chown, and reading as other users): run the tests as root, as make test and CI do")
	}
}

func TestSetupVolumes_FSGroupAndUserOwnFilesAsAKubeletMakesThem(t *testing.T) {
	needRoot(t)
	// istiod-lite in the chart: runAsUser 1337 for the whole pod, plus an
	// fsGroup as many charts set.
	pod := volumePod(&v1.PodSecurityContext{RunAsUser: i64(1337), RunAsGroup: i64(1337), FSGroup: i64(2000)},
		v1.Container{Name: "discovery"})
	vols := setUpVolumes(t, pod)
	api, certs := vols["kube-api-access"], vols["certs"]

	for _, tc := range []struct {
		file     string
		uid, gid int
		mode     os.FileMode
	}{
		// The token is the pod user's, group-readable through the fsGroup.
		{filepath.Join(api, "token"), 1337, 2000, 0o640},
		{filepath.Join(api, "ca.crt"), 0, 2000, 0o644},
		{filepath.Join(api, "meta/namespace"), 0, 2000, 0o644},
		// 0400 plus group read for the fsGroup.
		{filepath.Join(certs, "key.pem"), 0, 2000, 0o440},
		{filepath.Join(api, "meta"), 0, 2000, 0o755 | os.ModeSetgid},
		{api, 0, 2000, 0o755 | os.ModeSetgid},
	} {
		uid, gid, mode := owner(t, tc.file)
		if uid != tc.uid || gid != tc.gid || mode != tc.mode {
			t.Errorf("%s: %d:%d %v, want %d:%d %v", filepath.Base(tc.file), uid, gid, mode, tc.uid, tc.gid, tc.mode)
		}
	}
	// What the container sees: its user (with the fsGroup as a
	// supplementary group, as runAs gives it) reads everything; another
	// user without the group reads neither the token nor the secret.
	for _, f := range []string{filepath.Join(api, "token"), filepath.Join(api, "ca.crt"), filepath.Join(certs, "key.pem")} {
		if _, err := readAs(f, 1337, 1337, 2000); err != nil {
			t.Errorf("uid 1337 (fsGroup 2000) cannot read %s: %v", filepath.Base(f), err)
		}
	}
	if out, err := readAs(filepath.Join(api, "token"), 1337, 1337); err != nil || out != "token-for-istio-ca" {
		t.Errorf("uid 1337 without the fsGroup reads its token as %q, %v", out, err)
	}
	for _, f := range []string{filepath.Join(api, "token"), filepath.Join(certs, "key.pem")} {
		if _, err := readAs(f, 4242, 4242); err == nil {
			t.Errorf("uid 4242, outside the pod's user and fsGroup, read %s", filepath.Base(f))
		}
	}

	// A refresh keeps the ownership (the volume manager rewrites files).
	p := &podRun{r: &runner{api: volumeAPI{}, cfg: &Config{}}, pod: pod, tokens: map[string]tokenEntry{}}
	files, err := p.volumeFiles(context.Background(), pod, &pod.Spec.Volumes[0])
	if err != nil {
		t.Fatal(err)
	}
	files["token"] = volFile{data: []byte("renewed"), mode: files["token"].mode, uid: files["token"].uid}
	if err := writeVolumeFiles(api, files, pod.Spec.SecurityContext.FSGroup); err != nil {
		t.Fatal(err)
	}
	if out, err := readAs(filepath.Join(api, "token"), 1337, 1337); err != nil || out != "renewed" {
		t.Errorf("after renewal uid 1337 reads its token as %q, %v", out, err)
	}
}

func TestSetupVolumes_TokenOwnerWithoutFSGroup(t *testing.T) {
	needRoot(t)
	t.Run("AllContainersShareAUser", func(t *testing.T) {
		pod := volumePod(&v1.PodSecurityContext{RunAsUser: i64(1337)}, v1.Container{Name: "a"}, v1.Container{Name: "b"})
		api := setUpVolumes(t, pod)["kube-api-access"]
		if uid, gid, mode := owner(t, filepath.Join(api, "token")); uid != 1337 || gid != 0 || mode != 0o600 {
			t.Errorf("token %d:%d %v, want 1337:0 0600", uid, gid, mode)
		}
		if _, err := readAs(filepath.Join(api, "token"), 1337, 1337); err != nil {
			t.Errorf("the pod's user cannot read its token: %v", err)
		}
		if _, err := readAs(filepath.Join(api, "token"), 4242, 4242); err == nil {
			t.Error("another user read the token")
		}
	})
	t.Run("ContainersDiffer", func(t *testing.T) {
		// No single owner: the volume's mode, as a kubelet leaves it.
		pod := volumePod(nil,
			v1.Container{Name: "a", SecurityContext: &v1.SecurityContext{RunAsUser: i64(1000)}},
			v1.Container{Name: "b", SecurityContext: &v1.SecurityContext{RunAsUser: i64(1001)}})
		api := setUpVolumes(t, pod)["kube-api-access"]
		if uid, gid, mode := owner(t, filepath.Join(api, "token")); uid != 0 || gid != 0 || mode != 0o644 {
			t.Errorf("token %d:%d %v, want 0:0 0644", uid, gid, mode)
		}
		for _, u := range []uint32{1000, 1001} {
			if _, err := readAs(filepath.Join(api, "token"), u, u); err != nil {
				t.Errorf("container user %d cannot read the token: %v", u, err)
			}
		}
	})
}
