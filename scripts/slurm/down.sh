#!/bin/bash
# Stop what up.sh started, by PID, and remove its namespaces and bridge. Safe to run twice.
HERE=$(cd "$(dirname "$0")" && pwd)
source "$HERE/env.sh"
# Cancel jobs first: job steps would outlive their slurmd.
if [ -s "$D/pids" ]; then
  squeue -h -o %i 2>/dev/null | xargs -r scancel 2>/dev/null || true
  for _ in $(seq 50); do [ -z "$(squeue -h 2>/dev/null)" ] && break; sleep 0.1; done
  # The Slurm daemons together (each takes a few seconds to exit), munged, which they use, last.
  stop() {
    for entry in "$@"; do kill -TERM "${entry#* }" 2>/dev/null && echo "stopped $entry"; done
    for entry in "$@"; do
      pid=${entry#* }
      for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null && echo "killed $entry"
    done
  }
  mapfile -t slurm < <(grep -v '^munged ' "$D/pids")
  mapfile -t munge < <(grep '^munged ' "$D/pids")
  stop "${slurm[@]}"
  stop "${munge[@]}"
  : > "$D/pids"
fi
for i in "${!NODES[@]}"; do ip netns del "${NODES[$i]}" 2>/dev/null || true; done
ip link del "$BRIDGE" 2>/dev/null || true
# Namespace removal is asynchronous: wait for the host ends of the veths to go before a restart.
for _ in $(seq 50); do
  left=0
  for i in "${!NODES[@]}"; do ip link show "sl$((i + 1))h" >/dev/null 2>&1 && left=1; done
  [ "$left" = 0 ] && break
  sleep 0.1
done
exit 0
