#!/usr/bin/env bash
# Builds the control-plane binaries the e2e sandbox runs (etcd, kube-apiserver,
# kube-controller-manager, kube-scheduler) from the pinned module tools/kube
# into .cache/kube/<version>/. Skips the build when all four are present.
#
# Usage: hack/kube-bins.sh            build if missing, print the directory
#        KUBE_BINS_FORCE=1 hack/kube-bins.sh   rebuild
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
mod="$root/tools/kube"
version="$(awk '$1=="k8s.io/kubernetes" {print $2}' "$mod/go.mod" | head -n1)"
if [[ -z "$version" ]]; then
	echo "kube-bins: cannot read the k8s.io/kubernetes version from $mod/go.mod" >&2
	exit 1
fi
out="$root/.cache/kube/$version"
bins=(etcd kube-apiserver kube-controller-manager kube-scheduler)

have_all() {
	for b in "${bins[@]}"; do [[ -x "$out/$b" ]] || return 1; done
}

if [[ -z "${KUBE_BINS_FORCE:-}" ]] && have_all; then
	echo "$out"
	exit 0
fi

major="${version#v}"; major="${major%%.*}"
minor="${version#v*.}"; minor="${minor%%.*}"
vpkg=k8s.io/component-base/version
ldflags="-s -w -X $vpkg.gitVersion=$version -X $vpkg.gitMajor=$major -X $vpkg.gitMinor=$minor"
ldflags+=" -X $vpkg.gitTreeState=clean -X $vpkg.buildDate=1970-01-01T00:00:00Z"

# Build into a temp dir and move into place, so an interrupted build never
# leaves a half-populated cache that would be taken as complete.
tmp="$(mktemp -d "$root/.cache/kube-build.XXXXXX" 2>/dev/null || { mkdir -p "$root/.cache" && mktemp -d "$root/.cache/kube-build.XXXXXX"; })"
trap 'rm -rf "$tmp"' EXIT

start=$(date +%s)
cd "$mod"
export GOFLAGS="${GOFLAGS:-} -mod=readonly"
export CGO_ENABLED=0
echo "kube-bins: building $version into $out (takes about 5 minutes on 2 cores)" >&2
go build -trimpath -ldflags "$ldflags" -o "$tmp/" \
	k8s.io/kubernetes/cmd/kube-apiserver \
	k8s.io/kubernetes/cmd/kube-controller-manager \
	k8s.io/kubernetes/cmd/kube-scheduler
go build -trimpath -ldflags "-s -w" -o "$tmp/etcd" go.etcd.io/etcd/server/v3

mkdir -p "$out"
for b in "${bins[@]}"; do mv -f "$tmp/$b" "$out/$b"; done
echo "kube-bins: done in $(( $(date +%s) - start ))s" >&2
echo "$out"
