"""The one place metrics leave the trainer: `<run_dir>/metrics.jsonl`, the logger backends, and a console line.

metrics.jsonl gets one JSON object per `write` ({"step": N, "time/elapsed": s, "train/loss": ..., ...}), flushed at
once so a killed run keeps every line it logged; it is the file tests, scripts and `vlm_sft.report` read.
`time/elapsed` is the run's wall-clock seconds so far: this process's since it opened the writer, plus, for a run
resumed from a checkpoint, the last value the earlier processes logged (the time after a killed process's last line
is lost); a fresh start counts from 0. Like `step` it is the file's own bookkeeping (the backends keep their own
clocks). Every backend of `runner.logger.logger_backends` (vlm_sft/loggers.py: TensorBoard, wandb, swanlab) gets
every scalar written; a backend that fails mid-run (network gone, disk full) is dropped with one warning and the
others go on: logging never stops training. Only rank 0 writes: other ranks build the writer with enabled=False and
it touches no file and starts no backend.

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

from vlm_sft import loggers

ELAPSED = "time/elapsed"

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


def last_elapsed(path: str, tail_bytes: int = 1 << 16) -> float:
    """time/elapsed of the last complete line of metrics.jsonl that has one (0.0 for none); reads the tail only."""
    if not os.path.isfile(path):
        return 0.0
    with open(path, "rb") as f:
        f.seek(max(os.path.getsize(path) - tail_bytes, 0))
        lines = f.read().decode("utf-8", errors="replace").splitlines()
    for line in reversed(lines):
        try:
            value = json.loads(line).get(ELAPSED)
        except (ValueError, AttributeError):
            continue  # a killed run's half line, or the first, cut one of the tail
        if isinstance(value, (int, float)):
            return float(value)
    return 0.0


def _ends_mid_line(path: str) -> bool:
    if os.path.getsize(path) == 0:
        return False
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) != b"\n"


class MetricsWriter:
    """Writes scalars to metrics.jsonl and every logger backend, and prints progress lines with an ETA."""

    def __init__(
        self,
        run_dir: str,
        *,
        enabled: bool,
        total_steps: int,
        backends: tuple[str, ...] | list[str] = ("tensorboard",),
        project: str = "vlm_sft",
        experiment: str | None = None,
        run_config: Mapping[str, Any] | None = None,
        resume: bool = True,
        window: int = 20,
        clock: Callable[[], float] = time.monotonic,
    ):
        """project / experiment: the backends' project and run name (experiment defaults to the run dir's name);
        run_config: the config the backends record for the run; resume: continue the backend runs of this run dir
        (vlm_sft/loggers.py open_backends) and its time/elapsed."""
        loggers.check_backends(backends)
        if window < 2:
            raise ValueError(f"metrics: window must be >= 2 console lines, got {window}")
        self.enabled = enabled
        self.total_steps = total_steps
        self._clock = clock
        self._started = clock()
        self._elapsed_before = 0.0
        self._marks: collections.deque[tuple[int, float]] = collections.deque(maxlen=window)
        self._jsonl = None
        self._backends: list[loggers.Backend] = []
        if enabled:
            os.makedirs(run_dir, exist_ok=True)
            self._backends = loggers.open_backends(
                backends, run_dir, project=project,
                experiment=experiment or os.path.basename(os.path.normpath(run_dir)), run_config=run_config,
                resume=resume)
            path = os.path.join(run_dir, "metrics.jsonl")
            self._elapsed_before = last_elapsed(path) if resume else 0.0
            self._jsonl = open(path, "a", encoding="utf-8")
            if _ends_mid_line(path):  # a killed process's half line: ours start on a line of their own
                self._jsonl.write("\n")

    @property
    def backends(self) -> tuple[str, ...]:
        """The backends still logging (a failed one drops out)."""
        return tuple(b.name for b in self._backends)

    def write(self, step: int, scalars: Mapping[str, Any]) -> None:
        """Appends {"step": step, "time/elapsed": s, **scalars} to metrics.jsonl (flushed); scalars to every
        backend."""
        values = _as_floats(scalars)
        if not self.enabled:
            return
        step = int(step)
        elapsed = self._elapsed_before + self._clock() - self._started
        self._jsonl.write(json.dumps({"step": step, ELAPSED: elapsed, **values}) + "\n")
        self._jsonl.flush()
        for backend in list(self._backends):
            try:
                backend.log(step, values)
            except Exception as e:  # noqa: BLE001 - any failure of a logging library must not stop training
                self._drop(backend, e)

    def _drop(self, backend: loggers.Backend, error: BaseException) -> None:
        """One warning; the backend is not closed (closing may wait on the same dead network)."""
        self._backends.remove(backend)
        logging.warning("runner.logger.logger_backends: %s failed (%s: %s); it logs nothing more in this run, "
                        "metrics.jsonl%s go on", backend.name, type(error).__name__, error,
                        "".join(f", {b.name}" for b in self._backends))

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

    def close(self, failed: bool = False) -> None:
        """Closes metrics.jsonl and ends every backend's run (failed: the training run ended on an error)."""
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        backends, self._backends = self._backends, []
        for backend in backends:
            try:
                backend.close(failed=failed)
            except Exception as e:  # noqa: BLE001 - the run's results are already written
                logging.warning("runner.logger.logger_backends: %s failed to close (%s: %s)", backend.name,
                                type(e).__name__, e)

    def __enter__(self) -> "MetricsWriter":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.close(failed=exc_type is not None)
