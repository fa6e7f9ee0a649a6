#!/usr/bin/env bash
# Runs a command with a sandbox instance of its own, so several developers
# (or suites) can use sandboxes side by side on one machine.
#
#   hack/with-sandbox.sh go test -count=1 ./e2e/meshtest/
#
# It takes the first free instance lock among $MESHLITE_SANDBOX_INSTANCES
# (default 2), waiting when all are taken, and runs the command with
# MESHLITE_SANDBOX_INSTANCE set (e2e/sandbox derives names, addresses, ports
# and the state dir from it). The lock is held by this script, not passed to
# the command, so a sandbox left running does not keep it.
set -euo pipefail
n="${MESHLITE_SANDBOX_INSTANCES:-2}"
lockfile() { if [ "$1" = 0 ]; then echo /tmp/meshlite-sandbox-use.lock; else echo "/tmp/meshlite-sandbox-use-$1.lock"; fi; }
waited=0
while :; do
  for ((i = 0; i < n; i++)); do
    exec {fd}>"$(lockfile "$i")"
    if flock -n "$fd"; then
      [ "$waited" = 0 ] || echo "with-sandbox: got instance $i" >&2
      # The command must not inherit the lock descriptor.
      MESHLITE_SANDBOX_INSTANCE="$i" "$@" {fd}>&- && rc=0 || rc=$?
      exit "$rc"
    fi
    exec {fd}>&-
  done
  [ "$waited" = 1 ] || echo "with-sandbox: all $n sandbox instances busy; waiting" >&2
  waited=1
  sleep 3
done
