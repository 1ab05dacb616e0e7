"""Memory and step time of full fine-tuning vs a frozen vision tower vs LoRA, measured and on paper.

  python bench/memory.py [--workdir /tmp/bmem] [--steps 5]

1. Measured (CPU): the trainer's own step (main.py's path: a TrainPlan, plain params on one rank, the
   per-block gather and LoRA merge) on one small Qwen2.5-VL, the same batches in every mode. Each mode runs in its
   own process (peak RSS is per process) and the table gives its peak RSS above the loaded model, the median step
   time, and both as ratios to full fine-tuning measured in the same run.
2. On paper (`--paper-only` prints just this, in seconds): the planner of --mode=plan (vlm_sft/planner.py) for
   Qwen2.5-VL-3B/7B/32B/72B, Qwen3-VL-8B/32B, Qwen3-VL-30B-A3B and Qwen3.5-9B at their Hub shapes, full_shard on 8/16/32 GPUs of 80 GB, bf16
   compute, fp32 master weights and Adam, micro-batch 4 of Robo2VLM rows (one 640x480 image, ~100 text tokens),
   global batch 256: full fine-tuning with and without checkpointing, a frozen vision tower, LoRA; per GPU GiB of
   each term, whether it fits, and the planner's advice where it does not; then Qwen3-VL-30B-A3B on 8 and 16
   GPUs with and without expert parallelism (EP 8, 16), each row's peak as a ratio to no EP on the same GPUs.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs.robo2vlm import get_config  # noqa: E402
from vlm_sft import hostmem  # noqa: E402

MODES = {
    "full": {},
    "frozen_vision": {"actor.model.freeze_vision_tower": True},
    "lora": {"actor.model.is_lora": True},
}
GIB = 2 ** 30


def _config(mode: str):
    c = get_config("demo")
    for key, value in MODES[mode].items():
        node = c
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


def _rss_gib() -> float:
    return hostmem.peak_resident_gib()


def child(mode: str, workdir: str, steps: int) -> dict:
    """One mode, measured in this process: peak RSS after loading, after training; median step time."""
    from vlm_sft import main as main_lib
    from vlm_sft import models as model_lib
    from vlm_sft import sharding as sharding_lib
    from vlm_sft import step as step_lib
    from vlm_sft import trainable as trainable_lib
    from vlm_sft.data import robo2vlm
    from vlm_sft.data.collate import collate_encoded
    from vlm_sft.data.encode import Encoder
    from vlm_sft.data.processor import load_processor
    from vlm_sft.data.vision import VisionSpec
    from vlm_sft.state import init_train_state

    torch.manual_seed(0)
    config = _config(mode)
    model_dir, data_dir = os.path.join(workdir, "model"), os.path.join(workdir, "data")
    processor = load_processor(model_dir, min_pixels=224 * 224, max_pixels=224 * 224)
    encoder = Encoder(processor, max_prompt_length=512)
    source = robo2vlm.Robo2VLMSource(robo2vlm.find_parquet_files([data_dir], "train"))
    model, params = model_lib.load_model(model_dir)
    spec = VisionSpec.from_config(model.config, pad_token_id=processor.tokenizer.pad_token_id)
    batches = [[collate_encoded([encoder(source[4 * s + i]) for i in range(4)], spec=spec)] for s in range(steps + 1)]
    plan = trainable_lib.make_plan(config, model.module)
    device, created = sharding_lib.init_process_group(sharding_lib.ProcessInfo())
    sharding = sharding_lib.make_sharding(config, device, plain_single_rank=True)  # as main.py
    step_model, params = main_lib.apply_plan(model, params, plan, precision=torch.float32,
                                             compute_dtype=sharding.param_dtype, seed=0)
    params = sharding_lib.shard_model(model, params, sharding)
    loaded = _rss_gib()
    tx, schedule = step_lib.make_optimizer(config, 100, plan)
    trained = frozenset(plan.trainable)
    state = init_train_state(params, tx, trained)
    block_call = sharding_lib.make_block_call(sharding, lora_scale=plan.lora_scale)
    train_step = step_lib.make_train_step(step_model, tx, schedule, block_call=block_call, trainable=trained)
    times = []
    for i, batch in enumerate(batches):
        t0 = time.perf_counter()
        state, metrics = train_step(state, batch)
        float(metrics["train/loss"])
        if i:  # the first step warms allocator and caches
            times.append(time.perf_counter() - t0)
    if created:
        sharding_lib.destroy_process_group()
    return {"mode": mode, "loaded_gib": loaded, "peak_gib": _rss_gib(), "step_s": statistics.median(times),
            "trainable": plan.numel(plan.trainable), "frozen": plan.numel(plan.frozen),
            "opt_state_gib": sharding_lib.local_bytes(state.opt_state) / GIB}


def measured(workdir: str, steps: int) -> list[dict]:
    from vlm_sft import demo

    model_dir = os.path.join(workdir, "model")
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        demo.make_tiny_model_dir(model_dir, text_hidden=256, text_layers=4, text_heads=4, text_kv_heads=2,
                                    text_intermediate=1024, vision_hidden=256, vision_depth=8, vision_heads=4,
                                    vision_intermediate=1024)
    data_dir = os.path.join(workdir, "data")
    if not os.path.isdir(data_dir):
        demo.make_robo2vlm_dir(data_dir, n_train=4 * (steps + 1), n_test=1, image_size=(224, 224))
    results = []
    for mode in MODES:
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", mode, "--workdir", workdir,
                              "--steps", str(steps)], capture_output=True, text=True, check=False,
                             env={**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(
                                 os.path.abspath(__file__)))})
        if out.returncode:
            raise SystemExit(f"{mode}: {out.stderr[-3000:]}")
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return results


# ---------------------------------------------------------------------------------------------------------------
# On paper: the planner (vlm_sft/planner.py, what --mode=plan prints) at the sizes users run.

def _qwen2_5(**shape) -> dict:
    from vlm_sft.demo import tiny_hub_config
    c = tiny_hub_config(**{"vision_hidden": 1280, "vision_depth": 32, "vision_heads": 16, **shape})
    c["vocab_size"] = 151936 if c["tie_word_embeddings"] else 152064
    return c


def _qwen3(**shape) -> dict:
    from vlm_sft.demo import tiny_qwen3_vl_hub_config
    return tiny_qwen3_vl_hub_config(tie_word_embeddings=False, text_head_dim=128, vision_hidden=1152,
                                    vision_depth=27, vision_heads=16, vision_intermediate=4304,
                                    num_position_embeddings=2304, deepstack_visual_indexes=[8, 16, 24], **shape)


def _qwen3_moe(**shape) -> dict:
    from vlm_sft.demo import tiny_qwen3_vl_moe_hub_config
    return tiny_qwen3_vl_moe_hub_config(text_head_dim=128, vision_hidden=1152, vision_depth=27, vision_heads=16,
                                        vision_intermediate=4304, num_position_embeddings=2304,
                                        deepstack_visual_indexes=[8, 16, 24], mlp_only_layers=(), **shape)


def _qwen3_5(**shape) -> dict:
    from vlm_sft.demo import qwen3_5
    return qwen3_5.hub_config(tie_word_embeddings=False, text_head_dim=256, linear_key_heads=16, linear_value_heads=32,
                              linear_head_dim=128, vision_hidden=1152, vision_depth=27, vision_heads=16,
                              vision_intermediate=4304, num_position_embeddings=2304, **shape)


# config.json shapes of the Hub's checkpoints (only the sizes differ from the families' tiny builders).
SIZES = {
    "Qwen2.5-VL-3B": lambda: _qwen2_5(text_hidden=2048, text_layers=36, text_heads=16, text_kv_heads=2,
                                      text_intermediate=11008, vision_intermediate=3420),
    "Qwen2.5-VL-7B": lambda: _qwen2_5(tie_word_embeddings=False, text_hidden=3584, text_layers=28, text_heads=28,
                                      text_kv_heads=4, text_intermediate=18944, vision_intermediate=3420),
    "Qwen2.5-VL-32B": lambda: _qwen2_5(tie_word_embeddings=False, text_hidden=5120, text_layers=64, text_heads=40,
                                       text_kv_heads=8, text_intermediate=27648, vision_intermediate=3456),
    "Qwen2.5-VL-72B": lambda: _qwen2_5(tie_word_embeddings=False, text_hidden=8192, text_layers=80, text_heads=64,
                                       text_kv_heads=8, text_intermediate=29568, vision_intermediate=3456),
    "Qwen3-VL-8B": lambda: _qwen3(text_hidden=4096, text_layers=36, text_heads=32, text_kv_heads=8,
                                  text_intermediate=12288),
    "Qwen3-VL-32B": lambda: _qwen3(text_hidden=5120, text_layers=64, text_heads=64, text_kv_heads=8,
                                   text_intermediate=25600),
    "Qwen3-VL-30B-A3B": lambda: _qwen3_moe(text_hidden=2048, text_layers=48, text_heads=32, text_kv_heads=4,
                                           text_intermediate=6144, num_experts=128, num_experts_per_tok=8,
                                           moe_intermediate=768),
    # 24 Gated DeltaNet + 8 gated attention layers (the planner counts each as an attention layer of its widths)
    "Qwen3.5-9B": lambda: _qwen3_5(text_hidden=4096, text_layers=32, text_heads=16, text_kv_heads=4,
                                   text_intermediate=12288),
}
SETTINGS = {  # name -> config overrides (dotted keys), on top of full_shard, micro-batch 4, global batch 256
    "full": {},
    "full+ckpt": {"actor.fsdp_config.gradient_checkpointing": True},
    "frozen_vision+ckpt": {"actor.fsdp_config.gradient_checkpointing": True,
                           "actor.model.freeze_vision_tower": True},
    "lora+ckpt": {"actor.fsdp_config.gradient_checkpointing": True, "actor.model.is_lora": True},
}


def skeleton_of(hub: dict) -> torch.nn.Module:
    import transformers
    config = transformers.AutoConfig.for_model(**hub)
    with torch.device("meta"):
        return transformers.AutoModelForImageTextToText.from_config(config)


def robo2vlm_rows(image_tokens: int, n: int = 8) -> list:
    """Robo2VLM rows at 640x480 (Qwen2.5-VL: 391 image tokens, Qwen3-VL: 300), ~100 text + 9 answer tokens."""
    from vlm_sft.preflight import RowStats
    return [RowStats(f"row:{i}", prompt_tokens=100 + image_tokens, image_tokens=image_tokens,
                     sequence_tokens=109 + image_tokens) for i in range(n)]


def on_paper(gpus: tuple[int, ...] = (8, 16, 32), device_gib: float = 80.0, models: tuple[str, ...] = ()
             ) -> list[dict]:
    """The planner's rows for `models` (default: every size in SIZES)."""
    from vlm_sft import planner

    rows = []
    for name, hub in SIZES.items():
        if models and name not in models:
            continue
        module = skeleton_of(hub())
        stats = robo2vlm_rows(300 if "Qwen3" in name else 391)
        for setting, overrides in SETTINGS.items():
            for world in gpus:
                c = _config("full")
                c.actor.micro_batch_size, c.actor.global_batch_size = 4, 256
                c.data.packing = False  # padded micro-batches of 4 rows (packing: one per rank and step here)
                c.actor.fsdp_config.sharding_strategy = "full_shard"
                c.actor.fsdp_config.mixed_precision.param_dtype = "bf16"
                c.runner.device_memory_gib = device_gib
                c = planner.apply_overrides(c, overrides)
                report = planner.plan(c, module, stats, launched_world_size=world, device_type="cuda")
                rows.append({"model": name, "setting": setting, "gpus": world, **report["per_device"],
                             "fits": report["fits"], "advice": (report.get("advice") or {}).get("flags", "")})
    return rows


EP_MODEL = "Qwen3-VL-30B-A3B"
EP_ROWS = ((8, 1), (8, 8), (16, 1), (16, 8), (16, 16))  # (GPUs, actor.fsdp_config.expert_parallel_size)


def on_paper_ep(device_gib: float = 80.0) -> list[dict]:
    """The planner's rows for the MoE model with and without expert parallelism (EP_ROWS), full_shard otherwise,
    with and without checkpointing: each rank keeps E/e experts whole instead of 1/world of every expert."""
    from vlm_sft import planner

    module = skeleton_of(SIZES[EP_MODEL]())
    stats = robo2vlm_rows(300)
    rows = []
    for setting in ("full", "full+ckpt"):
        for world, ep in EP_ROWS:
            c = _config("full")
            c.actor.micro_batch_size, c.actor.global_batch_size = 4, 256
            c.data.packing = False
            c.actor.fsdp_config.sharding_strategy = "full_shard"
            c.actor.fsdp_config.mixed_precision.param_dtype = "bf16"
            c.runner.device_memory_gib = device_gib
            c = planner.apply_overrides(c, {**SETTINGS[setting], "actor.fsdp_config.expert_parallel_size": ep})
            report = planner.plan(c, module, stats, launched_world_size=world, device_type="cuda")
            rows.append({"model": EP_MODEL, "setting": setting, "gpus": world, "ep": ep, **report["per_device"],
                         "fits": report["fits"]})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="/tmp/bench_memory")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--child", choices=sorted(MODES), help=argparse.SUPPRESS)
    parser.add_argument("--paper-only", action="store_true", help="only the planner's table (seconds, no training)")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.workdir, args.steps)))
        return
    from bench.common import machine

    os.makedirs(args.workdir, exist_ok=True)
    print(f"# {machine()}")
    results = [] if args.paper_only else measured(args.workdir, args.steps)
    full = results[0] if results else None
    print("\n| mode | trainable params | frozen params | optimizer state (MiB) | peak RSS above the loaded model "
          "(GiB) | x full | step (s, median) | x full |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        extra, extra_full = r["peak_gib"] - r["loaded_gib"], full["peak_gib"] - full["loaded_gib"]
        print(f"| {r['mode']} | {r['trainable']:,} | {r['frozen']:,} | {r['opt_state_gib'] * 1024:.1f} | "
              f"{extra:.3f} | {extra / extra_full:.2f} | {r['step_s']:.3f} | {r['step_s'] / full['step_s']:.2f} |")
    print("\n| model | setting | GPUs | params | grads | Adam | gathered | activations | peak (GiB/GPU) | fits 80 GB "
          "| advice |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in on_paper():
        print(f"| {r['model']} | {r['setting']} | {r['gpus']} | {r['params_gib']:.1f} | {r['grads_gib']:.1f} | "
              f"{r['optimizer_gib']:.1f} | {r['gathered_gib']:.1f} | {r['activations_gib']:.1f} | {r['peak_gib']:.1f} | "
              f"{'yes' if r['fits'] else 'no'} | {r['advice']} |")
    print(f"\n{EP_MODEL} with expert parallelism (actor.fsdp_config.expert_parallel_size; ratio: peak over the same "
          "GPUs without EP)")
    print("\n| setting | GPUs | EP | params | grads | Adam | gathered | activations | peak (GiB/GPU) | x no EP | fits "
          "80 GB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    ep_rows = on_paper_ep()
    base = {(r["setting"], r["gpus"]): r["peak_gib"] for r in ep_rows if r["ep"] == 1}
    for r in ep_rows:
        print(f"| {r['setting']} | {r['gpus']} | {r['ep']} | {r['params_gib']:.1f} | {r['grads_gib']:.1f} | "
              f"{r['optimizer_gib']:.1f} | {r['gathered_gib']:.1f} | {r['activations_gib']:.1f} | "
              f"{r['peak_gib']:.1f} | {r['peak_gib'] / base[(r['setting'], r['gpus'])]:.2f} | "
              f"{'yes' if r['fits'] else 'no'} |")


if __name__ == "__main__":
    main()
