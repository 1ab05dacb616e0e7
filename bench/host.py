"""Host work of one train step on CPU, at a real model's depth with tiny widths: where the math is negligible, what
is left is the per-parameter and per-op Python that a GPU step also pays (issue 20, item 4).

  python bench/host.py                          # Qwen2.5-VL-3B depth (36 text layers, 32 vision blocks)
  python bench/host.py --family qwen3_vl        # Qwen3-VL-4B depth (36 text layers, 24 vision blocks)
  python bench/host.py --depth 2,4 --steps 2    # quick (tests/test_perf.py)

Model: vlm_sft.demo's tiny widths (text hidden 64, vision hidden 32, Qwen's 152k vocabulary) at the depth;
bf16 compute, fp32 master weights, AdamW + clipping. Rows: Robo2VLM-like (one 112x112 image each, ~100 prompt
tokens, 8 answer tokens; bench/step_gpu.py's rows), padded to a length bucket or packed (budget sixteenths).
Times are CPU seconds of this process (time.process_time, one torch thread): on a shared machine wall time
mostly measures the neighbours. Contestants, in one process, on the same batches:
  vlm-sft         the trainer as main.py builds it: plain tensors on one rank, fused AdamW (update_fused)
  baseline        the path before issue 20: DTensors on a mesh of one, foreach donated AdamW (update_)
  HF eager        the RLinf/TRL loop: fp32 module under autocast(bf16), backward, clip_grad_norm_, AdamW
  packed          vlm-sft on the same rows packed into one sequence (data.packing: varlen attention, per-row
                  positions) instead of a padded [rows, length] batch
each eager and (ours) compiled by region. Micro-batch contestants take one micro-batch of 4 rows; step
contestants a step of 16 rows: packed (one micro-batch at --step-budget) against RLinf's 4 padded micro-batches
of 4 and HF's loop at batch 16. Then the median perf/padding_fraction of 100 generated steps of 16 rows packed at
a 1024-token budget (lengths only, as the loader pads them). Columns, per step (median over the timed steps):
  step (s)          CPU time of a step
  host (ms)         the part of it not spent inside aten ops or compiled graphs (torch.profiler: the share of
                    a profiled step's wall time outside them, median of --profile-steps steps, times the step's
                    CPU time): Python, DTensor, autograd and dispatcher bookkeeping; what a GPU would wait on
  update (ms)       the optimizer update alone (clipping + AdamW), CPU time
  ops / kernel ops  top-level aten ops and compiled-graph calls of one step (profile_step); kernel ops leave
                    out views and aliases
  padding           padded positions / all positions of the step's micro-batches
  samples/s         rows / step CPU seconds
  per token         ops and kernel ops / real (attention-mask) tokens
Targets (issue 20): host <= 120 ms, kernel ops <= 2,600, update <= 40 ms (vlm-sft compiled, 3B depth); packed
padding <= 8% at 1024; the packed 16-row step >= 2.5x the samples/s of 4 x 4 and >= 3x HF's loop at batch 16.
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


def profile_step(fn, *args, top_ops: int = 0) -> dict:
    """One fn(*args) under torch.profiler (CPU): wall s, host s, ops and kernel ops (and with `top_ops`, "table":
    the profiler's table of the top_ops ops by self CPU time, with their input shapes).

    The wall time is taken inside the profiler's context: starting and stopping the profiler costs 30-90 ms of its
    own (875 ms on its first use in a process), which is not the step's.

    Top-level events: aten ops and compiled-graph calls not nested in another one (an aten op inside a compiled
    graph or inside another aten op is its business). host = wall - time inside top-level events: the Python,
    DTensor, autograd and dispatcher work between ops. ops = top-level events; kernel ops = those that are not
    views or aliases. (TorchDispatchMode cannot count: torch.compile refuses to run under one.)
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=top_ops > 0) as prof:
        t0 = time.perf_counter()
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
    table = prof.key_averages(group_by_input_shape=True).table(
        sort_by="self_cpu_time_total", row_limit=top_ops, max_name_column_width=60,
        max_shapes_column_width=70) if top_ops else ""
    return dict(profiled_wall=wall, host=max(wall - inside, 0.0), ops=ops, kernel_ops=kernel_ops, table=table)


def padding_fractions(g, spec, grid, *, steps: int, rows: int, budget: int, micro_batch: int,
                      buckets: tuple[int, ...]) -> tuple[float, float, float]:
    """Median perf/padding_fraction over `steps` generated steps of `rows` rows: (packed at `budget`, padded
    micro-batches of `micro_batch` rows, mean micro-batches per packed step). Lengths only: packing.pack_rows and
    the compiled shapes (budget sixteenths, length buckets), as the loader pads them."""
    from step_gpu import robo2vlm_like_rows
    from vlm_sft.data import packing
    from vlm_sft.data.collate import bucket_length

    budget_buckets = packing.budget_buckets(budget, buckets)
    packed, padded, counts = [], [], []
    for _ in range(steps):
        lengths = [len(ids) for ids, _ in robo2vlm_like_rows(g, spec, rows=rows, grid=grid, prompt=100,
                                                              answer=8)[0]]
        groups = packing.pack_rows(lengths, budget)
        counts.append(len(groups))
        real = sum(lengths)
        packed.append(1 - real / sum(packing.padded_length(sum(lengths[i] for i in gr), budget, budget_buckets)
                                     for gr in groups))
        padded.append(1 - real / sum(len(lengths[j:j + micro_batch]) * bucket_length(
            max(lengths[j:j + micro_batch]), buckets, 8) for j in range(0, rows, micro_batch)))
    return statistics.median(packed), statistics.median(padded), statistics.mean(counts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--family", choices=sorted(DEPTHS), default="qwen2.5_vl")
    parser.add_argument("--depth", default="", help="TEXT_LAYERS,VISION_BLOCKS (default: the family's real depth)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per contestant (after the warm-up)")
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--step-rows", type=int, default=16, help="rows of the packed step against RLinf's "
                        "micro-batches of --micro-batch rows")
    parser.add_argument("--step-budget", type=int, default=4096, help="actor.max_tokens_per_micro_batch of the "
                        "packed step of --step-rows rows (4096: the 16 rows in one micro-batch)")
    parser.add_argument("--budget", type=int, default=1024, help="the budget the padding fractions are measured at")
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"))
    parser.add_argument("--only", default="", help="comma-separated contestants (default all)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: CPU seconds are the step's "
                        "own, and the host share of a profiled step applies to them)")
    parser.add_argument("--profile-steps", type=int, default=3, help="profiled steps per contestant (median)")
    parser.add_argument("--top-ops", type=int, default=0, help="print each contestant's N ops by self CPU time "
                        "(its median profiled step, grouped by input shapes): where a step's time goes. Recording shapes adds "
                        "to the profiled steps' host share: take the host column from a run without it")
    parser.add_argument("--workdir", default="", help="model dir and inductor cache (default: a temp dir)")
    args = parser.parse_args()

    import torch

    import common
    torch.set_num_threads(args.threads)
    profile_step(lambda: None)  # the profiler's first use in a process costs ~1 s: not a contestant's
    from configs.robo2vlm import get_config
    from step_gpu import image_grid, robo2vlm_like_rows, step_batches
    from vlm_sft import compile as compile_lib
    from vlm_sft import models as model_lib
    from vlm_sft import demo, optim, schedules
    from vlm_sft import sharding as sharding_lib
    from vlm_sft import step as step_lib
    from vlm_sft.data.collate import collate
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
    compute = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    buckets = tuple(config.data.length_buckets)

    probe, _ = model_lib.load_model(model_dir)
    spec = probe.vision_spec(pad_token_id=151643)
    pixels = (65536, 16777216) if args.family == "qwen3_vl" else (3136, 12845056)
    grid = image_grid(112, 112, patch=spec.patch_size, min_pixels=pixels[0], max_pixels=pixels[1])
    g = torch.Generator().manual_seed(0)
    mb, n = args.micro_batch, args.step_rows
    # Per step: `step_rows` rows; the micro-batch contestants take its first `micro_batch` rows.
    steps = []
    for _ in range(args.steps + 2):
        rows = robo2vlm_like_rows(g, spec, rows=n, grid=grid, prompt=100, answer=8)
        first = tuple(x[:mb] for x in rows)
        packed_step, rlinf_step = step_batches(rows, spec, micro_batch=mb, max_tokens=args.step_budget,
                                               buckets=buckets)
        steps.append({
            "unpacked": [collate(*first, spec, length_buckets=buckets, pad_labels=True)],
            "packed": step_batches(first, spec, micro_batch=mb, max_tokens=args.budget, buckets=buckets)[0],
            "packed_step": packed_step, "rlinf_step": rlinf_step,
            "hf_step": [collate(*rows, spec, length_buckets=buckets, pad_labels=True)]})

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

    # name -> (build, which of a step's batches it takes, rows per step)
    contestants = {
        "vlm-sft compiled": (lambda: ours(False, True), "unpacked", mb),
        "vlm-sft eager": (lambda: ours(False, False), "unpacked", mb),
        "vlm-sft packed compiled": (lambda: ours(False, True), "packed", mb),
        "vlm-sft packed eager": (lambda: ours(False, False), "packed", mb),
        "baseline compiled": (lambda: ours(True, True), "unpacked", mb),
        "baseline eager": (lambda: ours(True, False), "unpacked", mb),
        "HF eager": (hf, "unpacked", mb),
        f"vlm-sft packed compiled {n} rows": (lambda: ours(False, True), "packed_step", n),
        f"vlm-sft compiled {n // mb}x{mb} rows": (lambda: ours(False, True), "rlinf_step", n),
        f"HF eager batch {n}": (hf, "hf_step", n),
    }
    if args.only:
        contestants = {k: v for k, v in contestants.items() if k in args.only.split(",")}
    out = {}
    for name, (make, key, rows_per_step) in contestants.items():
        step, timed = make()
        batches = [s[key] for s in steps]
        t0 = time.perf_counter()
        step(batches[0])  # compiles here (compiled contestants)
        first = time.perf_counter() - t0
        step(batches[1])
        timed["update"].clear()
        cpu = []
        for b in batches[2:]:
            t0 = time.process_time()
            step(b)
            cpu.append(time.process_time() - t0)
        update = statistics.median(timed["update"]) if timed["update"] else None
        # Median of a few profiled steps (same shapes as the timed ones): one profiled step moves with the machine.
        runs = sorted((profile_step(step, b, top_ops=args.top_ops) for b in batches[2:2 + args.profile_steps]),
                      key=lambda r: r["host"] / r["profiled_wall"])
        profiled = runs[len(runs) // 2]
        host_share = profiled["host"] / profiled["profiled_wall"]
        tokens = statistics.mean(sum(float(m["attention_mask"].sum()) for m in s) for s in batches)
        positions = statistics.mean(sum(m["attention_mask"].numel() for m in s) for s in batches)
        out[name] = dict(first=first, step=statistics.median(cpu), update=update, host_share=host_share,
                         host=host_share * statistics.median(cpu), ops=profiled["ops"],
                         kernel_ops=profiled["kernel_ops"], tokens=tokens, rows=rows_per_step,
                         micro_batches=len(batches[2]), padding=1 - tokens / positions)
        print(f"{name}: {out[name]}", file=sys.stderr, flush=True)
        if args.top_ops:
            print(f"## {name}: top {args.top_ops} ops by self CPU time, one profiled step "
                  f"(wall {profiled['profiled_wall']:.3f} s)\n{profiled['table']}", flush=True)
        del step

    packed_pad, padded_pad, per_step = padding_fractions(
        torch.Generator().manual_seed(1), spec, grid, steps=100, rows=n, budget=args.budget, micro_batch=mb,
        buckets=buckets)
    print(f"# bench/host.py: {common.machine()}")
    print(f"tiny widths at {NAMES[args.family]} depth ({text_layers} text layers, {vision_depth} vision blocks), "
          f"{args.dtype} compute, fp32 master; micro-batch contestants: {mb} rows (packed: one micro-batch at "
          f"budget {args.budget}); step contestants: {n} rows (packed at budget {args.step_budget}, or "
          f"{n // mb} padded micro-batches of {mb}); load avg {os.getloadavg()[0]:.1f}\n")
    print("| contestant | rows | micro-batches | real tokens | padding | step (s) | samples/s | host (ms) | "
          "update (ms) | ops | kernel ops | ops / token | kernel ops / token | first step (s) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, r in out.items():
        update = f"{r['update'] * 1e3:.0f}" if r["update"] is not None else "n/a"
        print(f"| {name} | {r['rows']} | {r['micro_batches']} | {r['tokens']:.0f} | {100 * r['padding']:.1f}% | "
              f"{r['step']:.3f} | {r['rows'] / r['step']:.2f} | {r['host'] * 1e3:.0f} | {update} | {r['ops']:,} | "
              f"{r['kernel_ops']:,} | {r['ops'] / r['tokens']:.2f} | {r['kernel_ops'] / r['tokens']:.2f} | "
              f"{r['first']:.1f} |")
    pairs = (("vlm-sft compiled", "baseline compiled"), ("vlm-sft eager", "baseline eager"),
             ("vlm-sft compiled", "HF eager"), ("vlm-sft packed compiled", "vlm-sft compiled"),
             ("vlm-sft packed eager", "vlm-sft eager"),
             (f"vlm-sft packed compiled {n} rows", f"vlm-sft compiled {n // mb}x{mb} rows"),
             (f"vlm-sft packed compiled {n} rows", f"HF eager batch {n}"))
    for a, b in pairs:
        if a in out and b in out:
            ra, rb = out[a], out[b]
            print(f"\nratio: {a} / {b} = {(ra['rows'] / ra['step']) / (rb['rows'] / rb['step']):.2f}x samples/s, "
                  f"host {rb['host'] / max(ra['host'], 1e-9):.2f}x less, kernel ops per token "
                  f"{(rb['kernel_ops'] / rb['tokens']) / (ra['kernel_ops'] / ra['tokens']):.2f}x fewer")
    print(f"\nmedian perf/padding_fraction over 100 steps of {n} rows: {100 * packed_pad:.1f}% packed at budget "
          f"{args.budget} ({per_step:.1f} micro-batches per step) vs {100 * padded_pad:.1f}% in padded micro-batches "
          f"of {mb} rows (data.length_buckets)")
    checks = []
    r = out.get("vlm-sft compiled")
    if r is not None:
        checks += [("host <= 120 ms", r["host"] <= 0.120), ("kernel ops <= 2,600", r["kernel_ops"] <= 2600),
                   ("update <= 40 ms", r["update"] is not None and r["update"] <= 0.040)]
    checks.append((f"packed padding at {args.budget} <= 8%", packed_pad <= 0.08))
    a, b, h = (f"vlm-sft packed compiled {n} rows", f"vlm-sft compiled {n // mb}x{mb} rows",
               f"HF eager batch {n}")
    if a in out and b in out:
        checks.append((f"packed {n} rows >= 2.5x {n // mb} x {mb}", out[b]["step"] / out[a]["step"] >= 2.5))
    if a in out and h in out:
        checks.append((f"packed {n} rows >= 3x HF batch {n}", out[h]["step"] / out[a]["step"] >= 3))
    print("\ntargets: " + "; ".join(f"{k} {'met' if ok else 'NOT met'}" for k, ok in checks))
    sharding_lib.exit_process(0)


if __name__ == "__main__":
    main()
