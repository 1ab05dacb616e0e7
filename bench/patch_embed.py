"""The vision patch embedding, forward + backward: transformers' Conv3d (kernel == stride) against the matmul the
trainer runs (models/common.patch_embed), on the same patches, weight and output gradient.

  python bench/patch_embed.py                                 # both families' widths, fp32 and bf16, 256 patches
  python bench/patch_embed.py --patches 1564 --dtypes fp32    # one 640x480 image of Qwen2.5-VL

Shapes: Qwen2.5-VL-3B's tower (3 x 2 x 14 x 14 patches to 1280, no bias) and Qwen3-VL-4B's (3 x 2 x 16 x 16 to 1024,
with bias). Prints milliseconds per forward + backward (CPU seconds on CPU, synchronized wall time on CUDA; median
of the rounds after a warm-up), the ratio conv / matmul, and each one's largest error in its output and weight
gradient against the matmul in float64 (the same sums, exact to rounding).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [BENCH, os.path.dirname(BENCH)]

# (name, in_channels, temporal, patch, embed, bias)
SHAPES = [("Qwen2.5-VL-3B", 3, 2, 14, 1280, False), ("Qwen3-VL-4B", 3, 2, 16, 1024, True)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--patches", type=int, default=256)
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    import torch

    import common
    from vlm_sft.models.common import patch_embed

    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    print(common.machine())
    print("| tower | dtype | patches | Conv3d (ms) | matmul (ms) | Conv3d / matmul | Conv3d error: output, weight grad "
          "| matmul error: output, weight grad |")
    print("|---|---|---|---|---|---|---|---|")
    for name, channels, temporal, patch, embed, bias in SHAPES:
        conv = torch.nn.Conv3d(channels, embed, (temporal, patch, patch), stride=(temporal, patch, patch),
                               bias=bias, device=device)
        module = torch.nn.Module()
        module.proj = conv
        for dtype_name in args.dtypes.split(","):
            dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
            g = torch.Generator(device=device).manual_seed(0)
            x = torch.randn(args.patches, channels * temporal * patch * patch, generator=g, device=device)
            params = {k: v.detach().to(dtype).requires_grad_() for k, v in conv.named_parameters(prefix="proj")}
            grad = torch.randn(args.patches, embed, generator=g, device=device, dtype=dtype)

            exact = {k: v.detach().double().requires_grad_() for k, v in params.items()}
            want = patch_embed(module, exact, x.to(dtype).double())
            want_grad = torch.autograd.grad(want, list(exact.values()), grad.double())[0]

            def run_conv():
                out = torch.func.functional_call(conv, {k[len("proj."):]: v for k, v in params.items()},
                                                 (x.to(dtype).view(-1, channels, temporal, patch, patch),))
                out = out.view(-1, embed)
                return out, torch.autograd.grad(out, list(params.values()), grad)

            def run_matmul():
                out = patch_embed(module, params, x)
                return out, torch.autograd.grad(out, list(params.values()), grad)

            times: dict[str, list[float]] = {"conv": [], "matmul": []}
            results = {}
            for _ in range(args.rounds + 1):  # the first round warms up and is dropped
                for key, fn in (("conv", run_conv), ("matmul", run_matmul)):
                    common.sync(device)
                    start = clock()
                    results[key] = fn()
                    common.sync(device)
                    times[key].append(clock() - start)
            conv_ms, mm_ms = (statistics.median(times[k][1:]) * 1e3 for k in ("conv", "matmul"))
            errors = [f"{(out.double() - want).abs().max().item():.1e}, "
                      f"{(grads[0].double() - want_grad).abs().max().item():.1e}"
                      for out, grads in (results["conv"], results["matmul"])]
            print(f"| {name} | {dtype_name} | {args.patches} | {conv_ms:.1f} | {mm_ms:.1f} | {conv_ms / mm_ms:.1f}x | "
                  f"{errors[0]} | {errors[1]} |", flush=True)


if __name__ == "__main__":
    main()
