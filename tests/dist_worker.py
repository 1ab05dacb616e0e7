"""Per-rank memory measurement of a sharded train state, run in-process (a mesh of one) or under torchrun:

    torchrun --nproc_per_node=2 tests/dist_worker.py MODEL_DIR DATA_DIR OUT_DIR [STRATEGY [PARAM_DTYPES]]

Each rank shards the tiny model, builds the AdamW state, and runs one micro-batch's forward and backward with and
without activation checkpointing, measuring the bytes of its local param and optimizer-state shards and the
largest set of gathered (full) params alive at once. Writes OUT_DIR/<param dtype>_rank<r>.json for each compute
dtype in PARAM_DTYPES (comma-separated, default fp32; master weights stay fp32).
"""
from __future__ import annotations

import json
import os
import re
import sys

import torch
import torch.distributed as dist

from vlm_sft import models as model_lib
from vlm_sft import optim
from vlm_sft import sharding
from vlm_sft import step as step_lib
from vlm_sft.config import parse_dtype
from vlm_sft.data import robo2vlm
from vlm_sft.data.collate import collate_encoded
from vlm_sft.data.encode import Encoder
from vlm_sft.data.processor import load_processor
from vlm_sft.data.vision import VisionSpec
from vlm_sft.state import init_train_state

ROWS = 4  # the global micro-batch, split over the ranks
_REMAT = re.compile(r"\.(blocks|layers)\.\d+\.$")


def group_bytes(model: model_lib.Model, params: dict, dtype: torch.dtype) -> dict[str, int]:
    """Bytes of each param group's full copy in `dtype` (what one gather of the group produces)."""
    size = torch.empty((), dtype=dtype).element_size()
    return {prefix: sum(params[n].numel() for n in names) * size for prefix, names in model.groups.items()}


def measure(model_dir: str, data_dir: str, strategy: str = "full_shard", param_dtype: torch.dtype = torch.float32,
            device: torch.device = torch.device("cpu")) -> dict:
    rank, world = dist.get_rank(), dist.get_world_size()
    model, params = model_lib.load_model(model_dir)
    groups = group_bytes(model, params, param_dtype)
    full_param_bytes = sharding.local_bytes(params)
    mesh_shape = (world,) if strategy != "hybrid_shard" else (world // 2, 2)
    names = ("dp",) if strategy != "hybrid_shard" else ("replicate", "shard")
    mesh = torch.distributed.device_mesh.init_device_mesh(device.type, mesh_shape, mesh_dim_names=names)
    spec = sharding.Sharding(mesh, sharding.param_placements(strategy), param_dtype=param_dtype)
    params = sharding.shard_model(model, params, spec)
    state = init_train_state(params, optim.adamw(1e-3, weight_decay=0.01, max_grad_norm=1.0))

    processor = load_processor(model_dir, min_pixels=56 * 56, max_pixels=56 * 56)
    encoder = Encoder(processor, max_prompt_length=256)
    files = robo2vlm.find_parquet_files([data_dir], "train")
    source = robo2vlm.Robo2VLMSource(files, prompt_key="question", choice_key="choices",
                                     answer_key="correct_answer", image_keys=["image"])
    vision = VisionSpec.from_config(model.config, pad_token_id=processor.tokenizer.pad_token_id)
    per_rank = ROWS // world
    batch = collate_encoded([encoder(source[i]) for i in range(rank * per_rank, (rank + 1) * per_rank)],
                            spec=vision)

    out = {"rank": rank, "world": world, "strategy": strategy, "param_dtype": str(param_dtype),
           "local_param_bytes": sharding.local_bytes(state.params),
           "local_opt_bytes": sharding.local_bytes(state.opt_state),
           "full_param_bytes": full_param_bytes,
           "largest_remat_group_bytes": max(n for p, n in groups.items() if _REMAT.search(p)),
           "other_groups_bytes": sum(n for p, n in groups.items() if not _REMAT.search(p))}
    grads = {}
    for checkpointing in (False, True):
        stats = sharding.GatherStats()
        loss_and_grad = step_lib.make_loss_and_grad(model, sharding.make_block_call(
            spec, checkpointing=checkpointing, stats=stats))
        loss, grads[checkpointing] = loss_and_grad(state.params, batch, torch.ones(()))
        key = "ckpt" if checkpointing else "no_ckpt"
        out[f"{key}_loss"] = float(loss)
        out[f"{key}_peak_live_gathered_bytes"] = stats.peak_live_bytes
        out[f"{key}_gathered_bytes"] = stats.gathered_bytes
        out[f"{key}_grads_ok"] = all(g.placements == spec.placements and g.dtype == torch.float32
                                     for g in grads[checkpointing].values())
    diffs = [(grads[True][k].to_local() - grads[False][k].to_local()).abs() for k in grads[True]]
    out["grad_max_abs_diff_ckpt_vs_no_ckpt"] = max(float(d.max()) for d in diffs if d.numel())
    return out


def main(argv: list[str]) -> None:
    model_dir, data_dir, out_dir = argv[1:4]
    strategy = argv[4] if len(argv) > 4 else "full_shard"
    dtypes = argv[5].split(",") if len(argv) > 5 else ["fp32"]
    info = sharding.ProcessInfo.from_env()
    device, created = sharding.init_process_group(info)
    try:
        os.makedirs(out_dir, exist_ok=True)
        for name in dtypes:
            result = measure(model_dir, data_dir, strategy, parse_dtype(name, "PARAM_DTYPES"), device=device)
            with open(os.path.join(out_dir, f"{name}_rank{info.rank}.json"), "w") as f:
                json.dump(result, f)
    finally:
        if created:
            sharding.destroy_process_group()
    sharding.exit_process(0)  # not interpreter finalization: gloo's threads can abort it (see its docstring)


if __name__ == "__main__":
    main(sys.argv)
