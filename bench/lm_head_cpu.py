"""The vocabulary head at the labelled positions on CPU, forward + backward: in bf16 (the step's compute dtype)
against fp32 of the same bf16 inputs (what models/common._lm_head computes on CPU).

  python bench/lm_head_cpu.py                   # 64 labels, hidden 64 (bench/host.py's tiny widths)
  python bench/lm_head_cpu.py --hidden 64,512   # wider: bf16 without bf16 instructions takes minutes at 2048

Prints CPU milliseconds (median of the rounds after a warm-up, 1 torch thread), the ratio bf16 / fp32, and each
one's largest error in the hidden states' gradient against float64.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [BENCH, os.path.dirname(BENCH)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--labels", type=int, default=64, help="labelled positions (bench/host.py: 64 at 4 rows)")
    parser.add_argument("--hidden", default="64", help="comma-separated hidden sizes")
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    import torch
    import torch.nn.functional as F

    import common

    torch.set_num_threads(1)
    print(common.machine())
    print("| labels x hidden x vocab | bf16 (ms) | fp32 of bf16 inputs (ms) | bf16 / fp32 | bf16 grad error | "
          "fp32 grad error |")
    print("|---|---|---|---|---|---|")
    for hidden in (int(h) for h in args.hidden.split(",")):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(args.labels, hidden, generator=g).bfloat16()
        w = (torch.randn(args.vocab, hidden, generator=g) / hidden ** 0.5).bfloat16()
        targets = torch.randint(0, args.vocab, (args.labels,), generator=g)

        def run(dtype):
            xs, ws = x.to(dtype).requires_grad_(), w.to(dtype).requires_grad_()
            loss = F.cross_entropy(F.linear(xs, ws).float(), targets)
            return torch.autograd.grad(loss, [xs, ws])[0]

        want = run(torch.float64)
        times: dict[str, list[float]] = {"bf16": [], "fp32": []}
        errors = {}
        for _ in range(args.rounds + 1):  # the first round warms up and is dropped
            for key, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
                start = time.process_time()
                grad = run(dtype)
                times[key].append(time.process_time() - start)
                errors[key] = (grad.double() - want).abs().max().item()
        bf, fp = (statistics.median(times[k][1:]) * 1e3 for k in ("bf16", "fp32"))
        print(f"| {args.labels} x {hidden} x {args.vocab} | {bf:.0f} | {fp:.0f} | {bf / fp:.1f}x | "
              f"{errors['bf16']:.1e} | {errors['fp32']:.1e} |", flush=True)


if __name__ == "__main__":
    main()
