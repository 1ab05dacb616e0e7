"""Learning-rate schedules: `step -> lr`, where step = number of optimizer updates already applied.

Each schedule takes a Python int (returns a float, for logging and tests) or a 0-dim tensor (returns an fp32
0-dim tensor built from torch ops only, so a compiled train step computes the lr on device and a changing lr
never recompiles). The formula is written once and evaluated with either `math` or `torch` ops.

All schedules give min_lr (constant: lr) for step >= total_steps, i.e. after the run's last update.
"""
import math
from typing import Callable

import torch

Schedule = Callable[[int | torch.Tensor], float | torch.Tensor]


class _Ops:
    """The handful of ops a schedule needs, for Python floats or for tensors."""

    def __init__(self, step: int | torch.Tensor):
        self.tensor = isinstance(step, torch.Tensor)
        self.step = step.to(torch.float32) if self.tensor else float(step)

    def cos(self, x):
        return torch.cos(x) if self.tensor else math.cos(x)

    def clip(self, x, lo: float, hi: float):
        return torch.clamp(x, lo, hi) if self.tensor else min(max(x, lo), hi)

    def where(self, cond, a, b):
        if self.tensor:
            return torch.where(cond, a, torch.as_tensor(b, dtype=torch.float32, device=self.step.device))
        return a if cond else b


def _check(peak_lr: float, warmup_steps: int, total_steps: int | None = None, min_lr: float = 0.0) -> None:
    if peak_lr < 0:
        raise ValueError(f"schedules: peak lr (actor.optim.lr) must be >= 0, got {peak_lr}")
    if warmup_steps < 0:
        raise ValueError(f"schedules: warmup_steps (actor.optim.lr_warmup_steps) must be >= 0, got {warmup_steps}")
    if total_steps is not None and total_steps < 1:
        raise ValueError(f"schedules: total_steps (actor.optim.total_training_steps) must be >= 1, got {total_steps}")
    if not 0 <= min_lr <= peak_lr:
        raise ValueError(f"schedules: min_lr (actor.optim.min_lr) must be in [0, lr={peak_lr}], got {min_lr}")


def _warmup(ops: _Ops, peak_lr: float, warmup_steps: int):
    """peak * (step + 1) / warmup: the first update already moves the weights (RLinf's runs at lr 0)."""
    return peak_lr * (ops.step + 1.0) / max(warmup_steps, 1)


def _progress(ops: _Ops, warmup_steps: int, total_steps: int):
    """Fraction of the decay phase done, in [0, 1]."""
    return ops.clip((ops.step - warmup_steps) / max(total_steps - warmup_steps, 1), 0.0, 1.0)


def warmup_cosine(peak_lr: float, warmup_steps: int, total_steps: int, min_lr: float = 0.0) -> Schedule:
    """Linear warmup, then cosine decay to min_lr (RLinf's "cosine", without its lr-0 first update).

        lr(s) = peak * (s + 1) / warmup                                   s < warmup
        lr(s) = min_lr + (peak - min_lr) * 0.5 * (1 + cos(pi * p))       warmup <= s < total
                p = (s - warmup) / (total - warmup)
        lr(s) = min_lr                                                     s >= total

    warmup 0 starts at the peak. With warmup >= total the run ends inside the warmup.
    """
    _check(peak_lr, warmup_steps, total_steps, min_lr)
    peak_lr, min_lr = float(peak_lr), float(min_lr)

    def schedule(step: int | torch.Tensor) -> float | torch.Tensor:
        ops = _Ops(step)
        progress = _progress(ops, warmup_steps, total_steps)
        cosine = min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + ops.cos(math.pi * progress))
        lr = ops.where(ops.step < warmup_steps, _warmup(ops, peak_lr, warmup_steps), cosine)
        return ops.where(ops.step >= total_steps, min_lr, lr)

    return schedule


def linear(peak_lr: float, warmup_steps: int, total_steps: int, min_lr: float = 0.0) -> Schedule:
    """Linear warmup as warmup_cosine, then a straight line from peak to min_lr over (total - warmup) steps.

        lr(s) = peak + (min_lr - peak) * (s - warmup) / (total - warmup)  warmup <= s < total
    """
    _check(peak_lr, warmup_steps, total_steps, min_lr)
    peak_lr, min_lr = float(peak_lr), float(min_lr)

    def schedule(step: int | torch.Tensor) -> float | torch.Tensor:
        ops = _Ops(step)
        decay = peak_lr + (min_lr - peak_lr) * _progress(ops, warmup_steps, total_steps)
        lr = ops.where(ops.step < warmup_steps, _warmup(ops, peak_lr, warmup_steps), decay)
        return ops.where(ops.step >= total_steps, min_lr, lr)

    return schedule


def constant(lr: float, warmup_steps: int = 0) -> Schedule:
    """lr(s) = lr * min(1, (s + 1) / warmup): the linear warmup of warmup_cosine, then flat."""
    _check(lr, warmup_steps)
    lr = float(lr)

    def schedule(step: int | torch.Tensor) -> float | torch.Tensor:
        ops = _Ops(step)
        return ops.clip(_warmup(ops, lr, warmup_steps), 0.0, lr)

    return schedule


SCHEDULES = ("constant", "cosine", "linear")


def make_schedule(name: str, *, peak_lr: float, warmup_steps: int, total_steps: int, min_lr: float = 0.0) -> Schedule:
    """The schedule named by `actor.optim.lr_scheduler`."""
    if name == "cosine":
        return warmup_cosine(peak_lr, warmup_steps, total_steps, min_lr)
    if name == "linear":
        return linear(peak_lr, warmup_steps, total_steps, min_lr)
    if name == "constant":
        return constant(peak_lr, warmup_steps)
    raise ValueError(f"actor.optim.lr_scheduler: unknown schedule {name!r}; known: {', '.join(SCHEDULES)}")
