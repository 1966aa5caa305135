#!/bin/bash
# Start a throw-away two-node Slurm cluster on this machine (root): munged, slurmctld, and one slurmd
# per "node", each slurmd in its own network and UTS namespace on a private bridge, so that the nodes
# are distinct hosts (slnode1, slnode2) as on a real cluster. Names, addresses, ports and munged's
# socket derive from DYMU_SLURM_DIR (env.sh): a second cluster with another folder runs beside the
# first. Debian's slurm-wlm and munge (and
# iproute2) are installed with apt when missing. Traffic stays on loopback and on the bridge: the
# namespaces have no other route.
# Then: `export SLURM_CONF=/tmp/dymu-slurm/slurm.conf` (printed at the end) and use sbatch/srun/squeue.
# Stop it with down.sh.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
source "$HERE/env.sh"

if [ "$(id -u)" != 0 ]; then echo "error: up.sh needs root (namespaces, daemons)" >&2; exit 2; fi
if [ -e "/sys/class/net/$BRIDGE" ] || [ -s "$D/pids" ] || [ -e "/run/netns/${NODES[0]}" ]; then
  echo "error: a local cluster seems to be running already ($BRIDGE or ${NODES[0]} exists, or $D/pids is not" \
       "empty); run down.sh with the same DYMU_SLURM_DIR, or start another with a different DYMU_SLURM_DIR" >&2
  exit 2
fi

missing=()
command -v slurmctld >/dev/null && command -v slurmd >/dev/null || missing+=(slurm-wlm)
command -v munged >/dev/null || missing+=(munge)
command -v ip >/dev/null || missing+=(iproute2)
if [ "${#missing[@]}" != 0 ]; then
  echo "installing ${missing[*]} with apt-get"
  apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
fi

rm -rf "$D"
mkdir -p "$D/ctld" "$MUNGE_DIR"
for node in "${NODES[@]}"; do mkdir -p "$D/spool-$node"; done  # slurmd does not create its spool dir
chown munge:munge "$MUNGE_DIR"
[ -s /etc/munge/munge.key ] || setpriv --reuid=munge --regid=munge --init-groups mungekey --create
: > "$D/pids"

# The bridge (the controller's address) and one namespace per node, joined to it by a veth pair.
ip link add "$BRIDGE" type bridge
echo "bridge $BRIDGE" >> "$D/created"   # down.sh removes what is listed here, nothing else
ip addr add "$SUB.1/24" dev "$BRIDGE"
ip link set "$BRIDGE" up
CTL=$(hostname -s)
printf '127.0.0.1 localhost\n%s %s\n' "$SUB.1" "$CTL" > "$D/hosts"
NODE_LINES=""
for i in "${!NODES[@]}"; do
  node=${NODES[$i]}; n=$((i + 1))
  ip netns add "$node"
  echo "netns $node" >> "$D/created"
  ip link add "${VETH}${n}h" type veth peer name snet0 netns "$node"
  echo "veth ${VETH}${n}h" >> "$D/created"
  ip link set "${VETH}${n}h" master "$BRIDGE" up
  ip -n "$node" addr add "$SUB.1$n/24" dev snet0
  ip -n "$node" link set snet0 up
  ip -n "$node" link set lo up
  echo "$SUB.1$n $node" >> "$D/hosts"
  # CPUs must not exceed the real cores, or slurmd drains the node; both nodes share them.
  NODE_LINES+="NodeName=$node NodeHostname=$node NodeAddr=$SUB.1$n CPUs=$(nproc) RealMemory=1000 State=UNKNOWN"$'\n'
done

cat > "$SLURM_CONF" <<CONF
ClusterName=dymulocal${TAG}
SlurmctldHost=$CTL($SUB.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$MUNGE_DIR/munge.socket.2
CredType=cred/munge
MpiDefault=none
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SwitchType=switch/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
StateSaveLocation=$D/ctld
SlurmdSpoolDir=$D/spool-%n
SlurmctldPidFile=$D/slurmctld.pid
SlurmdPidFile=$D/slurmd-%n.pid
SlurmctldLogFile=$D/slurmctld.log
SlurmdLogFile=$D/slurmd-%n.log
SlurmctldPort=$CTLD_PORT
SlurmdPort=$((CTLD_PORT + 1))
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=300
KillWait=5
Waittime=0
SlurmctldDebug=info
SlurmdDebug=info
${NODE_LINES}PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF

# Each daemon runs in the foreground and `$!` is its own PID (setpriv, unshare, sh -c exec and
# nsenter without --fork all exec), so down.sh stops exactly these processes.
setpriv --reuid=munge --regid=munge --init-groups /usr/sbin/munged --foreground \
  --socket="$MUNGE_DIR/munge.socket.2" --pid-file="$MUNGE_DIR/munged.pid" --seed-file="$MUNGE_DIR/munged.seed" \
  --log-file="$MUNGE_DIR/munged.log" > "$D/munged.out" 2>&1 &
echo "munged $!" >> "$D/pids"
for _ in $(seq 50); do munge -n --socket="$MUNGE_DIR/munge.socket.2" >/dev/null 2>&1 && break; sleep 0.1; done
slurmctld -D -i > "$D/slurmctld.out" 2>&1 &
echo "slurmctld $!" >> "$D/pids"
for node in "${NODES[@]}"; do
  "$HERE/on-node.sh" "$node" slurmd -D > "$D/slurmd-$node.out" 2>&1 &
  echo "slurmd-$node $!" >> "$D/pids"
done
for _ in $(seq 150); do
  [ "$(sinfo -h -N -t idle -o %N 2>/dev/null | sort -u | wc -l)" = "${#NODES[@]}" ] && break
  sleep 0.2
done
if [ "$(sinfo -h -N -t idle -o %N 2>/dev/null | sort -u | wc -l)" != "${#NODES[@]}" ]; then
  echo "error: the nodes did not come up; see $D/*.out and $D/*.log" >&2
  sinfo -N >&2 || true
  exit 1
fi
sinfo -N
echo "cluster up: export SLURM_CONF=$SLURM_CONF"
