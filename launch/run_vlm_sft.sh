#!/usr/bin/env bash
# Train (or evaluate) on this machine: one process per local GPU (NCCL), or CPU processes (gloo) without a GPU.
#
#   launch/run_vlm_sft.sh [config] [--config.field=value ...] [--mode=eval]
#   launch/run_vlm_sft.sh configs/robo2vlm.py:demo                       # the tiny demo
#   launch/run_vlm_sft.sh configs/robo2vlm.py --config.actor.model.model_path=/models/Qwen2.5-VL-3B-Instruct \
#       --config.data.train_data_paths=/data/Robo2VLM-1/data --config.data.eval_data_paths=/data/Robo2VLM-1/data
#
# config defaults to configs/robo2vlm.py. Logs go to logs/<timestamp>/: the console of all ranks in run.log, and
# the run directory (metrics.jsonl, tensorboard/, config.json) under it, as runner.logger.log_path. Environment:
#   NPROC_PER_NODE  processes to start (default: the number of local GPUs; 1 without a GPU)
#   LOG_DIR         log directory instead of logs/<timestamp>
#   PYTHON          interpreter (default: python)
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python}"
CONFIG="${1:-$REPO/configs/robo2vlm.py}"
if [[ $# -gt 0 ]]; then shift; fi
if [[ "$CONFIG" == --* ]]; then
    echo "error: the first argument is the config (e.g. configs/robo2vlm.py:demo); overrides come after it" >&2
    exit 2
fi

GPUS="$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())')"
if [[ "$GPUS" -gt 0 ]]; then
    NPROC="${NPROC_PER_NODE:-$GPUS}"
    DEVICE="$NPROC GPU process(es), nccl"
else
    NPROC="${NPROC_PER_NODE:-1}"
    # torchrun would set 1 thread per process; share this machine's cores between the processes instead.
    CORES="$(nproc)"
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( CORES / NPROC > 0 ? CORES / NPROC : 1 ))}"
    DEVICE="$NPROC CPU process(es) x $OMP_NUM_THREADS thread(s), gloo"
fi

# SIGUSR1 (e.g. `kill -USR1 -<process group>`) asks the ranks to checkpoint and stop: this shell, torchrun and tee
# ignore it (torchrun would die of it); the workers inherit that and replace it with their own handler.
trap '' USR1

LOG_DIR="${LOG_DIR:-$REPO/logs/$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$LOG_DIR"
echo "vlm-sft: $CONFIG on $DEVICE; logs in $LOG_DIR" | tee "$LOG_DIR/run.log"

# The user's overrides come after ours, so they win (absl: the last value of a flag counts).
"$PYTHON" -m torch.distributed.run --standalone --nnodes=1 --nproc_per_node="$NPROC" -m vlm_sft.main \
    --config="$CONFIG" --config.runner.logger.log_path="$LOG_DIR" "$@" 2>&1 | tee -a "$LOG_DIR/run.log"
