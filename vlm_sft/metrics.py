"""The one place metrics leave the trainer: `<run_dir>/metrics.jsonl`, TensorBoard, and a console line.

metrics.jsonl gets one JSON object per `write` ({"step": N, "train/loss": ..., ...}), flushed at once so a
killed run keeps every line it logged; it is the file tests and scripts read. TensorBoard (tensorboardX, under
`<run_dir>/tensorboard/`) gets the same scalars. Only rank 0 writes: other ranks build the writer with
enabled=False and it touches no file.

Keys the console line shows when present: train/loss, train/learning_rate, train/grad_norm, perf/tokens_per_sec,
perf/mfu (a fraction, shown as %), eval/eval_accuracy. The ETA comes from wall-clock time between recent
`console` calls, so it includes evaluation and checkpoint pauses, and the first (compiling) steps drop out of
it after `window` lines.
"""
import collections
import json
import math
import os
import time
from typing import Any, Callable, Mapping

from absl import logging

BACKENDS = ("tensorboard",)

# (key, label, format) for the console line, in display order.
_CONSOLE_FIELDS = (
    ("train/loss", "loss", "{:.4f}"),
    ("train/learning_rate", "lr", "{:.2e}"),
    ("train/grad_norm", "grad_norm", "{:.3f}"),
    ("perf/tokens_per_sec", "tok/s", "{:,.0f}"),
    ("perf/mfu", "mfu", "{:.1%}"),
    ("eval/eval_accuracy", "eval_acc", "{:.4f}"),
)


def format_eta(seconds: float) -> str:
    """Compact duration: 45s, 12m05s, 3h02m, 2d04h; "--" when unknown."""
    if not math.isfinite(seconds) or seconds < 0:
        return "--"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _as_floats(scalars: Mapping[str, Any]) -> dict[str, float]:
    """Python floats from numbers and one-element tensors, so JSON and TensorBoard get plain values."""
    out = {}
    for key, value in scalars.items():
        if not isinstance(key, str) or key == "step":
            raise ValueError(f"metrics: scalar names must be strings other than 'step', got {key!r}")
        try:
            out[key] = float(value)
        except (TypeError, ValueError, RuntimeError):
            raise ValueError(
                f"metrics: scalar {key!r} must be a number or a one-element tensor, got {value!r}"
            ) from None
    return out


class MetricsWriter:
    """Writes scalars to metrics.jsonl and TensorBoard, and prints progress lines with an ETA."""

    def __init__(
        self,
        run_dir: str,
        *,
        enabled: bool,
        total_steps: int,
        backends: tuple[str, ...] | list[str] = ("tensorboard",),
        window: int = 20,
        clock: Callable[[], float] = time.monotonic,
    ):
        unknown = sorted(set(backends) - set(BACKENDS))
        if unknown:
            raise ValueError(
                f"runner.logger.logger_backends: unknown backend(s) {unknown}; known: {', '.join(BACKENDS)}"
            )
        if window < 2:
            raise ValueError(f"metrics: window must be >= 2 console lines, got {window}")
        self.enabled = enabled
        self.total_steps = total_steps
        self._clock = clock
        self._marks: collections.deque[tuple[int, float]] = collections.deque(maxlen=window)
        self._jsonl = None
        self._tb = None
        if enabled:
            os.makedirs(run_dir, exist_ok=True)
            self._jsonl = open(os.path.join(run_dir, "metrics.jsonl"), "a", encoding="utf-8")
            if "tensorboard" in backends:
                from tensorboardX import SummaryWriter

                self._tb = SummaryWriter(logdir=os.path.join(run_dir, "tensorboard"))

    def write(self, step: int, scalars: Mapping[str, Any]) -> None:
        """Appends {"step": step, **scalars} to metrics.jsonl (flushed) and to TensorBoard."""
        values = _as_floats(scalars)
        if not self.enabled:
            return
        step = int(step)
        self._jsonl.write(json.dumps({"step": step, **values}) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for key, value in values.items():
                self._tb.add_scalar(key, value, step)
            self._tb.flush()

    def seconds_per_step(self) -> float:
        """Wall-clock seconds per step over the recent console calls; nan before two calls."""
        if len(self._marks) < 2:
            return math.nan
        (s0, t0), (s1, t1) = self._marks[0], self._marks[-1]
        return (t1 - t0) / (s1 - s0) if s1 > s0 else math.nan

    def console(self, step: int, scalars: Mapping[str, Any]) -> str | None:
        """Logs "step N/T (p%) | loss .. | lr .. | tok/s .. | s/step | ETA .." and returns it (None if disabled)."""
        values = _as_floats(scalars)
        if not self.enabled:
            return None
        step = int(step)
        if self._marks and step < self._marks[-1][0]:
            self._marks.clear()  # the run went back (a restart): old timings say nothing about it
        if not self._marks or step > self._marks[-1][0]:  # a second line for one step (eval) is not a step
            self._marks.append((step, self._clock()))
        parts = [f"step {step}/{self.total_steps} ({step / max(self.total_steps, 1):.1%})"]
        for key, label, fmt in _CONSOLE_FIELDS:
            if key in values:
                parts.append(f"{label} {fmt.format(values[key])}")
        per_step = self.seconds_per_step()
        if math.isfinite(per_step):
            parts.append(f"{per_step:.2f} s/step")
        parts.append(f"ETA {format_eta(per_step * max(self.total_steps - step, 0))}")
        line = " | ".join(parts)
        logging.info(line)
        return line

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> "MetricsWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
