"""Host-side precompute for Qwen3-VL's vision tower: position-embedding interpolation taps and rotary ids.

Qwen3-VL learns a square grid of position embeddings (the 4B: 48 x 48) and bilinearly resamples it to each image's
patch grid (align_corners=True). The stock tower computes the taps from `image_grid_thw` with `.tolist()` and Python
loops inside the forward; they depend only on the grids, so they are computed here with the rest of a batch's vision
indexing, and the step does one embedding gather and a weighted sum of four rows per patch.

Patch order is the processor's: per frame, 2x2 (merge x merge) blocks in raster order, raster order inside a block;
frames of one image repeat the same positions. Everything is plain torch on the CPU, no model object.
"""
from __future__ import annotations

import torch


def _check_grids(grids: torch.Tensor, merge: int) -> list[list[int]]:
    if grids.ndim != 2 or grids.shape[1] != 3:
        raise ValueError(f"image grids must be [n, 3] (t, h, w), got shape {tuple(grids.shape)}")
    rows = grids.tolist()
    for t, h, w in rows:
        if t < 1 or h < merge or w < merge or h % merge or w % merge:
            raise ValueError(f"image grid {(t, h, w)}: h and w must be positive multiples of the merge size {merge}")
    return rows


def vision_rotary_ids(grids: torch.Tensor, merge: int) -> torch.Tensor:
    """[P, 2] long (row, col) of every patch in the processor's patch order: the positions the vision rotary
    embedding rotates by (transformers' `get_vision_position_ids`, Qwen3-VL's `rot_pos_emb`)."""
    parts = []
    for t, h, w in _check_grids(grids, merge):
        rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        blocks = (h // merge, merge, w // merge, merge)
        rows = rows.reshape(blocks).transpose(1, 2).flatten()
        cols = cols.reshape(blocks).transpose(1, 2).flatten()
        parts.append(torch.stack([rows, cols], dim=-1).repeat(t, 1))
    if not parts:
        return torch.zeros(0, 2, dtype=torch.long)
    return torch.cat(parts)


def _axis_taps(position: torch.Tensor, size: torch.Tensor, side: int
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Bilinear taps (lower, upper table index) and the upper tap's weight along one axis, align_corners=True:
    patch `position` of `size` maps to `position * (side - 1) / (size - 1)` on the learned grid."""
    source = position.to(torch.float32) * (side - 1) / torch.clamp(size - 1, min=1)
    lower = torch.floor(source)
    frac = source - lower
    lower = lower.long()
    upper = torch.clamp(lower + 1, max=side - 1)
    return lower, upper, frac


def position_embedding_interpolation(grids: torch.Tensor, num_grid_per_side: int, merge: int
                                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of the flattened learned position table and their bilinear weights, for every patch of `grids`.

    grids: [n, 3] long (t, h, w) in patches; num_grid_per_side: sqrt(num_position_embeddings); merge: the spatial
    merge size. Returns (index [4, P] long, weight [4, P] float32); patch p's position embedding is
    `sum_k weight[k, p] * table[index[k, p]]`, taps ordered (top-left, top-right, bottom-left, bottom-right), equal
    to the stock tower's `fast_pos_embed_interpolate` (transformers 5: get_vision_interpolation_indices_and_weights,
    bilinear, align_corners=True, transposed).
    """
    side = int(num_grid_per_side)
    if side < 1:
        raise ValueError(f"num_grid_per_side={num_grid_per_side}: must be >= 1")
    coords = vision_rotary_ids(grids, merge)
    per_patch = (grids[:, 0] * grids[:, 1] * grids[:, 2]).long()
    heights = torch.repeat_interleave(grids[:, 1].long(), per_patch)
    widths = torch.repeat_interleave(grids[:, 2].long(), per_patch)
    top, bottom, dh = _axis_taps(coords[:, 0], heights, side)
    left, right, dw = _axis_taps(coords[:, 1], widths, side)
    index = torch.stack([top * side + left, top * side + right, bottom * side + left, bottom * side + right])
    weight = torch.stack([(1 - dh) * (1 - dw), (1 - dh) * dw, dh * (1 - dw), dh * dw])
    return index, weight
