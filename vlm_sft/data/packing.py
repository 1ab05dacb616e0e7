"""Packing: a rank's rows of one global batch -> micro-batches of at most `max_tokens` tokens each, every
micro-batch one sequence [1, T] holding several rows (data/collate.py collate_packed).

Packing is first-fit decreasing over the rows' lengths (image tokens included), a pure function of the rows, so it
is deterministic and needs nothing in the resumable data position beyond the rows themselves. Rows are never split;
a row longer than the budget is a bad row (data.bad_rows). Compiled, each micro-batch is padded to the next
sixteenth of the budget, so compiled regions see at most 16 text lengths.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import torch

from vlm_sft.data.collate import bucket_length, collate_encoded_packed

BUDGET_PARTS = 16  # padded lengths of a compiled packed micro-batch: the budget's sixteenths


def pack_rows(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Groups of row indices (each group's lengths sum to <= max_tokens): first-fit decreasing, ties in row
    order; groups in the order they were opened, rows within a group in row order."""
    if any(n > max_tokens for n in lengths):
        raise ValueError(f"a row of {max(lengths)} tokens exceeds the budget of {max_tokens}")
    groups: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for g, room in enumerate(free):
            if lengths[i] <= room:
                groups[g].append(i)
                free[g] -= lengths[i]
                break
        else:
            groups.append([i])
            free.append(max_tokens - lengths[i])
    return [sorted(g) for g in groups]


def budget_buckets(max_tokens: int, length_buckets: Sequence[int], parts: int = BUDGET_PARTS) -> tuple[int, ...]:
    """The padded lengths a packed micro-batch may take when shapes must be static (`length_buckets` given, i.e.
    compiled): the budget's sixteenths (multiples of 8), below the first of them the length buckets, so a full
    micro-batch pads at most budget/16 and a small one (a short step's only micro-batch) to its length bucket.
    Coarser buckets pad much more: rows of ~410 tokens fill a 1024 budget to 824, which the length bucket 1024
    pads by 20%, the sixteenth 832 by 1%. No length buckets: () (each micro-batch padded to a multiple of 8,
    never past the budget)."""
    if not length_buckets:
        return ()
    step = -(-max_tokens // parts // 8) * 8
    return tuple(b for b in length_buckets if b < step) + tuple(range(step, max_tokens, step)) + (max_tokens,)


def padded_length(tokens: int, max_tokens: int, buckets: Sequence[int], pad_multiple: int = 8) -> int:
    return min(bucket_length(max(tokens, 1), buckets, pad_multiple), max_tokens) if buckets else \
        min(-(-max(tokens, 1) // pad_multiple) * pad_multiple, max_tokens)


def _collate_group(examples: Sequence, *, spec: Any, max_tokens: int, buckets: tuple[int, ...],
                   pad_labels: bool) -> dict:
    length = padded_length(sum(len(e.input_ids) for e in examples), max_tokens, buckets)
    return collate_encoded_packed(examples, spec, length=length, pad_labels=pad_labels)


def make_packed_collate(spec: Any, max_tokens: int, length_buckets: Sequence[int] = (),
                        pad_labels: bool = True) -> Callable[[Sequence], dict]:
    """examples -> one packed micro-batch padded to its budget bucket (picklable, for data workers)."""
    return functools.partial(_collate_group, spec=spec, max_tokens=max_tokens,
                             buckets=budget_buckets(max_tokens, length_buckets), pad_labels=pad_labels)


def label_count(batch: dict | None) -> float:
    """Real label tokens of a host batch (0 for None: every row skipped)."""
    if batch is None:
        return 0.0
    if "label_weight" in batch:
        return float(batch["label_weight"].sum())
    return float(len(batch["label_ids"]))


def without_labels(batch: dict) -> dict:
    """The same micro-batch with every label weighing 0 and no real token counted: the same work and the same
    collectives (images included) as `batch`, no gradient, nothing in the token metrics."""
    out = dict(batch)
    out["label_weight"] = torch.zeros_like(batch["label_weight"])
    out["attention_mask"] = torch.zeros_like(batch["attention_mask"])
    return out


def balance(micro_batches: list, empty: Callable[[], dict] | None, *, world_size: int, rank: int
            ) -> tuple[list, float]:
    """(micro-batches, answer tokens of the whole global batch), in one small collective when world_size > 1.

    Ranks pack their shares independently, so their micro-batch counts may differ; every rank must run as many
    (the sharded gathers are collectives), so a rank with fewer repeats its last micro-batch without labels
    (without_labels: the vision tower runs where the others' may too), or runs `empty()` (padding only) when it
    has none. The token count is the denominator of actor.loss_normalization=tokens.
    """
    tokens = sum(label_count(b) for b in micro_batches)
    if world_size == 1:
        return micro_batches, tokens
    from vlm_sft import sharding as sharding_lib

    counts = torch.zeros(world_size + 1, dtype=torch.float64)
    counts[rank], counts[-1] = len(micro_batches), tokens
    total = sharding_lib.all_reduce_sum(counts)
    most = int(total[:-1].max())
    if most > len(micro_batches):
        last = next((b for b in reversed(micro_batches) if b is not None and "label_weight" in b), None)
        if last is None and empty is None:
            raise ValueError(f"rank {rank} has {len(micro_batches)} micro-batches, another has {most}")
        filler = (lambda: without_labels(last)) if last is not None else empty
        micro_batches = list(micro_batches) + [filler() for _ in range(most - len(micro_batches))]
    return micro_batches, float(total[-1])
