#!/usr/bin/env bash
# Installs what the data-plane benchmarks (bench/l4*, bench/l7) run besides
# meshlite itself: load generators and the peer proxies the mesh is compared
# with. Idempotent: Debian packages already installed are not touched, and
# the pinned Go tools are built once into .cache/tools/bin (kept while their
# version stamp matches). Prints the tools directory on success.
#
#   apt:  iperf3, wrk, nghttp2-client (h2load), nginx, haproxy, stunnel4
#   go:   fortio v1.68.2 (go install), ghostunnel v1.8.4 (go mod download + build)
#
# BENCH_TOOLS_FORCE=1 rebuilds the Go tools.
set -euo pipefail

fortio_version=v1.68.2
ghostunnel_version=v1.8.4
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bin="$root/.cache/tools/bin"
mkdir -p "$bin"

log() { echo "bench-tools: $*" >&2; }

# --- Debian packages ---------------------------------------------------------
apt_pkgs=(iperf3 wrk nghttp2-client nginx haproxy stunnel4)
missing=()
for p in "${apt_pkgs[@]}"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [[ ${#missing[@]} -gt 0 ]]; then
	log "apt-get install ${missing[*]}"
	apt-get update -qq
	# The packages' own services are not wanted: the benchmarks start every
	# server themselves inside the sandbox's pod namespaces. policy-rc.d keeps
	# dpkg from starting nginx/haproxy/stunnel/iperf3 daemons on the host.
	policy=/usr/sbin/policy-rc.d
	had_policy=0
	[[ -e $policy ]] && had_policy=1
	if [[ $had_policy -eq 0 ]]; then
		printf '#!/bin/sh\nexit 101\n' >"$policy"
		chmod +x "$policy"
	fi
	# iperf3 asks (debconf) whether to start a daemon; answer no.
	echo "iperf3 iperf3/start_daemon boolean false" | debconf-set-selections 2>/dev/null || true
	rc=0
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null || rc=$?
	[[ $had_policy -eq 0 ]] && rm -f "$policy"
	[[ $rc -eq 0 ]] || { log "apt-get install failed ($rc)"; exit "$rc"; }
fi

# --- Go tools (pinned) ---------------------------------------------------------
stamp_ok() { [[ -x "$bin/$1" && -f "$bin/.$1.version" && "$(cat "$bin/.$1.version")" == "$2" && -z "${BENCH_TOOLS_FORCE:-}" ]]; }

if ! stamp_ok fortio "$fortio_version"; then
	log "go install fortio.org/fortio@$fortio_version"
	# Outside any module, so the pin is exactly this version.
	(cd / && GOFLAGS= CGO_ENABLED=0 GOBIN="$bin" go install -trimpath fortio.org/fortio@"$fortio_version")
	echo "$fortio_version" >"$bin/.fortio.version"
fi

if ! stamp_ok ghostunnel "$ghostunnel_version"; then
	mod=github.com/ghostunnel/ghostunnel
	log "go mod download $mod@$ghostunnel_version"
	dir="$(cd / && GOFLAGS= go mod download -json "$mod@$ghostunnel_version" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')"
	[[ -n $dir && -f $dir/go.mod ]] || { log "go mod download $mod@$ghostunnel_version gave no source"; exit 1; }
	log "build ghostunnel from $dir"
	# Built in its own module (its go.mod and go.sum pin its dependencies;
	# its vendor/ is incomplete in the module zip, hence -mod=mod). With cgo:
	# its certloader only compiles with the PKCS#11 (cgo) variant.
	(cd "$dir" && GOFLAGS=-mod=mod CGO_ENABLED=1 go build -trimpath -o "$bin/ghostunnel" .)
	echo "$ghostunnel_version" >"$bin/.ghostunnel.version"
fi

for t in iperf3 wrk h2load nginx haproxy stunnel4; do
	command -v "$t" >/dev/null || { log "$t not on PATH after install"; exit 1; }
done
echo "$bin"
