package sandbox

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/meshlite/meshlite/e2e/cluster"
	"github.com/meshlite/meshlite/e2e/netlab"
)

// ModulePath is the repository's Go module, used to recognise its root.
const ModulePath = "github.com/meshlite/meshlite"

// CNIPluginsVersion is the containernetworking/plugins release
// hack/cni-plugins.sh builds.
const CNIPluginsVersion = "v1.6.2"

// DefaultStateDir holds a running sandbox's files unless
// $MESHLITE_SANDBOX_DIR names another.
const DefaultStateDir = "/var/lib/meshlite-sandbox"

// StateDirFromEnv returns $MESHLITE_SANDBOX_DIR, or the state dir of the
// instance $MESHLITE_SANDBOX_INSTANCE names (DefaultStateDir for 0).
func StateDirFromEnv() string {
	if d := os.Getenv("MESHLITE_SANDBOX_DIR"); d != "" {
		return absDir(d)
	}
	if i := InstanceFromEnv(); i > 0 {
		return fmt.Sprintf("%s-%d", DefaultStateDir, i)
	}
	return DefaultStateDir
}

// InstanceFromEnv is $MESHLITE_SANDBOX_INSTANCE: several sandboxes can run
// side by side (developers running suites in parallel), each with its own
// names, addresses, ports and state dir. Unset or invalid means 0.
func InstanceFromEnv() int {
	i, err := strconv.Atoi(os.Getenv("MESHLITE_SANDBOX_INSTANCE"))
	if err != nil || i < 0 || i >= netlab.MaxInstances {
		return 0
	}
	return i
}

// instanceOfPrefix inverts netlab.PlanFor's prefix.
func instanceOfPrefix(prefix string) int {
	for i := 1; i < netlab.MaxInstances; i++ {
		if netlab.PlanFor(i, 1).Prefix == prefix {
			return i
		}
	}
	return 0
}

// absDir makes a state dir absolute and clean: it is compared with
// processes' arguments and mount points.
func absDir(d string) string {
	if a, err := filepath.Abs(d); err == nil {
		return a
	}
	return filepath.Clean(d)
}

// FindRepoRoot walks up from dir to the directory whose go.mod declares
// ModulePath.
func FindRepoRoot(dir string) (string, error) {
	dir, err := filepath.Abs(dir)
	if err != nil {
		return "", err
	}
	for d := dir; ; d = filepath.Dir(d) {
		if isRepoRoot(d) {
			return d, nil
		}
		if d == filepath.Dir(d) {
			return "", fmt.Errorf("no %s checkout above %s", ModulePath, dir)
		}
	}
}

func isRepoRoot(d string) bool {
	f, err := os.Open(filepath.Join(d, "go.mod"))
	if err != nil {
		return false
	}
	defer f.Close()
	s := bufio.NewScanner(f)
	for s.Scan() {
		if fields := strings.Fields(s.Text()); len(fields) == 2 && fields[0] == "module" {
			return fields[1] == ModulePath
		}
	}
	return false
}

// RepoRoot finds the checkout from the working directory, then from the
// running executable (bin/sandbox lives in <repo>/bin).
func RepoRoot() (string, error) {
	var errs []error
	if wd, err := os.Getwd(); err == nil {
		r, err := FindRepoRoot(wd)
		if err == nil {
			return r, nil
		}
		errs = append(errs, err)
	}
	if exe, err := os.Executable(); err == nil {
		r, err := FindRepoRoot(filepath.Dir(exe))
		if err == nil {
			return r, nil
		}
		errs = append(errs, err)
	}
	return "", fmt.Errorf("find the meshlite checkout: %w", errors.Join(errs...))
}

// KubeBinDir is where hack/kube-bins.sh puts the control-plane binaries,
// unless $MESHLITE_KUBE_BINS names another directory.
func KubeBinDir(repo string) string {
	if d := os.Getenv("MESHLITE_KUBE_BINS"); d != "" {
		return d
	}
	return filepath.Join(repo, ".cache", "kube", cluster.KubeVersion)
}

// CNIPluginDir is where hack/cni-plugins.sh puts the reference plugins.
func CNIPluginDir(repo string) string {
	return filepath.Join(repo, ".cache", "cni", CNIPluginsVersion)
}
