"""Attention within the segments of a packed sequence (text rows, vision windows and images), every family's.

On CUDA in half precision: torch's varlen flash kernel over cu_seqlens. Elsewhere: the segments gathered into
padded rows [segments, longest] and one batched sdpa (segments * longest^2 work, not the T^2 of a block-diagonal
mask). A packed text batch's layout depends on its cu_seqlens' values, which a static-shaped compiled region cannot
trace, so that path is a custom op that reads the bounds when it runs (free on CPU).

On CPU the op saves the forward's logsumexp and calls the CPU flash backward directly (no recomputed forward), and
computes in fp32 when the step computes in bf16/fp16: torch 2.13's CPU flash backward is ~9x slower in bf16 than in
fp32 (bench/attention_cpu.py), with or without bf16 instructions. Other devices (CUDA fp32) differentiate the op by
recomputing its forward under torch.func.vjp.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from vlm_sft.data.vision import attention_layout

try:  # torch >= 2.10: flash attention over packed variable-length sequences (CUDA, bf16/fp16)
    from torch.nn.attention.varlen import varlen_attn
except ImportError:  # pragma: no cover - older torch: the reference path everywhere
    varlen_attn = None


def attention_impl(device: torch.device, dtype: torch.dtype) -> str:
    """How attention over packed segments runs: "varlen" (torch's flash kernel over cu_seqlens: CUDA, half
    precision) or "reference" (reference_segment_attention: sdpa per segment, exact on any device; the tests hold
    the two equal)."""
    if varlen_attn is not None and device.type == "cuda" and dtype in (torch.bfloat16, torch.float16):
        return "varlen"
    return "reference"


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype attention off the flash path (and the vocabulary head, common._lm_head) computes in: fp32 for half
    precision on CPU (torch's CPU flash backward is 5-9x slower in bf16), the input's own dtype elsewhere.
    Attention rounds its output back to the input's dtype."""
    if x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16):
        return torch.float32
    return x.dtype


def segment_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                      max_len: int, *, causal: bool, scale: float | None = None, impl: str = "varlen"
                      ) -> torch.Tensor:
    """Attention of packed q [T, heads, d], k/v [T, kv_heads, d] within the segments cu_seqlens [n + 1] (int32,
    from 0 to T; trailing repeats are empty segments). impl "varlen": torch's flash kernel; `max_len` bounds the
    longest segment (an upper bound is exact, so a static one, the budget, keeps compiled shapes from changing
    every step). impl "reference": reference_segment_attention (max_len unused)."""
    if impl == "reference":
        return reference_segment_attention(q, k, v, cu_seqlens, causal, scale)
    return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_len, max_len, scale=scale,
                       window_size=(-1, 0) if causal else (-1, -1), enable_gqa=q.shape[1] != k.shape[1])


def reference_segment_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                                causal: bool, scale: float | None) -> torch.Tensor:
    """segment_attention without the flash kernel, as one op to torch.compile (see the module docstring): on CPU
    the op that keeps its logsumexp for a direct backward, elsewhere the one that recomputes its forward."""
    if q.device.type == "cpu":
        return cpu_segment_attention(q, k, v, cu_seqlens, causal, scale)[0]
    return recomputed_segment_attention(q, k, v, cu_seqlens, causal, scale)


def _to_rows(z: torch.Tensor, gather: torch.Tensor, groups: int, dtype: torch.dtype) -> torch.Tensor:
    """Packed z [T, heads, ...] as padded rows [n, heads * groups, max_len, ...] (GQA's kv heads repeated)."""
    rows = z[gather].transpose(1, 2)
    return (rows.repeat_interleave(groups, 1) if groups > 1 else rows).to(dtype)


def _from_rows(rows: torch.Tensor, scatter: torch.Tensor) -> torch.Tensor:
    """Padded rows [n, heads, max_len, ...] back to the packed [T, heads, ...], pad slots dropped."""
    return rows.transpose(1, 2).flatten(0, 1)[scatter]


def gathered_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gather: torch.Tensor, mask: torch.Tensor,
                       scatter: torch.Tensor, *, causal: bool, scale: float | None = None) -> torch.Tensor:
    """Attention within segments of packed q [T, heads, d], k/v [T, kv_heads, d] by one batched sdpa over the
    segments gathered into padded rows (data/vision.py attention_layout: gather [n, max_len], mask, scatter): the
    work is n * max_len^2, not the T^2 of one sdpa under a block-diagonal mask. Each segment starts at slot 0 of
    its row, so causal attention never reaches a pad slot; non-causal masks the pad keys. Pad queries see real
    keys only and their outputs are dropped (no gradient), so the result equals per-segment attention exactly."""
    work, groups = compute_dtype(q), q.shape[1] // k.shape[1]
    qs, ks, vs = _to_rows(q, gather, 1, work), _to_rows(k, gather, groups, work), _to_rows(v, gather, groups, work)
    out = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=None if causal else mask[:, None, None, :],
                                         is_causal=causal, scale=scale)
    return _from_rows(out, scatter).to(q.dtype)


def _segment_layout(cu_seqlens: torch.Tensor, t: int, device: torch.device
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """attention_layout's (gather, mask, scatter) for the non-empty segments of cu_seqlens, read on the host."""
    bounds = cu_seqlens.tolist()  # host-side bounds: free on CPU; a sync on CUDA, whose half precision is varlen
    if bounds[0] != 0 or bounds[-1] != t:
        raise ValueError(f"cu_seqlens must run from 0 to the {t} packed positions, got {bounds[0]}..{bounds[-1]}")
    layout = attention_layout([b - a for a, b in zip(bounds, bounds[1:]) if b > a], "s")
    return tuple(layout[f"s_{key}"].to(device) for key in ("gather", "mask", "scatter"))


# --- CPU: the forward keeps its logsumexp; the backward is the CPU flash kernel's, called directly. ---

def _pad_key_bias(mask: torch.Tensor, causal: bool, dtype: torch.dtype) -> torch.Tensor | None:
    """Non-causal rows mask their pad keys (an additive [n, 1, 1, max_len] bias); causal rows never reach them."""
    if causal:
        return None
    return torch.zeros(mask.shape, dtype=dtype).masked_fill_(~mask, float("-inf"))[:, None, None, :]


@torch.library.custom_op("vlm_sft::cpu_segment_attention", mutates_args=(), device_types="cpu")
def cpu_segment_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                          causal: bool, scale: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-segment attention of packed q [T, heads, d], k/v [T, kv_heads, d] and its logsumexp [T, heads] (in the
    compute dtype), which the backward needs instead of a recomputed forward."""
    gather, mask, scatter = _segment_layout(cu_seqlens, q.shape[0], q.device)
    work, groups = compute_dtype(q), q.shape[1] // k.shape[1]
    qs, ks, vs = _to_rows(q, gather, 1, work), _to_rows(k, gather, groups, work), _to_rows(v, gather, groups, work)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        qs, ks, vs, 0.0, causal, attn_mask=_pad_key_bias(mask, causal, work), scale=scale)
    return _from_rows(out, scatter).to(q.dtype).contiguous(), _from_rows(lse, scatter).contiguous()


@cpu_segment_attention.register_fake
def _(q, k, v, cu_seqlens, causal, scale):
    return q.new_empty(q.shape), q.new_empty(q.shape[:2], dtype=compute_dtype(q))


@torch.library.custom_op("vlm_sft::cpu_segment_attention_backward", mutates_args=(), device_types="cpu")
def _cpu_segment_attention_backward(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                    out: torch.Tensor, lse: torch.Tensor, cu_seqlens: torch.Tensor, causal: bool,
                                    scale: float | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q/k/v gradients of cpu_segment_attention by the CPU flash backward over the same padded rows. Pad queries
    get an infinite logsumexp: their attention weights exp(s - lse) are 0, so they add nothing to any key's
    gradient whatever output gradient their slot holds; GQA's repeated kv heads sum their gradients back."""
    gather, mask, scatter = _segment_layout(cu_seqlens, q.shape[0], q.device)
    work, kv_heads = compute_dtype(q), k.shape[1]
    groups = q.shape[1] // kv_heads
    qs, ks, vs = _to_rows(q, gather, 1, work), _to_rows(k, gather, groups, work), _to_rows(v, gather, groups, work)
    lses = lse[gather].transpose(1, 2).masked_fill(~mask[:, None, :], float("inf"))     # [n, heads, max_len]
    dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        _to_rows(grad, gather, 1, work), qs, ks, vs, _to_rows(out, gather, 1, work), lses, 0.0, causal,
        attn_mask=_pad_key_bias(mask, causal, work), scale=scale)
    dk, dv = (_from_rows(z, scatter).unflatten(1, (kv_heads, groups)).sum(2) for z in (dk, dv))
    return (_from_rows(dq, scatter).to(q.dtype).contiguous(), dk.to(k.dtype).contiguous(),
            dv.to(v.dtype).contiguous())


@_cpu_segment_attention_backward.register_fake
def _(grad, q, k, v, out, lse, cu_seqlens, causal, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _save_cpu_segment_attention(ctx: Any, inputs: tuple, output: tuple) -> None:
    q, k, v, cu_seqlens, ctx.causal, ctx.scale = inputs
    ctx.save_for_backward(q, k, v, *output, cu_seqlens)


def _cpu_segment_attention_grads(ctx: Any, grad: torch.Tensor, _lse_grad: Any) -> tuple:
    q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
    return (*_cpu_segment_attention_backward(grad, q, k, v, out, lse, cu_seqlens, ctx.causal, ctx.scale),
            None, None, None)


cpu_segment_attention.register_autograd(_cpu_segment_attention_grads, setup_context=_save_cpu_segment_attention)


# --- Other devices: the backward recomputes the forward under torch.func.vjp. ---

def _padded_segment_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                              causal: bool, scale: float | None) -> torch.Tensor:
    gather, mask, scatter = _segment_layout(cu_seqlens, q.shape[0], q.device)
    return gathered_attention(q, k, v, gather, mask, scatter, causal=causal, scale=scale).contiguous()


@torch.library.custom_op("vlm_sft::reference_segment_attention", mutates_args=())
def recomputed_segment_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                                 causal: bool, scale: float | None) -> torch.Tensor:
    """Per-segment attention of packed q/k/v on any device (gathered_attention over cu_seqlens' segments)."""
    return _padded_segment_attention(q, k, v, cu_seqlens, causal, scale)


@recomputed_segment_attention.register_fake
def _(q, k, v, cu_seqlens, causal, scale):
    return q.new_empty(q.shape)


@torch.library.custom_op("vlm_sft::reference_segment_attention_backward", mutates_args=())
def _recomputed_segment_attention_backward(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                           cu_seqlens: torch.Tensor, causal: bool, scale: float | None
                                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients of recomputed_segment_attention: its forward recomputed under torch.func.vjp (an op's body
    runs below autograd, where plain backward records nothing; functorch's transform records its own)."""
    _, vjp = torch.func.vjp(lambda *qkv: _padded_segment_attention(*qkv, cu_seqlens, causal, scale), q, k, v)
    return tuple(g.contiguous() for g in vjp(grad))


@_recomputed_segment_attention_backward.register_fake
def _(grad, q, k, v, cu_seqlens, causal, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _save_segment_inputs(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
    q, k, v, cu_seqlens, ctx.causal, ctx.scale = inputs
    ctx.save_for_backward(q, k, v, cu_seqlens)


def _recomputed_segment_attention_grads(ctx: Any, grad: torch.Tensor) -> tuple:
    q, k, v, cu_seqlens = ctx.saved_tensors
    return (*_recomputed_segment_attention_backward(grad, q, k, v, cu_seqlens, ctx.causal, ctx.scale),
            None, None, None)


recomputed_segment_attention.register_autograd(_recomputed_segment_attention_grads,
                                               setup_context=_save_segment_inputs)
