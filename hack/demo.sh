#!/usr/bin/env bash
# make demo: the mesh, end to end, in the sandbox cluster (run as root after
# `make build deps`). It brings the sandbox up with 2 nodes (or reuses the
# running one), installs istiod-lite, the CNI agent and ztunnel from the
# Helm chart (deploy/helm/meshlite, through e2e/cmd/meshinstall as the e2e
# tests install it), deploys the sample app from examples/ (namespace demo,
# enrolled, and namespace legacy, not enrolled), waits for its traffic, and
# prints `meshctl mtls status -A`: HBONE and live mTLS for demo, TCP for
# legacy. Then it holds a plaintext connection from legacy to a demo pod,
# which meshctl flags (exit 1), and makes demo STRICT, which refuses it.
# It exits non-zero unless all of that is shown. The sandbox stays up;
# `make down` removes it.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
start=$SECONDS

if [ -t 1 ]; then B=$'\e[1m' G=$'\e[32m' R=$'\e[31m' D=$'\e[2m' N=$'\e[0m'; else B='' G='' R='' D='' N=''; fi
step() { printf '\n%s== %s%s %s(%ds)%s\n' "$B" "$*" "$N" "$D" "$((SECONDS - start))" "$N"; }
say() { printf '   %s\n' "$*"; }
pass() { printf '   %s✓%s %s\n' "$G" "$N" "$*"; }
die() {
	printf '   %s✗ %s%s\n' "$R" "$*" "$N" >&2
	exit 1
}
indent() { sed 's/^/   /'; }

[ "$(id -u)" = 0 ] || die "the sandbox needs root (network namespaces, iptables): run as root"
command -v kubectl >/dev/null || die "kubectl not found (any recent version; the sandbox serves Kubernetes 1.34)"
for b in sandbox istiod-lite cni-agent mesh-cni ztunnel echo meshctl meshinstall; do
	[ -x "bin/$b" ] || die "bin/$b missing: run make build deps first (make demo does)"
done
tmp=$(mktemp -d)
bg=()
cleanup() {
	for p in "${bg[@]}"; do kill "$p" 2>/dev/null || true; done
	rm -rf "$tmp"
}
trap cleanup EXIT

# --- 1. the cluster ---------------------------------------------------------
step "1/6 Sandbox cluster with 2 nodes"
t0=$SECONDS
# The sandbox's daemons outlive this script: they must not inherit its open
# files beyond stdio (a lock this script runs under, say `flock LOCK make
# demo`, would otherwise stay held by etcd and the kubelets until
# `make down`).
sandbox_up() {
	(
		for fd in /proc/self/fd/*; do
			fd=${fd##*/}
			[ "$fd" -gt 2 ] 2>/dev/null && eval "exec $fd>&-"
		done
		exec bin/sandbox up --nodes 2
	)
}
sandbox_up >"$tmp/up.out" 2>"$tmp/up.log" || { cat "$tmp/up.log" >&2; die "bin/sandbox up failed"; }
kubeconfig=$(bin/sandbox kubeconfig)
state=$(dirname "$kubeconfig")
export KUBECONFIG=$kubeconfig
k() { kubectl "$@"; }
meshctl() { "$repo/bin/meshctl" "$@"; }
# Server-side apply: no last-applied annotations to warn about, and objects
# the e2e tests made are taken over.
kapply() { k apply --server-side --force-conflicts -f "$1" >/dev/null; }
nodes=$(k get nodes --no-headers 2>/dev/null | wc -l)
[ "$nodes" -ge 2 ] || die "the sandbox has $nodes node(s); the demo needs 2 (bin/sandbox down, then make demo)"
pass "$nodes nodes ready in $((SECONDS - t0))s"

# --- 2. the mesh ------------------------------------------------------------
step "2/6 Mesh: istiod-lite, CNI agent, ztunnel (namespace istio-system)"
t0=$SECONDS
# The chart, with the sandbox's values (images mapped to bin/, node roots,
# istiod-lite's pod IP for ztunnel: no cluster DNS here); a mesh installed
# already (an earlier make demo's) is left as it is.
MESHLITE_SANDBOX_DIR="$state" bin/meshinstall up >"$tmp/mesh.log" 2>&1 ||
	{ cat "$tmp/mesh.log" >&2; die "installing the chart failed"; }
istiod_ip=$(k -n istio-system get pods -l app=istiod --field-selector=status.phase=Running \
	-o jsonpath='{.items[0].status.podIP}')
k -n istio-system rollout status ds/istio-cni-node --timeout=120s >/dev/null
k -n istio-system rollout status ds/ztunnel --timeout=120s >/dev/null
pass "ready in $((SECONDS - t0))s: istiod-lite at $istiod_ip:15012, a CNI agent and a ztunnel on each node"
meshctl version 2>&1 | indent

# --- 3. the app -------------------------------------------------------------
step "3/6 Sample app: examples/demo.yaml (namespace demo, enrolled), examples/legacy.yaml (legacy, not enrolled)"
t0=$SECONDS
# The STRICT step below leaves a PeerAuthentication; start from PERMISSIVE.
k -n demo delete peerauthentication default --ignore-not-found >/dev/null 2>&1 || true
kapply examples/demo.yaml
kapply examples/legacy.yaml
for ns in demo legacy; do
	k -n "$ns" rollout status deploy/echo --timeout=120s >/dev/null
done
# The clients' target: the sandbox has no cluster DNS, so the demo client
# gets the Service's ClusterIP (ztunnel carries VIP traffic for enrolled
# pods) and the legacy client an echo pod's IP (no kube-proxy outside the
# mesh).
vip=$(k -n demo get service echo -o jsonpath='{.spec.clusterIP}')
legacy_echo_ip=$(k -n legacy get pods -l app=echo --field-selector=status.phase=Running -o jsonpath='{.items[0].status.podIP}')
restart=()
for ns in demo legacy; do
	url="http://$vip:80/"
	[ "$ns" = legacy ] && url="http://$legacy_echo_ip:8080/"
	if [ "$(k -n "$ns" get configmap client-target -o jsonpath='{.data.url}')" != "$url" ]; then
		k -n "$ns" create configmap client-target --from-literal=url="$url" --dry-run=client -o yaml | kapply -
		restart+=("$ns")
	fi
done
for ns in "${restart[@]}"; do k -n "$ns" rollout restart deploy/client >/dev/null; done
for ns in demo legacy; do
	k -n "$ns" rollout status deploy/client --timeout=120s >/dev/null
done
# (Pods of the restarted clients' old ReplicaSet may still be going.)
for ns in demo legacy; do
	k get pods -n "$ns" -o wide --no-headers | awk -v ns="$ns" '$3 == "Running" { printf "   %-34s %-12s %s\n", ns "/" $1, $6, $7 }'
done
pass "running in $((SECONDS - t0))s; demo/client sends a request a second to Service echo ($vip), legacy/client to $legacy_echo_ip"

# --- 4. the verdict ---------------------------------------------------------
step "4/6 Is it mTLS? bin/meshctl mtls status -A"
t0=$SECONDS
# Wait until both ends of the client's connection are live in the
# ztunnels' tables and the verdict holds (new pods take a moment to be
# redirected and to get certificates).
ok=0
for _ in $(seq 30); do
	if meshctl mtls status -n demo -o json >"$tmp/status.json" 2>/dev/null &&
		grep -Eq '"mtls_connections": ([2-9]|[1-9][0-9]+),' "$tmp/status.json"; then
		ok=1
		break
	fi
	sleep 1
done
meshctl mtls status -A | tee "$tmp/status.txt" | indent || true
[ "$ok" = 1 ] || die "meshctl mtls status -n demo did not pass within 30s"
grep -Eq '^demo +client-.* HBONE +PERMISSIVE +(verified|annotated)' "$tmp/status.txt" || die "demo/client is not shown as HBONE"
grep -Eq '^legacy +echo-.* TCP ' "$tmp/status.txt" || die "legacy/echo is not shown as TCP"
pass "demo: HBONE, redirected into ztunnel, SPIFFE certificates, live connections all mTLS; legacy: plain TCP ($((SECONDS - t0))s)"

# --- 5. a plaintext connection into the mesh ------------------------------------
step "5/6 A plaintext connection from legacy into demo (PERMISSIVE accepts it)"
legacy_client=$(k -n legacy get pods -l app=client --field-selector=status.phase=Running -o jsonpath='{.items[0].metadata.name}')
read -r server server_ip < <(k -n demo get pods -l app=echo --field-selector=status.phase=Running \
	-o jsonpath='{range .items[*]}{.metadata.name} {.status.podIP}{"\n"}{end}' | head -1)
# One kept-alive connection, a request every 300 ms for ~9 s.
bin/sandbox exec "legacy/$legacy_client" -- "$repo/bin/echo" client -n 30 -interval 300ms \
	"http://$server_ip:8080/plaintext" >"$tmp/plain.out" 2>&1 &
bg+=($!)
flagged=0
for _ in $(seq 10); do
	sleep 0.7
	if ! meshctl mtls status -n demo >"$tmp/plain-status.txt" 2>&1; then
		grep -q 'plaintext' "$tmp/plain-status.txt" && { flagged=1; break; }
	fi
done
say "${D}\$ bin/meshctl mtls status -n demo; echo exit \$?${N}"
indent <"$tmp/plain-status.txt"
[ "$flagged" = 1 ] || die "meshctl did not flag the plaintext connection legacy/$legacy_client -> demo/$server"
say "exit 1"
pass "meshctl flags it: namespace demo is enrolled, yet legacy/$legacy_client talks to demo/$server in plaintext"

# --- 6. STRICT ---------------------------------------------------------------
step "6/6 kubectl apply -f examples/strict.yaml: namespace demo refuses plaintext"
for p in "${bg[@]}"; do kill "$p" 2>/dev/null || true; done
bg=()
kapply examples/strict.yaml
plain_ok() { bin/sandbox exec "legacy/$legacy_client" -- "$repo/bin/echo" client -timeout 2s "http://$server_ip:8080/plaintext" >/dev/null 2>&1; }
refused=0
for _ in $(seq 20); do plain_ok || { refused=1; break; }; sleep 0.5; done
[ "$refused" = 1 ] || die "under STRICT, plaintext from legacy/$legacy_client still reaches demo/$server"
pass "legacy/$legacy_client -> demo/$server:8080 in plaintext: refused"
ok=0
for _ in $(seq 20); do
	if meshctl mtls status -n demo >"$tmp/strict.txt" 2>&1 && grep -Eq '^demo +echo-.* STRICT ' "$tmp/strict.txt"; then
		ok=1
		break
	fi
	sleep 0.5
done
indent <"$tmp/strict.txt"
[ "$ok" = 1 ] || die "meshctl mtls status -n demo does not show STRICT and pass"
pass "meshctl: MODE STRICT as ztunnel enforces it, all connections mTLS, exit 0"

step "Done in $((SECONDS - start))s: traffic in namespace demo is mutual TLS over HBONE"
cat <<EOF2
   explore:  export KUBECONFIG=$kubeconfig
             bin/meshctl mtls status -A                 # the verdict (exit 1 on plaintext in an enrolled namespace)
             bin/meshctl ztunnel-config connections     # what each ztunnel proxies now
             bin/meshctl ztunnel-config workloads       # also: services, policies, certificates
             bin/meshctl enroll legacy                  # then: bin/meshctl mtls status -n legacy
             kubectl get pods -A -o wide
             kubectl -n istio-system logs ds/ztunnel
             bin/sandbox exec demo/<pod> -- bin/echo client http://$vip/
   The sandbox keeps running (namespace demo stays STRICT); 'make down' removes it.
EOF2
