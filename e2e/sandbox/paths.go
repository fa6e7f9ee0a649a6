package sandbox

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/meshlite/meshlite/e2e/cluster"
)

// ModulePath is the repository's Go module, used to recognise its root.
const ModulePath = "github.com/meshlite/meshlite"

// CNIPluginsVersion is the containernetworking/plugins release
// hack/cni-plugins.sh builds.
const CNIPluginsVersion = "v1.6.2"

// DefaultStateDir holds a running sandbox's files unless
// $MESHLITE_SANDBOX_DIR names another.
const DefaultStateDir = "/var/lib/meshlite-sandbox"

// StateDirFromEnv returns $MESHLITE_SANDBOX_DIR or DefaultStateDir.
func StateDirFromEnv() string {
	if d := os.Getenv("MESHLITE_SANDBOX_DIR"); d != "" {
		return absDir(d)
	}
	return DefaultStateDir
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
