"""Speed accounting (vlm_sft/perf.py) and the benchmark scripts' code paths on CPU."""
import os
import re
import subprocess
import sys

import pytest
import torch
import transformers
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from vlm_sft import models as model_lib
from vlm_sft import perf
from vlm_sft import step as step_lib
from vlm_sft.data.collate import collate
from vlm_sft.data.vision import VisionSpec
from vlm_sft.demo import tiny_hub_config, tiny_qwen3_vl_hub_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD = 151644, 151645, 151652, 151653, 151655


def equal_rows(rows: int, grid: tuple[int, int, int], text: int, answer: int, pixel_dim: int = 1176
               ) -> tuple[list, list, list]:
    """(sequences, pixel_values, grids) of `rows` equal rows with one image of `grid` each."""
    g = torch.Generator().manual_seed(0)
    t, h, w = grid
    ids = [IM_START, VISION_START] + [IMAGE_PAD] * (t * h * w // 4) + [VISION_END]
    ids += torch.randint(100, 5000, (text,), generator=g).tolist()
    target = torch.randint(100, 5000, (answer,), generator=g).tolist() + [IM_END]
    sequences = [(torch.tensor(ids + target), torch.tensor([-100] * len(ids) + target))] * rows
    pixels = [torch.randn(t * h * w, pixel_dim, generator=g) for _ in range(rows)]
    return sequences, pixels, [torch.tensor([grid])] * rows


# FlopCounterMode has no formula for the CPU flash attention kernels. Forward as for the GPU kernels; backward
# as twice the forward (torchtitan's count, which MFU uses): torch's backward formula adds the flash kernel's
# recompute of the scores, work a memory-saving kernel chooses to do, not work the step needs.
CPU_ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
        lambda q, k, v, *args, out_shape=None, **kwargs: sdpa_flop_count(q, k, v),
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward:
        lambda grad_out, q, k, v, *args, out_shape=None, **kwargs: 2 * sdpa_flop_count(q, k, v),
}


def test_flop_formula_equals_counted_flops(tiny_model_dir):
    """Forward + backward of a batch without padding (equal rows, window-aligned images): the formula gives what
    torch's FlopCounterMode counts over every matmul, convolution and attention the step runs."""
    model, params = model_lib.load_model(str(tiny_model_dir))
    spec = VisionSpec.from_config(model.config, pad_token_id=151643)
    batch = collate(*equal_rows(rows=3, grid=(1, 16, 8), text=21, answer=5), spec, pad_multiple=1)
    assert bool(batch["window_mask"].all()) and bool(batch["attention_mask"].all())
    loss_and_grad = step_lib.make_loss_and_grad(model)
    with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) as counter:
        loss_and_grad(params, batch, torch.tensor(1.0))
    counted = counter.get_flop_counts()["Global"]
    assert any("attention" in str(op) for op in counted), counted
    flop_model = perf.FlopModel.from_model(model.config, {k: v.shape for k, v in params.items()},
                                           model.lm_head_name)
    assert flop_model.batch_flops(batch) == pytest.approx(counter.get_total_flops(), rel=1e-3)
    assert flop_model.step_flops([batch, None, batch]) == pytest.approx(2 * flop_model.batch_flops(batch))


def test_flop_formula_skips_padding_and_padded_labels(tiny_model_dir):
    model, params = model_lib.load_model(str(tiny_model_dir))
    spec = VisionSpec.from_config(model.config, pad_token_id=151643)
    flop_model = perf.FlopModel.from_model(model.config, {k: v.shape for k, v in params.items()},
                                           model.lm_head_name)
    rows = equal_rows(rows=2, grid=(1, 8, 8), text=10, answer=3)
    plain = collate(*rows, spec, pad_multiple=1)
    padded = collate(*rows, spec, length_buckets=(128,), pad_labels=True)
    assert padded["input_ids"].shape[1] == 128 and len(padded["label_ids"]) == 16
    assert flop_model.batch_flops(padded) == pytest.approx(flop_model.batch_flops(plain), rel=1e-12)
    assert perf.padding_fraction([padded]) == pytest.approx(1 - plain["input_ids"].shape[1] / 128)
    assert perf.padding_fraction([plain, None]) == 0.0
    assert perf.real_tokens([padded, plain]) == 2 * plain["attention_mask"].sum()


def test_qwen2_5_vl_3b_parameter_counts():
    """The 3B shape from rlinf_facts.md: ~6 * 3.09e9 FLOPs per text token (text matmuls + lm_head), a ~0.67B
    vision tower. Built on the meta device: no memory, no weights."""
    config = transformers.Qwen2_5_VLConfig.from_dict(tiny_hub_config(
        text_hidden=2048, text_layers=36, text_heads=16, text_kv_heads=2, text_intermediate=11008,
        vision_hidden=1280, vision_depth=32, vision_heads=16, vision_intermediate=3420))
    assert config.vision_config.fullatt_block_indexes == [7, 15, 23, 31]
    with torch.device("meta"):
        module = transformers.Qwen2_5_VLForConditionalGeneration(config)
    shapes = {n: p.shape for n, p in module.named_parameters()}
    fm = perf.FlopModel.from_model(config, shapes, "model.language_model.embed_tokens.weight")
    assert fm.text_params + fm.head_params == pytest.approx(3.09e9, rel=0.01)
    assert fm.vision_params + fm.patch_params + fm.merger_params == pytest.approx(0.67e9, rel=0.02)
    assert fm.text_attention == 36 * 16 * 2 * 128
    assert (fm.window_blocks, fm.full_blocks, fm.merge_unit) == (28, 4, 4)


def test_qwen3_vl_flop_formula_equals_counted_flops(tiny_qwen3_vl_dir):
    """Qwen3-VL: no windows, DeepStack mergers, head_dim * heads != hidden. FlopCounterMode counts every matmul,
    convolution and attention; the formula adds only the position-embedding mix (a gather and a weighted sum of
    4 rows per patch, which the counter does not see)."""
    model, params = model_lib.load_model(str(tiny_qwen3_vl_dir))
    batch = collate(*equal_rows(rows=3, grid=(1, 8, 6), text=21, answer=5, pixel_dim=3 * 2 * 16 * 16),
                    model.vision_spec(151643), pad_multiple=1)
    assert "window_cu_seqlens" not in batch and bool(batch["attention_mask"].all())
    with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) as counter:
        step_lib.make_loss_and_grad(model)(params, batch, torch.tensor(1.0))
    fm = perf.FlopModel.from_model(model.config, {k: v.shape for k, v in params.items()}, model.lm_head_name)
    vision = model.config.vision_config
    assert (fm.window_blocks, fm.full_blocks, fm.pos_embed) == (0, vision.depth, 4 * vision.hidden_size)
    pos_embed_flops = 4 * fm.pos_embed * batch["pixel_values"].shape[0]
    assert fm.batch_flops(batch) - pos_embed_flops == pytest.approx(counter.get_total_flops(), rel=1e-3)


def test_qwen3_vl_4b_flop_shape():
    """The 4B shape (rlinf_facts.md) on the meta device: head_dim 128 with 32 heads (not hidden / heads), three
    DeepStack mergers counted beside the merger, full attention in all 24 vision blocks."""
    config = transformers.Qwen3VLConfig.from_dict(tiny_qwen3_vl_hub_config(
        text_hidden=2560, text_layers=36, text_heads=32, text_kv_heads=8, text_head_dim=128, text_intermediate=9728,
        vision_hidden=1024, vision_depth=24, vision_heads=16, vision_intermediate=4096,
        num_position_embeddings=2304))
    assert config.vision_config.deepstack_visual_indexes == [5, 11, 17]
    with torch.device("meta"):
        module = transformers.Qwen3VLForConditionalGeneration(config)
    shapes = {n: p.shape for n, p in module.named_parameters()}
    fm = perf.FlopModel.from_model(config, shapes, "model.language_model.embed_tokens.weight")
    assert fm.text_attention == 36 * 32 * 2 * 128
    assert (fm.window_blocks, fm.full_blocks, fm.merge_unit, fm.pos_embed) == (0, 24, 4, 4 * 1024)
    merger = sum(s.numel() for n, s in shapes.items() if n.startswith("model.visual.merger.") and len(s) == 2)
    assert fm.merger_params == 4 * merger  # the merger and three DeepStack mergers of the same matmul shapes
    assert fm.text_params + fm.head_params == pytest.approx(4.0e9, rel=0.01)  # Qwen3-4B: 4.0B with the embedding


def test_peak_flops_and_mfu():
    assert perf.peak_flops_for("NVIDIA H100 80GB HBM3", torch.bfloat16) == 989e12
    assert perf.peak_flops_for("NVIDIA H100 PCIe", torch.bfloat16) == 756e12
    assert perf.peak_flops_for("NVIDIA H200", torch.bfloat16) == 989e12
    assert perf.peak_flops_for("NVIDIA A100-SXM4-80GB", torch.float32, allow_tf32=True) == 156e12
    assert perf.peak_flops_for("NVIDIA H100 80GB HBM3", torch.float32) == 67e12
    assert perf.peak_flops_for("Some Future Card", torch.bfloat16) is None
    assert perf.device_peak_flops(torch.device("cpu"), torch.bfloat16) is None
    assert perf.mfu(989e12 * 0.5, 1.0, 989e12) == pytest.approx(0.5)
    assert perf.mfu(989e12, 1.0, 989e12, devices=8) == pytest.approx(0.125)
    assert perf.mfu(1e12, 1.0, None) is None
    assert perf.max_memory_gib(torch.device("cpu")) > 0



def test_cpu_peak_memory_is_the_process_own_not_its_launchers():
    """A trainer started by a big process (here: this one, after touching 1 GiB) logs its own peak resident set.
    Linux carries getrusage's ru_maxrss across fork + exec, so reading it made every CI subprocess report pytest's
    resident set as its peak (2.38 GiB for a step that peaked at 1.8)."""
    ballast = torch.ones(2 ** 28)  # 1 GiB, touched
    code = ("import torch; from vlm_sft import hostmem, perf; x = torch.ones(2 ** 26); "
            "print(perf.max_memory_gib(torch.device('cpu')), hostmem.resident_gib())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    peak, now = map(float, out.stdout.split())
    assert ballast.sum() == 2 ** 28
    assert 0.25 <= now <= peak < 0.9, (now, peak)  # torch + the 0.25 GiB it touched; not the parent's 1 GiB


def test_bench_data_pipeline_runs(tmp_path):
    """bench/data.py on a few small rows: prints its table and the ratio line."""
    out = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "data.py"), "--rows", "16",
                          "--workers", "0", "--image-size", "160x120", "--step-seconds", "0.5",
                          "--workdir", str(tmp_path)],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "samples/s" in out.stdout and "ratio" in out.stdout


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen3_vl_moe", "qwen3_5"])
def test_bench_step_gpu_tiny_runs_on_cpu(tmp_path, family):
    """bench/step_gpu.py's whole code path (compiled step, eager HF loop, table) on a tiny model on CPU. Qwen2.5-VL
    and Qwen3-VL run it inside gpu_check.sh's dry run (below), held to the same loss check there."""
    out = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "step_gpu.py"), "--tiny", "--warmup", "1",
                          "--steps", "1", "--workdir", str(tmp_path), "--family", family],
                         capture_output=True, text=True, timeout=1200, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "vlm-sft compiled" in out.stdout and "HF eager" in out.stdout and "ratio" in out.stdout
    # fp32 on CPU: the trainer's first loss equals the HF model's on the same weights and batch
    diff = re.search(r"\|diff\| (\S+)", out.stdout)
    assert diff and float(diff.group(1)) < 1e-4, out.stdout[-2000:]


@pytest.mark.slow
def test_gpu_check_dry_run_on_cpu(tmp_path):
    """bench/gpu_check.sh --dry-run: every step of the prepared GPU script on CPU at tiny sizes (the CLI smoke,
    bench/step_gpu.py cold and warm with the same cache dir per family), ending in the results table."""
    out = subprocess.run(["bash", os.path.join(ROOT, "bench", "gpu_check.sh"), "--dry-run"], capture_output=True,
                         text=True, timeout=1500, cwd=ROOT,
                         env={**os.environ, "GPU_CHECK_WORKDIR": str(tmp_path), "CUDA_VISIBLE_DEVICES": ""})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "gpu_check: all steps passed" in out.stdout
    # fp32 on CPU: in each family's cold run, the trainer's first loss equals the HF model's on the same batch
    diffs = re.findall(r"\|diff\| (\S+)", out.stdout)
    assert len(diffs) == 2 and all(float(d) < 1e-4 for d in diffs), out.stdout[-3000:]
    for family in ("qwen2.5_vl", "qwen3_vl"):  # a row per family: cold, warm first step and steady step measured
        name = re.escape(family)
        row = re.search(rf"^\| {name} \| tiny {name} \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|", out.stdout,
                        re.MULTILINE)
        assert row and all(float(v) > 0 for v in row.groups()), out.stdout[-3000:]
    # (That a restart compiles from the cache is tested where it can be counted: test_compile.py's deep model.)


@pytest.mark.slow
def test_bench_compile_runs_at_a_small_depth(tmp_path):
    """bench/compile.py end to end (cold process, warm process on the same cache dir, steady compiled vs eager) at
    2 text layers and 4 vision blocks: its table row is printed and the warm process generated no code."""
    out = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "compile.py"), "--workdir", str(tmp_path),
                          "--depth", "2,4", "--checkpointing", "0", "--steps", "1", "--rounds", "1"],
                         capture_output=True, text=True, timeout=900, cwd=ROOT,
                         env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    row = re.search(r"^\| off \| ([\d.]+) \| ([\d.]+) \| 0 / (\d+) \| (\d+) / 0 \|", out.stdout, re.MULTILINE)
    assert row and int(row.group(3)) > 0 and int(row.group(4)) > 0, out.stdout[-3000:]
    assert "(2 text layers, 4 vision blocks)" in out.stdout


def test_bench_attention_cpu_runs():
    """bench/attention_cpu.py at its tiny-width shape: a row per contestant, and the op the trainer runs is as
    accurate as the one it replaced (bf16: both errors are bf16's rounding of the same fp32-or-better result)."""
    out = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "attention_cpu.py"), "--shapes", "0",
                          "--dtypes", "bf16,fp32", "--rounds", "1"], capture_output=True, text=True, timeout=600,
                         cwd=ROOT)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = {(m[0], m[1]): (float(m[2]), float(m[3]), float(m[4])) for m in re.findall(
        r"^\| host.py 16 rows, tiny widths \(T=\d+\) \| (\w+) \| ([\w ]+) \| [\d.]+ \| ([\d.]+)x \| (\S+) \| (\S+) \|$",
        out.stdout, re.MULTILINE)}
    assert set(rows) == {(d, c) for d in ("bf16", "fp32") for c in ("before", "recomputed op", "cpu op")}, out.stdout
    for dtype, tolerance in (("bf16", 3e-2), ("fp32", 1e-5)):
        assert rows[dtype, "before"][0] == 1.0
        assert rows[dtype, "cpu op"][1] <= max(rows[dtype, "before"][1], tolerance), out.stdout
        assert rows[dtype, "cpu op"][2] <= max(rows[dtype, "before"][2], tolerance), out.stdout


def test_bench_patch_embed_and_lm_head_cpu_run():
    """bench/patch_embed.py and bench/lm_head_cpu.py at small sizes: a row per shape, and the trainer's choice (the
    matmul; fp32 logits) no less accurate against float64 than what it replaced."""
    number = r"([\d.e+-]+)"
    out = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "patch_embed.py"), "--patches", "8",
                          "--dtypes", "fp32", "--rounds", "1"], capture_output=True, text=True, timeout=300, cwd=ROOT,
                         env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = re.findall(rf"^\| (Qwen\S+) \| fp32 \| 8 \| [\d.]+ \| [\d.]+ \| [\d.]+x \| {number}, {number} \| "
                      rf"{number}, {number} \|$", out.stdout, re.MULTILINE)
    assert [r[0] for r in rows] == ["Qwen2.5-VL-3B", "Qwen3-VL-4B"], out.stdout
    for _, *errors in rows:
        conv_out, conv_grad, mm_out, mm_grad = map(float, errors)
        assert mm_out <= max(conv_out, 1e-5) and mm_grad <= max(conv_grad, 1e-4), out.stdout
    out = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "lm_head_cpu.py"), "--hidden", "16",
                          "--vocab", "2000", "--rounds", "1"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    row = re.search(rf"^\| 64 x 16 x 2000 \| \d+ \| \d+ \| [\d.]+x \| {number} \| {number} \|$", out.stdout,
                    re.MULTILINE)
    assert row and float(row.group(2)) <= float(row.group(1)), out.stdout


def test_bench_update_runs(tmp_path):
    """bench/update.py at a small depth: both contestants timed, the ratio printed."""
    out = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "update.py"), "--workdir", str(tmp_path),
                          "--depth", "2,4", "--iters", "3"], capture_output=True, text=True, timeout=600, cwd=ROOT,
                         env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    for name in ("pure", "donated"):
        assert re.search(rf"^\| {name} \| [\d.]+ \| [\d.]+ \|$", out.stdout, re.MULTILINE), out.stdout
    assert re.search(r"^ratio pure / donated: first [\d.]+x, later [\d.]+x$", out.stdout, re.MULTILINE)


@pytest.mark.slow
def test_bench_host_runs_at_a_small_depth(tmp_path):
    """bench/host.py at 1 text layer and 1 vision block: every contestant's row (step, host, update, ops), the
    ratio lines and the target line, each contestant's top-ops table (--top-ops); the trainer's step dispatches
    fewer kernel ops than the HF loop.

    fp32 compute and 8-row steps, and without the compiled baseline (one more cold compile): in bf16, on a CPU
    without bf16 instructions, one 4-row step of the 152k-vocabulary head takes ~8 s and the whole run > 15 min."""
    only = ",".join(["vlm-sft compiled", "vlm-sft eager", "vlm-sft packed compiled", "vlm-sft packed eager",
                     "baseline eager", "HF eager", "vlm-sft packed compiled 8 rows", "vlm-sft compiled 2x4 rows",
                     "HF eager batch 8"])
    out = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "host.py"), "--workdir", str(tmp_path),
                          "--depth", "1,1", "--steps", "1", "--dtype", "fp32", "--step-rows", "8", "--only", only,
                          "--top-ops", "3"],
                         capture_output=True, text=True, timeout=900, cwd=ROOT,
                         env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = {m.group(1): m.groups()[1:] for m in re.finditer(
        r"^\| ([\w -]+) \| (\d+) \| (\d+) \| (\d+) \| ([\d.]+)% \| ([\d.]+) \| ([\d.]+) \| (\d+) \| (\d+|n/a) \| "
        r"([\d,]+) \| ([\d,]+) \| [\d.]+ \| [\d.]+ \| [\d.]+ \|$", out.stdout, re.MULTILINE)}
    assert set(rows) == set(only.split(",")), out.stdout
    kernel_ops = {k: int(v[9].replace(",", "")) for k, v in rows.items()}
    assert kernel_ops["vlm-sft eager"] < kernel_ops["HF eager"], out.stdout
    assert rows["vlm-sft compiled"][7] != "n/a"
    assert rows["vlm-sft packed compiled 8 rows"][1] == "1" and rows["vlm-sft compiled 2x4 rows"][1] == "2"
    assert re.search(r"^median perf/padding_fraction over 100 steps of 8 rows: [\d.]+% packed at budget 1024",
                     out.stdout, re.MULTILINE), out.stdout
    assert re.search(r"^targets: host <= 120 ms (met|NOT met)", out.stdout, re.MULTILINE)
    tops = re.findall(r"^## (.+): top 3 ops by self CPU time, one profiled step \(wall [\d.]+ s\)$", out.stdout,
                      re.MULTILINE)
    assert set(tops) == set(rows) and "aten::" in out.stdout.split("## vlm-sft compiled: top 3 ops")[1], out.stdout
