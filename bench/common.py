"""Shared by the benchmarks: the eager Hugging Face training loop (the baseline), contestants, timing, the table.

A speed ratio is only meaningful against a baseline measured in the same process, on the same batches and device
(../shared/DESIGN.md "Measuring speed honestly"), so every benchmark runs its contestants side by side here:
rounds alternate between them, so slow drifts of a shared machine hit all of them alike, and the table reports
the median round.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
import platform
import statistics
import time
from typing import Callable, Sequence

import torch

from vlm_sft import optim, schedules
from vlm_sft import step as step_lib
from vlm_sft.state import init_train_state

Batch = dict[str, torch.Tensor]
IMAGE_PAD = 151655


def machine() -> str:
    """One line naming the hardware and software a number was measured on."""
    if torch.cuda.is_available():
        device = f"{torch.cuda.get_device_name()} ({torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB)"
    else:
        device = f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores, " \
                 f"{torch.get_num_threads()} torch threads"
    import transformers
    return (f"{datetime.date.today().isoformat()}; {device}; torch {torch.__version__}, "
            f"transformers {transformers.__version__}, python {platform.python_version()}")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def hf_batch(batch: Batch, image_token_id: int = IMAGE_PAD) -> dict[str, torch.Tensor]:
    """The trainer's batch as the HF model's inputs: labels [B, L] (-100 off the answer), padded only to the
    longest row (as a HF collator does), not to the trainer's length bucket."""
    lengths = batch["attention_mask"].sum(dim=1)
    length = min(int(-(-int(lengths.max()) // 8) * 8), batch["input_ids"].shape[1])
    rows, width = batch["input_ids"].shape
    labels = torch.full((rows * width,), -100, dtype=torch.long, device=batch["input_ids"].device)
    real = batch["label_weight"] > 0 if "label_weight" in batch else torch.ones_like(batch["label_ids"], dtype=bool)
    labels[batch["label_index"][real] + 1] = batch["label_ids"][real]
    inputs = {
        "input_ids": batch["input_ids"][:, :length],
        "attention_mask": batch["attention_mask"][:, :length],
        "labels": labels.view(rows, width)[:, :length],
        "mm_token_type_ids": (batch["input_ids"][:, :length] == image_token_id).int(),
    }
    if "pixel_values" in batch:
        inputs["pixel_values"] = batch["pixel_values"]
        inputs["image_grid_thw"] = batch["image_grid_thw"]
    return inputs


def hf_step_fn(module: torch.nn.Module, *, lr: float, weight_decay: float, max_grad_norm: float,
               autocast_dtype: torch.dtype | None = None) -> Callable[[Sequence[Batch]], torch.Tensor]:
    """The eager loop RLinf and TRL run, over a step's micro-batches: forward with labels -> outputs.loss / n,
    backward (gradients accumulate in .grad), then clip_grad_norm_, torch.optim.AdamW (fused on CUDA, as a tuned
    HF run would use), zero_grad. Mixed precision the HF way: fp32 weights under torch.autocast."""
    module.train()
    module.requires_grad_(True)
    params = [p for p in module.parameters() if p.requires_grad]
    cuda = params[0].is_cuda
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay,
                            fused=True if cuda else None)
    device_type = "cuda" if cuda else "cpu"
    image_token_id = module.config.image_token_id  # the family's (Qwen3.5: 248056)

    def step(micro_batches: Sequence[Batch]) -> torch.Tensor:
        total = 0.0
        for batch in micro_batches:
            inputs = hf_batch(batch, image_token_id)
            autocast = (torch.autocast(device_type, dtype=autocast_dtype) if autocast_dtype is not None
                        else contextlib.nullcontext())
            with autocast:
                loss = module(**inputs).loss
            (loss / len(micro_batches)).backward()
            total = total + loss.detach()
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return total / len(micro_batches)

    return step


def trainer_step_fn(model, params: dict, sharding, *, lr: float, weight_decay: float, max_grad_norm: float,
                    compile: bool, checkpointing: bool = False, loss_normalization: str = "micro_batch"
                    ) -> Callable[[Sequence[Batch]], torch.Tensor]:
    """This trainer's train_step as main.py builds it (params sharded as DTensors, gathered per block by
    sharding.make_block_call), with the same optimizer settings as the HF loop. Takes the step's micro-batches.
    `model`'s module is turned into a skeleton (sharding.shard_model): give each contestant its own."""
    from vlm_sft import sharding as sharding_lib

    schedule = schedules.make_schedule("constant", peak_lr=lr, warmup_steps=0, total_steps=1)
    tx = optim.adamw(schedule, weight_decay=weight_decay, max_grad_norm=max_grad_norm)
    state = init_train_state(sharding_lib.shard_model(model, params, sharding), tx)
    block_call = sharding_lib.make_block_call(sharding, checkpointing=checkpointing, compile=compile)
    train_step = step_lib.make_train_step(model, tx, schedule, compile=compile, block_call=block_call,
                                          loss_normalization=loss_normalization)
    holder = {"state": state}

    def step(micro_batches: Sequence[Batch]) -> torch.Tensor:
        holder["state"], metrics = train_step(holder["state"], list(micro_batches))
        return metrics["train/loss"]

    step.holder = holder  # the live state (benchmarks free it between contestants)
    return step


@dataclasses.dataclass
class Result:
    name: str
    first_step_s: float            # the first (warm-up) step: includes compilation where there is one
    step_times: list[float]        # seconds per step, one median-of-round entry per round
    samples_per_step: int
    tokens_per_step: float         # real (attention-mask) tokens
    flops_per_step: float
    first_loss: float
    last_loss: float
    peak_memory_gib: float | None = None

    @property
    def step_s(self) -> float:
        return statistics.median(self.step_times)


def rows_of(batch: Batch) -> int:
    """Samples in a micro-batch: its rows, or with packing the rows packed into its one sequence."""
    if "row_ids" in batch:
        return int(batch["row_ids"][batch["attention_mask"] > 0].unique().numel())
    return len(batch["input_ids"])


def run_rounds(contestants: dict[str, Callable[[Sequence[Batch]], torch.Tensor]], steps: Sequence[Sequence[Batch]],
               *, warmup: int, rounds: int, device: torch.device, flops: Callable[[Sequence[Batch]], float]
               ) -> dict[str, Result]:
    """Warm up each contestant (`warmup` steps, the first one timed alone), then `rounds` rounds in which every
    contestant runs all `steps` in turn. Step i of every contestant gets the same micro-batches."""
    results = {}
    for name, step in contestants.items():
        sync(device)
        t0 = time.perf_counter()
        loss = float(step(steps[0]))
        sync(device)
        first = time.perf_counter() - t0
        for i in range(1, warmup):
            step(steps[i % len(steps)])
        sync(device)
        results[name] = Result(name, first, [], sum(rows_of(b) for b in steps[0]),
                               statistics.mean(sum(float(b["attention_mask"].sum()) for b in s) for s in steps),
                               statistics.mean(flops(s) for s in steps), loss, loss)
    for _ in range(rounds):
        for name, step in contestants.items():
            sync(device)
            t0 = time.perf_counter()
            for s in steps:
                loss = step(s)
            results[name].last_loss = float(loss)
            sync(device)
            results[name].step_times.append((time.perf_counter() - t0) / len(steps))
    return results


def print_table(results: dict[str, Result], baseline: str | None, target: str, *, peak_flops: float | None
                ) -> float | None:
    """The table (markdown) and the ratio line; returns target's steps/s over the baseline's (None without one)."""
    header = "| contestant | s/step | steps/s | samples/s | real tokens/s | TFLOP/s | MFU | first step (s) | " \
             "peak mem (GiB) | loss first -> last |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for r in results.values():
        tflops = r.flops_per_step / r.step_s / 1e12
        mfu = f"{r.flops_per_step / r.step_s / peak_flops:.1%}" if peak_flops else "n/a"
        memory = f"{r.peak_memory_gib:.1f}" if r.peak_memory_gib is not None else "n/a"
        print(f"| {r.name} | {r.step_s:.3f} | {1 / r.step_s:.2f} | {r.samples_per_step / r.step_s:.1f} | "
              f"{r.tokens_per_step / r.step_s:,.0f} | {tflops:.3g} | {mfu} | {r.first_step_s:.1f} | {memory} | "
              f"{r.first_loss:.4f} -> {r.last_loss:.4f} |")
    if baseline is None:
        return None
    ratio = results[baseline].step_s / results[target].step_s
    per_round = ", ".join(f"{b / t:.2f}" for b, t in zip(results[baseline].step_times, results[target].step_times))
    print(f"\nratio: {target} / {baseline} = {ratio:.2f}x steps/s (median of {len(results[target].step_times)} "
          f"rounds; per-round ratios {per_round})")
    return ratio
