"""One-GPU benchmark at the Qwen2.5-VL-3B (or Qwen3-VL-4B) shape: this trainer's compiled step vs the eager Hugging
Face loop.

  python bench/step_gpu.py                 # one H100/H200: random-weight 3B, bf16 compute, fp32 master weights
  python bench/step_gpu.py --family qwen3_vl   # the same at the Qwen3-VL-4B-Instruct shape
  python bench/step_gpu.py --family qwen3_vl_moe   # Qwen3-VL-30B-A3B's layer shape, 4 of its 48 decoder layers
  python bench/step_gpu.py --no-packing    # the trainer on RLinf's padded micro-batches of 4 rows instead
  python bench/step_gpu.py --rows-per-step 16 --max-tokens 8192   # other accumulation / budget
  python bench/step_gpu.py --tiny          # the same code path on a tiny model (runs on CPU; used by the tests)

Shape: Qwen2.5-VL-3B-Instruct or Qwen3-VL-4B-Instruct (rlinf_facts.md) with random weights; full-parameter AdamW
(lr 1e-5, wd 0.01, clip 1.0). Batches: Robo2VLM-like rows, each one 640x480 image (Qwen2.5-VL: 1564 patches of 14,
391 image tokens; Qwen3-VL: 1200 patches of 16, 300 image tokens), ~100 prompt tokens and 8 answer tokens +
<|im_end|>; RLinf's accumulation: 32 rows per GPU per step (global batch 256 on 8 GPUs). The trainer packs them
(data.packing: micro-batches of <= --max-tokens tokens, varlen attention, loss_normalization=tokens); the HF loop
takes them as RLinf does, padded micro-batches of --micro-batch rows. Token ids and pixels are random: speed does
not depend on their values. Contestants run one after the other (both would not fit in memory at once), same batches:
  vlm-sft compiled  the trainer's own path: params as plain tensors on one rank (sharding.py, no_shard), gathered
                    per block in bf16 (mixed_precision param_dtype bf16, reduce fp32), make_train_step(compile=True)
  HF eager          fp32 module under torch.autocast(bf16), loss.backward(), clip_grad_norm_, fused AdamW
Targets (issue 5): MFU >= 45%, >= 1.5x the eager loop, peak memory within an 80 GB card, all inside 10 minutes.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import tempfile
import time

import torch
import transformers

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [BENCH, os.path.dirname(BENCH)]  # common.py; the repo root for configs/
import common  # noqa: E402

from configs.robo2vlm import get_config  # noqa: E402
from vlm_sft import models as model_lib  # noqa: E402
from vlm_sft import perf  # noqa: E402
from vlm_sft import sharding as sharding_lib  # noqa: E402
from vlm_sft.data import packing  # noqa: E402
from vlm_sft.data.collate import collate, collate_packed  # noqa: E402
from vlm_sft.data.vision import Spec  # noqa: E402
from vlm_sft.demo import qwen3_5 as qwen3_5_hub  # noqa: E402
from vlm_sft.demo import tiny_hub_config, tiny_qwen3_vl_hub_config, tiny_qwen3_vl_moe_hub_config  # noqa: E402

LR, WEIGHT_DECAY, MAX_GRAD_NORM = 1e-5, 0.01, 1.0
QWEN2_5_VL_3B = dict(text_hidden=2048, text_layers=36, text_heads=16, text_kv_heads=2, text_intermediate=11008,
                     vision_hidden=1280, vision_depth=32, vision_heads=16, vision_intermediate=3420)
QWEN3_VL_4B = dict(text_hidden=2560, text_layers=36, text_heads=32, text_kv_heads=8, text_head_dim=128,
                   text_intermediate=9728, vision_hidden=1024, vision_depth=24, vision_heads=16,
                   vision_intermediate=4096, num_position_embeddings=2304)
# Qwen3-VL-30B-A3B-Instruct's shapes (128 experts, 8 per token, moe_intermediate 768, every layer sparse) at 4 of
# its 48 decoder layers, so its fp32 master weights + AdamW state (~3.6B params) and the HF loop fit one GPU; MFU
# counts the active experts only (perf.py), so it is comparable to a dense model's.
QWEN3_VL_30B_A3B_4_LAYERS = dict(text_hidden=2048, text_layers=4, text_heads=32, text_kv_heads=4, text_head_dim=128,
                                 text_intermediate=6144, vision_hidden=1152, vision_depth=27, vision_heads=16,
                                 vision_intermediate=4304, num_position_embeddings=2304,
                                 deepstack_visual_indexes=[8, 16, 24], num_experts=128, num_experts_per_tok=8,
                                 moe_intermediate=768, mlp_only_layers=())
# --family -> (Hub config.json builder, the real shape, its name, the image processor's pixel budget)
# Qwen3.5-9B's widths (untied, 248k vocabulary, Gated DeltaNet with 16 key / 32 value heads of 128) at 12 of its
# 32 layers (9 linear, 3 full attention): ~5B params, whose fp32 master weights + AdamW state (16 bytes a param)
# fit one 141 GB GPU beside the eager HF baseline's; the whole 9B (~144 GB of state) needs full_shard over GPUs.
QWEN3_5_9B_12_LAYERS = dict(tie_word_embeddings=False, text_hidden=4096, text_layers=12, text_heads=16,
                            text_kv_heads=4, text_head_dim=256, text_intermediate=12288, linear_key_heads=16,
                            linear_value_heads=32, linear_head_dim=128, vision_hidden=1152, vision_depth=27,
                            vision_heads=16, vision_intermediate=4304, num_position_embeddings=2304)
FAMILIES = {
    "qwen3_5": (qwen3_5_hub.hub_config, QWEN3_5_9B_12_LAYERS, "Qwen3.5-9B (12 of 32 layers)", (65536, 16777216)),
    "qwen2.5_vl": (tiny_hub_config, QWEN2_5_VL_3B, "Qwen2.5-VL-3B", (3136, 12845056)),
    "qwen3_vl": (tiny_qwen3_vl_hub_config, QWEN3_VL_4B, "Qwen3-VL-4B", (65536, 16777216)),
    "qwen3_vl_moe": (tiny_qwen3_vl_moe_hub_config, QWEN3_VL_30B_A3B_4_LAYERS, "Qwen3-VL-30B-A3B (4 of 48 layers)",
                     (65536, 16777216)),
}
IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD, PAD = 151644, 151645, 151652, 151653, 151655, 151643
# Qwen3.5's ids of the same tokens (its 248k vocabulary): --family qwen3_5 uses them
QWEN3_5_TOKENS = (qwen3_5_hub.SPECIAL_BASE + 1, qwen3_5_hub.SPECIAL_BASE + 2, qwen3_5_hub.VISION_START_ID,
                  qwen3_5_hub.VISION_END_ID, qwen3_5_hub.IMAGE_TOKEN_ID, qwen3_5_hub.SPECIAL_BASE)


def image_grid(width: int, height: int, *, patch: int, min_pixels: int, max_pixels: int) -> tuple[int, int, int]:
    """The (t, h, w) patch grid Qwen's image processor gives an image (its smart_resize rule, merge 2)."""
    factor = 2 * patch
    h, w = max(factor, round(height / factor) * factor), max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h, w = math.floor(height / beta / factor) * factor, math.floor(width / beta / factor) * factor
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return 1, h // patch, w // patch


def robo2vlm_like_batch(g: torch.Generator, spec: Spec, *, rows: int, grid: tuple[int, int, int],
                        prompt: int, answer: int, buckets: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """One micro-batch: per row one image, prompt +-5 tokens of text, `answer` tokens + <|im_end|> labelled."""
    sequences, pixels, grids = robo2vlm_like_rows(g, spec, rows=rows, grid=grid, prompt=prompt, answer=answer)
    return collate(sequences, pixels, grids, spec, length_buckets=buckets, pad_labels=True)


def robo2vlm_like_rows(g: torch.Generator, spec: Spec, *, rows: int, grid: tuple[int, int, int], prompt: int,
                       answer: int) -> tuple[list, list, list]:
    """(sequences, pixels, grids): per row one image, prompt +-5 tokens of text, `answer` tokens + <|im_end|>
    labelled."""
    qwen3_5 = spec.image_token_id == QWEN3_5_TOKENS[4]  # the family's token ids, by its image token
    im_start, im_end, vision_start, vision_end, image_pad, _ = (
        QWEN3_5_TOKENS if qwen3_5 else (IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD, PAD))
    t, h, w = grid
    sequences, pixels = [], []
    for _ in range(rows):
        text = prompt + int(torch.randint(-5, 6, (), generator=g))
        ids = [im_start, vision_start] + [image_pad] * (t * h * w // 4) + [vision_end]
        ids += torch.randint(100, 150000, (text,), generator=g).tolist()
        target = torch.randint(100, 150000, (answer,), generator=g).tolist() + [im_end]
        sequences.append((torch.tensor(ids + target), torch.tensor([-100] * len(ids) + target)))
        pixels.append(torch.randn(t * h * w, 3 * 2 * spec.patch_size ** 2, generator=g))
    return sequences, pixels, [torch.tensor([grid])] * rows


def step_batches(rows: tuple[list, list, list], spec: Spec, *, micro_batch: int, max_tokens: int,
                 buckets: tuple[int, ...]) -> tuple[list[dict], list[dict]]:
    """One step's rows as (packed micro-batches, padded micro-batches of `micro_batch` rows)."""
    sequences, pixels, grids = rows
    padded = [collate(sequences[i:i + micro_batch], pixels[i:i + micro_batch], grids[i:i + micro_batch], spec,
                      length_buckets=buckets, pad_labels=True) for i in range(0, len(sequences), micro_batch)]
    budget_buckets = packing.budget_buckets(max_tokens, buckets)
    packed = []
    for group in packing.pack_rows([len(ids) for ids, _ in sequences], max_tokens):
        length = packing.padded_length(sum(len(sequences[i][0]) for i in group), max_tokens, budget_buckets)
        packed.append(collate_packed([sequences[i] for i in group], [pixels[i] for i in group],
                                     [grids[i] for i in group], spec, length=length))
    return packed, padded


def build_module(config: transformers.PretrainedConfig, device: torch.device, seed: int) -> torch.nn.Module:
    """Random fp32 weights, initialised on the device (seconds for 3B on a GPU), the same for the same seed."""
    torch.manual_seed(seed)
    with torch.device(device):  # dtype explicit: the Hub config says bfloat16 (it would apply to the text model)
        module = model_lib.family_for_config(config).hf_class()._from_config(
            config, dtype=torch.float32, attn_implementation="sdpa")
    return module.train()


def trainer_model(module: torch.nn.Module) -> tuple[model_lib.Model, dict[str, torch.Tensor]]:
    """What model_lib.load_model returns, for a module built in memory (no 7 GB round trip through disk)."""
    return model_lib.model_from_module(module, model_lib.family_for_config(module.config))


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--family", choices=sorted(FAMILIES), default="qwen2.5_vl",
                        help="model family: Qwen2.5-VL-3B, Qwen3-VL-4B, Qwen3-VL-30B-A3B (4 layers) or "
                        "Qwen3.5-9B (12 layers) shape")
    parser.add_argument("--tiny", action="store_true", help="tiny model (CPU is fine): exercises the code path")
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--rows-per-step", type=int, default=0,
                        help="rows per GPU per optimizer step (default 32, RLinf's 256 on 8 GPUs; 8 with --tiny)")
    parser.add_argument("--max-tokens", type=int, default=16384, help="actor.max_tokens_per_micro_batch")
    parser.add_argument("--no-packing", action="store_true",
                        help="the trainer on padded micro-batches of --micro-batch rows too (data.packing=False)")
    parser.add_argument("--steps", type=int, default=3, help="distinct steps per timed round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation happens here)")
    parser.add_argument("--image-size", default="", help="WIDTHxHEIGHT (default 640x480; 112x112 with --tiny)")
    parser.add_argument("--prompt-tokens", type=int, default=100)
    parser.add_argument("--answer-tokens", type=int, default=8)
    parser.add_argument("--dtype", default="", help="compute dtype: bf16 (default) or fp32 (default with --tiny)")
    parser.add_argument("--checkpointing", action="store_true", help="activation checkpointing of the blocks")
    parser.add_argument("--skip-hf", action="store_true", help="only the trainer's step")
    parser.add_argument("--eager", action="store_true", help="the trainer's step without torch.compile")
    parser.add_argument("--workdir", default="", help="inductor cache lives here (default: a temp dir); a second "
                        "run with the same workdir measures a warm restart")
    parser.add_argument("--result-json", default="", help="also write the trainer's numbers to this file")
    args = parser.parse_args()
    width, height = (int(v) for v in (args.image_size or ("112x112" if args.tiny else "640x480")).split("x"))
    dtype_name = args.dtype or ("fp32" if args.tiny else "bf16")
    compute_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    workdir = args.workdir or tempfile.mkdtemp(prefix="bench_step_gpu_")
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(workdir, ".inductor_cache"))
    t_start = time.perf_counter()
    name = "vlm-sft eager" if args.eager else "vlm-sft compiled"

    device, created = sharding_lib.init_process_group(sharding_lib.ProcessInfo())
    config = get_config()
    config.actor.fsdp_config.mixed_precision.param_dtype = dtype_name
    config.actor.fsdp_config.mixed_precision.reduce_dtype = "fp32"
    config.actor.fsdp_config.mixed_precision.buffer_dtype = "fp32"
    sharding = sharding_lib.make_sharding(config, device, plain_single_rank=True)  # as main.py
    hub_config, real_shape, shape_name, (min_pixels, max_pixels) = FAMILIES[args.family]
    family = model_lib.family_named(args.family)
    hf_config = family.hf_class().config_class.from_dict(hub_config(**({} if args.tiny else real_shape)))
    spec = family.vision_spec(hf_config, QWEN3_5_TOKENS[-1] if args.family == "qwen3_5" else PAD)
    grid = image_grid(width, height, patch=spec.patch_size, min_pixels=min_pixels, max_pixels=max_pixels)
    buckets = tuple(config.data.length_buckets)
    g = torch.Generator().manual_seed(0)
    rows_per_step = args.rows_per_step or (8 if args.tiny else 32)
    both = [step_batches(robo2vlm_like_rows(g, spec, rows=rows_per_step, grid=grid, prompt=args.prompt_tokens,
                                            answer=args.answer_tokens), spec, micro_batch=args.micro_batch,
                         max_tokens=args.max_tokens, buckets=buckets) for _ in range(args.steps)]
    to_device = lambda s: [{k: v.to(device) for k, v in b.items()} for b in s]  # noqa: E731
    padded_steps = [to_device(padded) for _, padded in both]
    steps = padded_steps if args.no_packing else [to_device(packed) for packed, _ in both]
    host_steps = [padded if args.no_packing else packed for packed, padded in both]
    peak_flops = perf.device_peak_flops(device, compute_dtype)

    # vlm-sft: the trainer's own path (as main.py builds it).
    model, params = trainer_model(build_module(hf_config, device, seed=0))
    n_params = sum(p.numel() for p in params.values())
    flop_model = perf.FlopModel.from_model(hf_config, {k: v.shape for k, v in params.items()}, model.lm_head_name)
    flops = lambda s: flop_model.step_flops([{k: v.cpu() for k, v in b.items()} for b in s])  # noqa: E731
    ours = common.trainer_step_fn(model, params, sharding, compile=not args.eager, checkpointing=args.checkpointing,
                                  lr=LR, weight_decay=WEIGHT_DECAY, max_grad_norm=MAX_GRAD_NORM,
                                  loss_normalization="micro_batch" if args.no_packing else "tokens")
    del params  # the full fp32 copy: the step holds the sharded one
    free(device)
    results = common.run_rounds({name: ours}, steps, warmup=args.warmup, rounds=args.rounds,
                                device=device, flops=flops)
    results[name].peak_memory_gib = perf.max_memory_gib(device) if device.type == "cuda" else None
    del ours, model
    free(device)

    if not args.skip_hf:
        hf = common.hf_step_fn(build_module(hf_config, device, seed=0), lr=LR, weight_decay=WEIGHT_DECAY,
                               max_grad_norm=MAX_GRAD_NORM,
                               autocast_dtype=compute_dtype if compute_dtype != torch.float32 else None)
        results.update(common.run_rounds({"HF eager": hf}, padded_steps, warmup=args.warmup, rounds=args.rounds,
                                         device=device, flops=flops))
        results["HF eager"].peak_memory_gib = perf.max_memory_gib(device) if device.type == "cuda" else None
        del hf
        free(device)

    shape = f"tiny {args.family}" if args.tiny else shape_name
    print(f"# bench/step_gpu.py: {common.machine()}")
    print(f"{shape} ({n_params / 1e9:.2f}B params), {dtype_name} compute, fp32 master weights and AdamW state; "
          f"{rows_per_step} rows per step, "
          + (f"micro-batches of {args.micro_batch} rows" if args.no_packing else
             f"packed into {sum(len(p) for p, _ in both) / len(both):g} micro-batches of <= {args.max_tokens} "
             f"tokens (HF: micro-batches of {args.micro_batch} rows)")
          + f"; images {width}x{height} (grid {grid}); "
          f"prompt ~{args.prompt_tokens} + answer {args.answer_tokens} tokens; padding "
          f"{perf.padding_fraction([b for s in host_steps for b in s]):.0%} of the trainer's positions; "
          f"activation checkpointing {args.checkpointing}")
    print(f"MFU counts required FLOPs only: {perf.FORMULA}; peak "
          f"{f'{peak_flops:.3g} FLOP/s' if peak_flops else 'unknown'}\n")
    if "HF eager" in results:
        ratio = common.print_table(results, "HF eager", name, peak_flops=peak_flops)
        first = results["HF eager"].first_loss, results[name].first_loss
        print(f"first-step loss (same weights, same batch): HF {first[0]:.6f}, vlm-sft {first[1]:.6f}, "
              f"|diff| {abs(first[0] - first[1]):.2e}")
        print(f"target >= 1.5x: {'met' if ratio >= 1.5 else 'NOT met'}")
    else:
        common.print_table(results, None, name, peak_flops=peak_flops)
    print(f"total wall time {time.perf_counter() - t_start:.0f} s")
    if args.result_json:
        r = results[name]
        with open(args.result_json, "w") as f:
            json.dump({"family": args.family, "shape": shape, "first_step_s": r.first_step_s, "step_s": r.step_s,
                       "mfu": r.flops_per_step / r.step_s / peak_flops if peak_flops else None,
                       "peak_memory_gib": r.peak_memory_gib, "checkpointing": args.checkpointing,
                       "hf_step_s": results["HF eager"].step_s if "HF eager" in results else None}, f)
    if created:
        sharding_lib.destroy_process_group()


if __name__ == "__main__":
    main()
    sharding_lib.exit_process(0)  # not interpreter finalization: gloo's threads can abort it
