"""Three compiled train steps in a fresh process, as main.py builds them (params as DTensors on a mesh of one,
gathered per block), reporting what each step compiled:

    python tests/compile_worker.py MODEL_DIR CACHE_DIR OUT_JSON

Steps 1 and 2 share a length bucket but differ in text lengths, answer lengths, image sizes and the number of
images per row; step 3 is a longer length bucket with the same label bucket. Writes, per step, the
compile.CompileStats delta and the number of graphs dynamo holds for each region function.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys

import torch
from torch._dynamo.eval_frame import _debug_get_cache_entry_list

from vlm_sft import compile as compile_lib
from vlm_sft import models as model_lib
from vlm_sft.models import common as model_common
from vlm_sft import optim, schedules
from vlm_sft import sharding
from vlm_sft import step as step_lib
from vlm_sft.data.vision import VisionSpec
from vlm_sft.state import init_train_state

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_compile import make_batch  # noqa: E402

REGIONS = {"decoder_block": model_common.decoder_block, "vision_block": model_common.vision_block,
           "apply_module": model_common.apply_module, "patch_embed": model_common.patch_embed,
           "lm_head": model_common._lm_head}


def steps(spec: VisionSpec) -> list[list[dict[str, torch.Tensor]]]:
    g = torch.Generator().manual_seed(0)
    a = [([(1, 4, 4)], 10, 3), ([(1, 8, 12)], 30, 5), ([(1, 6, 10)], 21, 2), ([(1, 10, 8)], 5, 4)]
    b = [([(1, 6, 6), (1, 4, 8)], 40, 6), ([(1, 12, 10)], 3, 2), ([(1, 8, 8)], 15, 3), ([(1, 4, 4)], 60, 5)]
    c = [([(1, 8, 12)], 150, 4), ([(1, 4, 4)], 20, 2), ([(1, 6, 10)], 9, 3), ([(1, 10, 8)], 30, 6)]
    return [[make_batch(g, spec, rows, length_buckets=(128, 256), pad_labels=True)] for rows in (a, b, c)]


def main(model_dir: str, cache_dir: str, out: str) -> None:
    compile_lib.set_cache_dir(cache_dir)
    device, created = sharding.init_process_group(sharding.ProcessInfo())
    model, params = model_lib.load_model(model_dir)
    spec = VisionSpec.from_config(model.config, pad_token_id=151643)
    mesh = torch.distributed.device_mesh.init_device_mesh("cpu", (1,), mesh_dim_names=("dp",))
    shard = sharding.Sharding(mesh, sharding.param_placements("no_shard"))
    schedule = schedules.make_schedule("constant", peak_lr=1e-3, warmup_steps=0, total_steps=10)
    tx = optim.adamw(schedule, weight_decay=0.01, max_grad_norm=1.0)
    state = init_train_state(sharding.shard_model(model, params, shard), tx)
    block_call = sharding.make_block_call(shard, compile=True)
    train_step = step_lib.make_train_step(model, tx, schedule, compile=True, block_call=block_call)
    report = []
    for micro_batches in steps(spec):
        before = compile_lib.CompileStats.now()
        state, metrics = train_step(state, micro_batches)
        report.append({"stats": dataclasses.asdict(compile_lib.CompileStats.now() - before),
                       "loss": float(metrics["train/loss"]),
                       "graphs": {name: len(_debug_get_cache_entry_list(fn.__code__))
                                  for name, fn in REGIONS.items()},
                       "regions": len(block_call.regions)})
    with open(out, "w") as f:
        json.dump(report, f)
    if created:
        sharding.destroy_process_group()
    sharding.exit_process(0)


if __name__ == "__main__":
    main(*sys.argv[1:4])
