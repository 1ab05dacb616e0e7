"""Host work of one train step on CPU, at a real model's depth with tiny widths: where the math is negligible, what
is left is the per-parameter and per-op Python that a GPU step also pays (issue 20, item 4).

  python bench/host.py                          # Qwen2.5-VL-3B depth (36 text layers, 32 vision blocks)
  python bench/host.py --family qwen3_vl        # Qwen3-VL-4B depth (36 text layers, 24 vision blocks)
  python bench/host.py --depth 2,4 --steps 2    # quick (tests/test_perf.py)

Model: vlm_sft.demo's tiny widths (text hidden 64, vision hidden 32, Qwen's 152k vocabulary) at the depth;
bf16 compute, fp32 master weights, AdamW + clipping. One step = one micro-batch of 4 Robo2VLM-like rows (one
112x112 image each, ~100 prompt tokens, 8 answer tokens; bench/step_gpu.py's batches), padded to a length bucket.
Times are CPU seconds of this process (time.process_time, one torch thread): on a shared machine wall time
mostly measures the neighbours. Contestants, in one process, on the same batches:
  vlm-sft         the trainer as main.py builds it: plain tensors on one rank, fused AdamW (update_fused)
  baseline        the path before issue 20: DTensors on a mesh of one, foreach donated AdamW (update_)
  HF eager        the RLinf/TRL loop: fp32 module under autocast(bf16), backward, clip_grad_norm_, AdamW
each eager and (ours) compiled by region. Columns, per step (median over the timed steps):
  step (s)          CPU time of a step
  host (ms)         the part of it not spent inside aten ops or compiled graphs (torch.profiler, one step: its
                    share of the profiled wall time, times the step's CPU time): Python, DTensor, autograd and
                    dispatcher bookkeeping; what a GPU would wait on
  update (ms)       the optimizer update alone (clipping + AdamW), CPU time
  ops / kernel ops  top-level aten ops and compiled-graph calls of one step (profile_step); kernel ops leave
                    out views and aliases
  per token         kernel ops / real (attention-mask) tokens
Targets (issue 20): host <= 120 ms, kernel ops <= 2,600, update <= 40 ms (vlm-sft compiled, 3B depth).
`packed`: n/a: every contestant here takes the same unpacked micro-batch (a packed one is left to do).
"""
from __future__ import annotations

import argparse
import collections
import os
import statistics
import sys
import tempfile
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [BENCH, os.path.dirname(BENCH)]

DEPTHS = {"qwen2.5_vl": (36, 32), "qwen3_vl": (36, 24)}  # the 3B's and the 4B's (text layers, vision blocks)
NAMES = {"qwen2.5_vl": "Qwen2.5-VL-3B", "qwen3_vl": "Qwen3-VL-4B"}


_ALIASING: dict[str, bool] = {}


def is_kernel(event) -> bool:
    """Whether a profiler event does work: a compiled-graph call, or an aten op that is not a view/alias. An op
    whose schema may alias (aten::to, reshape, contiguous) counts when something under it does work (the cast)."""
    name = event.name
    if "CompiledFxGraph" in name:
        return True
    if not name.startswith("aten::"):  # profiler bookkeeping under an op (e.g. autograd's "detach")
        return any(is_kernel(child) for child in event.cpu_children)
    if name not in _ALIASING:
        import torch
        packet = getattr(torch.ops.aten, name.split("::")[-1], None)
        overloads = [getattr(packet, o) for o in packet.overloads()] if packet is not None else []
        _ALIASING[name] = any(o.is_view for o in overloads) or name in (
            "aten::_unsafe_view", "aten::lift_fresh", "aten::resolve_conj", "aten::resolve_neg")
    return not _ALIASING[name] or any(is_kernel(child) for child in event.cpu_children)


def profile_step(fn, *args) -> dict:
    """One fn(*args) under torch.profiler (CPU): wall s, host s, ops and kernel ops.

    Top-level events: aten ops and compiled-graph calls not nested in another one (an aten op inside a compiled
    graph or inside another aten op is its business). host = wall - time inside top-level events: the Python,
    DTensor, autograd and dispatcher work between ops. ops = top-level events; kernel ops = those that are not
    views or aliases. (TorchDispatchMode cannot count: torch.compile refuses to run under one.)
    """
    from torch.profiler import ProfilerActivity, profile

    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn(*args)
    wall = time.perf_counter() - t0

    def counted(e) -> bool:
        return e.name.startswith("aten::") or "CompiledFxGraph" in e.name

    inside, ops, kernel_ops = 0.0, 0, 0
    for e in prof.events():
        if not counted(e):
            continue
        parent = e.cpu_parent
        while parent is not None and not counted(parent):
            parent = parent.cpu_parent
        if parent is not None:
            continue
        inside += e.cpu_time_total / 1e6
        ops += 1
        kernel_ops += is_kernel(e)
    return dict(profiled_wall=wall, host=max(wall - inside, 0.0), ops=ops, kernel_ops=kernel_ops)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--family", choices=sorted(DEPTHS), default="qwen2.5_vl")
    parser.add_argument("--depth", default="", help="TEXT_LAYERS,VISION_BLOCKS (default: the family's real depth)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per contestant (after the warm-up)")
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"))
    parser.add_argument("--only", default="", help="comma-separated contestants (default all)")
    parser.add_argument("--workdir", default="", help="model dir and inductor cache (default: a temp dir)")
    args = parser.parse_args()

    import torch

    import common
    from configs.robo2vlm import get_config
    from step_gpu import image_grid, robo2vlm_like_batch
    from vlm_sft import compile as compile_lib
    from vlm_sft import models as model_lib
    from vlm_sft import demo, optim, schedules
    from vlm_sft import sharding as sharding_lib
    from vlm_sft import step as step_lib
    from vlm_sft.state import init_train_state

    text_layers, vision_depth = (int(x) for x in (args.depth or "%d,%d" % DEPTHS[args.family]).split(","))
    workdir = args.workdir or tempfile.mkdtemp(prefix="bench_host_")
    compile_lib.set_cache_dir(os.path.join(workdir, ".inductor_cache"))
    model_dir = os.path.join(workdir, f"{args.family}_{text_layers}x{vision_depth}")
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        build = demo.make_tiny_model_dir if args.family == "qwen2.5_vl" else demo.make_tiny_qwen3_vl_dir
        build(model_dir, text_layers=text_layers, vision_depth=vision_depth)

    device, _ = sharding_lib.init_process_group(sharding_lib.ProcessInfo())
    config = get_config()
    mp = config.actor.fsdp_config.mixed_precision
    mp.param_dtype, mp.reduce_dtype, mp.buffer_dtype = args.dtype, "fp32", "fp32"
    # The batches here are unpacked (bench/step_gpu.py's collate); a packed contestant is not built yet.
    packed = "n/a (unpacked batches)" if "packing" in config.data else "n/a (no data.packing)"
    compute = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]

    probe, _ = model_lib.load_model(model_dir)
    spec = probe.vision_spec(pad_token_id=151643)
    pixels = (65536, 16777216) if args.family == "qwen3_vl" else (3136, 12845056)
    grid = image_grid(112, 112, patch=spec.patch_size, min_pixels=pixels[0], max_pixels=pixels[1])
    g = torch.Generator().manual_seed(0)
    batches = [[robo2vlm_like_batch(g, spec, rows=args.micro_batch, grid=grid, prompt=100, answer=8,
                                    buckets=tuple(config.data.length_buckets))] for _ in range(args.steps + 2)]
    tokens = statistics.mean(float(s[0]["attention_mask"].sum()) for s in batches)

    def ours(baseline: bool, compiled: bool):
        sharding = sharding_lib.make_sharding(config, device, plain_single_rank=not baseline)
        model, params = model_lib.load_model(model_dir)
        schedule = schedules.make_schedule("constant", peak_lr=1e-5, warmup_steps=0, total_steps=1)
        tx = optim.adamw(schedule, weight_decay=0.01, max_grad_norm=1.0)
        if baseline:
            tx = tx._replace(update_fused=None)
        timed = {"update": []}
        for name in ("update_fused", "update_"):
            fn = getattr(tx, name)
            if fn is not None:
                def run(*a, _fn=fn, **kw):
                    t0 = time.process_time()
                    out = _fn(*a, **kw)
                    timed["update"].append(time.process_time() - t0)
                    return out
                tx = tx._replace(**{name: run})
        holder = {"state": init_train_state(sharding_lib.shard_model(model, params, sharding), tx)}
        block_call = sharding_lib.make_block_call(sharding, compile=compiled)
        train_step = step_lib.make_train_step(model, tx, schedule, compile=compiled, block_call=block_call)

        def step(micro_batches):
            holder["state"], metrics = train_step(holder["state"], micro_batches)
            return float(metrics["train/loss"])

        return step, timed

    def hf():
        module, _ = model_lib.load_model(model_dir)
        fn = common.hf_step_fn(module.module, lr=1e-5, weight_decay=0.01, max_grad_norm=1.0,
                               autocast_dtype=None if compute == torch.float32 else compute)
        return (lambda micro_batches: float(fn(micro_batches))), {"update": []}

    contestants = {
        "vlm-sft compiled": lambda: ours(False, True), "vlm-sft eager": lambda: ours(False, False),
        "baseline compiled": lambda: ours(True, True), "baseline eager": lambda: ours(True, False),
        "HF eager": hf,
    }
    if args.only:
        contestants = {k: v for k, v in contestants.items() if k in args.only.split(",")}
    rows = {}
    for name, make in contestants.items():
        step, timed = make()
        t0 = time.perf_counter()
        step(batches[0])  # compiles here (compiled contestants)
        first = time.perf_counter() - t0
        step(batches[1])
        timed["update"].clear()
        cpu = []
        for s in batches[2:]:
            t0 = time.process_time()
            step(s)
            cpu.append(time.process_time() - t0)
        update = statistics.median(timed["update"]) if timed["update"] else None
        profiled = profile_step(step, batches[2])
        host_share = profiled["host"] / profiled["profiled_wall"]
        rows[name] = dict(first=first, step=statistics.median(cpu), update=update, host_share=host_share,
                          host=host_share * statistics.median(cpu), ops=profiled["ops"],
                          kernel_ops=profiled["kernel_ops"])
        print(f"{name}: {rows[name]}", file=sys.stderr, flush=True)
        del step

    print(f"# bench/host.py: {common.machine()}")
    print(f"tiny widths at {NAMES[args.family]} depth ({text_layers} text layers, {vision_depth} vision blocks), "
          f"{args.dtype} compute, fp32 master; 1 micro-batch of {args.micro_batch} rows, {tokens:.0f} real tokens; "
          f"packed: {packed}; load avg {os.getloadavg()[0]:.1f}\n")
    print("| contestant | step (s) | host (ms) | update (ms) | ops | kernel ops | kernel ops / token | "
          "first step (s) |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        update = f"{r['update'] * 1e3:.0f}" if r["update"] is not None else "n/a"
        print(f"| {name} | {r['step']:.3f} | {r['host'] * 1e3:.0f} | {update} | {r['ops']:,} | "
              f"{r['kernel_ops']:,} | {r['kernel_ops'] / tokens:.2f} | {r['first']:.1f} |")
    for a, b in (("vlm-sft compiled", "baseline compiled"), ("vlm-sft eager", "baseline eager"),
                 ("vlm-sft compiled", "HF eager")):
        if a in rows and b in rows:
            print(f"\nratio: {a} / {b} = {rows[b]['step'] / rows[a]['step']:.2f}x steps/s, host "
                  f"{rows[b]['host'] / max(rows[a]['host'], 1e-9):.2f}x less, kernel ops "
                  f"{rows[b]['kernel_ops'] / rows[a]['kernel_ops']:.2f}x fewer")
    r = rows.get("vlm-sft compiled")
    if r is not None:
        checks = (("host <= 120 ms", r["host"] <= 0.120), ("kernel ops <= 2,600", r["kernel_ops"] <= 2600),
                  ("update <= 40 ms", r["update"] is not None and r["update"] <= 0.040))
        print("\ntargets (vlm-sft compiled): " + "; ".join(f"{k} {'met' if ok else 'NOT met'}" for k, ok in checks))
    sharding_lib.exit_process(0)


if __name__ == "__main__":
    main()
