"""One rank of sharded loading, under torchrun (tests/test_loading.py):

    torchrun --nproc_per_node=4 tests/loading_worker.py MODEL_DIR OUT_DIR STRATEGY

Loads MODEL_DIR with loading.load_sharded (fp32 master weights), writes OUT_DIR/rank<r>.json (its pid, resident set
before loading (transformers' model modules imported), the bytes of its local shards) and the local shards of a few tensors (OUT_DIR/rank<r>.pt), then
waits for OUT_DIR/done so the test can read this process's peak resident set (VmHWM) from outside.
"""
import json
import os
import sys
import time

import torch

# torchrun runs this file as a script: the repository root (where configs/ lives) is not on sys.path by itself.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs.robo2vlm import get_config  # noqa: E402
from vlm_sft import loading
from vlm_sft import models as model_lib
from vlm_sft import sharding as sharding_lib

KEPT = ("model.language_model.embed_tokens.weight", "model.language_model.layers.0.mlp.down_proj.weight",
        "model.visual.blocks.0.attn.qkv.bias", "model.language_model.norm.weight")


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def main(model_dir: str, out: str, strategy: str) -> None:
    info = sharding_lib.ProcessInfo.from_env()
    device, _ = sharding_lib.init_process_group(info)
    config = get_config("demo")
    config.actor.fsdp_config.sharding_strategy = strategy
    sharding = sharding_lib.make_sharding(config, device)
    model_lib.family_named("qwen2.5_vl").hf_class()  # its transformers modules imported: runtime, not loading
    before = rss_mib()
    _, params = loading.load_sharded(model_dir, sharding, {})
    local = {k: v.to_local() for k, v in params.items()}
    torch.save({k: local[k].clone() for k in KEPT}, os.path.join(out, f"rank{info.rank}.pt"))
    with open(os.path.join(out, f"rank{info.rank}.json"), "w") as f:
        json.dump({"pid": os.getpid(), "rss_before_mib": before,
                   "local_bytes": sum(t.numel() * t.element_size() for t in local.values()),
                   "full_fp32_bytes": sum(v.numel() * 4 for v in params.values())}, f)
    deadline = time.time() + 300
    while not os.path.exists(os.path.join(out, "done")) and time.time() < deadline:
        time.sleep(0.1)
    sharding_lib.barrier()
    sharding_lib.exit_process(0)


if __name__ == "__main__":
    main(*sys.argv[1:])
