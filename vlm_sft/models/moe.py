"""Sparse mixture-of-experts MLP as a function of stacked expert tensors: top-k routing, tokens sorted by expert,
one grouped GEMM per projection, and the router statistics the load-balancing loss needs.

Experts are stacked as transformers 5 holds them: `gate_up` [E, 2I, H] (gate rows first, then up) and `down`
[E, H, I]. The token -> expert assignment is data-dependent, so nothing here asks the host for it: the top-k
expert ids are sorted on the device (a stable argsort), the per-expert counts are a scatter-add into E bins and
their cumulative sum is the group boundaries `offs` that `torch._grouped_mm` takes. No `.item()`, no `nonzero`, no
Python loop over experts: the shapes of every tensor are fixed by (tokens, top_k), so a block compiles once.

Grouped GEMM (`grouped_mm`): bf16 inputs go to `torch._grouped_mm` itself (the CUDA grouped kernel on GPUs that
have it; inductor traces it). Its meta function accepts bf16 only, so any other dtype (the fp32 CPU tests and
demo) goes through a custom op whose kernel is the same `torch._grouped_mm` called eagerly (its fallback computes
each group with a plain matmul: exact), opaque to the compiler, with the grouped products of its backward.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

__all__ = ["grouped_mm", "route", "experts", "sparse_moe", "load_balancing_loss", "max_expert_load"]


@torch.library.custom_op("vlm_sft::grouped_mm", mutates_args=())
def _grouped_mm_any_dtype(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    return torch._grouped_mm(a, b, offs=offs)


@_grouped_mm_any_dtype.register_fake
def _(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    if b.dim() == 3:                                  # [N, K] x [E, K, M] -> [N, M]
        return a.new_empty(a.shape[0], b.shape[-1])
    return a.new_empty(offs.shape[0], a.shape[0], b.shape[-1])   # [K, N] x [N, M] -> [E, K, M]


def _setup(ctx, inputs, output) -> None:
    a, b, offs = inputs
    ctx.save_for_backward(a, b, offs)


def _backward(ctx, grad: torch.Tensor):
    a, b, offs = ctx.saved_tensors
    grad = grad.contiguous()  # an expanded gradient (of a sum) has zero strides, which the kernel refuses
    if b.dim() == 3:  # out[n] = a[n] @ b[e(n)]
        grad_a = _grouped_mm_any_dtype(grad, b.transpose(-2, -1), offs)
        grad_b = _grouped_mm_any_dtype(a.transpose(0, 1), grad, offs)
        return grad_a, grad_b, None
    raise NotImplementedError("grouped_mm: backward of the [K, N] x [N, M] form is not needed")


_grouped_mm_any_dtype.register_autograd(_backward, setup_context=_setup)


def grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """a [N, K] rows grouped by expert (group e = rows offs[e-1]:offs[e]) times b [E, K, M] -> [N, M]."""
    if a.dtype == torch.bfloat16 and b.dtype == torch.bfloat16:
        return torch._grouped_mm(a, b, offs=offs)
    return _grouped_mm_any_dtype(a, b, offs)


def route(x: torch.Tensor, gate_weight: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Router logits [T, E], normalised top-k weights [T, k] (in the logits' dtype) and expert ids [T, k]: softmax
    in fp32, top-k, renormalised to sum 1 (Qwen3-MoE's routing)."""
    logits = F.linear(x, gate_weight)
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    weights = weights / weights.sum(dim=-1, keepdim=True)
    return logits, weights.to(logits.dtype), ids


def expert_counts(ids: torch.Tensor, num_experts: int, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Assignments per expert [E] (weighted per assignment when `weight` [T*k] is given), on the device."""
    flat = ids.reshape(-1)
    w = torch.ones_like(flat) if weight is None else weight
    return torch.zeros(num_experts, dtype=w.dtype, device=flat.device).scatter_add(0, flat, w)


def experts(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
            act: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """sum_j weights[t, j] * expert_{ids[t, j]}(x[t]) for every token x [T, H]: the T * k assignments sorted by
    expert, two grouped GEMMs, and the weighted results added back to their tokens."""
    top_k = ids.shape[-1]
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)                         # assignments grouped by expert
    token = order // top_k
    offs = torch.cumsum(expert_counts(flat, gate_up.shape[0]), 0).to(torch.int32)
    h = grouped_mm(x[token], gate_up.transpose(1, 2), offs)          # [T*k, 2I]
    gate, up = h.chunk(2, dim=-1)
    y = grouped_mm(act(gate) * up, down.transpose(1, 2), offs)        # [T*k, H]
    y = y * weights.reshape(-1)[order, None]
    return torch.zeros_like(x).index_add(0, token, y.to(x.dtype))


def sparse_moe(x: torch.Tensor, gate_weight: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, top_k: int,
               act: Callable[[torch.Tensor], torch.Tensor], mask: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """The MoE MLP on x [..., H] -> (output like x, router stats [2, E]).

    Stats (for the load-balancing loss, summed over layers by the caller): row 0 the top-k assignments per expert
    and row 1 the router probabilities summed per expert, both over the real tokens (`mask`, x's leading shape,
    1 for real tokens, 0 for padding), as transformers' load_balancing_loss_func counts them with an attention mask.
    """
    shape = x.shape
    flat_x = x.reshape(-1, shape[-1])
    logits, weights, ids = route(flat_x, gate_weight, top_k)
    out = experts(flat_x, ids, weights, gate_up, down, act).view(shape)
    m = mask.reshape(-1).to(torch.float32)
    counts = expert_counts(ids, gate_weight.shape[0], m.repeat_interleave(top_k))
    probs = (torch.softmax(logits, dim=-1).float() * m[:, None]).sum(0)
    return out, torch.stack([counts, probs])


def load_balancing_loss(stats: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Switch-Transformer load-balancing loss as transformers defines it: E * sum_e f_e * P_e, where f_e is the
    share of top-k assignments and P_e the mean router probability of expert e, both over every MoE layer's real
    tokens. `stats` [2, E]: sparse_moe's stats summed over the layers; `rows`: real tokens x MoE layers."""
    num_experts = stats.shape[-1]
    return num_experts * torch.sum((stats[0] / rows) * (stats[1] / rows))


def max_expert_load(counts: torch.Tensor) -> torch.Tensor:
    """The busiest expert's share over the mean share, per layer (counts [..., E]): 1 is perfectly even, E means
    every assignment went to one expert."""
    return counts.amax(-1) / counts.mean(-1).clamp_min(1e-9)
