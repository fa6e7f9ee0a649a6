#!/usr/bin/env bash
# make demo: brings up the sandbox cluster, deploys the sample app across both
# nodes and sends a request from one node's pod to the other's. The mesh
# (istiod-lite, CNI, ztunnel, meshctl: issues #4-#7) is not written yet, so
# this shows the cluster the mesh will run on, and says plainly that the
# traffic it shows is not yet mTLS. `make down` removes everything.
set -euo pipefail
cd "$(dirname "$0")/.."
bin/sandbox up
kc=(kubectl --kubeconfig "$(bin/sandbox kubeconfig)")
"${kc[@]}" apply -f - <<'YAML' >/dev/null
apiVersion: v1
kind: Namespace
metadata:
  name: demo
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: echo
  namespace: demo
spec:
  replicas: 2
  selector:
    matchLabels: {app: echo}
  template:
    metadata:
      labels: {app: echo}
    spec:
      topologySpreadConstraints:
      - maxSkew: 1
        topologyKey: kubernetes.io/hostname
        whenUnsatisfiable: DoNotSchedule
        labelSelector:
          matchLabels: {app: echo}
      containers:
      - name: echo
        image: meshlite/echo:dev
        args: [server, --http-ports, "8080"]
        readinessProbe:
          httpGet: {path: /, port: 8080}
---
apiVersion: v1
kind: Service
metadata:
  name: echo
  namespace: demo
spec:
  selector: {app: echo}
  ports:
  - {name: http, port: 80, targetPort: 8080}
YAML
"${kc[@]}" -n demo rollout status deploy/echo --timeout=120s
"${kc[@]}" -n demo get pods -o wide
mapfile -t pods < <("${kc[@]}" -n demo get pods -l app=echo -o jsonpath='{range .items[*]}{.metadata.name}{"\n"}{end}')
dst_ip=$("${kc[@]}" -n demo get pod "${pods[1]}" -o jsonpath='{.status.podIP}')
echo
echo "request from demo/${pods[0]} to demo/${pods[1]} ($dst_ip), across nodes:"
bin/sandbox exec "demo/${pods[0]}" -- "$PWD/bin/echo" client -n 3 "http://$dst_ip:8080/demo"
echo
echo "NOTE: the mesh is not installed yet (istiod-lite, CNI, ztunnel and meshctl are issues #4-#7),"
echo "      so this request travelled in plaintext. 'make down' removes the sandbox."
