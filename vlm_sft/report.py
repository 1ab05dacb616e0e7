"""A run report a person can look at without TensorBoard: `<run dir>/curves.png` and `<run dir>/summary.md`.

  python -m vlm_sft.report RUN_DIR [RUN_DIR ...]

Written at the end of every run (rank 0) and by the command above at any time: it reads only metrics.jsonl and
config.json, so it works on a run that is still going or was killed (a half-written last line is left out). The
curves are the seed's "is training healthy?" three (eval accuracy, loss, grad norm) plus learning rate and
tokens/s over steps; the summary holds final and best eval accuracy, steps, wall time, tokens/s, MFU, peak memory,
skipped updates and the config's key fields. A step logged twice (recomputed after a resume) counts once, with its
last value. The PNG needs matplotlib (`pip install -e '.[report]'`); without it the end of a run writes
summary.md alone, with one warning.
"""
from __future__ import annotations

import dataclasses
import json
import os
import statistics
import sys
from typing import Any, Iterable

from absl import logging

METRICS = "metrics.jsonl"
CURVES = "curves.png"
SUMMARY = "summary.md"
INSTALL = "pip install -e '.[report]'"
FIGSIZE, DPI = (15.0, 8.0), 100
PNG_SIZE = (int(FIGSIZE[0] * DPI), int(FIGSIZE[1] * DPI))  # (width, height) in pixels
# (panel title, keys plotted in it)
PANELS = (
    ("eval accuracy", ("eval/eval_accuracy", "eval/choice_accuracy")),
    ("loss", ("train/loss",)),
    ("grad norm", ("train/grad_norm",)),
    ("learning rate", ("train/learning_rate",)),
    ("tokens/s", ("perf/tokens_per_sec",)),
)
ACCURACIES = ("eval/eval_accuracy", "eval/choice_accuracy")
# (label, dotted config path) for the summary's config table
CONFIG_FIELDS = (
    ("model type", "actor.model.model_type"), ("model path", "actor.model.model_path"),
    ("LoRA", "actor.model.is_lora"), ("train data", "data.train_data_paths"), ("eval data", "data.eval_data_paths"),
    ("max steps", "runner.max_steps"), ("max epochs", "runner.max_epochs"),
    ("global batch", "actor.global_batch_size"), ("micro batch", "actor.micro_batch_size"),
    ("lr", "actor.optim.lr"), ("lr scheduler", "actor.optim.lr_scheduler"),
    ("warmup steps", "actor.optim.lr_warmup_steps"), ("sharding", "actor.fsdp_config.sharding_strategy"),
    ("compute dtype", "actor.fsdp_config.mixed_precision.param_dtype"), ("seed", "actor.seed"),
    ("logger backends", "runner.logger.logger_backends"),
)


class ReportError(ValueError):
    """The report cannot be made (no metrics.jsonl, no matplotlib for the PNG); the message says what to do."""


@dataclasses.dataclass(frozen=True)
class Metrics:
    rows: list[dict]   # metrics.jsonl's objects, in file order
    unreadable: int    # lines that did not parse (a killed run's half-written last line)


def read_metrics(run_dir: str) -> Metrics:
    path = os.path.join(run_dir, METRICS)
    if not os.path.isfile(path):
        raise ReportError(f"{path}: no such file (is {run_dir} a run directory, and has it logged a step yet?)")
    rows, unreadable = [], 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                unreadable += 1
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), int):
                rows.append(row)
            else:
                unreadable += 1
    return Metrics(rows, unreadable)


def series(rows: Iterable[dict], key: str) -> list[tuple[int, float]]:
    """(step, value) of `key`, sorted by step; a step logged twice keeps its last value."""
    by_step = {row["step"]: row[key] for row in rows if key in row}
    return sorted(by_step.items())


def lineages(rows: list[dict]) -> list[list[dict]]:
    """The rows split where time/elapsed goes back: a fresh start (from step 0) in an old run dir; a resumed run
    continues its time."""
    parts: list[list[dict]] = []
    last = None
    for row in rows:
        elapsed = row.get("time/elapsed")
        if not parts or (elapsed is not None and last is not None and elapsed < last):
            parts.append([])
        parts[-1].append(row)
        last = elapsed if elapsed is not None else last
    return parts


def _median(points: list[tuple[int, float]]) -> float | None:
    return statistics.median(v for _, v in points) if points else None


def summarize(rows: list[dict]) -> dict[str, Any]:
    """The summary's figures from metrics.jsonl's rows (None where the run logged nothing of the kind)."""
    figures: dict[str, Any] = {}
    for key in ACCURACIES:
        points = series(rows, key)
        figures[key] = {
            "final": points[-1] if points else None,
            "best": max(points, key=lambda p: (p[1], -p[0])) if points else None,  # the first step reaching it
        }
    loss = series(rows, "train/loss")
    figures["steps"] = loss[-1][0] if loss else 0
    figures["final_loss"] = loss[-1][1] if loss else None
    elapsed = [max((r["time/elapsed"] for r in part if "time/elapsed" in r), default=None) for part in lineages(rows)]
    figures["wall_time_s"] = sum(e for e in elapsed if e is not None) if any(e is not None for e in elapsed) else None
    figures["tokens_per_sec"] = _median(series(rows, "perf/tokens_per_sec"))
    figures["mfu"] = _median(series(rows, "perf/mfu"))
    memory = series(rows, "perf/max_memory_gib")
    figures["peak_memory_gib"] = max(v for _, v in memory) if memory else None
    skipped = series(rows, "train/skipped_update")
    figures["skipped_updates"] = int(sum(v for _, v in skipped))
    figures["logged_steps"] = len(loss)
    skipped_rows = series(rows, "data/skipped_rows")
    figures["skipped_rows"] = int(skipped_rows[-1][1]) if skipped_rows else 0
    return figures


def read_config(run_dir: str) -> dict | None:
    try:
        with open(os.path.join(run_dir, "config.json"), encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def _lookup(config: dict, dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def format_duration(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m{s % 60:02d}s" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def summary_markdown(run_dir: str, metrics: Metrics, config: dict | None) -> str:
    f = summarize(metrics.rows)
    total = _lookup(config or {}, "runner.max_steps")
    name = os.path.basename(os.path.normpath(run_dir))
    lines = [f"# Run summary: {name}", "", f"From `{os.path.join(run_dir, METRICS)}` "
             f"({len(metrics.rows)} lines" + (f", {metrics.unreadable} unreadable: a run killed mid-write"
                                               if metrics.unreadable else "") + ").", "",
             "| figure | value |", "| --- | --- |"]

    def row(label: str, value: str) -> None:
        lines.append(f"| {label} | {value} |")

    for key in ACCURACIES:
        final, best = f[key]["final"], f[key]["best"]
        if final is None:
            row(f"final {key}", "not evaluated")
            continue
        row(f"final {key}", f"{final[1]:.4f} at step {final[0]}")
        row(f"best {key}", f"{best[1]:.4f} at step {best[0]}")
    steps = f"{f['steps']}" + (f" of {total}" if isinstance(total, int) and total > 0 else "")
    row("steps", steps)
    row("final train/loss", "none logged" if f["final_loss"] is None else f"{f['final_loss']:.4f}")
    row("wall time", "unknown" if f["wall_time_s"] is None else
        f"{format_duration(f['wall_time_s'])} ({f['wall_time_s']:.1f} s, to the last logged line)")
    row("tokens/s (median over logged steps)", "none logged" if f["tokens_per_sec"] is None else
        f"{f['tokens_per_sec']:,.1f}")
    row("MFU (median over logged steps)", "unknown (no peak FLOP/s for this device)" if f["mfu"] is None else
        f"{f['mfu']:.2%}")
    row("peak memory", "none logged" if f["peak_memory_gib"] is None else f"{f['peak_memory_gib']:.2f} GiB")
    row("skipped updates (non-finite loss/grad)", f"{f['skipped_updates']} of {f['logged_steps']} logged steps")
    row("skipped bad rows", str(f["skipped_rows"]))
    lines += ["", "## Config", ""]
    if config is None:
        lines.append(f"`{os.path.join(run_dir, 'config.json')}`: missing or unreadable.")
    else:
        lines += ["| field | value |", "| --- | --- |"]
        for label, dotted in CONFIG_FIELDS:
            value = _lookup(config, dotted)
            lines.append(f"| {label} (`{dotted}`) | {'' if value is None else json.dumps(value)} |")
    if os.path.isfile(os.path.join(run_dir, CURVES)):
        lines += ["", f"![curves]({CURVES})"]
    return "\n".join(lines) + "\n"


def import_matplotlib():
    """matplotlib with the Agg canvas (no display), or ReportError with the pip command."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ReportError(f"{CURVES} needs matplotlib, which does not import ({e}): {INSTALL}") from None
    return Figure, FigureCanvasAgg


def plot_curves(run_dir: str, metrics: Metrics, path: str) -> None:
    """The five panels over steps, PNG_SIZE pixels; written to a temporary file first, so a reader never sees
    half a PNG."""
    Figure, FigureCanvasAgg = import_matplotlib()
    from matplotlib.ticker import MaxNLocator
    fig = Figure(figsize=FIGSIZE, dpi=DPI)
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 3).flatten()
    steps = [row["step"] for row in metrics.rows]
    for ax, (title, keys) in zip(axes, PANELS):
        plotted = False
        for key in keys:
            points = series(metrics.rows, key)
            if points:
                ax.plot([s for s, _ in points], [v for _, v in points], marker="." if len(points) < 50 else None,
                        label=key)
                plotted = True
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if steps and max(steps) > min(steps):
            ax.set_xlim(min(steps), max(steps))  # every panel on the same steps
        ax.grid(True, alpha=0.3)
        if title == "eval accuracy":
            ax.set_ylim(-0.02, 1.02)  # an accuracy of 1 stays visible
        if title == "learning rate":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
        if plotted and len(keys) > 1:
            ax.legend(fontsize="small", loc="lower right")
        if not plotted:
            ax.text(0.5, 0.5, "not logged yet", ha="center", va="center", transform=ax.transAxes, color="gray")
    for ax in axes[len(PANELS):]:
        ax.set_axis_off()
    fig.suptitle(f"{os.path.basename(os.path.normpath(run_dir))}: step {summarize(metrics.rows)['steps']}")
    # Fixed margins: tight_layout would measure every label first (a third of the time of the whole plot).
    fig.subplots_adjust(left=0.05, right=0.98, bottom=0.07, top=0.9, wspace=0.22, hspace=0.35)
    tmp = path + ".tmp"
    fig.savefig(tmp, format="png", dpi=DPI)
    os.replace(tmp, path)


def write_report(run_dir: str, *, require_png: bool = True) -> list[str]:
    """Writes curves.png and summary.md into `run_dir`; returns their paths. require_png=False (the end of a
    run): without matplotlib, one warning and summary.md alone."""
    metrics = read_metrics(run_dir)
    if require_png:
        import_matplotlib()  # before anything is written
    written = []
    png = os.path.join(run_dir, CURVES)
    try:
        plot_curves(run_dir, metrics, png)
        written.append(png)
    except ReportError as e:
        if require_png:
            raise
        logging.warning("report: %s; wrote %s without it", e, SUMMARY)
    md = os.path.join(run_dir, SUMMARY)
    with open(md + ".tmp", "w", encoding="utf-8") as f:
        f.write(summary_markdown(run_dir, metrics, read_config(run_dir)))
    os.replace(md + ".tmp", md)
    written.append(md)
    return written


def main(argv: list[str]) -> int:
    """`python -m vlm_sft.report RUN_DIR [RUN_DIR ...]`: argv without the program name; the exit status."""
    if not argv or any(a.startswith("-") for a in argv):
        print("usage: python -m vlm_sft.report RUN_DIR [RUN_DIR ...]", file=sys.stderr)
        return 2
    for run_dir in argv:
        try:
            for path in write_report(run_dir):
                print(path)
        except ReportError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
