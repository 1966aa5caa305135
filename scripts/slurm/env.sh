# Shared settings of the local test cluster (sourced by up.sh, down.sh and on-node.sh).
# Override any of them in the environment to run a second cluster beside a first.
D=${DYMU_SLURM_DIR:-/tmp/dymu-slurm}   # config, state, logs and PIDs of the daemons
SUB=${DYMU_SLURM_SUBNET:-10.250.77}   # private /24 on the bridge: .1 controller, .11 and .12 the nodes
BRIDGE=${DYMU_SLURM_BRIDGE:-slbr0}
NODES=(slnode1 slnode2)                # node i has namespace slnode$i, veth sl${i}h, address $SUB.1$i
export SLURM_CONF=$D/slurm.conf        # clients, daemons and jobs read this file, never /etc/slurm
