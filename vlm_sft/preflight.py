"""--mode=check: read every train and eval row exactly as training would, and say what the run will meet.

Before 8 GPUs spend hours on 678k rows, a user wants to know that every row decodes, how long the prompts really
are against data.max_prompt_length and the length buckets, and how many rows a bad-row policy would skip, not to
learn it from a crash at row 412,003. So every row goes through the configured reader, processor and encoder
(in data.num_workers worker processes); only the processor files of the model directory are read, never its
weights. The report is printed and written as preflight.json; `check` raises DataCheckFailed when the run as
configured would stop (a bad row under data.bad_rows="error", which includes over-long prompts under
data.truncation="error", or fewer rows than one global batch).
"""
from __future__ import annotations

import collections
import dataclasses
import json
import os
import sys
import time
from typing import Any, Iterator, Sequence, TextIO

import numpy as np
import torch

from vlm_sft.data.collate import bucket_length
from vlm_sft.data.encode import IMAGE_TOKEN, Encoder
from vlm_sft.errors import DataCheckFailed, PromptTooLong, RowError
from vlm_sft.metrics import format_eta

FIRST_NAMED = 5       # bad rows named per reason
CHUNK_ROWS = 64       # rows per work item when the source has no row groups to follow
PAD_MULTIPLE = 8      # the collate's padding without buckets (collate.collate's default)


@dataclasses.dataclass(slots=True)
class RowStats:
    """What one row costs (or why it cannot be used). Small and picklable: workers send these, not tensors; a
    678k-row check holds one per row."""

    source: str                      # "<file>:<row>" as errors name it
    reason: str | None = None        # None for a good row; else "image", "answer", "json", "too_long", ...
    message: str = ""
    prompt_tokens: int = 0           # image tokens included
    image_tokens: int = 0
    sequence_tokens: int = 0         # prompt + answer + <|im_end|>: what a batch pads to a length bucket
    truncated: bool = False          # the question was cut to fit (data.truncation="text")
    image_sizes: list[tuple[int, int]] = dataclasses.field(default_factory=list)  # (width, height) decoded


def check_row(source: Any, encoder: Encoder, image_token_id: int, i: int) -> RowStats:
    """Read, decode and encode row i as the trainer would; a bad row becomes its reason and message."""
    name = source.source_of(i)
    try:
        example = source[i]
    except RowError as e:
        return RowStats(name, e.reason, str(e))
    sizes = [tuple(image.size) for image in example.images]
    try:
        encoded = encoder(example)
    except PromptTooLong as e:
        return RowStats(name, "too_long", str(e), image_sizes=sizes)
    except ValueError as e:  # the encoder's own checks (e.g. image tokens typed into the question)
        message = str(e) if str(e).startswith(name) else f"{name}: {e}"
        return RowStats(name, "encode", message, image_sizes=sizes)
    prompt = encoded.input_ids[:encoded.prompt_length]
    return RowStats(name, prompt_tokens=encoded.prompt_length, image_tokens=int((prompt == image_token_id).sum()),
                    sequence_tokens=len(encoded.input_ids), truncated=encoded.truncated, image_sizes=sizes)


class _Chunks(torch.utils.data.Dataset):
    """Item k: the RowStats of the k-th chunk of rows (chunks follow parquet row groups, so each is read once)."""

    def __init__(self, source: Any, encoder: Encoder, image_token_id: int, chunks: list[range]):
        self.source, self.encoder, self.image_token_id, self.chunks = source, encoder, image_token_id, chunks

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, k: int) -> list[RowStats]:
        return [check_row(self.source, self.encoder, self.image_token_id, i) for i in self.chunks[k]]


def _chunks(source: Any) -> list[range]:
    groups = source.row_groups() if hasattr(source, "row_groups") else None
    sizes = groups or [CHUNK_ROWS] * (-(-len(source) // CHUNK_ROWS))
    out, start = [], 0
    for size in sizes:
        out.append(range(start, min(start + size, len(source))))
        start += size
    return [c for c in out if len(c)]


def _identity(x):
    return x


def check_rows(source: Any, encoder: Encoder, *, num_workers: int, label: str,
               stream: TextIO | None = None) -> list[RowStats]:
    """RowStats of every row of `source`, in row order, over `num_workers` worker processes, with progress."""
    image_token_id = encoder.processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    dataset = _Chunks(source, encoder, image_token_id, _chunks(source))
    if num_workers == 0:
        items: Iterator[list[RowStats]] = (dataset[k] for k in range(len(dataset)))
    else:
        items = iter(torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=num_workers,
                                                 collate_fn=_identity, persistent_workers=False))
    progress = Progress(label, len(source), stream=stream)
    stats: list[RowStats] = []
    for item in items:
        stats += item
        progress.update(len(item))
    progress.close()
    return stats


class Progress:
    """A progress bar with rate and ETA on the console: redrawn in place on a terminal, a line every 10% (or
    30 s) when the console is a log file."""

    def __init__(self, label: str, total: int, *, stream: TextIO | None = None):
        self.label, self.total, self.done = label, total, 0
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.t0 = self._last_draw = time.perf_counter()
        self._last_decile, self._drawn = -1, -1

    def update(self, n: int) -> None:
        self.done += n
        now = time.perf_counter()
        decile = 10 * self.done // max(self.total, 1)
        if (self.tty and now - self._last_draw >= 0.2) or (not self.tty and (
                decile > self._last_decile or now - self._last_draw >= 30)):
            self._draw(now)

    def _draw(self, now: float) -> None:
        self._last_draw, self._last_decile, self._drawn = now, 10 * self.done // max(self.total, 1), self.done
        elapsed = max(now - self.t0, 1e-9)
        rate = self.done / elapsed
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        width = 30
        filled = width * self.done // max(self.total, 1)
        line = (f"{self.label}: [{'#' * filled}{'.' * (width - filled)}] {self.done:,}/{self.total:,} rows "
                f"({100 * self.done / max(self.total, 1):.0f}%) | {rate:,.0f} rows/s | ETA {format_eta(eta)}")
        self.stream.write(("\r" + line) if self.tty else line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self._drawn != self.done:
            self._draw(time.perf_counter())
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def _spread(values: Sequence[float]) -> dict[str, float] | None:
    """min / median / p99 / max (None for no values); p99 is the value 99% of rows do not exceed."""
    if not len(values):
        return None
    a = np.asarray(values)
    return {"min": a.min().item(), "median": float(np.median(a)),
            "p99": np.percentile(a, 99, method="higher").item(), "max": a.max().item()}


def summarize_split(stats: list[RowStats], *, files: Sequence[str], buckets: Sequence[int],
                    max_prompt_length: int) -> dict[str, Any]:
    """One split's report: rows, bad rows by reason (first few named), prompt lengths, buckets and images."""
    good = [s for s in stats if s.reason is None]
    bad: dict[str, dict[str, Any]] = {}
    for s in stats:
        if s.reason is not None:
            entry = bad.setdefault(s.reason, {"count": 0, "first": []})
            entry["count"] += 1
            if len(entry["first"]) < FIRST_NAMED:
                entry["first"].append(s.message)
    lengths = [s.sequence_tokens for s in good]
    padded = [bucket_length(n, buckets, PAD_MULTIPLE) for n in lengths]
    per_bucket = collections.Counter(padded)
    sizes = [size for s in good for size in s.image_sizes]
    return {
        "files": len(files),
        "rows": len(stats),
        "good_rows": len(good),
        "bad_rows": sum(e["count"] for e in bad.values()),
        "bad_rows_by_reason": dict(sorted(bad.items(), key=lambda kv: -kv[1]["count"])),
        "first_bad_row": next((s.message for s in stats if s.reason is not None), None),
        "prompt_tokens": _spread([s.prompt_tokens for s in good]),
        "prompt_image_tokens": _spread([s.image_tokens for s in good]),
        "prompt_text_tokens": _spread([s.prompt_tokens - s.image_tokens for s in good]),
        "max_prompt_length": max_prompt_length,
        "truncated_rows": sum(s.truncated for s in good),
        "sequence_tokens": _spread(lengths),
        "rows_per_length_bucket": {str(b): per_bucket[b] for b in sorted(per_bucket)},
        "bucket_padding_fraction": 1.0 - sum(lengths) / sum(padded) if padded else 0.0,
        "images_per_row": {str(k): v for k, v in sorted(collections.Counter(len(s.image_sizes) for s in good).items())},
        "image_width": _spread([w for w, _ in sizes]),
        "image_height": _spread([h for _, h in sizes]),
    }


def mark_over_budget(stats: list[RowStats], max_tokens: int) -> None:
    """Rows longer than a packed micro-batch's budget are bad rows (rows are never split)."""
    for s in stats:
        if s.reason is None and s.sequence_tokens > max_tokens:
            s.reason = "over_budget"
            s.message = (f"{s.source}: {s.sequence_tokens} tokens (image tokens included) exceed "
                         f"actor.max_tokens_per_micro_batch={max_tokens}")


def packing_report(stats: list[RowStats], *, max_tokens: int, buckets: Sequence[int], micro_batch_size: int,
                   global_batch_size: int, world_size: int, seed: int, shuffle: bool) -> dict[str, Any]:
    """What the first epoch's steps would get, packed (data.packing) and as padded micro-batches of
    micro_batch_size rows (packing off), for each of `world_size` ranks: micro-batches per rank per step and the
    padding fraction (padded positions / all positions). Bad rows are left out as data.bad_rows="skip" would."""
    from vlm_sft.data import loader, packing

    lengths = [s.sequence_tokens if s.reason is None else 0 for s in stats]
    order = loader.epoch_order(len(stats), seed=seed, epoch=0, shuffle=shuffle)
    per_rank = global_batch_size // world_size
    budget_buckets = packing.budget_buckets(max_tokens, buckets)
    counts, real, packed, padded = [], 0, 0, 0
    for step in range(len(stats) // global_batch_size):
        for r in range(world_size):
            start = step * global_batch_size + r * per_rank
            shard = [lengths[i] for i in order[start:start + per_rank] if lengths[i]]
            groups = packing.pack_rows(shard, max_tokens) if shard else []
            counts.append(len(groups))
            real += sum(shard)
            packed += sum(packing.padded_length(sum(shard[j] for j in g), max_tokens, budget_buckets)
                          for g in groups)
            for j in range(0, len(shard), micro_batch_size):
                rows = shard[j:j + micro_batch_size]
                padded += len(rows) * bucket_length(max(rows), buckets, PAD_MULTIPLE)
    return {"max_tokens_per_micro_batch": max_tokens, "world_size": world_size,
            "micro_batches_per_step": _spread(counts), "padding_fraction": 1.0 - real / packed if packed else 0.0,
            "unpacked_micro_batch_size": micro_batch_size,
            "unpacked_padding_fraction": 1.0 - real / padded if padded else 0.0}


def stop_reasons(report: dict[str, Any], *, bad_rows: str, global_batch_size: int) -> list[str]:
    """Why the run as configured would stop on this data (empty: it would not)."""
    reasons = []
    for split, r in report["splits"].items():
        if bad_rows == "error" and r["bad_rows"]:
            reasons.append(f"{r['bad_rows']} bad {split} row(s) under data.bad_rows='error' "
                           f"(set data.bad_rows='skip' to leave them out); first: {r['first_bad_row']}")
    train = report["splits"].get("train")
    if train is not None and train["rows"] < global_batch_size:
        reasons.append(f"{train['rows']} train rows are fewer than actor.global_batch_size={global_batch_size}")
    return reasons


def check(config: Any, splits: dict[str, tuple[list[str], Any]], encoder: Encoder, *, out_path: str,
          stream: TextIO | None = None, world_size: int = 1) -> dict[str, Any]:
    """Check every row of each split ({"train"|"test": (files, source)}), print the report to `stream`
    (stdout) and write it as JSON to `out_path`. Raises DataCheckFailed (after writing) when the run would stop."""
    d, a, r = config.data, config.actor, config.runner
    buckets = list(d.length_buckets)
    report: dict[str, Any] = {
        "settings": {"max_prompt_length": d.max_prompt_length, "truncation": d.truncation, "bad_rows": d.bad_rows,
                     "length_buckets": buckets, "min_pixels": d.min_pixels, "max_pixels": d.max_pixels,
                     "global_batch_size": a.global_batch_size, "num_workers": d.num_workers},
        "splits": {},
    }
    t0 = time.perf_counter()
    for split, (files, source) in splits.items():
        stats = check_rows(source, encoder, num_workers=d.num_workers, label=f"check {split}")
        if split == "train" and d.packing:
            mark_over_budget(stats, a.max_tokens_per_micro_batch)
        report["splits"][split] = summarize_split(stats, files=files, buckets=buckets,
                                                  max_prompt_length=d.max_prompt_length)
        if split == "train" and len(stats) >= a.global_batch_size:
            report["splits"][split]["packing"] = dict(packing_report(
                stats, max_tokens=a.max_tokens_per_micro_batch, buckets=buckets, micro_batch_size=a.micro_batch_size,
                global_batch_size=a.global_batch_size, world_size=world_size, seed=a.seed, shuffle=d.shuffle),
                enabled=bool(d.packing))
    if "train" in report["splits"]:
        rows = report["splits"]["train"]["rows"]
        steps_per_epoch = rows // a.global_batch_size
        steps = r.max_steps if r.max_steps > 0 else r.max_epochs * steps_per_epoch
        report["splits"]["train"]["epoch"] = {
            "rows": rows, "global_batch_size": a.global_batch_size, "steps_per_epoch": steps_per_epoch,
            "rows_left_out_per_epoch": rows - steps_per_epoch * a.global_batch_size,
            "configured_steps": steps, "epochs": steps / steps_per_epoch if steps_per_epoch else None}
    if "test" in report["splits"]:
        rows = report["splits"]["test"]["rows"]
        report["splits"]["test"]["rows_evaluated"] = min(rows, d.eval_max_rows) if d.eval_max_rows > 0 else rows
    report["seconds"] = time.perf_counter() - t0
    report["stop_reasons"] = stop_reasons(report, bad_rows=d.bad_rows, global_batch_size=a.global_batch_size)
    report["would_stop"] = bool(report["stop_reasons"])
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with open(out_path, "w") as f:
        json.dump(report, f, indent=2)
    out = stream or sys.stdout
    out.write(format_report(report) + f"\nwritten to {out_path}\n")
    out.flush()
    if report["would_stop"]:
        raise DataCheckFailed(f"preflight: the run would stop: {report['stop_reasons'][0]} "
                              f"(report: {out_path})")
    return report


def _fmt_spread(s: dict[str, float] | None) -> str:
    if s is None:
        return "-"
    return " / ".join(f"{s[k]:g}" for k in ("min", "median", "p99", "max"))


def format_report(report: dict[str, Any]) -> str:
    """The report as the console shows it."""
    st = report["settings"]
    lines = []
    for split, r in report["splits"].items():
        lines.append(f"== {split}: {r['rows']:,} rows in {r['files']} file(s); {r['good_rows']:,} good, "
                     f"{r['bad_rows']:,} bad")
        for reason, entry in r["bad_rows_by_reason"].items():
            lines.append(f"  bad ({reason}): {entry['count']:,}")
            lines += [f"    {message}" for message in entry["first"]]
        lines.append(f"  prompt tokens (min / median / p99 / max): {_fmt_spread(r['prompt_tokens'])} "
                     f"against max_prompt_length {st['max_prompt_length']} (truncation={st['truncation']!r}: "
                     f"{r['truncated_rows']:,} row(s) cut)")
        lines.append(f"    image tokens: {_fmt_spread(r['prompt_image_tokens'])}; "
                     f"text tokens: {_fmt_spread(r['prompt_text_tokens'])}")
        lines.append(f"  sequence tokens (prompt + answer): {_fmt_spread(r['sequence_tokens'])}")
        buckets = ", ".join(f"{b}: {n:,}" for b, n in r["rows_per_length_bucket"].items())
        lines.append(f"  rows per length bucket (data.length_buckets: a compiled step pads each batch to its "
                     f"longest row's bucket): {buckets or '-'}; padding at least "
                     f"{100 * r['bucket_padding_fraction']:.1f}% of bucket tokens")
        per_row = ", ".join(f"{k} image(s): {n:,}" for k, n in r["images_per_row"].items())
        lines.append(f"  images per row: {per_row or '-'}; width {_fmt_spread(r['image_width'])}; "
                     f"height {_fmt_spread(r['image_height'])} (pixels, as stored)")
        if "epoch" in r:
            e = r["epoch"]
            epochs = f"{e['epochs']:.2f}" if e["epochs"] is not None else "-"
            lines.append(f"  epoch: {e['rows']:,} rows = {e['steps_per_epoch']:,} steps at global batch "
                         f"{e['global_batch_size']} ({e['rows_left_out_per_epoch']:,} rows wait for the next "
                         f"epoch); {e['configured_steps']:,} configured steps = {epochs} epochs")
        if "packing" in r:
            p = r["packing"]
            lines.append(f"  packing ({'on' if p['enabled'] else 'off'}: data.packing): micro-batches of <= "
                         f"{p['max_tokens_per_micro_batch']} tokens per rank per step (min / median / p99 / max, "
                         f"{p['world_size']} rank(s)): {_fmt_spread(p['micro_batches_per_step'])}; padding "
                         f"{100 * p['padding_fraction']:.1f}% packed vs {100 * p['unpacked_padding_fraction']:.1f}% "
                         f"in micro-batches of {p['unpacked_micro_batch_size']} rows (compiled shapes: budget "
                         f"sixteenths, data.length_buckets)")
        if "rows_evaluated" in r:
            lines.append(f"  evaluated: {r['rows_evaluated']:,} rows (data.eval_max_rows)")
    if report["would_stop"]:
        lines += [f"WOULD STOP: {reason}" for reason in report["stop_reasons"]]
    else:
        skipped = sum(r["bad_rows"] for r in report["splits"].values())
        lines.append(f"ok: the run as configured would not stop on this data (data.bad_rows={st['bad_rows']!r}"
                     + (f": {skipped:,} bad row(s) would be skipped)" if skipped else ")"))
    return "\n".join(lines)
