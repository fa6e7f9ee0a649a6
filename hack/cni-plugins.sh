#!/usr/bin/env bash
# Builds the reference CNI plugins the e2e sandbox wires pods with (bridge,
# host-local, loopback, portmap from containernetworking/plugins) into
# .cache/cni/<version>/. Skips the build when all are present.
set -euo pipefail

version=v1.6.2
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="$root/.cache/cni/$version"
mod=github.com/containernetworking/plugins
pkgs=(main/bridge ipam/host-local main/loopback meta/portmap)

missing=0
for p in "${pkgs[@]}"; do [[ -x "$out/${p##*/}" ]] || missing=1; done
if [[ $missing -eq 0 && -z "${CNI_PLUGINS_FORCE:-}" ]]; then
	echo "$out"
	exit 0
fi

tmp="$(mkdir -p "$root/.cache" && mktemp -d "$root/.cache/cni-build.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
args=()
for p in "${pkgs[@]}"; do args+=("$mod/plugins/$p@$version"); done
# go install pkg@version builds outside any module, exactly at the pinned
# version, whatever the caller's working directory.
(cd "$tmp" && GOFLAGS= CGO_ENABLED=0 GOBIN="$tmp" go install -trimpath -ldflags "-s -w" "${args[@]}")
mkdir -p "$out"
for p in "${pkgs[@]}"; do mv -f "$tmp/${p##*/}" "$out/"; done
echo "$out"
