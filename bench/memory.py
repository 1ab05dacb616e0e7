"""Memory and step time of full fine-tuning vs a frozen vision tower vs LoRA, measured and on paper.

  python bench/memory.py [--workdir /tmp/bmem] [--steps 5]

1. Measured (CPU): the trainer's own step (main.py's path: a TrainPlan, DTensor params on a mesh of one, the
   per-block gather and LoRA merge) on one small Qwen2.5-VL, the same batches in every mode. Each mode runs in its
   own process (peak RSS is per process) and the table gives its peak RSS above the loaded model, the median step
   time, and both as ratios to full fine-tuning measured in the same run.
2. On paper: per-GPU bytes of params, gradients and Adam state for Qwen2.5-VL-3B, -7B and Qwen3.5-9B in each mode (no_shard
   on 1 GPU, full_shard on 8), plus activations at micro-batch 4 x 512 tokens, to check the target "LoRA on the 3B
   shape fits one 24 GB GPU at micro-batch 4". Trained leaves: fp32 master + fp32 gradient + 2 fp32 Adam moments
   (16 bytes/param); frozen leaves held in the bf16 compute dtype (2 bytes/param), no gradient, no state.
3. On paper: Qwen3-VL-30B-A3B (31.1B params, 3.3B active) under full_shard on 8 and 16 GPUs, full fine-tuning and
   LoRA, with and without activation checkpointing: the sharded state per GPU, the largest per-block gather (a
   sparse layer's 128 stacked experts, gathered in fp32 then cast to bf16: both alive at the cast; without
   checkpointing every block's bf16 copy stays alive for backward, tests/test_distributed.py measures it),
   activations.
   Expert parallelism (actor.fsdp_config.expert_parallel_size) is not implemented yet, so it has no rows.

  python bench/memory.py --paper   # the on-paper tables only (seconds; no model is built)
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs.robo2vlm import get_config  # noqa: E402

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
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


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
    sharding = sharding_lib.make_sharding(config, device)
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
# On paper.

def shapes_3b() -> dict:
    from vlm_sft.demo import tiny_hub_config
    return tiny_hub_config(text_hidden=2048, text_layers=36, text_heads=16, text_kv_heads=2, text_intermediate=11008,
                           vision_hidden=1280, vision_depth=32, vision_heads=16, vision_intermediate=3420)


def shapes_7b() -> dict:
    from vlm_sft.demo import tiny_hub_config
    c = tiny_hub_config(tie_word_embeddings=False, text_hidden=3584, text_layers=28, text_heads=28, text_kv_heads=4,
                        text_intermediate=18944, vision_hidden=1280, vision_depth=32, vision_heads=16,
                        vision_intermediate=3420)
    c["vocab_size"] = 152064
    return c


def shapes_qwen3_5_9b() -> dict:
    """Qwen3.5-9B (9.4B params: 24 Gated DeltaNet + 8 gated attention layers, untied 248k vocabulary)."""
    from vlm_sft.demo import qwen3_5
    return qwen3_5.hub_config(tie_word_embeddings=False, text_hidden=4096, text_layers=32, text_heads=16,
                              text_kv_heads=4, text_head_dim=256, text_intermediate=12288, linear_key_heads=16,
                              linear_value_heads=32, linear_head_dim=128, vision_hidden=1152, vision_depth=27,
                              vision_heads=16, vision_intermediate=4304, num_position_embeddings=2304)


def plan_for(hub_config: dict, mode: str):
    import copy

    from vlm_sft import models as model_lib
    from vlm_sft import trainable as trainable_lib

    family = model_lib.family_for_model_type(hub_config["model_type"], "bench/memory.py")
    config = family.hf_class().config_class.from_dict(copy.deepcopy(hub_config))
    with torch.device("meta"):
        module = family.hf_class()(config)
    return config, trainable_lib.make_plan(_config(mode), module)


def activation_bytes(config, rows: int, length: int, patches_per_row: int, checkpointing: bool) -> float:
    """bf16 activations kept for backward, rough: per decoder layer (6H + 2*kv + 3I) values per token (q, k, v, o,
    attention out, norms, MLP gate/up/act); per vision block (6Hv + 3Iv) per patch. With checkpointing, each block
    keeps only its input and one block's internals exist at a time. The lm_head runs at label tokens only.
    A sparse MoE layer (config.text_config.num_experts) keeps per token E router logits and, for each of its k
    experts, the gathered input, gate/up/act (3 * moe_intermediate) and the output: E + k * (2H + 3I_moe)."""
    t, v = config.text_config, config.vision_config
    kv = t.num_key_value_heads * (getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads)
    mlp = 3 * t.intermediate_size
    if getattr(t, "num_experts", 0):
        mlp = t.num_experts + t.num_experts_per_tok * (2 * t.hidden_size + 3 * t.moe_intermediate_size)
    per_token = 6 * t.hidden_size + 2 * kv + mlp
    per_patch = 6 * v.hidden_size + 3 * v.intermediate_size
    tokens, patches = rows * length, rows * patches_per_row
    if checkpointing:
        values = (t.num_hidden_layers * t.hidden_size + per_token) * tokens + \
            (v.depth * v.hidden_size + per_patch) * patches
    else:
        values = t.num_hidden_layers * per_token * tokens + v.depth * per_patch * patches
    return 2.0 * values


def on_paper() -> list[dict]:
    rows = []
    for name, hub in (("Qwen2.5-VL-3B", shapes_3b()), ("Qwen2.5-VL-7B", shapes_7b()),
                      ("Qwen3.5-9B", shapes_qwen3_5_9b())):
        for mode in MODES:
            config, plan = plan_for(hub, mode)
            trained, frozen = plan.numel(plan.trainable), plan.numel(plan.frozen)
            state = 16 * trained + 2 * frozen
            # One 640x480 image per row: 1564 patches, 391 tokens; rows padded to the 512 bucket.
            act = {ckpt: activation_bytes(config, 4, 512, 1564, ckpt) for ckpt in (False, True)}
            rows.append({"model": name, "mode": mode, "trainable": trained, "frozen": frozen,
                         "state_1gpu_gib": state / GIB, "state_8gpu_gib": state / 8 / GIB,
                         "act_gib": act[False] / GIB, "act_ckpt_gib": act[True] / GIB,
                         "total_1gpu_gib": (state + act[False]) / GIB,
                         "total_1gpu_ckpt_gib": (state + act[True]) / GIB})
    return rows


def shapes_30b_a3b() -> dict:
    from vlm_sft.demo import tiny_qwen3_vl_moe_hub_config
    return tiny_qwen3_vl_moe_hub_config(
        text_hidden=2048, text_layers=48, text_heads=32, text_kv_heads=4, text_head_dim=128, text_intermediate=6144,
        vision_hidden=1152, vision_depth=27, vision_heads=16, vision_intermediate=4304, num_position_embeddings=2304,
        deepstack_visual_indexes=[8, 16, 24], num_experts=128, num_experts_per_tok=8, moe_intermediate=768,
        mlp_only_layers=())


def moe_on_paper() -> list[dict]:
    """Qwen3-VL-30B-A3B per GPU under full_shard (section 3 of the module docstring)."""
    import transformers

    from vlm_sft import trainable as trainable_lib

    config = transformers.Qwen3VLMoeConfig.from_dict(shapes_30b_a3b())
    with torch.device("meta"):
        module = transformers.Qwen3VLMoeForConditionalGeneration(config)
    layer = "model.language_model.layers.0."
    block = sum(p.numel() for n, p in module.named_parameters() if n.startswith(layer))
    total = sum(p.numel() for p in module.parameters())
    rows = []
    for mode in ("full", "lora"):
        c = _config(mode)
        c.actor.model.model_type = "qwen3_vl_moe"
        plan = trainable_lib.make_plan(c, module)
        trained, frozen = plan.numel(plan.trainable), plan.numel(plan.frozen)
        state = 16 * trained + 2 * frozen
        cast = 4 if mode == "full" else 0  # trained leaves gathered in fp32, then cast (frozen: gathered in bf16)
        for gpus in (8, 16):
            for ckpt in (False, True):
                gather = block * (cast + 2) if ckpt else total * 2 + block * cast
                act = activation_bytes(config, 4, 512, 1200, ckpt)  # a 640x480 image: 1200 patches of 16
                rows.append({"model": "Qwen3-VL-30B-A3B", "mode": mode, "gpus": gpus, "checkpointing": ckpt,
                             "trainable": trained, "frozen": frozen, "state_gib": state / gpus / GIB,
                             "gather_gib": gather / GIB, "act_gib": act / GIB,
                             "total_gib": (state / gpus + gather + act) / GIB})
    return rows


def print_moe_on_paper() -> None:
    print("\n| model | mode | GPUs (full_shard) | checkpointing | trainable | state per GPU (GiB) | gathered params "
          "alive (GiB) | activations mb4 x 512 (GiB) | total per GPU (GiB) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in moe_on_paper():
        print(f"| {r['model']} | {r['mode']} | {r['gpus']} | {r['checkpointing']} | {r['trainable'] / 1e9:.3g}B | "
              f"{r['state_gib']:.1f} | {r['gather_gib']:.2f} | {r['act_gib']:.1f} | {r['total_gib']:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="/tmp/bench_memory")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--child", choices=sorted(MODES), help=argparse.SUPPRESS)
    parser.add_argument("--paper", action="store_true", help="the on-paper tables only")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.workdir, args.steps)))
        return
    if args.paper:
        print_paper()
        print_moe_on_paper()
        return
    from bench.common import machine

    os.makedirs(args.workdir, exist_ok=True)
    print(f"# {machine()}")
    results = measured(args.workdir, args.steps)
    full = results[0]
    print("\n| mode | trainable params | frozen params | optimizer state (MiB) | peak RSS above the loaded model "
          "(GiB) | x full | step (s, median) | x full |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        extra, extra_full = r["peak_gib"] - r["loaded_gib"], full["peak_gib"] - full["loaded_gib"]
        print(f"| {r['mode']} | {r['trainable']:,} | {r['frozen']:,} | {r['opt_state_gib'] * 1024:.1f} | "
              f"{extra:.3f} | {extra / extra_full:.2f} | {r['step_s']:.3f} | {r['step_s'] / full['step_s']:.2f} |")
    print_paper()
    print_moe_on_paper()


def print_paper() -> None:
    print("\n| model | mode | trainable | frozen | params+grads+Adam, 1 GPU (GiB) | same, full_shard on 8 (GiB) | "
          "activations mb4 x 512 (GiB) | with checkpointing (GiB) | 1 GPU total (GiB) | 1 GPU, checkpointing (GiB) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in on_paper():
        print(f"| {r['model']} | {r['mode']} | {r['trainable'] / 1e9:.3g}B | {r['frozen'] / 1e9:.3g}B | "
              f"{r['state_1gpu_gib']:.1f} | {r['state_8gpu_gib']:.1f} | {r['act_gib']:.1f} | {r['act_ckpt_gib']:.1f} | "
              f"{r['total_1gpu_gib']:.1f} | {r['total_1gpu_ckpt_gib']:.1f} |")


if __name__ == "__main__":
    main()
