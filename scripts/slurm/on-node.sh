#!/bin/bash
# Run a command as if on node NAME of the local cluster: in its network namespace, with its hostname
# and the cluster's hosts file. up.sh starts each slurmd this way; jobs inherit it. Also how a
# developer starts torchrun on a node by hand:  scripts/slurm/on-node.sh slnode1 torchrun ...
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
source "$HERE/env.sh"
node=$1; shift
# `ip netns exec` would remount /sys, hiding /sys/fs/cgroup from slurmd (which then refuses to
# start); nsenter enters only the network namespace. The private mount namespace carries the hosts
# file, the UTS namespace the hostname, so node names resolve to bridge addresses inside jobs.
exec unshare --uts --mount sh -c 'mount --bind "$1" /etc/hosts && hostname "$2" && shift 2 && exec nsenter --net="/run/netns/$0" "$@"' \
  "$node" "$D/hosts" "$node" "$@"
