#!/usr/bin/env bash
# Generates the Go code for proto/**/*.proto next to each .proto file.
#
#   hack/proto.sh          regenerate proto/**/*.pb.go in place
#   hack/proto.sh check    regenerate into a temp dir and fail if the committed
#                          files differ (run by `make test`)
#
# The code generators are pinned and installed into .cache/tools/bin (git-ignored)
# the first time. protoc itself comes from Debian 12's protobuf-compiler and its
# well-known types (google/protobuf/*.proto) from libprotobuf-dev; its version is
# written into every generated file, so it is pinned as well.
set -euo pipefail

PROTOC_WANT="libprotoc 3.21.12"
PROTOC_GEN_GO_VERSION="v1.36.12"      # must match google.golang.org/protobuf in go.mod
PROTOC_GEN_GO_GRPC_VERSION="v1.6.1"   # generated code needs google.golang.org/grpc >= v1.64

die() { echo "hack/proto.sh: $*" >&2; exit 1; }

mode="${1:-generate}"
case "$mode" in
  generate|check) ;;
  *) die "unknown mode '$mode' (usage: hack/proto.sh [check])" ;;
esac

# Work from the repo root with relative paths only, so nothing machine-specific
# ends up in the generated files.
cd "$(dirname "${BASH_SOURCE[0]}")/.."

tools_bin="$(pwd)/.cache/tools/bin"

# install_tool BINARY MODULE_PATH VERSION: installs BINARY unless the one in
# tools_bin already reports VERSION.
install_tool() {
  local bin="$1" pkg="$2" version="$3"
  if [[ -x "$tools_bin/$bin" ]] && "$tools_bin/$bin" --version 2>/dev/null | grep -qw -- "${version#v}\|$version"; then
    return
  fi
  echo "hack/proto.sh: installing $pkg@$version into .cache/tools/bin" >&2
  mkdir -p "$tools_bin"
  GOBIN="$tools_bin" GOFLAGS='' go install "$pkg@$version" \
    || die "go install $pkg@$version failed"
  "$tools_bin/$bin" --version 2>/dev/null | grep -qw -- "${version#v}\|$version" \
    || die "$bin installed but does not report version $version"
}

command -v protoc >/dev/null || die "protoc not found; apt-get install protobuf-compiler libprotobuf-dev"
have="$(protoc --version)"
[[ "$have" == "$PROTOC_WANT" ]] \
  || die "found '$have', need '$PROTOC_WANT' (Debian 12 protobuf-compiler); the version is recorded in the generated files"

# Well-known types: protoc's own include dir (next to the binary), else the
# usual system locations; PROTOC_INCLUDE overrides.
wkt_include=""
for dir in ${PROTOC_INCLUDE:-} "$(dirname "$(command -v protoc)")/../include" /usr/include /usr/local/include; do
  if [[ -f "$dir/google/protobuf/struct.proto" ]]; then
    wkt_include="$dir"
    break
  fi
done
[[ -n "$wkt_include" ]] || die "google/protobuf/struct.proto not found; apt-get install libprotobuf-dev or set PROTOC_INCLUDE"

install_tool protoc-gen-go google.golang.org/protobuf/cmd/protoc-gen-go "$PROTOC_GEN_GO_VERSION"
install_tool protoc-gen-go-grpc google.golang.org/grpc/cmd/protoc-gen-go-grpc "$PROTOC_GEN_GO_GRPC_VERSION"

mapfile -t protos < <(find proto -name '*.proto' -type f | LC_ALL=C sort)
[[ ${#protos[@]} -gt 0 ]] || die "no .proto files under proto/"

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

# Import paths are relative to proto/ ("workload/workload.proto"), and the
# output mirrors that layout, so each .pb.go lands beside its .proto.
protoc \
  -I proto -I "$wkt_include" \
  --plugin=protoc-gen-go="$tools_bin/protoc-gen-go" \
  --plugin=protoc-gen-go-grpc="$tools_bin/protoc-gen-go-grpc" \
  --go_out="$tmp" --go_opt=paths=source_relative \
  --go-grpc_out="$tmp" --go-grpc_opt=paths=source_relative \
  "${protos[@]}"

# Relative paths (under proto/) of generated files, new and committed.
list_generated() { (cd "$1" && find . -name '*.pb.go' -type f | sed 's|^\./||' | LC_ALL=C sort); }
mapfile -t fresh < <(list_generated "$tmp")
mapfile -t committed < <(list_generated proto)

if [[ "$mode" == check ]]; then
  stale=0
  declare -A is_fresh=() is_committed=()
  for f in "${fresh[@]}"; do is_fresh[$f]=1; done
  for f in "${committed[@]}"; do is_committed[$f]=1; done
  for f in "${fresh[@]}"; do
    [[ -n "${is_committed[$f]:-}" ]] || { echo "proto/$f: generated but not committed" >&2; stale=1; }
  done
  for f in "${committed[@]}"; do
    [[ -n "${is_fresh[$f]:-}" ]] || { echo "proto/$f: committed but no longer generated" >&2; stale=1; }
  done
  for f in "${fresh[@]}"; do
    [[ -f "proto/$f" ]] || continue
    if ! diff -u "proto/$f" "$tmp/$f" --label "proto/$f (committed)" --label "proto/$f (regenerated)" >&2; then
      stale=1
    fi
  done
  if [[ $stale -ne 0 ]]; then
    die "generated protobuf code is out of date; run hack/proto.sh (make proto) and commit the result"
  fi
  echo "hack/proto.sh: generated protobuf code is up to date (${#fresh[@]} files)"
  exit 0
fi

# generate: drop outputs whose .proto is gone, then copy the fresh ones in.
for f in "${committed[@]}"; do
  [[ -f "$tmp/$f" ]] || { rm -f "proto/$f"; echo "removed proto/$f"; }
done
for f in "${fresh[@]}"; do
  if ! cmp -s "$tmp/$f" "proto/$f"; then
    cp "$tmp/$f" "proto/$f"
    echo "wrote proto/$f"
  fi
done
