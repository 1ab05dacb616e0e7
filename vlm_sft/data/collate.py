"""Encoded examples -> one batch of tensors the step consumes, with all data-dependent indexing precomputed.

A batch is a flat dict of tensors (a pytree). Sequences are right-padded, so a causal mask alone is exact for
every real token (pads only follow real tokens), and the model never builds a padding mask. Label positions are
gathered here, so the lm_head and the loss run only where a label exists (the 152k vocabulary makes full logits the
largest tensor of the step).
"""
from __future__ import annotations

from typing import Sequence

import torch

from vlm_sft.data.vision import Spec, mrope_position_ids

Batch = dict[str, torch.Tensor]


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def bucket_length(n: int, buckets: Sequence[int], pad_multiple: int) -> int:
    """The padded sequence length: the smallest bucket >= n; past the last bucket, a multiple of it.

    A compiled step specialises on shapes, so every distinct padded length is a compilation; buckets bound them.
    Without buckets: n rounded up to pad_multiple.
    """
    if not buckets:
        return round_up(n, pad_multiple)
    for b in buckets:
        if n <= b:
            return b
    return round_up(n, buckets[-1])


def label_bucket(n: int) -> int:
    """Static label count for n labels: the next power of two (at least 16), so the lm_head/loss shapes take a
    handful of values per length bucket instead of one per batch."""
    return max(16, 1 << max(n - 1, 0).bit_length())


def check_length_buckets(buckets: Sequence[int]) -> None:
    if any(not isinstance(b, int) or b <= 0 for b in buckets) or list(buckets) != sorted(set(buckets)):
        raise ValueError(f"data.length_buckets={list(buckets)}: expected strictly increasing positive integers")


def collate(sequences: Sequence[tuple[torch.Tensor, torch.Tensor]], pixel_values: Sequence[torch.Tensor],
            grids: Sequence[torch.Tensor], spec: Spec, *, pad_multiple: int = 8,
            length_buckets: Sequence[int] = (), pad_labels: bool = False) -> Batch:
    """Build a batch from (input_ids, labels) pairs and the images each sequence holds.

    `pixel_values[i]` / `grids[i]` are the patches and [n, 3] grids of sequence i's images (possibly none).
    Keys:
      input_ids, attention_mask [B, L]; position_ids [3, B, L] (mrope);
      label_index [N] (flat B*L position whose hidden state predicts the label), label_ids [N], label_row [N];
      label_weight [N] float (only with pad_labels: 1 on real labels, 0 on the padding up to label_bucket(N);
      padded labels are -100 at position 0 of row 0, so the loss is sum(w * nll) / sum(w));
      pixel_values [P, D]; image_grid_thw [n, 3]; image_index [P/m^2] (flat positions of <|image_pad|>);
      and the family's vision indexing, spec.image_inputs(grid) (data/vision.py), e.g. for Qwen2.5-VL
      vision_rotary_ids [P, 2]; window_index, window_reverse [P/m^2];
      {window,full}_{gather,mask,scatter,cu_seqlens}: attention_layout() of the windows / frames, in window order.
    L is bucket_length() of the longest sequence.
    """
    batch_size = len(sequences)
    length = bucket_length(max(len(ids) for ids, _ in sequences), length_buckets, pad_multiple)
    input_ids = torch.full((batch_size, length), spec.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros(batch_size, length, dtype=torch.long)
    position_ids = torch.zeros(3, batch_size, length, dtype=torch.long)
    label_index, label_ids, label_row = [], [], []
    for b, ((ids, labels), grid) in enumerate(zip(sequences, grids)):
        n = len(ids)
        input_ids[b, :n] = ids
        attention_mask[b, :n] = 1
        position_ids[:, b, :n] = mrope_position_ids(ids, grid, spec)
        pos = torch.nonzero(labels[1:] != -100).flatten() + 1  # a label at position 0 has no predictor
        label_index.append(b * length + pos - 1)
        label_ids.append(labels[pos])
        label_row.append(torch.full_like(pos, b))
    batch = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "position_ids": position_ids,
        "label_index": torch.cat(label_index),
        "label_ids": torch.cat(label_ids),
        "label_row": torch.cat(label_row),
    }
    return _finish(batch, pixel_values, grids, spec, pad_labels)


def _finish(batch: Batch, pixel_values: Sequence[torch.Tensor], grids: Sequence[torch.Tensor], spec: Spec,
            pad_labels: bool) -> Batch:
    """The label padding and the images' inputs, shared by padded and packed batches."""
    input_ids = batch["input_ids"]
    if pad_labels:
        n = len(batch["label_ids"])
        pad = label_bucket(n) - n
        batch["label_weight"] = torch.cat([torch.ones(n), torch.zeros(pad)])
        for key, value in (("label_index", 0), ("label_ids", -100), ("label_row", 0)):
            batch[key] = torch.cat([batch[key], torch.full((pad,), value, dtype=torch.long)])
    grids = [g for g in grids if len(g)]
    if grids:
        grid = torch.cat(grids).long()
        batch.update({
            "pixel_values": torch.cat([p for p in pixel_values if len(p)]).float(),
            "image_grid_thw": grid,
            "image_index": torch.nonzero(input_ids.flatten() == spec.image_token_id).flatten(),
            **spec.image_inputs(grid),
        })
        features = int(grid.prod(-1).sum()) // spec.spatial_merge_size ** 2
        if len(batch["image_index"]) != features:
            raise ValueError(f"{len(batch['image_index'])} <|image_pad|> tokens for {features} image "
                             "features: the image processor and the tokenizer disagree")
    return batch


def cu_seqlens_bucket(n: int) -> int:
    """Static entry count of a packed batch's cu_seqlens for n boundaries: the next power of two (at least 8)."""
    return max(8, 1 << max(n - 1, 0).bit_length())


def collate_packed(sequences: Sequence[tuple[torch.Tensor, torch.Tensor]], pixel_values: Sequence[torch.Tensor],
                   grids: Sequence[torch.Tensor], spec: Spec, *, length: int, pad_labels: bool = True) -> Batch:
    """Several rows as ONE sequence [1, length]: rows back to back in the given order, then padding.

    Each row keeps the positions it has alone (M-RoPE restarts per row) and attends only within itself: the batch
    carries the rows' boundaries as `cu_seqlens` [cu_seqlens_bucket(rows + 2)] int32 (0, the end of each row, the
    end of the padding, then repeats of `length`: empty segments, so the shape is static) and `row_ids` [1, length]
    (the row of each position; the padding is one more row). The labels are as collate's over the flat positions
    (label_row: the row within this batch). No rows: a batch of padding only (no labels), for a rank that has
    fewer micro-batches than another.
    """
    total = sum(len(ids) for ids, _ in sequences)
    if total > length:
        raise ValueError(f"{len(sequences)} rows of {total} tokens do not fit a packed batch of {length}")
    input_ids = torch.full((1, length), spec.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros(1, length, dtype=torch.long)
    position_ids = torch.zeros(3, 1, length, dtype=torch.long)
    row_ids = torch.full((1, length), len(sequences), dtype=torch.long)
    bounds, label_index, label_ids, label_row = [0], [], [], []
    start = 0
    for r, ((ids, labels), grid) in enumerate(zip(sequences, grids)):
        n = len(ids)
        input_ids[0, start:start + n] = ids
        attention_mask[0, start:start + n] = 1
        row_ids[0, start:start + n] = r
        position_ids[:, 0, start:start + n] = mrope_position_ids(ids, grid, spec)
        pos = torch.nonzero(labels[1:] != -100).flatten() + 1
        label_index.append(start + pos - 1)
        label_ids.append(labels[pos])
        label_row.append(torch.full_like(pos, r))
        start += n
        bounds.append(start)
    bounds.append(length)
    entries = cu_seqlens_bucket(len(bounds))
    cu_seqlens = torch.tensor(bounds + [length] * (entries - len(bounds)), dtype=torch.int32)
    empty = torch.zeros(0, dtype=torch.long)
    batch = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "position_ids": position_ids,
        "row_ids": row_ids,
        "cu_seqlens": cu_seqlens,
        "label_index": torch.cat(label_index) if label_index else empty,
        "label_ids": torch.cat(label_ids) if label_ids else empty,
        "label_row": torch.cat(label_row) if label_row else empty,
    }
    return _finish(batch, pixel_values, grids, spec, pad_labels)


def collate_encoded_packed(examples: Sequence, spec: Spec, *, length: int, pad_labels: bool = True) -> Batch:
    """collate_packed over `Encoded` examples (data/encode.py): their target labels."""
    return collate_packed([(e.input_ids, e.labels) for e in examples], [e.pixel_values for e in examples],
                          [e.image_grid_thw for e in examples], spec, length=length, pad_labels=pad_labels)


def collate_encoded(examples: Sequence, spec: Spec, *, pad_multiple: int = 8,
                    length_buckets: Sequence[int] = (), pad_labels: bool = False) -> Batch:
    """Collate `Encoded` examples (data/encode.py) for training: the target labels of each example.

    For a compiled step pass `length_buckets` and `pad_labels=True` (static shapes, few compilations)."""
    return collate([(e.input_ids, e.labels) for e in examples], [e.pixel_values for e in examples],
                   [e.image_grid_thw for e in examples], spec, pad_multiple=pad_multiple,
                   length_buckets=length_buckets, pad_labels=pad_labels)


def collate_choices(examples: Sequence, spec: Spec, *, pad_multiple: int = 8) -> tuple[Batch, list[int]]:
    """One sequence per (example, choice): prompt + that choice's target, labelled on the target.

    Returns the batch and the number of choices of each example (rows are example-major), for choice scoring.
    """
    sequences, pixels, grids, counts = [], [], [], []
    for e in examples:
        prompt = e.input_ids[:e.prompt_length]
        for target in e.choice_targets:
            ids = torch.cat([prompt, target])
            labels = torch.cat([torch.full_like(prompt, -100), target])
            sequences.append((ids, labels))
            pixels.append(e.pixel_values)
            grids.append(e.image_grid_thw)
        counts.append(len(e.choice_targets))
    return collate(sequences, pixels, grids, spec, pad_multiple=pad_multiple), counts
