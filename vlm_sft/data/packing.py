"""Packing: a rank's rows of one global batch -> micro-batches of at most `max_tokens` tokens each, every
micro-batch one sequence [1, T] holding several rows (data/collate.py collate_packed).

Packing is first-fit decreasing over the rows' lengths (image tokens included), a pure function of the rows, so it
is deterministic and needs nothing in the resumable data position beyond the rows themselves. Rows are never split;
a row longer than the budget is a bad row (data.bad_rows). Each micro-batch is padded to the smallest of a few
budget buckets (the length buckets below the budget, and the budget), so compiled regions see few shapes.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import torch

from vlm_sft.data.collate import bucket_length, collate_encoded_packed


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


def budget_buckets(max_tokens: int, length_buckets: Sequence[int]) -> tuple[int, ...]:
    """The padded lengths a packed micro-batch may take: the length buckets below the budget, then the budget.
    No length buckets: () (each micro-batch padded to a multiple of 8, never past the budget)."""
    if not length_buckets:
        return ()
    return tuple(b for b in length_buckets if b < max_tokens) + (max_tokens,)


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


def balance(micro_batches: list, empty: Callable[[], dict] | None, *, world_size: int, rank: int
            ) -> tuple[list, float]:
    """(micro-batches, answer tokens of the whole global batch), in one small collective when world_size > 1.

    Ranks pack their shares independently, so their micro-batch counts may differ; every rank must run as many
    (the sharded gathers are collectives), so a rank with fewer gets padding-only micro-batches (`empty()`,
    no labels, zero gradient). The token count is the denominator of actor.loss_normalization=tokens.
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
        if empty is None:
            raise ValueError(f"rank {rank} has {len(micro_batches)} micro-batches, another has {most}")
        micro_batches = list(micro_batches) + [empty() for _ in range(most - len(micro_batches))]
    return micro_batches, float(total[-1])
