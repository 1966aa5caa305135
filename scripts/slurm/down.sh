#!/bin/bash
# Stop what up.sh started, by PID, and remove its namespaces and bridge. Safe to run twice. Only the
# cluster of this DYMU_SLURM_DIR: its names derive from the folder (env.sh).
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
# The namespaces and the bridge that this folder's up.sh created (listed in $D/created), and no others.
if [ -s "$D/created" ]; then
  while read -r kind name; do [ "$kind" = netns ] && { ip netns del "$name" 2>/dev/null || true; }; done < "$D/created"
  while read -r kind name; do [ "$kind" = bridge ] && { ip link del "$name" 2>/dev/null || true; }; done < "$D/created"
  # Namespace removal is asynchronous: wait for the host ends of the veths to go before a restart.
  for _ in $(seq 50); do
    left=0
    while read -r kind name; do
      [ "$kind" = veth ] && ip link show "$name" >/dev/null 2>&1 && left=1
    done < "$D/created"
    [ "$left" = 0 ] && break
    sleep 0.1
  done
  : > "$D/created"
fi
exit 0
