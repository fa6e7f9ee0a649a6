package kubelet

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
)

// imageBinaryName is the binary an image stands for: its last path element
// without tag or digest. "docker.io/meshlite/echo:dev" -> "echo",
// "localhost:5000/ztunnel@sha256:..." -> "ztunnel".
func imageBinaryName(image string) string {
	name := image
	if i := strings.IndexByte(name, '@'); i >= 0 {
		name = name[:i]
	}
	if i := strings.LastIndexByte(name, '/'); i >= 0 {
		name = name[i+1:]
	}
	// After the last '/', a ':' can only start the tag.
	if i := strings.IndexByte(name, ':'); i >= 0 {
		name = name[:i]
	}
	return name
}

// errImageBinary marks a container whose image maps to no binary.
var errImageBinary = errors.New("no binary for image")

// findInDirs returns the first executable regular file named name in dirs.
func findInDirs(name string, dirs []string) string {
	if name == "" || name == "." || name == ".." || strings.ContainsRune(name, '/') {
		return ""
	}
	for _, d := range dirs {
		p := filepath.Join(d, name)
		if st, err := os.Stat(p); err == nil && st.Mode().IsRegular() && st.Mode()&0o111 != 0 {
			return p
		}
	}
	return ""
}

// lookups abstracts where command names resolve, for tests.
type lookups struct {
	imageDirs []string
	// hostPath finds a command on the host (exec.LookPath).
	hostPath func(string) (string, error)
}

func defaultLookups(dirs []string) lookups {
	return lookups{imageDirs: dirs, hostPath: exec.LookPath}
}

// resolveArgv turns a container's image, command and args (already expanded)
// into the argv to exec, following Kubernetes: command replaces the image's
// entrypoint, args alone are passed to the entrypoint. The image's entrypoint
// is its binary from the image dirs; a command names either that binary (by
// its base name, whatever directory the manifest gives, so
// "/usr/local/bin/ztunnel" runs our ztunnel), another binary in the image
// dirs, or a host program ("sh", "/bin/sleep"), for images like busybox.
func resolveArgv(image string, command, args []string, l lookups) ([]string, error) {
	name := imageBinaryName(image)
	bin := findInDirs(name, l.imageDirs)
	if len(command) == 0 {
		if bin == "" {
			return nil, fmt.Errorf("%w: image %q needs binary %q in %v (or a command)", errImageBinary, image, name, l.imageDirs)
		}
		return append([]string{bin}, args...), nil
	}
	c0 := command[0]
	var exe string
	switch {
	case c0 == "":
		return nil, fmt.Errorf("image %q: empty command", image)
	case bin != "" && filepath.Base(c0) == name:
		exe = bin
	case findInDirs(filepath.Base(c0), l.imageDirs) != "":
		exe = findInDirs(filepath.Base(c0), l.imageDirs)
	default:
		p, err := l.hostPath(c0)
		if err != nil {
			return nil, fmt.Errorf("%w: image %q: command %q is neither in %v nor on the host: %v", errImageBinary, image, c0, l.imageDirs, err)
		}
		if !filepath.IsAbs(p) {
			if p, err = filepath.Abs(p); err != nil {
				return nil, fmt.Errorf("resolve %q: %w", c0, err)
			}
		}
		exe = p
	}
	argv := append([]string{exe}, command[1:]...)
	return append(argv, args...), nil
}
