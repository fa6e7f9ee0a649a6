// Package images builds meshlite's container images without a container
// engine: each image is one layer of static binaries on an empty base, with
// its entrypoint and user set, written as an OCI image layout tarball (what
// `skopeo copy oci-archive:...`, `crane push` or a registry import take).
// It owns the image contents and their reproducibility (fixed timestamps
// and ownership, so the same binaries give the same digest); building the
// binaries is the caller's (hack/images.sh).
package images

import (
	"archive/tar"
	"bytes"
	"debug/elf"
	"errors"
	"fmt"
	"io"
	"os"
	"path"
	"path/filepath"
	"runtime"
	"sort"
	"strings"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

// BinDir is where binaries go inside every image.
const BinDir = "/usr/local/bin"

// Users the images run as. Non-root wherever the component allows it.
const (
	// UserRoot is for ztunnel and the CNI agent: they enter other pods'
	// network namespaces (setns needs CAP_SYS_ADMIN over the namespace's
	// owner, the host's user namespace), program iptables and write the
	// node's CNI config and binaries, all root-owned host resources. The
	// chart drops every capability but NET_ADMIN, SYS_ADMIN and NET_RAW.
	UserRoot = "0:0"
	// UserMesh is Istio's proxy and control-plane uid (1337), for
	// istiod-lite and the waypoint; the chart runs istiod-lite as it too.
	UserMesh = "1337:1337"
	// UserNobody is for meshctl, a plain client.
	UserNobody = "65532:65532"
)

// Spec is one image.
type Spec struct {
	// Name is the image's repository name (istiod-lite, ztunnel, ...),
	// which the sandbox's kubelet-lite maps to bin/<Name>.
	Name string
	// Binaries are the file names (in the binaries directory) installed
	// into BinDir; the first is the entrypoint.
	Binaries []string
	// User is "uid:gid".
	User string
	// Description goes into the image's annotations.
	Description string
}

// Components are the images `make images` builds: one per component, every
// binary static.
var Components = []Spec{
	{Name: "istiod-lite", Binaries: []string{"istiod-lite"}, User: UserMesh,
		Description: "meshlite control plane: Workload API over delta xDS and the mesh CA"},
	{Name: "ztunnel", Binaries: []string{"ztunnel"}, User: UserRoot,
		Description: "meshlite node proxy: HBONE over HTTP/2 and QUIC with mTLS"},
	{Name: "waypoint", Binaries: []string{"waypoint"}, User: UserMesh,
		Description: "meshlite L7 waypoint proxy"},
	// The agent installs mesh-cni from beside its own binary onto the node.
	{Name: "cni-agent", Binaries: []string{"cni-agent", "mesh-cni"}, User: UserRoot,
		Description: "meshlite CNI node agent and the mesh-cni plugin it installs"},
	{Name: "meshctl", Binaries: []string{"meshctl"}, User: UserNobody,
		Description: "meshlite CLI"},
}

// Options are the settings every image shares.
type Options struct {
	// BinDir holds the binaries named in the specs (static, for GOOS linux).
	BinDir string
	// Arch is the GOARCH the binaries were built for (default runtime.GOARCH).
	Arch string
	// Created stamps the config and file times (default the Unix epoch, so
	// that builds are reproducible; hack/images.sh passes SOURCE_DATE_EPOCH).
	Created time.Time
	// Version becomes the org.opencontainers.image.version annotation.
	Version string
}

// Build assembles the image of s from the binaries in opts.BinDir. Every
// binary must be a statically linked ELF executable, as the image has no
// libc or loader.
func Build(s Spec, opts Options) (v1.Image, error) {
	if len(s.Binaries) == 0 {
		return nil, fmt.Errorf("image %s: no binaries", s.Name)
	}
	if opts.Arch == "" {
		opts.Arch = runtime.GOARCH
	}
	created := opts.Created.UTC()
	if created.IsZero() {
		created = time.Unix(0, 0).UTC()
	}
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	// Parent directories first, as image tools expect.
	dirs := []string{"usr", "usr/local", strings.TrimPrefix(BinDir, "/")}
	for _, d := range dirs {
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: d + "/", Mode: 0o755, ModTime: created, Format: tar.FormatPAX}); err != nil {
			return nil, fmt.Errorf("image %s: %w", s.Name, err)
		}
	}
	bins := append([]string(nil), s.Binaries...)
	sort.Strings(bins)
	for _, b := range bins {
		if b == "" || strings.ContainsRune(b, '/') {
			return nil, fmt.Errorf("image %s: bad binary name %q", s.Name, b)
		}
		src := filepath.Join(opts.BinDir, b)
		data, err := os.ReadFile(src)
		if err != nil {
			return nil, fmt.Errorf("image %s: read binary: %w", s.Name, err)
		}
		if err := checkStatic(src, data, opts.Arch); err != nil {
			return nil, fmt.Errorf("image %s: %w", s.Name, err)
		}
		hdr := &tar.Header{
			Typeflag: tar.TypeReg, Name: path.Join(strings.TrimPrefix(BinDir, "/"), b),
			Mode: 0o755, Size: int64(len(data)), ModTime: created, Format: tar.FormatPAX,
		}
		if err := tw.WriteHeader(hdr); err != nil {
			return nil, fmt.Errorf("image %s: %w", s.Name, err)
		}
		if _, err := tw.Write(data); err != nil {
			return nil, fmt.Errorf("image %s: %w", s.Name, err)
		}
	}
	if err := tw.Close(); err != nil {
		return nil, fmt.Errorf("image %s: %w", s.Name, err)
	}
	layerBytes := buf.Bytes()
	layer, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) {
		return io.NopCloser(bytes.NewReader(layerBytes)), nil
	}, tarball.WithMediaType(types.OCILayer))
	if err != nil {
		return nil, fmt.Errorf("image %s: layer: %w", s.Name, err)
	}

	base := mutate.MediaType(empty.Image, types.OCIManifestSchema1)
	base = mutate.ConfigMediaType(base, types.OCIConfigJSON)
	img, err := mutate.Append(base, mutate.Addendum{
		Layer:     layer,
		History:   v1.History{Created: v1.Time{Time: created}, CreatedBy: "meshlite deploy/images", Comment: strings.Join(s.Binaries, " ")},
		MediaType: types.OCILayer,
	})
	if err != nil {
		return nil, fmt.Errorf("image %s: %w", s.Name, err)
	}
	cf, err := img.ConfigFile()
	if err != nil {
		return nil, fmt.Errorf("image %s: %w", s.Name, err)
	}
	cf = cf.DeepCopy()
	cf.Architecture = opts.Arch
	cf.OS = "linux"
	cf.Created = v1.Time{Time: created}
	cf.Config = v1.Config{
		Entrypoint: []string{path.Join(BinDir, s.Binaries[0])},
		User:       s.User,
		Env:        []string{"PATH=" + BinDir + ":/usr/bin:/bin"},
		WorkingDir: "/",
		Labels:     annotations(s, opts),
	}
	img, err = mutate.ConfigFile(img, cf)
	if err != nil {
		return nil, fmt.Errorf("image %s: config: %w", s.Name, err)
	}
	return img, nil
}

func annotations(s Spec, opts Options) map[string]string {
	a := map[string]string{
		"org.opencontainers.image.title":       s.Name,
		"org.opencontainers.image.description": s.Description,
		"org.opencontainers.image.source":      "https://github.com/meshlite/meshlite",
		"org.opencontainers.image.licenses":    "Apache-2.0",
	}
	if opts.Version != "" {
		a["org.opencontainers.image.version"] = opts.Version
	}
	return a
}

var elfMachine = map[string]elf.Machine{
	"amd64": elf.EM_X86_64, "arm64": elf.EM_AARCH64, "386": elf.EM_386, "arm": elf.EM_ARM,
	"riscv64": elf.EM_RISCV, "ppc64le": elf.EM_PPC64, "s390x": elf.EM_S390,
}

// checkStatic rejects anything but a statically linked ELF executable for
// arch: a dynamic binary would fail to start in an image with no loader.
func checkStatic(name string, data []byte, arch string) error {
	f, err := elf.NewFile(bytes.NewReader(data))
	if err != nil {
		return fmt.Errorf("%s is not an ELF executable: %w", name, err)
	}
	defer f.Close()
	if f.Type != elf.ET_EXEC && f.Type != elf.ET_DYN {
		return fmt.Errorf("%s: ELF type %v is not an executable", name, f.Type)
	}
	if m, ok := elfMachine[arch]; ok && f.Machine != m {
		return fmt.Errorf("%s is built for %v, not %s", name, f.Machine, arch)
	}
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			return fmt.Errorf("%s is dynamically linked (build it with CGO_ENABLED=0)", name)
		}
	}
	return nil
}

// RefName is the reference an image is stored under in its layout
// (annotation org.opencontainers.image.ref.name): <registry>/<name>:<tag>.
func RefName(registry, name, tag string) string {
	r := strings.TrimSuffix(registry, "/")
	if r != "" {
		r += "/"
	}
	return r + name + ":" + tag
}

// WriteLayoutTar writes img as an OCI image layout, tagged ref, and packs
// that layout into the tarball at dst (replaced atomically).
func WriteLayoutTar(dst, ref string, img v1.Image) error {
	tmp, err := os.MkdirTemp(filepath.Dir(dst), ".layout-*")
	if err != nil {
		return fmt.Errorf("write %s: %w", dst, err)
	}
	defer os.RemoveAll(tmp)
	p, err := layout.Write(tmp, empty.Index)
	if err != nil {
		return fmt.Errorf("write layout for %s: %w", ref, err)
	}
	if err := p.AppendImage(img, layout.WithAnnotations(map[string]string{
		"org.opencontainers.image.ref.name": ref,
	})); err != nil {
		return fmt.Errorf("write layout for %s: %w", ref, err)
	}
	part := dst + ".part"
	if err := tarDir(tmp, part); err != nil {
		os.Remove(part)
		return fmt.Errorf("pack %s: %w", dst, err)
	}
	if err := os.Rename(part, dst); err != nil {
		return fmt.Errorf("write %s: %w", dst, err)
	}
	return nil
}

// tarDir packs the files under dir (relative names, sorted, fixed times)
// into the file dst.
func tarDir(dir, dst string) (err error) {
	f, err := os.Create(dst)
	if err != nil {
		return err
	}
	defer func() {
		if cerr := f.Close(); err == nil {
			err = cerr
		}
	}()
	tw := tar.NewWriter(f)
	var files []string
	if err := filepath.Walk(dir, func(p string, info os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		if p != dir {
			files = append(files, p)
		}
		return nil
	}); err != nil {
		return err
	}
	sort.Strings(files)
	for _, p := range files {
		info, err := os.Lstat(p)
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(dir, p)
		hdr := &tar.Header{Name: filepath.ToSlash(rel), ModTime: time.Unix(0, 0), Format: tar.FormatPAX}
		switch {
		case info.IsDir():
			hdr.Typeflag, hdr.Name, hdr.Mode = tar.TypeDir, hdr.Name+"/", 0o755
		case info.Mode().IsRegular():
			hdr.Typeflag, hdr.Mode, hdr.Size = tar.TypeReg, 0o644, info.Size()
		default:
			return fmt.Errorf("%s: not a file or directory", p)
		}
		if err := tw.WriteHeader(hdr); err != nil {
			return err
		}
		if hdr.Typeflag == tar.TypeReg {
			src, err := os.Open(p)
			if err != nil {
				return err
			}
			_, err = io.Copy(tw, src)
			src.Close()
			if err != nil {
				return err
			}
		}
	}
	return tw.Close()
}

// ReadLayoutTar unpacks an OCI layout tarball into dir and returns the
// image tagged ref in it.
func ReadLayoutTar(src, dir, ref string) (v1.Image, error) {
	f, err := os.Open(src)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	tr := tar.NewReader(f)
	for {
		hdr, err := tr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return nil, fmt.Errorf("read %s: %w", src, err)
		}
		name := filepath.Clean(filepath.FromSlash(hdr.Name))
		if filepath.IsAbs(name) || name == ".." || strings.HasPrefix(name, ".."+string(filepath.Separator)) {
			return nil, fmt.Errorf("read %s: entry %q escapes the layout", src, hdr.Name)
		}
		p := filepath.Join(dir, name)
		switch hdr.Typeflag {
		case tar.TypeDir:
			if err := os.MkdirAll(p, 0o755); err != nil {
				return nil, err
			}
		case tar.TypeReg:
			if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
				return nil, err
			}
			out, err := os.Create(p)
			if err != nil {
				return nil, err
			}
			_, err = io.Copy(out, tr)
			out.Close()
			if err != nil {
				return nil, fmt.Errorf("read %s: %w", src, err)
			}
		default:
			return nil, fmt.Errorf("read %s: entry %q of type %c", src, hdr.Name, hdr.Typeflag)
		}
	}
	lp, err := layout.FromPath(dir)
	if err != nil {
		return nil, fmt.Errorf("open layout of %s: %w", src, err)
	}
	idx, err := lp.ImageIndex()
	if err != nil {
		return nil, fmt.Errorf("open layout of %s: %w", src, err)
	}
	im, err := idx.IndexManifest()
	if err != nil {
		return nil, fmt.Errorf("open layout of %s: %w", src, err)
	}
	for _, d := range im.Manifests {
		if d.Annotations["org.opencontainers.image.ref.name"] == ref {
			return lp.Image(d.Digest)
		}
	}
	return nil, fmt.Errorf("%s has no image %s", src, ref)
}
