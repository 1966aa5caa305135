# Shared settings of the local test cluster (sourced by up.sh, down.sh and on-node.sh).
# Every name this cluster creates on the machine (namespaces, veths, bridge, subnet, ports) derives
# from DYMU_SLURM_DIR, so clusters with different folders never touch each other's. The default
# folder keeps the short names: slnode1, slnode2, veths sl1h, sl2h, slbr0, 10.250.77.0/24, ports 6817-6818.
D=${DYMU_SLURM_DIR:-/tmp/dymu-slurm}   # config, state, logs and PIDs of the daemons
if [ "$D" = /tmp/dymu-slurm ]; then
  TAG=""; NUM=0
else
  NUM=$(( $(printf '%s' "$D" | cksum | cut -d' ' -f1) % 200 + 1 ))   # 1..200, one per folder
  TAG=$(printf '%03d' "$NUM")
fi
SUB=${DYMU_SLURM_SUBNET:-10.$((250 - NUM / 100)).$((77 + NUM % 100))}  # private /24: .1 controller, .11, .12 nodes
BRIDGE=${DYMU_SLURM_BRIDGE:-slbr${TAG:-0}}
NODES=("sl${TAG}node1" "sl${TAG}node2")  # node i: namespace and hostname ${NODES[i-1]}, address $SUB.1$i
VETH=sl${TAG:+${TAG}v}                 # host end of node i's veth: ${VETH}${i}h (at most 15 characters)
CTLD_PORT=$((6817 + 2 * NUM))          # slurmctld's port; slurmd listens on the next one
MUNGE_DIR=/run/munge                   # munged's socket, PID, seed and log: its own folder for a
[ -n "$TAG" ] && MUNGE_DIR=$D/munge    # non-default cluster, so that two munged never share a socket
export SLURM_CONF=$D/slurm.conf        # clients, daemons and jobs read this file, never /etc/slurm
