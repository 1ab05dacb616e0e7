#!/usr/bin/env bash
# One node's share of a multi-node run: start it on EVERY node with the same MASTER_ADDR, NNODES and RUN_ID.
#
#   MASTER_ADDR=node0 NNODES=2 NODE_RANK=0 RUN_ID=sft-0412 launch/multinode.sh [config] [--config.field=value ...]
#   MASTER_ADDR=node0 NNODES=2 NODE_RANK=1 RUN_ID=sft-0412 launch/multinode.sh [config] [--config.field=value ...]
#
# torchrun's c10d rendezvous on MASTER_ADDR:MASTER_PORT gathers the nodes; cluster.num_nodes is set to NNODES, so
# hybrid_shard shards within a node and replicates across nodes. logs/<RUN_ID>/ must be on a filesystem all nodes
# share (rank 0 writes the run directory there; each node writes its console to node<NODE_RANK>.log).
#   NPROC_PER_NODE  processes per node (default: the number of local GPUs; 1 without a GPU)
#   MASTER_PORT     rendezvous port on MASTER_ADDR (default 29500)
#   LOG_DIR         log directory instead of logs/<RUN_ID>
#   PYTHON          interpreter (default: python)
# Under Slurm, NODE_RANK, NNODES, MASTER_ADDR and RUN_ID default from the job (see launch/slurm.sbatch).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python}"
NNODES="${NNODES:-${SLURM_NNODES:-}}"
NODE_RANK="${NODE_RANK:-${SLURM_NODEID:-}}"
RUN_ID="${RUN_ID:-${SLURM_JOB_ID:-}}"
: "${MASTER_ADDR:?set MASTER_ADDR to the hostname of the first node}"
: "${NNODES:?set NNODES to the number of nodes}"
: "${NODE_RANK:?set NODE_RANK to the index of this node (0..NNODES-1)}"
: "${RUN_ID:?set RUN_ID to the same name on every node (it names the rendezvous and logs/<RUN_ID>/)}"
MASTER_PORT="${MASTER_PORT:-29500}"
CONFIG="${1:-$REPO/configs/robo2vlm.py}"
if [[ $# -gt 0 ]]; then shift; fi

GPUS="$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())')"
if [[ "$GPUS" -gt 0 ]]; then
    NPROC="${NPROC_PER_NODE:-$GPUS}"
else
    NPROC="${NPROC_PER_NODE:-1}"
    CORES="$(nproc)"
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( CORES / NPROC > 0 ? CORES / NPROC : 1 ))}"
fi

# SIGUSR1 asks the ranks to checkpoint and stop (launch/slurm.sbatch). This shell, torchrun and tee ignore it (torchrun
# would die of it); the workers inherit the ignored disposition and replace it with their own handler.
trap '' USR1

LOG_DIR="${LOG_DIR:-$REPO/logs/$RUN_ID}"
mkdir -p "$LOG_DIR"
LOG="$LOG_DIR/node$NODE_RANK.log"
echo "vlm-sft: node $NODE_RANK/$NNODES, $NPROC process(es), rendezvous $MASTER_ADDR:$MASTER_PORT ($RUN_ID)" | tee "$LOG"

"$PYTHON" -m torch.distributed.run --nnodes="$NNODES" --nproc_per_node="$NPROC" --node_rank="$NODE_RANK" \
    --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv_id="$RUN_ID" -m vlm_sft.main \
    --config="$CONFIG" --config.cluster.num_nodes="$NNODES" --config.runner.logger.log_path="$LOG_DIR" "$@" \
    2>&1 | tee -a "$LOG"
