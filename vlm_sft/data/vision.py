"""Host-side precompute of everything data-dependent in a Qwen-VL forward (Qwen2.5-VL and Qwen3-VL).

The stock forwards derive mrope position ids, vision attention segments, the window permutation, the vision rotary
ids and (Qwen3-VL) the position-embedding interpolation from `image_grid_thw` with `.tolist()`,
`repeat_interleave` and Python loops: graph breaks and host syncs inside the step. All of it depends only on token
ids and image grids, so it is computed here, per example, in the data pipeline (DataLoader workers), and the
compiled step sees plain index tensors of static meaning. Each family has its spec (a picklable dataclass):
collate calls its `image_inputs(grid)` for the batch's images.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch

from vlm_sft.data.qwen3_vl_vision import position_embedding_interpolation


@dataclasses.dataclass(frozen=True)
class VisionSpec:
    """The handful of config numbers the precompute needs (picklable; no model object in workers)."""

    image_token_id: int
    spatial_merge_size: int
    patch_size: int
    window_size: int
    pad_token_id: int
    video_token_id: int = -1
    tokens_per_second: float = 0.0  # temporal rope positions per second of video (second_per_grid_ts scales it)
    video_frames_split = False      # each video frame group is its own block of positions (Qwen3-VL: True)

    @classmethod
    def from_config(cls, config: Any, pad_token_id: int) -> "VisionSpec":
        vc = config.vision_config
        return cls(
            image_token_id=int(config.image_token_id),
            spatial_merge_size=int(vc.spatial_merge_size),
            patch_size=int(vc.patch_size),
            window_size=int(vc.window_size),
            pad_token_id=int(pad_token_id),
            video_token_id=int(getattr(config, "video_token_id", -1)),
            tokens_per_second=float(getattr(vc, "tokens_per_second", 0) or 0),
        )

    def image_inputs(self, grid: torch.Tensor) -> dict[str, torch.Tensor]:
        """Vision indexing of a batch's images (grid [n, 3]): rotary ids, window permutation, segment layouts."""
        window_index, window_lengths = window_partition(grid, self)
        return {
            "vision_rotary_ids": vision_rotary_ids(grid, self),
            "window_index": window_index,
            "window_reverse": torch.argsort(window_index),
            **attention_layout(frame_lengths(grid), "full"),
            **attention_layout(window_lengths, "window"),
        }


@dataclasses.dataclass(frozen=True)
class Qwen3VLVisionSpec:
    """Qwen3-VL's precompute: no windows (every block attends within whole frames), and the learned position
    embeddings' bilinear interpolation (4 table rows and weights per patch) computed here, not in the step."""

    image_token_id: int
    spatial_merge_size: int
    patch_size: int
    num_grid_per_side: int
    pad_token_id: int
    video_token_id: int = -1
    tokens_per_second = 0.0
    # Qwen3-VL's get_rope_index splits a video into its frame groups (timestamp text between them): each group is
    # a block of positions with t = 0, like an image.
    video_frames_split = True

    @classmethod
    def from_config(cls, config: Any, pad_token_id: int) -> "Qwen3VLVisionSpec":
        vc = config.vision_config
        return cls(
            image_token_id=int(config.image_token_id),
            spatial_merge_size=int(vc.spatial_merge_size),
            patch_size=int(vc.patch_size),
            num_grid_per_side=int(vc.num_position_embeddings ** 0.5),
            pad_token_id=int(pad_token_id),
            video_token_id=int(getattr(config, "video_token_id", -1)),
        )

    def image_inputs(self, grid: torch.Tensor) -> dict[str, torch.Tensor]:
        """Rotary ids, position-embedding taps pos_embed_index/pos_embed_weight [P, 4], frame layout."""
        index, weight = position_embedding_interpolation(grid, self.num_grid_per_side, self.spatial_merge_size)
        return {
            "vision_rotary_ids": vision_rotary_ids(grid, self),
            "pos_embed_index": index.t().contiguous(),
            "pos_embed_weight": weight.t().contiguous().float(),
            **attention_layout(frame_lengths(grid), "full"),
        }


# A family's precompute: collate needs its image_token_id, spatial_merge_size, pad_token_id and image_inputs(grid).
Spec = VisionSpec | Qwen3VLVisionSpec


def frame_lengths(grid: torch.Tensor) -> list[int]:
    """Patches of every frame of every image (the segments of full attention), in batch order."""
    return (grid[:, 1] * grid[:, 2]).repeat_interleave(grid[:, 0]).tolist()


def _blocks(grids: torch.Tensor, seconds: torch.Tensor | None, spec: Spec, video: bool
            ) -> list[tuple[int, int, int, float]]:
    """(t, h, w, temporal step) of each contiguous block of vision tokens, in order: one per image; one per video
    (step tokens_per_second * second_per_grid_ts: Qwen2.5-VL), or one per video frame group (t = 1: Qwen3-VL)."""
    out = []
    for k, (t, h, w) in enumerate(grids.tolist()):
        if not video:
            out.append((t, h, w, 1.0))
        elif spec.video_frames_split:
            out += [(1, h, w, 1.0)] * t
        else:
            out.append((t, h, w, spec.tokens_per_second * float(seconds[k]) if seconds is not None else 1.0))
    return out


def mrope_position_ids(input_ids: torch.Tensor, grids: torch.Tensor, spec: Spec,
                       video_grids: torch.Tensor | None = None,
                       second_per_grid_ts: torch.Tensor | None = None) -> torch.Tensor:
    """[3, L] (temporal, height, width) rope positions for one sequence, as get_rope_index of Qwen2.5-VL and of
    Qwen3-VL (transformers 5), images (`grids`) and videos (`video_grids`, with second_per_grid_ts) alike.

    Text tokens advance all three axes together; a vision block gets its (t, h, w) grid offset by the position
    where it starts (a Qwen2.5-VL video's t scaled by tokens_per_second * second_per_grid_ts, truncated as the
    stock float32 product), and the text after it resumes at start + max(h, w) (merged grid units). Computed per
    row, so packed rows concatenate their own positions.
    """
    ids = input_ids.tolist()
    m = spec.spatial_merge_size
    out = torch.empty(3, len(ids), dtype=torch.long)
    kinds = {spec.image_token_id: ("image", "<|image_pad|>", len(grids), iter(_blocks(grids, None, spec, False)))}
    if video_grids is not None and len(video_grids):
        kinds[spec.video_token_id] = ("video", "<|video_pad|>", len(video_grids),
                                      iter(_blocks(video_grids, second_per_grid_ts, spec, True)))
    counts = dict.fromkeys(kinds, 0)
    cur, i = 0, 0
    while i < len(ids):
        if ids[i] not in kinds:
            out[:, i] = cur
            cur += 1
            i += 1
            continue
        token = ids[i]
        what, name, _, blocks = kinds[token]
        block = next(blocks, None)
        if block is None:
            raise ValueError(f"more {name} blocks in the sequence than {what}s")
        counts[token] += 1
        t, h, w, step = block
        gh, gw = h // m, w // m
        n = t * gh * gw
        if ids[i:i + n] != [token] * n:
            raise ValueError(f"{what} {counts[token] - 1}: expected {n} {name} tokens for grid {(t, h, w)}")
        temporal = (torch.arange(t) * torch.tensor(step, dtype=torch.float32)).long()
        tt, hh, ww = torch.meshgrid(temporal, torch.arange(gh), torch.arange(gw), indexing="ij")
        out[:, i:i + n] = torch.stack([tt.flatten(), hh.flatten(), ww.flatten()]) + cur
        cur += max(gh, gw)
        i += n
    for token, (what, name, total, blocks) in kinds.items():
        if next(blocks, None) is not None:
            raise ValueError(f"{total} {what}s but {counts[token]} {name} blocks in the sequence")
    return out


def vision_rotary_ids(grids: torch.Tensor, spec: Spec) -> torch.Tensor:
    """[P, 2] (row, col) patch coordinates in the processor's patch order (merge-block major)."""
    m = spec.spatial_merge_size
    parts = []
    for t, h, w in grids.tolist():
        hh, ww = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        shape = (h // m, m, w // m, m)
        hh = hh.reshape(shape).transpose(1, 2).flatten()
        ww = ww.reshape(shape).transpose(1, 2).flatten()
        parts.append(torch.stack([hh, ww], dim=-1).repeat(t, 1))
    return torch.cat(parts)


def window_partition(grids: torch.Tensor, spec: VisionSpec) -> tuple[torch.Tensor, list[int]]:
    """Window permutation of merged patches and the window lengths (in patches), as the vision tower's windowing.

    Returns (window_index [P / merge^2] long, window_lengths list of patch counts in permuted order).
    """
    m = spec.spatial_merge_size
    unit = m * m
    win = spec.window_size // m // spec.patch_size
    index, lengths, base = [], [], 0
    for t, h, w in grids.tolist():
        gh, gw = h // m, w // m
        grid = torch.arange(t * gh * gw).reshape(t, gh, gw)
        pad_h, pad_w = (-gh) % win, (-gw) % win
        padded = torch.nn.functional.pad(grid, (0, pad_w, 0, pad_h), value=-1)
        nh, nw = (gh + pad_h) // win, (gw + pad_w) // win
        blocks = padded.reshape(t, nh, win, nw, win).permute(0, 1, 3, 2, 4).reshape(t * nh * nw, win * win)
        for block in blocks:
            real = block[block >= 0]
            if len(real):
                index.append(real + base)
                lengths.append(len(real) * unit)
        base += t * gh * gw
    return torch.cat(index), lengths


def attention_layout(lengths: list[int], prefix: str) -> dict[str, torch.Tensor]:
    """Index tensors that turn packed attention over consecutive segments into one batched, padded attention.

    A block-diagonal [P, P] mask over every patch of the batch costs P^2 work where the segments need only
    sum(len^2) (~100x more for the windowed blocks of a 640x480 image). Instead the step gathers the segments
    into [n, max_len] rows (`gather`; pad slots point at patch 0), masks the pad keys (`mask`, True = real) and
    gathers the real rows back (`scatter`: flat row*max_len+slot of each patch). `cu_seqlens` [n + 1] int32 is
    the same layout for varlen flash attention. Pad queries see real keys only, so nothing is NaN, and their
    outputs are dropped, so the result equals per-segment attention exactly.
    """
    if not lengths or min(lengths) <= 0:
        raise ValueError(f"attention segments must be non-empty, got lengths {lengths}")
    width = max(lengths)
    n = torch.tensor(lengths)
    starts = torch.cumsum(n, 0) - n
    slot = torch.arange(width)
    mask = slot[None, :] < n[:, None]
    gather = torch.where(mask, starts[:, None] + slot[None, :], 0)
    scatter = torch.nonzero(mask.flatten()).flatten()
    cu_seqlens = torch.cat([torch.zeros(1, dtype=torch.int32), torch.cumsum(n, 0).to(torch.int32)])
    return {f"{prefix}_gather": gather, f"{prefix}_mask": mask, f"{prefix}_scatter": scatter,
            f"{prefix}_cu_seqlens": cu_seqlens}
