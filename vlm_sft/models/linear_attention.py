"""Gated DeltaNet's two sequence ops (Qwen3.5's linear-attention layers): a short causal depthwise conv, then the
chunked gated delta rule. On CUDA the flash-linear-attention (`fla-core`: the delta rule and a triton conv) and, when
installed, `causal-conv1d`'s conv kernel (`pip install -e '.[gpu]'`); everywhere else torch code equal to transformers' own torch fallback
(`torch_chunk_gated_delta_rule`, `causal_conv1d_fn` in models/qwen3_5; tests/test_qwen3_5_model.py holds them equal).

Packing: `cu_seqlens` [n + 1] (int32, cumulative lengths over the single row of a packed [1, T] batch, as the
kernels take it) marks where sequences start; the conv window and the recurrent state restart there, so a packed
row equals its sequences run one at a time. Without it every batch row is one sequence; right padding cannot leak
into real positions (both ops are causal).
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import torch
import torch.nn.functional as F

CHUNK = 64  # transformers' and fla's chunk size


@functools.cache
def _fla_chunk_gated_delta_rule() -> Callable[..., Any] | None:
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    except Exception:  # not installed, or no triton/CUDA build: the torch path
        return None
    return chunk_gated_delta_rule


@functools.cache
def _causal_conv1d_fn() -> Callable[..., Any] | None:
    """The conv kernel as (x [B, L, D], weight [D, W], cu_seqlens) -> silu(conv) [B, L, D]: the causal-conv1d
    package's CUDA kernel, else fla's triton one (fla-core ships it: pure-Python wheels), else None."""
    try:
        from causal_conv1d import causal_conv1d_fn
    except Exception:
        causal_conv1d_fn = None
    if causal_conv1d_fn is not None:
        def conv(x: torch.Tensor, weight: torch.Tensor, cu_seqlens: torch.Tensor | None) -> torch.Tensor:
            seq_idx = None if cu_seqlens is None else _segment_ids(cu_seqlens, x.shape[1])[None]
            # channel-last view (stride 1 over D), which the kernel needs with seq_idx
            return causal_conv1d_fn(x.transpose(1, 2), weight, None, seq_idx=seq_idx,
                                    activation="silu").transpose(1, 2)
        return conv
    try:
        from fla.modules.conv import causal_conv1d as fla_conv
    except Exception:
        return None

    def conv(x: torch.Tensor, weight: torch.Tensor, cu_seqlens: torch.Tensor | None) -> torch.Tensor:
        return fla_conv(x, weight, activation="silu",
                        cu_seqlens=None if cu_seqlens is None else cu_seqlens.long())[0]
    return conv


def kernel_path(device: torch.device) -> dict[str, bool]:
    """Which op runs as a CUDA kernel on `device` ({"conv": ..., "delta_rule": ...}); False: the torch path."""
    cuda = torch.device(device).type == "cuda"
    return {"conv": cuda and _causal_conv1d_fn() is not None,
            "delta_rule": cuda and _fla_chunk_gated_delta_rule() is not None}


def _segment_ids(cu_seqlens: torch.Tensor, length: int) -> torch.Tensor:
    """[T] int32: the index of the sequence each position of a packed row belongs to (positions past the last
    boundary, padding, count as the last sequence)."""
    positions = torch.arange(length, device=cu_seqlens.device)
    ids = torch.searchsorted(cu_seqlens[1:].contiguous(), positions, right=True)
    return ids.clamp(max=cu_seqlens.shape[0] - 2).to(torch.int32)


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """silu(causal depthwise conv) of x [B, L, D] with weight [D, W] (no bias) -> [B, L, D], in x's dtype."""
    fn = _causal_conv1d_fn() if x.is_cuda else None
    if fn is not None:
        return fn(x, weight, cu_seqlens)
    if cu_seqlens is None:
        out = F.conv1d(x.transpose(1, 2).to(weight.dtype), weight.unsqueeze(1), padding=weight.shape[-1] - 1,
                       groups=x.shape[-1])[:, :, :x.shape[1]]
        return F.silu(out).to(x.dtype).transpose(1, 2)
    # Packed: tap k looks back W-1-k positions; a look-back past the start of the position's sequence reads 0.
    width, length = weight.shape[-1], x.shape[1]
    starts = cu_seqlens[:-1].long()[_segment_ids(cu_seqlens, length).long()]
    offset = torch.arange(length, device=x.device) - starts          # position within its sequence
    xw = x.to(weight.dtype)
    out = torch.zeros_like(xw)
    for k in range(width):
        lag = width - 1 - k
        shifted = F.pad(xw, (0, 0, lag, 0))[:, :length]
        out = out + shifted * (offset >= lag)[None, :, None].to(xw.dtype) * weight[:, k]
    return F.silu(out).to(x.dtype)


def _l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + eps)


def _chunk_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor
                ) -> torch.Tensor:
    """The gated delta rule, chunked (the WY/UT form), fp32, on [B, H, L, d] (q, k already normalised and q
    scaled; g, beta [B, H, L]). Within a chunk: a unit lower-triangular solve; across chunks: a scan carrying
    the [dk, dv] state. The same arithmetic as transformers' torch_chunk_gated_delta_rule."""
    b, h, length, dk = k.shape
    dv = v.shape[-1]
    pad = (CHUNK - length % CHUNK) % CHUNK
    q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
    beta, g = (F.pad(t, (0, pad)) for t in (beta, g))
    n = (length + pad) // CHUNK
    v_beta, k_beta = v * beta[..., None], k * beta[..., None]
    q, k, k_beta, v_beta = (t.reshape(b, h, n, CHUNK, t.shape[-1]) for t in (q, k, k_beta, v_beta))
    g = g.reshape(b, h, n, CHUNK).cumsum(dim=-1)                        # log decay from the chunk start
    upper = torch.ones(CHUNK, CHUNK, dtype=torch.bool, device=q.device).triu(1)
    decay = (g[..., :, None] - g[..., None, :]).masked_fill(upper, float("-inf")).exp()
    system = (k_beta @ k.transpose(-1, -2)) * decay
    intra = (q @ k.transpose(-1, -2)) * decay
    values = torch.linalg.solve_triangular(system, v_beta, upper=False, unitriangular=True)
    k_decayed = torch.linalg.solve_triangular(system, k_beta * g.exp()[..., None], upper=False,
                                              unitriangular=True)
    q = q * g.exp()[..., None]
    k = k * (g[..., -1:] - g).exp()[..., None]
    chunk_decay = g[..., -1].exp()[..., None, None]
    state = q.new_zeros(b, h, dk, dv)
    out = []
    for i in range(n):
        v_new = values[:, :, i] - k_decayed[:, :, i] @ state
        out.append(q[:, :, i] @ state + intra[:, :, i] @ v_new)
        state = state * chunk_decay[:, :, i] + k[:, :, i].transpose(-1, -2) @ v_new
    return torch.stack(out, dim=2).reshape(b, h, n * CHUNK, dv)[:, :, :length]


def gated_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                     cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """Gated delta rule with q/k L2-normalised in the kernel and q scaled by dk^-1/2 (Qwen3.5's use).

    q, k [B, L, Hk, dk]; v [B, L, Hv, dv]; g (log decay, <= 0), beta [B, L, Hv]. Each key head serves Hv / Hk
    consecutive value heads. Returns [B, L, Hv, dv] in v's dtype."""
    heads = v.shape[2]
    if k.shape[2] != heads:  # grouped value heads: every kernel version takes equal head counts
        q, k = (t.repeat_interleave(heads // t.shape[2], dim=2) for t in (q, k))
    fn = _fla_chunk_gated_delta_rule() if q.is_cuda else None
    if fn is not None:
        out, _ = fn(q, k, v, g=g, beta=beta, cu_seqlens=None if cu_seqlens is None else cu_seqlens.long(),
                    use_qk_l2norm_in_kernel=True)
        return out
    if cu_seqlens is not None:  # the reference path: one sequence at a time (host-side lengths)
        bounds = cu_seqlens.tolist()  # trailing repeats (a static entry count) are empty sequences: skipped
        return torch.cat([gated_delta_rule(*(t[:, s:e] for t in (q, k, v, g, beta)))
                          for s, e in zip(bounds[:-1], bounds[1:]) if e > s], dim=1)
    dtype = v.dtype
    q, k, v, beta, g = (t.transpose(1, 2).float().contiguous() for t in (q, k, v, beta, g))
    q, k = _l2norm(q), _l2norm(k)
    q = q * q.shape[-1] ** -0.5
    return _chunk_rule(q, k, v, g, beta).transpose(1, 2).contiguous().to(dtype)
