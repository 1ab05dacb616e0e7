"""The optimizer update alone: the pure AdamW chain (`tx.update` + `apply_updates`, over DTensors) against the
donated one the trainer runs (`tx.update_`: in place, chunked, on the local shards), in one process.

  python bench/update.py                         # tiny widths at the 3B's depth (824 leaves), CPU or GPU
  python bench/update.py --depth 2,4 --iters 3   # quick

Params as main.py holds them: DTensors on a mesh of one (no_shard), fp32; fresh random gradients each iteration.
Prints the first update (DTensor's sharding propagation is paid there) and the median of the later ones, and the
ratio pure / donated. Both produce the same params bit for bit (tests/test_optim.py).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [BENCH, os.path.dirname(BENCH)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--depth", default="36,32", help="TEXT_LAYERS,VISION_BLOCKS of the tiny model (the 3B's)")
    parser.add_argument("--iters", type=int, default=8, help="updates per contestant (the first is reported alone)")
    parser.add_argument("--workdir", default="", help="the model dir goes here (default: a temp dir)")
    args = parser.parse_args()

    import torch

    import common
    from configs.robo2vlm import get_config
    from vlm_sft import models as model_lib
    from vlm_sft import demo, optim
    from vlm_sft import sharding as sharding_lib

    text_layers, vision_depth = (int(x) for x in args.depth.split(","))
    model_dir = os.path.join(args.workdir or tempfile.mkdtemp(prefix="bench_update_"),
                             f"model_{text_layers}x{vision_depth}")
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        demo.make_tiny_model_dir(model_dir, text_layers=text_layers, vision_depth=vision_depth)
    device, _ = sharding_lib.init_process_group(sharding_lib.ProcessInfo())
    sharding = sharding_lib.make_sharding(get_config(), device)
    _, params = model_lib.load_model(model_dir)
    params = sharding_lib.shard_params({k: v.to(device) for k, v in params.items()}, sharding)
    tx = optim.adamw(lambda step: torch.tensor(1e-5, device=device), weight_decay=0.01, max_grad_norm=1.0)
    torch.manual_seed(0)

    def grads() -> dict:
        return {k: torch.randn_like(v).mul_(1e-3) for k, v in params.items()}

    times: dict[str, list[float]] = {}
    for name in ("pure", "donated"):
        state = tx.init(params)
        times[name] = []
        for _ in range(args.iters):
            grad = grads()
            common.sync(device)
            t0 = time.perf_counter()
            if name == "pure":
                updates, state = tx.update(grad, state, params)
                optim.apply_updates(params, updates)
            else:
                state = tx.update_(grad, state, params)
            common.sync(device)
            times[name].append(time.perf_counter() - t0)

    print(f"# bench/update.py: {common.machine()}")
    print(f"AdamW + clipping over {len(params)} leaves ({sum(v.numel() for v in params.values()):,} params, tiny "
          f"widths at {text_layers} text layers / {vision_depth} vision blocks), DTensors on a mesh of one, fp32\n")
    print("| update | first (s) | later, median (s) |")
    print("|---|---|---|")
    for name, ts in times.items():
        print(f"| {name} | {ts[0]:.3f} | {statistics.median(ts[1:]):.4f} |")
    later = statistics.median(times["pure"][1:]) / statistics.median(times["donated"][1:])
    print(f"\nratio pure / donated: first {times['pure'][0] / times['donated'][0]:.1f}x, later {later:.1f}x")
    sharding_lib.exit_process(0)


if __name__ == "__main__":
    main()
