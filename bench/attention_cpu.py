"""Packed attention off the flash path on CPU, forward + backward: the op the trainer runs against the one before.

  python bench/attention_cpu.py                      # both shapes, bf16 and fp32, 1 torch thread
  python bench/attention_cpu.py --dtypes fp32 --rounds 3 --shapes 0   # the tiny-width shape only

Contestants, on the same packed q/k/v and output gradient (rows of random lengths, cu_seqlens as a packed batch
gives them), each a forward and a backward:
- "before": what models/attention.py ran until 2026-12-04: the rows gathered into padded rows, sdpa in the input's
  dtype, the backward recomputing the forward under torch.func.vjp (the baseline of the ratio column);
- "recomputed op": attention.recomputed_segment_attention (the path of devices other than CPU, fp32 compute);
- "cpu op": attention.segment_attention(impl="reference") on CPU: logsumexp saved by the forward, the CPU flash
  backward called directly, fp32 compute for bf16 inputs.
Prints CPU milliseconds per forward + backward (median round; rounds alternate contestants), the ratio to
"before", and each output's and q-gradient's largest error against float64 attention of the same inputs.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [BENCH, os.path.dirname(BENCH)]

# (name, rows, longest row, heads, kv heads, head dim): bench/host.py's packed 16 rows at tiny widths, and
# Qwen2.5-VL-3B's text attention (16 heads, 2 kv heads, dim 128) over 8 rows of up to 512 tokens.
SHAPES = [("host.py 16 rows, tiny widths", 16, 140, 4, 2, 16), ("Qwen2.5-VL-3B text, 8 rows", 8, 512, 16, 2, 128)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtypes", default="bf16,fp32")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--shapes", default="", help="comma-separated indices into SHAPES (default: all)")
    args = parser.parse_args()

    import torch
    import torch.nn.functional as F

    import common
    from vlm_sft.data.vision import attention_layout
    from vlm_sft.models import attention

    torch.set_num_threads(args.threads)
    dtypes = {"bf16": torch.bfloat16, "fp32": torch.float32}

    def before(q, k, v, cu):
        """The pre-2026-12-04 op: sdpa in the input dtype over the gathered rows, backward by a recomputed forward."""
        bounds = cu.tolist()
        layout = attention_layout([b - a for a, b in zip(bounds, bounds[1:]) if b > a], "s")
        gather, scatter = layout["s_gather"], layout["s_scatter"]
        groups = q.shape[1] // k.shape[1]

        def attend(q, k, v):
            qs, ks, vs = (z[gather].transpose(1, 2) for z in (q, k, v))
            ks, vs = ks.repeat_interleave(groups, 1), vs.repeat_interleave(groups, 1)
            out = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True)
            return out.transpose(1, 2).flatten(0, 1)[scatter]
        return attend, (q, k, v)

    def fwd_bwd_before(q, k, v, cu, grad):
        attend, qkv = before(q, k, v, cu)
        with torch.no_grad():
            out = attend(*qkv)
        _, vjp = torch.func.vjp(attend, *qkv)
        return out, vjp(grad)

    def fwd_bwd(fn):
        def run(q, k, v, cu, grad):
            leaves = [z.detach().requires_grad_() for z in (q, k, v)]
            out = fn(*leaves, cu)
            return out, torch.autograd.grad(out, leaves, grad)
        return run

    contestants = {
        "before": fwd_bwd_before,
        "recomputed op": fwd_bwd(lambda q, k, v, cu: attention.recomputed_segment_attention(q, k, v, cu, True, None)),
        "cpu op": fwd_bwd(lambda q, k, v, cu: attention.segment_attention(q, k, v, cu, 0, causal=True,
                                                                          impl="reference")),
    }
    print(common.machine())
    print("| shape | dtype | contestant | fwd + bwd (ms) | vs before | output error | dq error |")
    print("|---|---|---|---|---|---|---|")
    shapes = [SHAPES[int(i)] for i in args.shapes.split(",")] if args.shapes else SHAPES
    for name, rows, longest, heads, kv_heads, dim in shapes:
        g = torch.Generator().manual_seed(0)
        lengths = torch.randint(longest // 4, longest + 1, (rows,), generator=g)
        lengths[0] = longest
        t = int(lengths.sum())
        cu = torch.cat([torch.zeros(1, dtype=torch.int32), lengths.cumsum(0).to(torch.int32)])
        exact = [torch.randn(t, h, dim, generator=g, dtype=torch.float64) for h in (heads, kv_heads, kv_heads)]
        grad64 = torch.randn(t, heads, dim, generator=g, dtype=torch.float64)
        want, want_grads = fwd_bwd_before(*exact, cu, grad64)
        for dtype_name in args.dtypes.split(","):
            dtype = dtypes[dtype_name]
            qkv = [z.to(dtype) for z in exact]
            grad = grad64.to(dtype)
            times: dict[str, list[float]] = {c: [] for c in contestants}
            errors = {}
            for _ in range(args.rounds + 1):  # the first round warms up and is dropped
                for c, run in contestants.items():
                    start = time.process_time()
                    out, grads = run(*qkv, cu, grad)
                    times[c].append(time.process_time() - start)
                    errors[c] = ((out.double() - want).abs().max().item(),
                                 (grads[0].double() - want_grads[0]).abs().max().item())
            base = statistics.median(times["before"][1:])
            for c in contestants:
                ms = statistics.median(times[c][1:])
                print(f"| {name} (T={t}) | {dtype_name} | {c} | {ms * 1e3:.1f} | {base / ms:.2f}x | "
                      f"{errors[c][0]:.1e} | {errors[c][1]:.1e} |", flush=True)


if __name__ == "__main__":
    main()
